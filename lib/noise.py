"""Measure a notebook's run-to-run noise, to size the tolerances of its results check.

    python -m lib.noise --only 04 --seeds 0 1 2                       # seed-to-seed spread
    python -m lib.noise --only 07 --capabilities native default       # machine-to-machine
    python -m lib.noise --only 04 --seeds 0 1 --capabilities native default --jobs 2
    python -m lib.noise --only 07 --results a.json b.json             # analyse finished runs

Each run executes the notebook with papermill into a scratch folder (its own ``COMPENDIUM_ROOT``),
with ``-p seed S`` and, for a capability other than ``native``, ``ATEN_CPU_CAPABILITY`` set to it
and ``MKL_CBWR=COMPATIBLE``: the two switches that make one machine compute like another CPU.
Then, for each group of result paths (list indices replaced by ``*``), it prints how far the
values spread across the runs, how far they moved from the committed results, what the
notebook's check allows today (``notebooks/NN_name.check.toml``) and whether every run passes.

A tolerance is sized from this table: a few times the largest spread, stated in the check file
with ``basis = "measured"`` and a comment saying how it was measured.  A notebook whose ``seed``
does not change its models (07 seeds its models itself) measures seed noise inside the notebook.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from lib.results import check_file_for, compare_results, flatten, load_check
from lib.run import ParameterError, check_parameters, default_jobs, find_notebooks, parse_value, run_many


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def spread_table(runs: dict[str, dict], committed: dict, check=None) -> list[dict]:
    """One row per group of paths: ``n``, largest spread across runs, largest move from committed,
    the allowance of the rule that decides, and how many runs pass the check."""
    flat_runs = {name: flatten(r) for name, r in runs.items()}
    flat_committed = flatten(committed)
    groups: dict[str, list[str]] = defaultdict(list)
    for path in flat_committed:
        groups[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)].append(path)
    rows = []
    for group, members in groups.items():
        spread = moved = allowed = 0.0
        differ = 0
        for path in members:
            values = [f[path] for f in flat_runs.values() if path in f]
            base = flat_committed[path]
            if values and all(_number(v) for v in values) and _number(base):
                spread = max(spread, max(values) - min(values))
                moved = max(moved, max(abs(v - base) for v in values))
                rule = check.rule_for(path) if check is not None else None
                if rule is not None and not rule.ignore:
                    allowed = max(allowed, rule.allowed(base))
            elif any(v != base for v in values):
                differ += 1
        rows.append({"group": group, "n": len(members), "spread": spread, "moved": moved,
                     "allowed": allowed, "non_numeric_differences": differ})
    return rows


def print_report(runs: dict[str, dict], committed: dict, check=None, all_rows: bool = False) -> int:
    """Print the spread table and each run's verdict; returns the number of runs that fail the check."""
    rows = spread_table(runs, committed, check)
    width = min(70, max(len(r["group"]) for r in rows))
    print(f"\n{'group of values':<{width}}  {'n':>4}  {'spread':>10}  {'moved':>10}  {'allowed':>10}")
    for r in rows:
        if not all_rows and r["spread"] == 0 and r["moved"] == 0 and not r["non_numeric_differences"]:
            continue
        flag = "  <- beyond" if check is not None and r["moved"] > r["allowed"] else ""
        extra = f"  ({r['non_numeric_differences']} non-numeric differ)" if r["non_numeric_differences"] else ""
        print(f"{r['group'][:width]:<{width}}  {r['n']:>4}  {r['spread']:>10.3g}  {r['moved']:>10.3g}  "
              f"{r['allowed']:>10.3g}{flag}{extra}")
    unchanged = sum(1 for r in rows if r["spread"] == 0 and r["moved"] == 0 and not r["non_numeric_differences"])
    if unchanged and not all_rows:
        print(f"({unchanged} groups identical in every run and to the committed results; --all shows them)")
    failing = 0
    if check is not None:
        for name, result in runs.items():
            problems = compare_results(result, committed, check)
            failing += bool(problems)
            print(f"{name}: {'passes' if not problems else f'{len(problems)} value(s) beyond tolerance'}")
            for p in problems[:10]:
                print(f"    {p}")
    return failing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", required=True, help="one notebook, by number or name")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="values of the notebook's `seed` parameter")
    ap.add_argument("--capabilities", nargs="+", default=["native"],
                    help="native, or an ATEN_CPU_CAPABILITY value (default, avx2, avx512) run with MKL_CBWR=COMPATIBLE")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="other parameters, as for python -m lib.run")
    ap.add_argument("--jobs", "-j", type=int, default=default_jobs())
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--results", nargs="+", type=Path, default=None,
                    help="analyse these results files instead of running the notebook")
    ap.add_argument("--all", action="store_true", help="list unchanged groups too")
    args = ap.parse_args(argv)

    [book] = find_notebooks(args.only)
    committed = json.loads((book.parent.parent / "data" / "results" / f"{book.stem}.json").read_text())
    check_path = check_file_for(book)
    check = load_check(check_path) if check_path.exists() else None

    if args.results:
        runs = {str(p): json.loads(Path(p).read_text()) for p in args.results}
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix=f"noise-{book.stem[:2]}-"))
        typed = dict(args.parameter)
        tasks, names = [], []
        for cap in args.capabilities:
            for seed in args.seeds:
                try:
                    params = check_parameters(book, {**{k: parse_value(v) for k, v in typed.items()}, "seed": seed},
                                              typed)
                except ParameterError as err:
                    print(f"error: {err}")
                    return 2
                name = f"seed{seed}-{cap}"
                root = out / name
                tasks.append({"path": book, "out": root / book.name, "parameters": params, "keep_failed": root / book.name,
                              "env": {"COMPENDIUM_ROOT": str(root), "OMP_NUM_THREADS": "1",
                                      **({} if cap == "native" else {"ATEN_CPU_CAPABILITY": cap, "MKL_CBWR": "COMPATIBLE"})}})
                names.append(name)
        results = run_many(tasks, args.jobs)
        runs = {}
        for name, task, (status, seconds, message) in zip(names, tasks, results):
            path = Path(task["env"]["COMPENDIUM_ROOT"]) / "data" / "results" / f"{book.stem}.json"
            print(f"{name}: {status} in {seconds:.0f}s {message}".rstrip())
            if status == "ok" and path.exists():
                runs[name] = json.loads(path.read_text())
        print(f"runs kept in {out}")
        if not runs:
            return 1
    return 1 if print_report(runs, committed, check, args.all) else 0


if __name__ == "__main__":
    raise SystemExit(main())
