"""Results files: JSON-clean values, rounding, atomic writes with ordinary permissions."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from lib.results import atomic_output, atomic_write_text, load_results, save_results


def test_save_results_cleans_and_rounds(isolated_root):
    path = save_results("99_test", {"a": np.float32(0.123456789), "b": torch.tensor([1.0, 2.5]),
                                    "c": float("nan"), "d": {1: np.int64(3)}, "e": np.bool_(True)}, digits=3)
    data = json.loads(path.read_text())
    assert data == {"a": 0.123, "b": [1.0, 2.5], "c": None, "d": {"1": 3}, "e": True}
    assert load_results("99_test") == data
    assert path.parent == isolated_root / "data" / "results"


def test_atomic_write_has_ordinary_permissions_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x" / "out.json"
    atomic_write_text(target, "{}")
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.json"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]
    with atomic_output(target) as tmp:  # a binary writer that wants a file name
        torch.save({"a": 1}, tmp)
    assert torch.load(target)["a"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_missing_results_say_how_to_make_them(isolated_root):
    with pytest.raises(FileNotFoundError, match="lib.run --only 42"):
        load_results("42_nothing")


# --------------------------------------------------------------------------------------------
# the results check
# --------------------------------------------------------------------------------------------
import copy  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import nbformat  # noqa: E402

from lib.results import (ResultsCheckError, Tolerance, check_file_for, compare_results, flatten,  # noqa: E402
                         load_check)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_flatten_paths():
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": [], "e": {}}) == {"a.b.0": 1, "a.b.1.c": 2, "d": [], "e": {}}


def test_compare_results_rules_in_order_abs_rel_and_exact_by_default():
    committed = {"acc": {"x": 0.50, "y": 0.80}, "mse": 10.0, "n": 7, "name": "toy", "flag": True, "none": None}
    rules = [Tolerance("acc.x", abs=0.01), Tolerance("acc.*", abs=0.05), Tolerance("mse", rel=0.1)]
    fresh = copy.deepcopy(committed)
    assert compare_results(fresh, committed, rules) == []
    fresh.update(acc={"x": 0.509, "y": 0.849}, mse=10.99)
    assert compare_results(fresh, committed, rules) == []  # all just inside
    fresh["acc"]["x"] = 0.52  # outside acc.x's 0.01 (the first matching rule decides, not acc.*)
    fresh["mse"] = 11.01  # outside 10% of 10
    fresh["n"] = 8  # no rule: must be equal
    fresh["flag"] = 1  # a bool is not a number
    problems = compare_results(fresh, committed, rules)
    assert [p.split(":")[0] for p in problems] == ["acc.x", "mse", "n", "flag"]
    assert "rule 'acc.x'" in problems[0] and "no rule" in problems[2]


def test_compare_results_reports_missing_new_and_ignores():
    committed = {"a": [1, 2, 3], "t": 5.0}
    fresh = {"a": [1, 2], "t": 9.0, "extra": 1}
    problems = compare_results(fresh, committed, [Tolerance("t", ignore=True)])
    assert any(p.startswith("a.2: in the committed") for p in problems)
    assert any(p.startswith("extra: new in the fresh") for p in problems)
    assert not any(p.startswith("t") for p in problems)
    assert compare_results({"x": float("nan")}, {"x": 1.0}, [Tolerance("x", abs=10)])  # NaN never passes


def test_load_check_errors_name_the_file_and_rule(tmp_path):
    bad = tmp_path / "bad.check.toml"
    for text, match in [("budget_s = ", "not valid TOML"), ("speed = 1", "unknown top-level"),
                        ('[[tolerance]]\nabs = 1', "needs a key"), ('[[tolerance]]\nkey = "a"\nabs = -1', "abs must be"),
                        ('[[tolerance]]\nkey = "a"\nbasis = "guessed"', "basis must be"),
                        ('[[tolerance]]\nkey = "a"\nabsolute = 1', "unknown field"), ("budget_s = 0", "budget_s")]:
        bad.write_text(text)
        with pytest.raises(ResultsCheckError, match=match) as err:
            load_check(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match="CONTRIBUTING"):
        load_check(tmp_path / "none.check.toml")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_declares_a_check_that_its_committed_results_pass(notebook):
    check = load_check(check_file_for(notebook))
    assert check.budget_s, f"{notebook.stem}: declare budget_s"
    committed = json.loads((REPO / "data" / "results" / f"{notebook.stem}.json").read_text())
    assert compare_results(committed, committed, check) == []
    for rule in check.tolerances:  # no dead rule: each matches some committed value
        assert any(rule.matches(p) for p in flatten(committed)), f"{check.path.name}: {rule.key!r} matches nothing"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_value_moved_beyond_its_tolerance_fails_the_check(notebook):
    """A real regression fails: each numeric result moved just past its allowance is caught, and
    one moved just inside is not."""
    check = load_check(check_file_for(notebook))
    committed = json.loads((REPO / "data" / "results" / f"{notebook.stem}.json").read_text())
    leaves = flatten(committed)
    numeric = [p for p, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not (check.rule_for(p) and check.rule_for(p).ignore)]
    assert numeric
    for path in numeric[:: max(1, len(numeric) // 25)]:  # a spread of values, every notebook
        rule = check.rule_for(path)
        allowed = rule.allowed(leaves[path]) if rule else 0.0
        for factor, fails in ((1.5, True), (0.5, False)):
            step = allowed * factor if allowed else (1 if fails else 0)
            fresh = _set(copy.deepcopy(committed), path, leaves[path] + step)
            assert bool(compare_results(fresh, committed, check)) == fails, (path, factor)


def _set(obj, path: str, value):
    """Set the leaf at dotted ``path`` (walking the same way as ``flatten``, keys may hold dots)."""
    def walk(node, rest):
        if not rest:
            return value
        if isinstance(node, list):
            head, _, tail = rest.partition(".")
            node[int(head)] = walk(node[int(head)], tail)
            return node
        for key in sorted(node, key=len, reverse=True):
            if rest == key or rest.startswith(key + "."):
                node[key] = walk(node[key], rest[len(key) + 1:])
                return node
        raise KeyError(rest)
    return walk(obj, path)


def _mini_repo(tmp_path: Path, written: float, committed: float, tolerance: float) -> Path:
    """notebooks/99_mini.ipynb (saves {"x": written}), its check file and committed results, and
    the repository's notebooks/conftest.py: the layout ``make test`` runs on."""
    (tmp_path / "notebooks").mkdir(parents=True)
    (tmp_path / "data" / "results").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / "conftest.py", tmp_path / "notebooks" / "conftest.py")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"x = {written}", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('from lib.results import save_results\nsave_results("99_mini", {"x": x, "n": 3})')]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "99_mini.ipynb")
    (tmp_path / "notebooks" / "99_mini.check.toml").write_text(
        f'budget_s = 60\n[[tolerance]]\nkey = "x"\nabs = {tolerance}\nbasis = "measured"\n')
    (tmp_path / "data" / "results" / "99_mini.json").write_text(json.dumps({"x": committed, "n": 3}))
    return tmp_path


@pytest.mark.parametrize("written,passes", [(0.52, True), (0.60, False)])
def test_the_suite_fails_when_a_notebook_result_leaves_its_tolerance(tmp_path, written, passes):
    """End to end through pytest + nbval + notebooks/conftest.py, as ``make test`` runs it."""
    root = _mini_repo(tmp_path / "repo", written=written, committed=0.5, tolerance=0.05)
    scratch = tmp_path / "scratch"
    env = {**os.environ, "COMPENDIUM_ROOT": str(scratch), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pytest", "notebooks", "--nbval-lax", "-p", "no:cacheprovider",
                          "-q", "--rootdir", str(root)], cwd=root, env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert "99_mini.ipynb::results" in text or passes
    assert "notebooks: wall time" in text and "99_mini.ipynb" in text  # the per-notebook time table
    if passes:
        assert out.returncode == 0, text
        assert "3 passed" in text
    else:
        assert out.returncode == 1, text
        assert "x: 0.6, committed 0.5" in text and "1 failed, 2 passed" in text


def test_contributing_states_each_notebooks_time_budget():
    """CONTRIBUTING.md's budget table agrees with the budget_s of every check file."""
    import re

    text = (REPO / "CONTRIBUTING.md").read_text()
    stated = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\d\d_\w+) \| (\d+) \|", text, re.M)}
    declared = {nb.stem: load_check(check_file_for(nb)).budget_s for nb in NOTEBOOKS}
    assert stated == declared
