"""Run notebooks headless with papermill: ``python -m lib.run``.

    python -m lib.run                         # every notebook, toy defaults, executed in place
    python -m lib.run --only 00,03            # selected notebooks (by number or name)
    python -m lib.run --only 01 -p model toy-4l -p probe_layer 3 --out runs/   # other parameters
    python -m lib.run --profile full          # the GPU / real-model parameters (see PROFILES)
    python -m lib.run --jobs 1                # one notebook at a time (default: one per CPU core)
    python -m lib.run --profile full --dry-run   # parameters checked, each notebook run to its setup cell only
    python -m lib.run --profile smoke -p model path/to/hf_dir --only 03   # every cell, smallest settings

Notebooks run in parallel, ``--jobs`` at a time (default: the number of CPU cores), each in its
own process and kernel with one torch thread (``--threads``; ``OMP_NUM_THREADS``), as ``make test``
runs them: a reduction split over another number of threads adds in another order, and training
amplifies that, so results committed from another thread count would not be reproduced.  The runner keeps
going when a notebook fails, prints one table of notebook, status and wall time at the end,
writes it to ``data/results/run_summary.json``, and exits non-zero if any notebook failed.

Parameters (``-p NAME VALUE``) are checked against each selected notebook's ``parameters`` cell
before anything runs: an unknown name is refused with the notebook's parameters listed, and a
value is parsed as a Python literal (``true`` / ``false`` / ``none`` in any case too) and must
fit the type of the default (``-p quick false`` is False, ``-p steps 1e3`` is 1000, a list
parameter takes ``'[0.01, 0.1]'``).

Executed notebooks are written back in place unless ``--out`` names another folder (use one when
you change parameters, so the committed notebooks keep their toy-default outputs).  A notebook is
executed into a temporary file and replaces its target only when it ran through: a failed run in
place leaves the committed notebook untouched (the failed copy is kept for reading, its path
printed); with ``--out`` the failed copy is written there.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib import paths
from lib.results import atomic_write_text

NOTEBOOKS_DIR = paths.REPO_ROOT / "notebooks"

# Parameter sets by profile; "default" is each notebook's own parameters cell (the toy default).
# "full" is what a user with a GPU and internet runs: real models named as the papers used them.
# Every key must be a parameter of its notebook (tests/test_run.py checks it).
PROFILES: dict[str, dict[str, dict]] = {
    "default": {},
    "full": {
        "01": {"model": "meta-llama/Llama-2-13b-hf", "probe_layer": 14},
        "02": {"model": "meta-llama/Llama-2-13b-hf"},
        "03": {"model": "gpt2"},
        "04": {"model": "gpt2"},
        "05": {"model": "gpt2"},
        "06": {"model": "gpt2"},
        "07": {"d_resid": 1000},
        "10": {"retrain_grid": True},
    },
}

# The parameter that names the model, in each notebook that runs on any causal LM (a toy name, a local
# Hugging Face folder or a hub name).  Not here: 00 (builds the toy world), 07, 10 and 17 (train their own
# small networks), 11, 15 and 16 (they need models trained for them: LMs pretrained with a shared SAE, a pair
# conditioned on meta-tokens, a retrodictor of the forward model; see the README's "A real model on a GPU").
MODEL_PARAMETER: dict[str, str] = {"01": "model", "02": "model", "03": "model", "04": "model", "05": "model",
                                   "06": "model", "08": "model", "09": "model_name", "12": "model", "13": "model",
                                   "14": "model"}
# "smoke": every cell on the smallest settings (the notebooks x families test runs it on the GPT-2, Pythia and
# Llama stand-ins): numbers are noise, only that each notebook runs through on a model is checked.
PROFILES["smoke"] = {number: {"quick": True} for number in MODEL_PARAMETER}


def failed_dir() -> Path:
    """Where a notebook that failed in place keeps its executed copy (the committed one is untouched)."""
    return Path(tempfile.gettempdir()) / "compendium-failed"


class ParameterError(ValueError):
    """A ``-p`` name the notebook does not have, or a value that does not fit its default's type."""


def find_notebooks(only: str | None = None, folder: Path | None = None) -> list[Path]:
    """Notebooks in ``folder`` (default ``notebooks/``, sorted), optionally filtered by a comma list
    of numbers or names."""
    folder = folder or NOTEBOOKS_DIR
    books = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return books
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [b for b in books if any(b.stem == w or b.stem.startswith(f"{w}_") or b.stem.split("_")[0] == w
                                      for w in wanted)]
    missing = [w for w in wanted if not any(b.stem == w or b.stem.split("_")[0] == w or b.stem.startswith(f"{w}_")
                                            for b in chosen)]
    if missing:
        names = ", ".join(b.stem for b in books)
        raise SystemExit(f"no notebook matches {missing}; available: {names}")
    return chosen


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """``-p key value``: ``true`` / ``false`` / ``none`` (any case), Python or JSON literals
    (numbers, lists, dicts), anything else a string."""
    stripped = text.strip()
    if stripped.lower() in _WORDS:
        return _WORDS[stripped.lower()]
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(stripped)  # JSON spellings inside lists: [true, null]
    except ValueError:
        return text


@dataclass
class Parameter:
    """One assignment of a notebook's ``parameters`` cell."""

    name: str
    default: str  # the source text of the default
    help: str = ""

    def default_value(self) -> tuple[bool, Any]:
        """``(known, value)``: the default as a Python literal, when it is one."""
        try:
            return True, ast.literal_eval(self.default)
        except (ValueError, SyntaxError, TypeError):
            return False, None

    def describe(self) -> str:
        return f"{self.name} = {self.default}" + (f"  # {self.help}" if self.help else "")


def notebook_parameters(path: str | os.PathLike) -> dict[str, Parameter]:
    """The parameters of a notebook's cell tagged ``parameters``, in order.

    Uses ``papermill.inspect_notebook``; assignments its line parser skips (a quote inside a
    comment trips it) are read from the cell's syntax tree, so no parameter is missed.
    """
    import nbformat
    import papermill as pm

    log = logging.getLogger("papermill")
    level = log.level
    log.setLevel(logging.ERROR)  # "Unable to parse line ...": handled below
    try:
        found = pm.inspect_notebook(str(path))
    finally:
        log.setLevel(level)
    params = {n: Parameter(n, str(p.get("default", "")), str(p.get("help") or "")) for n, p in found.items()}
    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return params
    source = cell.source
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return params
    ordered: dict[str, Parameter] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    ordered[t.id] = params.get(t.id) or Parameter(
                        t.id, ast.get_source_segment(source, node.value) or "", comments.get(node.lineno, ""))
    for name, p in params.items():
        ordered.setdefault(name, p)
    return ordered


def _type_name(value: Any) -> str:
    return {bool: "True/False", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a dict"}.get(type(value), type(value).__name__)


def coerce_parameter(param: Parameter, value: Any, text: str | None = None) -> Any:
    """``value`` made to fit ``param``'s default type, or ``ParameterError`` saying what fits.

    ``text`` is what the user typed (``-p``), when there was one: a string parameter keeps it as typed.
    """
    known, default = param.default_value()
    if not known or default is None:
        return value
    shown = repr(text) if text is not None else repr(value)

    def refuse(example: str) -> ParameterError:
        return ParameterError(f"{param.name} takes {_type_name(default)} (default {param.default}); got {shown}. "
                              f"Example: -p {param.name} {example}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise refuse("true")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise refuse(str(default))
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise refuse(str(default))
    if isinstance(default, str):
        if text is not None:
            return None if text.strip().lower() in ("none", "null") else text
        if isinstance(value, str) or value is None:
            return value
        raise refuse(json.dumps(default))
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise refuse(f"'{json.dumps(list(default)[:3])}'")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise refuse(f"'{json.dumps(default)}'")
    return value


def check_parameters(book: Path, params: dict[str, Any], typed: dict[str, str] | None = None) -> dict[str, Any]:
    """``params`` checked against ``book``'s parameters cell: unknown names refused (the message
    lists the notebook's parameters), values made to fit their defaults' types."""
    typed = typed or {}
    known = notebook_parameters(book)
    unknown = [k for k in params if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(known), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        listing = "\n".join(f"    {p.describe()}" for p in known.values()) or "    (none: it has no cell tagged 'parameters')"
        raise ParameterError(f"{book.stem} has no parameter {', '.join(hints)}. Its parameters:\n{listing}")
    out = {}
    for k, v in params.items():
        try:
            out[k] = coerce_parameter(known[k], v, typed.get(k))
        except ParameterError as err:
            raise ParameterError(f"{book.stem}: {err}") from None
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def run_notebook(path: Path, out: Path, parameters: dict, timeout: int | None = None,
                 keep_failed: Path | None = None) -> tuple[str, float, str]:
    """Execute one notebook with papermill into a temporary file; return (status, seconds, error).

    ``out`` is replaced only when every cell ran.  On failure the executed copy (with the error
    cell) goes to ``keep_failed`` when given, and ``out`` is left as it was.
    """
    import papermill as pm

    start = time.perf_counter()
    env_before = os.environ.get("COMPENDIUM_QUIET")
    os.environ["COMPENDIUM_QUIET"] = "1"
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=".run-"))
    executed = scratch / out.name
    try:
        pm.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                            kernel_name="python3", progress_bar=False, execution_timeout=timeout)
        _strip_machine_paths(executed, path, out)
        os.replace(executed, out)
        return "ok", time.perf_counter() - start, ""
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        message = f"{type(err).__name__}: {_error_summary(str(err))}"
        if keep_failed is not None and executed.exists():
            keep_failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(executed), keep_failed)
            message += f" (executed copy: {keep_failed})"
        return "FAILED", time.perf_counter() - start, message
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if env_before is None:
            os.environ.pop("COMPENDIUM_QUIET", None)
        else:
            os.environ["COMPENDIUM_QUIET"] = env_before


def _error_summary(text: str, limit: int = 400) -> str:
    """The line of a papermill error that names the exception (``ValueError: ...``) and the lines of its
    message after it (a multi-line message keeps its first line), cut to ``limit`` characters."""
    import re

    lines = [line for line in text.strip().splitlines() if line.strip()]
    named = [i for i, line in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    if not named:
        return lines[-1] if lines else ""
    shown = " ".join(line.strip() for line in lines[named[-1]:])
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def setup_only(path: Path, out: Path) -> Path:
    """Write to ``out`` a copy of the notebook at ``path`` cut after its setup: the cells up to and
    including the first code cell after the parameters cell (imports, parameter checks, the model
    loaded; some setups also harvest activations or train).  Executed with a profile's parameters it
    shows, before a long run, whether that run would start."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    params = next((i for i in code if "parameters" in nb.cells[i].metadata.get("tags", [])), None)
    if params is None:
        raise ParameterError(f"{path.name} has no cell tagged 'parameters'")
    setup = next((i for i in code if i > params), params)
    nb.cells = nb.cells[: setup + 1]
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out))
    return out


def _strip_machine_paths(executed: Path, source: Path, out: Path) -> None:
    """papermill records the absolute input and output paths in the notebook's metadata; a
    committed notebook keeps them relative to the repository (or just the file name)."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    meta = nb.metadata.get("papermill")
    if not meta:
        return

    def relative(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(paths.REPO_ROOT))
        except ValueError:
            return p.name

    meta["input_path"], meta["output_path"] = relative(source), relative(out)
    nbformat.write(nb, str(executed))


def _run_in_worker(path: Path, out: Path, parameters: dict, timeout: int | None, keep_failed: Path | None,
                   env: dict[str, str]) -> tuple[str, float, str]:
    """A worker process's task: its environment (threads, capability) is inherited by the kernel."""
    os.environ.update(env)
    return run_notebook(path, out, parameters, timeout, keep_failed)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def run_many(tasks: list[dict], jobs: int, env: dict[str, str] | None = None) -> list[tuple[str, float, str]]:
    """Run ``tasks`` ``jobs`` at a time; results in task order.

    A task holds the keyword arguments of :func:`run_notebook`, and optionally ``env``: variables
    for that run only (its kernel inherits them), added to ``env``.  ``jobs == 1`` runs the tasks
    one after the other in this process; otherwise each runs in a worker process.
    """
    results: list[tuple[str, float, str] | None] = [None] * len(tasks)
    if jobs <= 1 or len(tasks) <= 1:
        for i, t in enumerate(tasks):
            t = dict(t)
            extra = {**(env or {}), **t.pop("env", {})}
            saved = {k: os.environ.get(k) for k in extra}
            os.environ.update(extra)
            try:
                print(f"-> {t['path'].stem} {_shown(t['parameters'])}".rstrip(), flush=True)
                results[i] = run_notebook(**t)
                print(f"   {results[i][0]} in {results[i][1]:.1f}s {results[i][2]}".rstrip(), flush=True)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return results  # type: ignore[return-value]
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("spawn")) as pool:
        futures = {}
        for i, t in enumerate(tasks):
            print(f"-> {t['path'].stem} {_shown(t['parameters'])}".rstrip(), flush=True)
            futures[pool.submit(_run_in_worker, t["path"], t["out"], t["parameters"], t.get("timeout"),
                                t.get("keep_failed"), {**(env or {}), **t.get("env", {})})] = i
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as err:  # the worker itself died
                results[i] = ("FAILED", 0.0, f"{type(err).__name__}: {err}")
            status, seconds, message = results[i]
            print(f"   {tasks[i]['path'].stem}: {status} in {seconds:.1f}s {message}".rstrip(), flush=True)
    return results  # type: ignore[return-value]


def _shown(params: dict) -> str:
    return " ".join(f"{k}={v!r}" for k, v in params.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma list of notebook numbers or names, e.g. 00,03")
    ap.add_argument("--profile", default="default", choices=sorted(PROFILES))
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="set a notebook parameter (repeatable); applies to every selected notebook")
    ap.add_argument("--out", type=Path, default=None, help="write executed notebooks here instead of in place")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--jobs", "-j", type=int, default=None,
                    help=f"notebooks run at once (default: the number of CPU cores, {default_jobs()} here)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per notebook (default 1, or OMP_NUM_THREADS when set): as make test")
    ap.add_argument("--list", action="store_true", help="list the notebooks and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the parameters, then run each notebook only up to its setup cell (the model loaded; "
                         "some setups also harvest activations or train a first SAE); nothing is written back")
    args = ap.parse_args(argv)

    books = find_notebooks(args.only)
    if args.list:
        for b in books:
            print(b.stem)
        return 0
    if not books:
        print("no notebooks found", file=sys.stderr)
        return 1
    jobs = args.jobs if args.jobs is not None else default_jobs()
    if jobs < 1:
        ap.error(f"--jobs must be at least 1, got {jobs}")
    typed = dict(args.parameter)
    overrides = {k: parse_value(v) for k, v in args.parameter}
    tasks, scratches = [], []
    try:
        for book in books:
            params = check_parameters(book, {**PROFILES[args.profile].get(book.stem[:2], {}), **overrides}, typed)
            out = (args.out / book.name) if args.out else book
            keep = out if args.out else failed_dir() / book.name
            if args.dry_run:
                scratch = Path(tempfile.mkdtemp(prefix="dry-run-"))
                scratches.append(scratch)
                book, out, keep = setup_only(book, scratch / book.name), scratch / f"run-{book.name}", None
            tasks.append({"path": book, "out": out, "parameters": params, "timeout": args.timeout, "keep_failed": keep})
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    threads = str(args.threads) if args.threads is not None else os.environ.get("OMP_NUM_THREADS", "1")
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}  # read by torch when the kernel starts
    results = run_many(tasks, jobs, env)
    rows = [{"notebook": t["path"].stem, "status": s, "seconds": round(sec, 1), "parameters": t["parameters"],
             "error": msg} for t, (s, sec, msg) in zip(tasks, results)]

    width = max(len(r["notebook"]) for r in rows)
    print(f"\n{'notebook':<{width}}  status  wall time")
    for r in rows:
        print(f"{r['notebook']:<{width}}  {r['status']:<6}  {r['seconds']:>7.1f}s")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"{r['notebook']}: {r['error']}")
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.dry_run:
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)
        return 1 if failed else 0
    summary = {"profile": args.profile, "jobs": jobs, "notebooks": rows}
    atomic_write_text(paths.results_dir() / "run_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
