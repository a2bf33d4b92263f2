"""Run notebooks headless with papermill: ``python -m lib.run``.

    python -m lib.run                         # every notebook, toy defaults, executed in place
    python -m lib.run --only 00,03            # selected notebooks (by number or name)
    python -m lib.run --only 01 -p model toy-4l -p probe_layer 3 --out runs/   # other parameters
    python -m lib.run --profile full          # the GPU / real-model parameters (see PROFILES)

It keeps going when a notebook fails, prints a table of notebook, status and wall time at the
end, writes it to ``data/results/run_summary.json``, and exits non-zero if any notebook failed.
Executed notebooks are written back in place unless ``--out`` names another folder (use one when
you change parameters, so the committed notebooks keep their toy-default outputs).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

from lib import paths
from lib.results import atomic_write_text

NOTEBOOKS_DIR = paths.REPO_ROOT / "notebooks"

# Parameter sets by profile; "default" is each notebook's own parameters cell (the toy default).
# "full" is what a user with a GPU and internet runs: real models named as the papers used them.
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
    },
}


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


def parse_value(text: str):
    """``-p key value``: Python literals (numbers, lists, None, True) are parsed, anything else is a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_notebook(path: Path, out: Path, parameters: dict, timeout: int | None = None) -> tuple[str, float, str]:
    """Execute one notebook with papermill; return (status, seconds, error message)."""
    import papermill as pm

    start = time.perf_counter()
    env_before = os.environ.get("COMPENDIUM_QUIET")
    os.environ["COMPENDIUM_QUIET"] = "1"
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                            kernel_name="python3", progress_bar=False, execution_timeout=timeout)
        return "ok", time.perf_counter() - start, ""
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        return "FAILED", time.perf_counter() - start, message
    finally:
        if env_before is None:
            os.environ.pop("COMPENDIUM_QUIET", None)
        else:
            os.environ["COMPENDIUM_QUIET"] = env_before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma list of notebook numbers or names, e.g. 00,03")
    ap.add_argument("--profile", default="default", choices=sorted(PROFILES))
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="set a notebook parameter (repeatable); applies to every selected notebook")
    ap.add_argument("--out", type=Path, default=None, help="write executed notebooks here instead of in place")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = ap.parse_args(argv)

    books = find_notebooks(args.only)
    if args.list:
        for b in books:
            print(b.stem)
        return 0
    if not books:
        print("no notebooks found", file=sys.stderr)
        return 1
    overrides = {k: parse_value(v) for k, v in args.parameter}
    rows = []
    for book in books:
        params = {**PROFILES[args.profile].get(book.stem[:2], {}), **overrides}
        out = (args.out / book.name) if args.out else book
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        shown = " ".join(f"{k}={v!r}" for k, v in params.items())
        print(f"-> {book.stem} {shown}".rstrip(), flush=True)
        status, seconds, message = run_notebook(book, out, params, args.timeout)
        print(f"   {status} in {seconds:.1f}s {message}".rstrip(), flush=True)
        rows.append({"notebook": book.stem, "status": status, "seconds": round(seconds, 1),
                     "parameters": params, "error": message})

    width = max(len(r["notebook"]) for r in rows)
    print(f"\n{'notebook':<{width}}  status  wall time")
    for r in rows:
        print(f"{r['notebook']:<{width}}  {r['status']:<6}  {r['seconds']:>7.1f}s")
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    summary = {"profile": args.profile, "notebooks": rows}
    atomic_write_text(paths.results_dir() / "run_summary.json", json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
