"""How ``make test`` checks the notebooks, on top of nbval (``pytest notebooks --nbval-lax``).

* nbval runs every code cell of a notebook in one kernel and compares the output of cells marked
  ``# NBVAL_CHECK_OUTPUT`` as text: keep that mark for output that is exact by construction
  (counts, shapes, dataset sizes, text samples), never for rounded floats.
* After the last cell, one more test item, ``notebooks/NN_name.ipynb::results``, compares the
  results the run just wrote (``$COMPENDIUM_ROOT/data/results/NN_name.json``) with the committed
  ``data/results/NN_name.json``, value by value, within the tolerances declared in
  ``notebooks/NN_name.check.toml`` (see :mod:`lib.results`).  It runs in the same worker as the
  notebook's cells: with ``pytest-xdist --dist loadfile`` a notebook is one unit of work.
* For each notebook that takes a model (``lib.run.MODEL_PARAMETER``), three more items,
  ``NN_name.ipynb::family[gpt2]`` / ``[neox]`` / ``[llama]``, run it headless on the ``smoke`` profile
  with the model set to a tiny random stand-in of that family (``tests.tiny_models.build_standin``:
  the toy world's tokenizer with GPT-2's, Pythia's or Llama's special tokens) and check that it runs
  through and writes its results file: the promise that a notebook runs on a real model by changing
  ``model`` (the numbers of a random model are noise and are not compared).
* At the end, a table gives each notebook's wall time (kernel start and every cell) beside its
  budget (``budget_s`` in the same file), and the family runs' times.

Without ``COMPENDIUM_ROOT`` the notebooks would write into the checkout, over the committed
results; this plugin then points it at a scratch folder for the session.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from lib import paths
from lib.results import ResultsCheckError, check_file_for, check_notebook_results, load_check

RESULTS_ITEM = "results"
FAMILIES = ("gpt2", "neox", "llama")


def _nbval_on(config) -> bool:
    return bool(config.getoption("nbval", False) or config.getoption("nbval_lax", False))


def pytest_configure(config):
    if not _nbval_on(config):
        return
    if not os.environ.get("COMPENDIUM_ROOT"):
        scratch = tempfile.mkdtemp(prefix="compendium-test-")
        os.environ["COMPENDIUM_ROOT"] = scratch
        config.stash[_SCRATCH] = scratch
    os.environ.setdefault("COMPENDIUM_QUIET", "1")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) reports times
        config.pluginmanager.register(NotebookTimes(config), "compendium-notebook-times")


_SCRATCH = pytest.StashKey[str]()


def pytest_unconfigure(config):
    scratch = config.stash.get(_SCRATCH, None)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def _notebook_file(item) -> pytest.File | None:
    parent = getattr(item, "parent", None)
    if isinstance(parent, pytest.File) and str(parent.path).endswith(".ipynb"):
        return parent
    return None


def _budget(notebook: Path) -> float:
    try:
        return load_check(check_file_for(notebook)).budget_s or 0.0
    except (OSError, ResultsCheckError):
        return 0.0


def pytest_collection_modifyitems(session, config, items):
    """Add a results item after each notebook's last cell; under xdist, longest budgets first."""
    last: dict[pytest.File, int] = {}
    for i, item in enumerate(items):
        nb = _notebook_file(item)
        if nb is not None:
            last[nb] = i
    from lib.run import MODEL_PARAMETER

    for nb, i in sorted(last.items(), key=lambda kv: -kv[1]):
        extra = [NotebookResults.from_parent(nb, name=RESULTS_ITEM)]
        if Path(nb.path).stem[:2] in MODEL_PARAMETER and not config.getoption("--no-families", False):
            extra += [NotebookOnFamily.from_parent(nb, name=f"family[{f}]", family=f) for f in FAMILIES]
        items[i + 1:i + 1] = extra
    if hasattr(config, "workerinput") and last:
        # Longest notebooks first, unit tests after: whole files go to the free worker in this
        # order, so the slowest notebook does not start last (every worker sorts the same way).
        groups: dict[object, list] = defaultdict(list)
        for item in items:
            groups[_notebook_file(item) or "unit"].append(item)
        books = sorted((g for g in groups if g != "unit"), key=lambda nb: -_budget(Path(nb.path)))
        items[:] = [it for nb in books for it in groups[nb]] + groups.get("unit", [])


def pytest_runtest_setup(item):
    nb = _notebook_file(item)
    if nb is not None and not hasattr(nb, "_compendium_started"):
        nb._compendium_started = time.time()


class ResultsMismatch(AssertionError):
    """The fresh results left their tolerances (the message lists every offending value)."""


class NotebookResults(pytest.Item):
    """``NN_name.ipynb::results``: the fresh results JSON against the committed one."""

    def runtest(self):
        notebook = Path(self.parent.path)
        name = notebook.stem
        committed_dir = notebook.parent.parent / "data" / "results"
        fresh_dir = paths.results_dir()
        if fresh_dir.resolve() == committed_dir.resolve():
            raise ResultsMismatch(
                f"COMPENDIUM_ROOT points at the checkout ({paths.root()}): the notebook wrote over the committed "
                "results, so there is nothing to compare with. Run the tests with COMPENDIUM_ROOT set to a "
                "scratch folder (make test does)."
            )
        check = load_check(check_file_for(notebook))
        fresh = fresh_dir / f"{name}.json"
        started = getattr(self.parent, "_compendium_started", None)
        if fresh.exists() and started is not None and fresh.stat().st_mtime < started - 1:
            raise ResultsMismatch(f"{fresh} is older than this run: {notebook.name} did not call "
                                  f"save_results('{name}', ...) this time")
        problems = check_notebook_results(name, fresh_dir, committed_dir, check)
        if problems:
            shown = "\n  ".join(problems[:25])
            more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
            raise ResultsMismatch(
                f"{name}: {len(problems)} value(s) outside their tolerance "
                f"(fresh {fresh}, committed {committed_dir / (name + '.json')}, rules {check.path.name}):\n  "
                f"{shown}{more}\n"
                "A real change: rerun the notebook (python -m lib.run --only NN) and commit its results. "
                "Noise: measure it (python -m lib.noise --only NN) and size the tolerance from it."
            )

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (ResultsMismatch, ResultsCheckError, FileNotFoundError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{Path(self.path).name}::{RESULTS_ITEM}"


def pytest_addoption(parser):
    parser.addoption("--no-families", action="store_true", default=False,
                     help="skip the notebooks x {gpt2, neox, llama} stand-in runs (NN_name.ipynb::family[...])")


_STANDINS: dict[str, Path] = {}


def _standin(family: str) -> Path:
    """The stand-in of ``family``, built once per worker process in a temporary folder."""
    if family not in _STANDINS:
        from tests.tiny_models import build_standin

        root = Path(tempfile.mkdtemp(prefix="standins-"))
        _STANDINS[family] = build_standin(family, root / family)
    return _STANDINS[family]


class NotebookOnFamily(pytest.Item):
    """``NN_name.ipynb::family[gpt2]``: the notebook on the ``smoke`` profile with its model parameter set to
    the stand-in of a real family; passes when every cell runs and the results file is written."""

    def __init__(self, *, family: str, **kwargs):
        super().__init__(**kwargs)
        self.family = family

    def runtest(self):
        from lib.run import MODEL_PARAMETER, PROFILES, failed_dir, run_notebook

        notebook = Path(self.parent.path)
        number = notebook.stem[:2]
        params = {**PROFILES["smoke"].get(number, {}), MODEL_PARAMETER[number]: str(_standin(self.family))}
        root = Path(tempfile.mkdtemp(prefix=f"{notebook.stem}-{self.family}-"))
        before = os.environ.get("COMPENDIUM_ROOT")
        os.environ["COMPENDIUM_ROOT"] = str(root)  # the kernel's results, figures and caches: kept apart
        try:
            status, seconds, error = run_notebook(notebook, root / notebook.name, params,
                                                  keep_failed=failed_dir() / f"{notebook.stem}-{self.family}.ipynb")
            if status != "ok":
                raise FamilyRunError(f"{notebook.name} on the {self.family} stand-in ({params}): {error}")
            written = root / "data" / "results" / f"{notebook.stem}.json"
            if not written.exists():
                raise FamilyRunError(f"{notebook.name} ran on the {self.family} stand-in but wrote no {written.name}")
        finally:
            if before is None:
                os.environ.pop("COMPENDIUM_ROOT", None)
            else:
                os.environ["COMPENDIUM_ROOT"] = before
            shutil.rmtree(root, ignore_errors=True)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, FamilyRunError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{Path(self.path).name}::{self.name}"


class FamilyRunError(AssertionError):
    """A notebook did not run through on a stand-in of a real family."""


class NotebookTimes:
    """Collects each notebook's item durations (from every worker) and prints them at the end."""

    def __init__(self, config):
        self.config = config
        self.seconds: dict[str, float] = defaultdict(float)
        self.failed: dict[str, set] = defaultdict(set)
        self.results: dict[str, str] = {}
        self.family_seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def pytest_runtest_logreport(self, report):
        file, _, name = report.nodeid.partition("::")
        if not file.endswith(".ipynb"):
            return
        if name.startswith("family["):
            self.family_seconds[file][name[len("family["):-1]] += report.duration
            return
        self.seconds[file] += report.duration
        if report.failed:
            self.failed[file].add(name)
        if name == RESULTS_ITEM and (report.when == "call" or report.failed):
            self.results[file] = "failed" if report.failed else report.outcome

    def pytest_terminal_summary(self, terminalreporter):
        if not self.seconds and not self.family_seconds:
            return
        tr = terminalreporter
        label = "all notebooks (one core each)"
        width = max(len(label), *(len(Path(f).name) for f in [*self.seconds, *self.family_seconds]))
        if self.seconds:
            tr.write_sep("=", "notebooks: wall time (kernel start + cells + results check)")
            tr.write_line(f"{'notebook':<{width}}  {'cells':>12}  {'results':>7}  {'wall time':>9}  {'budget':>6}")
            total = 0.0
            for file in sorted(self.seconds):
                seconds = self.seconds[file]
                total += seconds
                budget = _budget(self.config.rootpath / file)
                failed_cells = len(self.failed[file] - {RESULTS_ITEM})
                cells = f"{failed_cells} failed" if failed_cells else "ok"
                over = "  OVER BUDGET" if budget and seconds > budget else ""
                tr.write_line(f"{Path(file).name:<{width}}  {cells:>12}  {self.results.get(file, '-'):>7}  "
                              f"{seconds:>8.1f}s  {budget:>5.0f}s{over}")
            tr.write_line(f"{label:<{width}}  {'':>12}  {'':>7}  {total:>8.1f}s")
        if self.family_seconds:
            tr.write_sep("=", "notebooks on the stand-ins (smoke profile): wall time per family")
            tr.write_line(f"{'notebook':<{width}}  " + "  ".join(f"{f:>8}" for f in FAMILIES))
            for file in sorted(self.family_seconds):
                row = self.family_seconds[file]
                tr.write_line(f"{Path(file).name:<{width}}  " + "  ".join(
                    f"{row[f]:>7.1f}s" if f in row else f"{'-':>8}" for f in FAMILIES))
            total = sum(sum(row.values()) for row in self.family_seconds.values())
            tr.write_line(f"{'all family runs (one core each)':<{width}}  {total:>7.1f}s")
