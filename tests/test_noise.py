"""lib.noise: runs a notebook with several seeds and reports the spread of its results."""
from __future__ import annotations

import json

import nbformat

from lib import noise, run
from lib.results import NotebookCheck, Tolerance


def test_spread_table_groups_list_items_and_compares_with_the_allowance():
    committed = {"rows": [{"loss": 1.0}, {"loss": 2.0}], "name": "a"}
    runs = {"s0": {"rows": [{"loss": 1.0}, {"loss": 2.0}], "name": "a"},
            "s1": {"rows": [{"loss": 1.1}, {"loss": 1.9}], "name": "b"}}
    check = NotebookCheck(path=None, tolerances=[Tolerance("*loss", abs=0.05)])
    rows = {r["group"]: r for r in noise.spread_table(runs, committed, check)}
    assert rows["rows.*.loss"]["n"] == 2
    assert abs(rows["rows.*.loss"]["spread"] - 0.1) < 1e-12 and abs(rows["rows.*.loss"]["moved"] - 0.1) < 1e-12
    assert rows["rows.*.loss"]["allowed"] == 0.05 and rows["name"]["non_numeric_differences"] == 1


def test_noise_runs_the_notebook_with_each_seed(tmp_path, monkeypatch, capsys):
    books = tmp_path / "notebooks"
    books.mkdir()
    (tmp_path / "data" / "results").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("seed = 0", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('from lib.results import save_results\n'
                                          'save_results("98_seedy", {"x": 0.5 + 0.01 * seed, "n": 4})')]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, books / "98_seedy.ipynb")
    (books / "98_seedy.check.toml").write_text('budget_s = 10\n[[tolerance]]\nkey = "x"\nabs = 0.015\nbasis = "measured"\n')
    (tmp_path / "data" / "results" / "98_seedy.json").write_text(json.dumps({"x": 0.5, "n": 4}))
    monkeypatch.setattr(run, "NOTEBOOKS_DIR", books)
    code = noise.main(["--only", "98", "--seeds", "0", "1", "2", "--jobs", "1", "--out", str(tmp_path / "runs")])
    text = capsys.readouterr().out
    assert code == 1  # seed 2 moves x by 0.02 > 0.015
    assert "seed0-native: passes" in text and "seed1-native: passes" in text
    assert "seed2-native: 1 value(s) beyond tolerance" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("x "))
    assert line.split()[1:4] == ["1", "0.02", "0.02"]  # n, spread, moved
