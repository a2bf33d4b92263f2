"""Key numbers of each notebook, written to ``data/results/NN_name.json``, and their check.

The README's results table and the tests read these files, so they are plain JSON with floats
rounded to a stated number of digits (stable diffs, no spurious precision).

``make test`` re-executes every notebook and compares its fresh results, value by value, with
the committed file, within the tolerances declared in ``notebooks/NN_name.check.toml``
(:func:`load_check`, :func:`compare_results`; the pytest side is ``notebooks/conftest.py``).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lib import paths


def _clean(obj: Any, digits: int) -> Any:
    """Make ``obj`` JSON-serialisable: numpy / torch scalars to Python, floats rounded, NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, digits) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays, torch tensors
        return _clean(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return None if math.isnan(x) or math.isinf(x) else round(x, digits)
    return obj


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds,
    deleted when it fails, so ``path`` is never half-written.  For writers that want a file name:

    >>> with atomic_output(path) as tmp:
    ...     torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, digits: int = 6, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (floats rounded to ``digits``, NaN as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(obj, digits), indent=indent, sort_keys=False) + "\n")
    return path


def save_results(name: str, results: dict, digits: int = 6) -> Path:
    """Write ``results`` to ``data/results/{name}.json`` (e.g. ``name="00_toy_world"``)."""
    return write_json(paths.results_dir() / f"{name}.json", results, digits)


def load_results(name: str) -> dict:
    path = paths.results_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"No results at {path}. Run the notebook first: python -m lib.run --only {name[:2]}"
        )
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# the results check: a fresh run's numbers against the committed JSON, within tolerances
# --------------------------------------------------------------------------------------------
# Each notebook ``notebooks/NN_name.ipynb`` has ``notebooks/NN_name.check.toml`` beside it:
#
#     budget_s = 120                      # wall time of the default run, one core
#
#     [[tolerance]]
#     key = "sweep.*.loss_per_feature"    # glob over dotted paths ("a.b.3.c": list items by index)
#     abs = 2e-4                          # allowed |fresh - committed| = abs + rel * |committed|
#     rel = 0.0
#     basis = "measured"                  # "exact" | "measured" | "to be measured"
#
# Rules are tried in order; the first whose key matches a value's path decides.  A value that
# no rule matches must be equal to the committed one (numbers included).  ``ignore = true``
# skips a value altogether (it is not a result: a timing, a machine-dependent setting).

BASES = ("exact", "measured", "to be measured")
_RULE_FIELDS = {"key", "abs", "rel", "ignore", "basis"}


class ResultsCheckError(ValueError):
    """A notebook's check file that cannot be used (bad TOML, unknown field, bad value)."""


@dataclass(frozen=True)
class Tolerance:
    """How far one group of values may move: ``|fresh - committed| <= abs + rel * |committed|``."""

    key: str
    abs: float = 0.0
    rel: float = 0.0
    ignore: bool = False
    basis: str = "exact"

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.key)

    def allowed(self, committed: float) -> float:
        return self.abs + self.rel * abs(committed)


@dataclass
class NotebookCheck:
    """A notebook's declared check: its time budget and its results tolerances, in order."""

    path: Path
    budget_s: float | None = None
    tolerances: list[Tolerance] = field(default_factory=list)

    def rule_for(self, path: str) -> Tolerance | None:
        return next((t for t in self.tolerances if t.matches(path)), None)


def check_file_for(notebook: str | os.PathLike) -> Path:
    """``notebooks/NN_name.check.toml`` for ``notebooks/NN_name.ipynb``."""
    notebook = Path(notebook)
    return notebook.with_name(f"{notebook.stem}.check.toml")


def load_check(path: str | os.PathLike) -> NotebookCheck:
    """Read a ``NN_name.check.toml``; errors name the file, the rule and what is wrong."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No results check at {path}. Every notebook declares its tolerances and time budget there: "
            "see CONTRIBUTING.md, 'The results check'."
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ResultsCheckError(f"{path} is not valid TOML: {err}") from err
    unknown = set(raw) - {"budget_s", "tolerance"}
    if unknown:
        raise ResultsCheckError(f"{path}: unknown top-level field(s) {sorted(unknown)}; allowed: budget_s, [[tolerance]]")
    budget = raw.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ResultsCheckError(f"{path}: budget_s must be a positive number of seconds, got {budget!r}")
    rules = []
    for i, rule in enumerate(raw.get("tolerance", []), start=1):
        where = f"{path}, tolerance #{i}"
        if not isinstance(rule, dict) or "key" not in rule:
            raise ResultsCheckError(f"{where}: each [[tolerance]] needs a key (a glob over dotted result paths)")
        extra = set(rule) - _RULE_FIELDS
        if extra:
            raise ResultsCheckError(f"{where} ({rule['key']!r}): unknown field(s) {sorted(extra)}; allowed: {sorted(_RULE_FIELDS)}")
        for name in ("abs", "rel"):
            value = rule.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ResultsCheckError(f"{where} ({rule['key']!r}): {name} must be a number >= 0, got {value!r}")
        if rule.get("basis", "exact") not in BASES:
            raise ResultsCheckError(f"{where} ({rule['key']!r}): basis must be one of {BASES}, got {rule.get('basis')!r}")
        rules.append(Tolerance(key=str(rule["key"]), abs=float(rule.get("abs", 0.0)), rel=float(rule.get("rel", 0.0)),
                               ignore=bool(rule.get("ignore", False)), basis=rule.get("basis", "exact")))
    return NotebookCheck(path=path, budget_s=None if budget is None else float(budget), tolerances=rules)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": leaf}``: every leaf of nested dicts and lists, by dotted path (list items by index).

    An empty dict or list is a leaf itself, so a table that lost all its rows is still seen.
    """
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: obj}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare_results(fresh: dict, committed: dict, check: NotebookCheck | list[Tolerance]) -> list[str]:
    """Every difference between ``fresh`` and ``committed`` that its tolerance does not allow.

    Returns one message per offending value (empty: the check passes).  Missing and new values
    are differences too, unless an ``ignore`` rule matches them.
    """
    if not isinstance(check, NotebookCheck):
        check = NotebookCheck(path=Path("<rules>"), tolerances=list(check))
    new, old = flatten(fresh), flatten(committed)
    problems = []
    for path in list(old) + [p for p in new if p not in old]:
        rule = check.rule_for(path)
        if rule is not None and rule.ignore:
            continue
        if path not in new:
            problems.append(f"{path}: in the committed results ({old[path]!r}) but missing from the fresh ones")
            continue
        if path not in old:
            problems.append(f"{path}: new in the fresh results ({new[path]!r}); not in the committed ones")
            continue
        a, b = new[path], old[path]
        if _is_number(a) and _is_number(b):
            allowed = rule.allowed(b) if rule is not None else 0.0
            diff = abs(float(a) - float(b))
            if not diff <= allowed:  # also catches NaN
                source = f"rule {rule.key!r}" if rule is not None else "no rule: must be equal"
                problems.append(f"{path}: {a!r}, committed {b!r}: |diff| {diff:.3g} > allowed {allowed:.3g} ({source})")
        elif type(a) is not type(b) or a != b:
            problems.append(f"{path}: {a!r}, committed {b!r} (not numbers: must be equal)")
    return problems


def check_notebook_results(name: str, fresh_dir: Path, committed_dir: Path, check: NotebookCheck) -> list[str]:
    """Compare ``fresh_dir/{name}.json`` with ``committed_dir/{name}.json`` under ``check``."""
    fresh_path, committed_path = Path(fresh_dir) / f"{name}.json", Path(committed_dir) / f"{name}.json"
    if not committed_path.exists():
        return [f"no committed results at {committed_path}: run the notebook (python -m lib.run --only {name[:2]}) "
                "and commit data/results/ with it"]
    if not fresh_path.exists():
        return [f"the notebook wrote no results at {fresh_path}: it failed before save_results('{name}', ...)?"]
    return compare_results(json.loads(fresh_path.read_text()), json.loads(committed_path.read_text()), check)
