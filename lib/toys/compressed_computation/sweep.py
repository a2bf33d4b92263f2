"""Notebook 07's committed sweep: every p and every sigma, several seeds, APD's 10,000 steps.

``make cc-sweep`` runs ``python -m lib.toys.compressed_computation.sweep --out data/sweeps/07_cc_sweep.json``
(about half an hour of one core).  The plan (:func:`sweep_plan`) is the notebook's: the p sweep
(random / clean / no embedding), the sigma sweep at ``sigma_p`` (clean embedding plus
``sigma * M0``, the embedding's M0 and a Gaussian one at matched sigma), the parametrization
check (``A``, ``B`` as the parameters), all at ``steps`` with ``seeds`` seeds each; and the p
sweep again at ``short_steps`` (APD's published 1,000-step runs had been the notebook's), so
that training length is a measured comparison.

Training goes through :func:`lib.toys.compressed_computation.train_models`'s job runner, one job
(models sharing p, at most ``job_size``) at a time in this process.  Each finished job is
appended to ``<out>.partial.jsonl`` and a line is logged to ``<out>.log``: a killed run restarts
where it stopped (jobs already in the partial file are skipped) and loses at most one job.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch

from lib.toys.compressed_computation.model import ModelSpec, TrainConfig, sigma_specs, sweep_specs
from lib.toys.compressed_computation.report import results_frame
from lib.toys.compressed_computation.train import TrainedModels, _jobs, _run_job

PS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1)
SIGMA_SCALES = (0.5, 1.0, 2.0, 4.0)  # in units of matched_sigma; 0 is the p sweep's clean model
CURVE_POINTS = 40  # training-loss points stored per model


def sweep_plan(steps: int = 10_000, short_steps: int = 1_000, seeds: int = 3, ps: Sequence[float] = PS,
               sigma_p: float = 0.01, sigma_scales: Sequence[float] = SIGMA_SCALES,
               d_resid: int = 1000) -> list[tuple[int, list[ModelSpec]]]:
    """``[(steps, specs), ...]``: what the sweep trains, long runs first."""
    long = (sweep_specs(ps, seeds) + sigma_specs(sigma_p, sigma_scales, seeds, d_resid)
            + sigma_specs(sigma_p, [1.0], seeds, d_resid, mixing="gaussian")
            + [ModelSpec(float(sigma_p), e, 0.0, s, parametrization="effective")
               for e in ("random", "clean") for s in range(seeds)])
    plan = [(steps, list(dict.fromkeys(long)))]
    if short_steps:
        plan.append((short_steps, sweep_specs(ps, seeds)))
    return plan


def _key(steps: int, specs: Sequence[ModelSpec]) -> str:
    return json.dumps([steps, [asdict(s) for s in specs]])


def _job_rows(specs: list[ModelSpec], cfg: TrainConfig, eval_rows: int) -> list[dict]:
    """Train and evaluate one job; one row per model (``results_frame``'s, plus steps and curve)."""
    A, B, mix, curves, losses, naive = _run_job(specs, cfg, eval_rows)
    steps = [(k + 1) * cfg.log_every for k in range(cfg.steps // cfg.log_every)]
    tm = TrainedModels(specs, A, B, mix, curves, steps, cfg, losses, naive)
    rows = results_frame(tm).to_dict("records")
    for i, row in enumerate(rows):
        row["steps"] = cfg.steps
        row["curve_steps"] = steps
        row["curve"] = [float(v) for v in curves[i]]
    return rows


def run_sweep(out: Path, plan: list[tuple[int, list[ModelSpec]]] | None = None, cfg: TrainConfig | None = None,
              eval_rows: int = 200_000, log=None) -> dict:
    """Run ``plan`` (default :func:`sweep_plan`) job by job, resumable; write ``out`` (JSON) at the end.

    ``cfg`` gives everything but ``steps`` and ``log_every`` (set per entry of the plan: the
    loss curve keeps ``CURVE_POINTS`` points).  Returns what was written:
    ``{"config": ..., "runs": [row per model]}``.
    """
    from lib.results import atomic_write_text

    out = Path(out)
    plan = plan if plan is not None else sweep_plan()
    base = cfg or TrainConfig()
    partial = out.with_name(out.name + ".partial.jsonl")
    log_path = out.with_name(out.name + ".log")
    done: dict[str, list[dict]] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec["rows"]

    def say(msg: str) -> None:
        with log_path.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        if log is not None:
            log(msg)

    todo = []
    for steps, specs in plan:
        cfg = replace(base, steps=steps, log_every=max(1, steps // CURVE_POINTS), workers=1)
        todo += [(cfg, [specs[i] for i in job]) for job in _jobs(specs, cfg)]
    say(f"start: {len(todo)} jobs, {sum(len(s) for _, s in todo)} models, {len(done)} jobs already done")
    rows: list[dict] = []
    t_all = time.perf_counter()
    for k, (cfg, specs) in enumerate(todo):
        key = _key(cfg.steps, specs)
        if key not in done:
            t0 = time.perf_counter()
            done[key] = _job_rows(specs, cfg, eval_rows)
            with partial.open("a") as f:
                f.write(json.dumps({"key": key, "rows": done[key]}) + "\n")
            say(f"job {k + 1}/{len(todo)}: {cfg.steps} steps, p = {specs[0].p}, {len(specs)} models, "
                f"{time.perf_counter() - t0:.0f} s (total {time.perf_counter() - t_all:.0f} s)")
        rows += done[key]
    config = {**asdict(replace(base, steps=plan[0][0], workers=1)), "eval_rows": eval_rows,
              "plan": [{"steps": s, "models": len(specs)} for s, specs in plan]}
    config.pop("log_every")
    result = {"config": config, "torch": torch.__version__, "runs": rows}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    say(f"done: {len(rows)} models in {time.perf_counter() - t_all:.0f} s this session, written to {out.name}")
    return result


def load_sweep(path: Path | str, steps: int | None = None):
    """The committed sweep's rows as a DataFrame (``results_frame``'s columns plus ``steps``),
    only those trained for ``steps`` when given."""
    import pandas as pd

    data = json.loads(Path(path).read_text())
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curve", "curve_steps")} for r in data["runs"]])
    return df if steps is None else df[df.steps == steps].reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="notebook 07's sweep: every p and sigma, 3 seeds, 10,000 steps")
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write (progress in <out>.log)")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--short-steps", type=int, default=1_000, help="the p sweep again at this length (0: not)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ps", type=float, nargs="+", default=list(PS))
    ap.add_argument("--eval-rows", type=int, default=200_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plan = sweep_plan(args.steps, args.short_steps, args.seeds, args.ps)
    run_sweep(args.out, plan, eval_rows=args.eval_rows, log=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
