"""The compendium's library: the notebooks call into it for all real work.

Modules (one concern each; dependencies point down this list's lower layers, never back up):

- ``paths``, ``utils``, ``results``, ``plots``: where things go, seeding and devices, results
  files and atomic writes, figures.
- ``models``: load a toy, local or hub model as a TransformerBridge (device and dtype chosen here).
- ``hooks``: hook names, built, parsed and checked in one place.
- ``world/``: the toy world (facts, corpus, toy LMs).  ``datasets/``: truth and XOR datasets as CSVs.
- ``activations``: the one code path that runs a model to read activations (tokenize, harvest,
  cache).  ``interventions``: add a direction at a hook.  ``probes``: linear probes and the splitter.
- ``truth``, ``xor``: the protocols of notebooks 01 and 02.
- ``sae/``: sparse autoencoders (architectures, training sources, trainer, metrics, I/O, ITO,
  attribution, the setup recipe of notebooks 03-06).
- ``toys/``: small synthetic models (compressed computation, XOR clusters, sequence languages and
  the capability-decay protocol of notebook 10).
- ``softprompts``, ``finetune``: soft prompts, and fine-tuning (every weight, or LoRA adapters
  through peft, with optional data mixing) on the same (prompt, target) rows.
- ``ftbias``: notebook 12's fine-tuning bias read through SAE latents.
- ``rerouting``: notebook 13's harmful-request task, the assistant, and the three defenses (probe,
  LoRA + head, representation rerouting) with their detection scores.
- ``rerouting_attack``: soft-prompt attacks on those defenses (white-box, k tokens, AUROC after attack).
- ``backdoor``: notebook 14's backdoored toy models (poisoned fine-tunes, clean controls) and their
  persistence under clean training.  ``elicitation``: eliciting a behaviour without its trigger (soft
  prompt, latent PGD, GCG over real tokens) at matched budgets, and the trigger direction.
- ``run``: the headless runner (``python -m lib.run``).

Import what you need, e.g. ``from lib.models import load_model``.
"""
import warnings

# tqdm.auto (imported by transformers and others) warns in a kernel without ipywidgets; the
# library's bars are plain text bars (lib.utils.progress), so the warning is noise in every notebook.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
