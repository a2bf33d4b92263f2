"""The headless runner: notebook selection, parameters, keep-going on failure, summary, exit code;
and notebook 00's quick retraining path (the training code run end to end through papermill)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from lib import run

REPO = Path(__file__).resolve().parent.parent


def _notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_find_notebooks_by_number_and_name(tmp_path):
    for name in ("00_a", "01_b", "02_c"):
        _notebook(tmp_path / f"{name}.ipynb", "pass")
    assert [p.stem for p in run.find_notebooks("00,02_c", tmp_path)] == ["00_a", "02_c"]
    assert len(run.find_notebooks(None, tmp_path)) == 3
    with pytest.raises(SystemExit, match="available"):
        run.find_notebooks("07", tmp_path)


def test_parse_value():
    assert run.parse_value("3") == 3 and run.parse_value("[1, 2]") == [1, 2]
    assert run.parse_value("None") is None and run.parse_value("toy-4l") == "toy-4l"
    # "-p quick false" used to arrive as the (truthy) string "false"
    for text, value in [("false", False), ("False", False), ("FALSE", False), ("true", True), ("none", None),
                        ("null", None), ("1e3", 1000.0), ("[true, null]", [True, None]), ('{"a": 1}', {"a": 1})]:
        assert run.parse_value(text) == value and type(run.parse_value(text)) is type(value), text


def _params_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        'quick = False  # shrink everything\n'
        'steps = 100    # training steps\n'
        'lr = 0.01      # "learning" rate (a quote in a comment trips papermill\'s parser)\n'
        'model = "toy-2l"\n'
        'ps = [0.1, 0.2]\n'
        'device = None', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(quick, steps, lr, model, ps, device)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_parameters_are_read_even_where_papermill_skips_a_line(tmp_path):
    params = run.notebook_parameters(_params_notebook(tmp_path / "00_p.ipynb"))
    assert list(params) == ["quick", "steps", "lr", "model", "ps", "device"]
    assert params["steps"].help == "training steps" and params["lr"].default == "0.01"


def test_parameters_fit_their_defaults_types(tmp_path):
    book = _params_notebook(tmp_path / "00_p.ipynb")

    def check(**typed):
        return run.check_parameters(book, {k: run.parse_value(v) for k, v in typed.items()}, typed)

    assert check(quick="false") == {"quick": False}
    assert check(quick="True", steps="1e3", lr="1", model="123", device="cuda") == \
        {"quick": True, "steps": 1000, "lr": 1.0, "model": "123", "device": "cuda"}
    assert check(ps="[0.5]") == {"ps": [0.5]}
    assert type(check(lr="1")["lr"]) is float
    for name, text, expected in [("quick", "yes", "True/False"), ("steps", "2.5", "an integer"),
                                 ("steps", "many", "an integer"), ("lr", "fast", "a number"), ("ps", "0.1", "a list")]:
        with pytest.raises(run.ParameterError, match=expected):
            check(**{name: text})
    with pytest.raises(run.ParameterError, match=r"no parameter 'step' \(did you mean 'steps'\?\)") as err:
        check(step="3")
    for name in ("quick = False", "steps = 100", "model = \"toy-2l\"", "ps = [0.1, 0.2]", "device = None"):
        assert name in str(err.value)  # every parameter listed, with its default


def test_unknown_parameter_fails_at_once_naming_the_parameters(isolated_root):
    out = subprocess.run([sys.executable, "-m", "lib.run", "--only", "00", "-p", "no_such_parameter", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "no_such_parameter" in out.stderr and "models = [" in out.stderr and "retrain = False" in out.stderr
    assert "->" not in out.stdout  # refused before any notebook started (no kernel, no summary)
    assert not (isolated_root / "data" / "results" / "run_summary.json").exists()


def test_every_profile_key_is_a_parameter_of_its_notebook():
    for profile, by_notebook in run.PROFILES.items():
        for number, params in by_notebook.items():
            [book] = run.find_notebooks(number)
            known = run.notebook_parameters(book)
            missing = set(params) - set(known)
            assert not missing, f"profile {profile!r} sets {sorted(missing)} that {book.stem} does not have"
            run.check_parameters(book, params)  # and the values fit the defaults' types
    assert "model" in run.notebook_parameters(run.find_notebooks("02")[0])  # 02 takes `model` like the others


def test_every_notebook_defaults_to_the_default_model():
    """One name, chosen in 00 (the smallest model that meets the judgement targets), everywhere."""
    from lib.world.registry import DEFAULT_MODEL

    defaults = {book.stem: run.notebook_parameters(book)[run.MODEL_PARAMETER[book.stem[:2]]].default
                for book in run.find_notebooks() if book.stem[:2] in run.MODEL_PARAMETER}
    assert len(defaults) == len(run.MODEL_PARAMETER), defaults
    wrong = {stem: d for stem, d in defaults.items() if d.strip("\"'") != DEFAULT_MODEL}
    assert not wrong, f"notebooks whose `model` is not DEFAULT_MODEL={DEFAULT_MODEL!r}: {wrong}"


def test_a_failing_notebook_run_in_place_leaves_the_notebook_unchanged(tmp_path, monkeypatch, isolated_root):
    books = tmp_path / "books"
    books.mkdir()
    book = _notebook(books / "00_fails.ipynb", "raise RuntimeError('boom')")
    nb = nbformat.read(book, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="the committed output\n")]
    nbformat.write(nb, book)
    before = book.read_bytes()
    monkeypatch.setattr(run, "NOTEBOOKS_DIR", books)
    monkeypatch.setattr(run, "failed_dir", lambda: tmp_path / "failed")
    assert run.main(["--only", "00", "--jobs", "1"]) == 1
    assert book.read_bytes() == before
    assert sorted(p.name for p in books.iterdir()) == ["00_fails.ipynb"]  # no temporary left behind
    kept = nbformat.read(tmp_path / "failed" / "00_fails.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in kept.cells if c.cell_type == "code" for o in c.outputs)
    # a successful run replaces it
    _notebook(book, "print('fresh')")
    assert run.main(["--only", "00", "--jobs", "1"]) == 0
    fresh = nbformat.read(book, as_version=4)
    assert fresh.cells[1].outputs[0]["text"].strip() == "fresh"
    # no machine's path in what gets committed: papermill's paths are relative or bare names
    recorded = fresh.metadata["papermill"]
    assert (recorded["input_path"], recorded["output_path"]) == ("00_fails.ipynb", "00_fails.ipynb")


def test_runner_keeps_going_and_reports(tmp_path, monkeypatch, isolated_root):
    books = tmp_path / "books"
    books.mkdir()
    _notebook(books / "00_ok.ipynb", "assert x == 5")
    _notebook(books / "01_fails.ipynb", "raise RuntimeError('boom')")
    _notebook(books / "02_ok.ipynb", "print(x)")
    monkeypatch.setattr(run, "NOTEBOOKS_DIR", books)
    out = tmp_path / "out"
    code = run.main(["-p", "x", "5", "--out", str(out), "--only", "00,01,02", "--jobs", "2"])  # in parallel
    assert code == 1  # one failed
    summary = json.loads((isolated_root / "data" / "results" / "run_summary.json").read_text())
    status = {r["notebook"]: r["status"] for r in summary["notebooks"]}
    assert status == {"00_ok": "ok", "01_fails": "FAILED", "02_ok": "ok"}  # 02 ran after 01 failed
    assert "boom" in summary["notebooks"][1]["error"]
    executed = nbformat.read(out / "02_ok.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"].strip() == "5"


def test_cli_lists_the_notebooks():
    out = subprocess.run([sys.executable, "-m", "lib.run", "--list"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert "00_toy_world" in out.stdout.split()


def test_notebook_00_quick_retrain(tmp_path, isolated_root):
    """Retraining through the notebook: corpus, tokenizer, training loop, save, load, recall."""
    out = tmp_path / "00.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "00_toy_world.ipynb"), str(out), cwd=str(REPO / "notebooks"),
                        parameters={"retrain": True, "quick": True, "n_corpus_sample": 200},
                        kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "measuring: toy-1l" in text
    assert "--steps 20" in text  # the provenance printed is that of the quick rebuild
    assert (isolated_root / "figures" / "00_training_curves.png").exists() or \
        (isolated_root / "figures" / "00_training_curves.html").exists()
    assert not (isolated_root / "data" / "results" / "00_toy_world.json").exists()  # quick runs don't report


def test_kernels_get_one_thread_as_make_test_gives_them(tmp_path, monkeypatch, isolated_root):
    books = tmp_path / "books"
    books.mkdir()
    _notebook(books / "00_threads.ipynb", "import os\nprint(os.environ.get('OMP_NUM_THREADS'))")
    monkeypatch.setattr(run, "NOTEBOOKS_DIR", books)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for extra, want in (([], "1"), (["--threads", "2"], "2")):
        assert run.main(["--out", str(tmp_path / "out"), "--jobs", "1", *extra]) == 0
        out = nbformat.read(tmp_path / "out" / "00_threads.ipynb", as_version=4)
        assert out.cells[-1].outputs[0]["text"].strip() == want


def test_model_parameter_names_every_notebook_that_takes_a_model():
    """MODEL_PARAMETER (the notebooks x families test and the README table read it) lists every notebook with a
    model parameter, except 15 and 16, whose models are trained for them; the smoke profile covers exactly these."""
    takes = {book.stem[:2] for book in run.find_notebooks()
             if {"model", "model_name"} & set(run.notebook_parameters(book))}
    assert set(run.MODEL_PARAMETER) == takes
    assert set(run.PROFILES["smoke"]) == set(run.MODEL_PARAMETER)
    for number, name in run.MODEL_PARAMETER.items():
        [book] = run.find_notebooks(number)
        assert name in run.notebook_parameters(book) and "quick" in run.notebook_parameters(book), book.stem


def test_setup_only_keeps_the_cells_up_to_the_setup(tmp_path):
    book = _notebook(tmp_path / "00_a.ipynb", "print('setup')")
    nb = nbformat.read(book, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("# title"))
    nb.cells += [nbformat.v4.new_markdown_cell("## later"), nbformat.v4.new_code_cell("raise SystemExit('not run')")]
    nbformat.write(nb, book)
    cut = nbformat.read(run.setup_only(book, tmp_path / "cut" / "00_a.ipynb"), as_version=4)
    assert [c.source for c in cut.cells] == ["# title", "x = 1", "print('setup')"]


def test_full_profile_starts_on_the_stand_ins(standin_dirs, tmp_path, isolated_root):
    """``--profile full --dry-run`` as a GPU user runs it first: each notebook of the full profile, with its model
    replaced by the stand-in of the same family (Llama-2 -> llama, gpt2 -> gpt2), runs its setup cell (imports,
    parameter checks, the model loaded) with the profile's other values (and ``quick``, which only shrinks sizes:
    some setup cells already harvest activations or train)."""
    family = {"meta-llama/Llama-2-13b-hf": "llama", "gpt2": "gpt2", "EleutherAI/pythia-70m-deduped": "neox"}
    for number, params in run.PROFILES["full"].items():
        if number not in run.MODEL_PARAMETER:
            continue
        [book] = run.find_notebooks(number)
        key = run.MODEL_PARAMETER[number]
        params = {**params, key: str(standin_dirs[family[params[key]]]), "quick": True}
        cut = run.setup_only(book, tmp_path / "cut" / book.name)
        status, _, error = run.run_notebook(cut, tmp_path / "out" / book.name, params)
        assert status == "ok", f"{book.stem} with {params}: {error}"


def test_a_failure_is_summarised_by_its_exception_and_whole_message():
    """A multi-line error message (the offline model error is one) is shown from the exception's name on, not
    only its last line."""
    text = ("---------\nValueError   Traceback (most recent call last)\nCell In[3], line 2\n----> 2 load_model('x')\n"
            "ModelNotFoundError: Model 'x' is not a toy-world model.\n  Toy models: toy-4l.\n  Pass a folder instead.")
    assert run._error_summary(text) == "ModelNotFoundError: Model 'x' is not a toy-world model. Toy models: toy-4l. Pass a folder instead."
    assert run._error_summary("no exception named here\nlast line") == "last line"
    assert run._error_summary("RuntimeError: " + "x" * 1000).endswith("...")
