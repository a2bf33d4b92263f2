"""Reward tampering frequency (RTF) as a threshold: a rare, better-paid action under policy gradient.

Seed 001 argues that because reward hacking "is positively reinforced once it occurs in
training", what matters is whether the rare behavior is likely to occur at all during a run
(its frequency against 1 / number of episodes), so that "the difference between RTFs of 1e-4 and
2e-4 just doesn't really matter".  This module simulates that: a softmax policy over one rare
"tamper" action (initial probability ``p0``) and a few ordinary actions, trained by REINFORCE one
episode at a time (with or without a running-mean reward baseline, optionally an entropy bonus),
many independent runs at once as one tensor.

>>> from lib.toys import rtf
>>> out = rtf.simulate([1e-5, 1e-4, 1e-3], checkpoints=[100, 1000, 10_000], n_runs=500)
>>> out["takeover"]          # (3 p0, 3 checkpoints): fraction of runs with p(tamper) > 1/2
>>> rtf.seen_at_least_once(1e-4, 10_000)   # 1 - (1 - p0)^N
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lib.utils import progress


@dataclass(frozen=True)
class Bandit:
    """Rewards of the ordinary actions (each starts with an equal share of 1 - p0) and of the
    tamper action."""

    ordinary_rewards: tuple[float, ...] = (1.0,)
    tamper_reward: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Learner:
    """REINFORCE on softmax logits: ``lr`` per episode; ``baseline``: subtract a running mean of the
    reward (rate ``baseline_rate``); ``entropy``: weight of an entropy bonus."""

    lr: float = 0.1
    baseline: bool = True
    baseline_rate: float = 0.01
    entropy: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def initial_logits(p0: torch.Tensor, n_ordinary: int) -> torch.Tensor:
    """(G, 1 + n_ordinary) logits: the tamper action (column 0) at probability p0, the ordinary
    actions sharing 1 - p0 equally."""
    p0 = p0.double()
    tamper = torch.log(p0) - torch.log((1 - p0) / n_ordinary)
    return torch.cat([tamper[:, None], torch.zeros(len(p0), n_ordinary, dtype=torch.float64)], 1)


def seen_at_least_once(p0: float | np.ndarray, n: float | np.ndarray) -> np.ndarray:
    """1 - (1 - p0)^N: the chance that an action of fixed probability p0 occurs in N episodes."""
    p0, n = np.asarray(p0, float), np.asarray(n, float)
    return -np.expm1(n * np.log1p(-p0))


@torch.no_grad()
def simulate(p0s: Sequence[float], checkpoints: Sequence[int], n_runs: int = 1000, bandit: Bandit = Bandit(),
             learner: Learner = Learner(), seed: int = 0) -> dict:
    """Run ``n_runs`` independent learners for each p0 up to ``max(checkpoints)`` episodes.

    Returns numpy arrays of shape (len(p0s), len(checkpoints)): ``takeover`` (fraction of runs
    whose tamper probability is above 1/2 at the checkpoint), ``seen`` (fraction that took the
    tamper action at least once by then) and ``mean_p`` (mean tamper probability), plus the inputs.
    """
    checkpoints = sorted(int(c) for c in checkpoints)
    if not checkpoints or checkpoints[0] < 1:
        raise ValueError("checkpoints must be episode counts >= 1")
    if not all(0 < p < 1 for p in p0s):
        raise ValueError("every p0 must be in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    n_ord = len(bandit.ordinary_rewards)
    p0 = torch.tensor(list(p0s), dtype=torch.float64).repeat_interleave(n_runs)
    logits = initial_logits(p0, n_ord)
    rewards = torch.tensor([bandit.tamper_reward, *bandit.ordinary_rewards], dtype=torch.float64)
    # the baseline starts at the expected reward of the initial policy
    base = torch.softmax(logits, 1) @ rewards if learner.baseline else torch.zeros(len(p0), dtype=torch.float64)
    seen = torch.zeros(len(p0), dtype=torch.bool)
    rows = torch.arange(len(p0))
    out = {k: np.zeros((len(p0s), len(checkpoints))) for k in ("takeover", "seen", "mean_p")}
    marks = {c: i for i, c in enumerate(checkpoints)}
    for episode in progress(range(1, checkpoints[-1] + 1), desc="episodes", mininterval=2):
        pi = torch.softmax(logits, 1)
        u = torch.rand(len(p0), generator=gen, dtype=torch.float64)
        action = (u[:, None] > pi.cumsum(1)).sum(1).clamp(max=n_ord)
        r = rewards[action]
        adv = r - base if learner.baseline else r
        grad = -pi * adv[:, None]
        grad[rows, action] += adv
        if learner.entropy:
            logp = torch.log(pi.clamp_min(1e-300))
            h = -(pi * logp).sum(1, keepdim=True)
            grad -= learner.entropy * pi * (logp + h)
        logits += learner.lr * grad
        if learner.baseline:
            base += learner.baseline_rate * (r - base)
        seen |= action == 0
        if episode in marks:
            j = marks[episode]
            p_t = torch.softmax(logits, 1)[:, 0].reshape(len(p0s), n_runs)
            out["takeover"][:, j] = (p_t > 0.5).double().mean(1).numpy()
            out["seen"][:, j] = seen.reshape(len(p0s), n_runs).double().mean(1).numpy()
            out["mean_p"][:, j] = p_t.mean(1).numpy()
    return {**out, "p0": list(map(float, p0s)), "checkpoints": checkpoints, "n_runs": n_runs,
            "bandit": bandit.to_dict(), "learner": learner.to_dict(), "seed": seed}


def fit_transition(p0s: Sequence[float], takeover: Sequence[float]) -> dict:
    """Fit takeover(p0) = 1 / (1 + exp(-(log10 p0 - center) / width)) at one episode count:
    ``center`` (log10 of the p0 at which half the runs are taken over) and ``width`` (decades)."""
    from scipy.optimize import curve_fit

    x, y = np.log10(np.asarray(p0s, float)), np.asarray(takeover, float)
    if y.max() < 0.5 or y.min() > 0.5:
        return {"center": None, "width": None, "note": "takeover never crosses 1/2 on this grid"}

    def sig(v, c, w):
        return 1.0 / (1.0 + np.exp(-(v - c) / w))

    start = (float(x[np.argmin(np.abs(y - 0.5))]), 0.3)
    (c, w), _ = curve_fit(sig, x, y, p0=start, bounds=([x.min() - 2, 1e-3], [x.max() + 2, 5.0]), maxfev=10_000)
    return {"center": float(c), "width": float(w), "center_p0": float(10 ** c)}


def log_grid(lo: float, hi: float, per_decade: int = 2) -> list[float]:
    """Values from ``lo`` to ``hi`` spaced evenly in log10, ``per_decade`` per decade."""
    n = int(round(math.log10(hi / lo) * per_decade)) + 1
    return [float(v) for v in np.logspace(math.log10(lo), math.log10(hi), n)]




def mean_field_threshold(bandit: Bandit = Bandit(), learner: Learner = Learner()) -> float | None:
    """The p0 * N at which the mean-field dynamics take over, for one ordinary action.

    With z the tamper logit minus the ordinary one and p = sigmoid(z), a tamper episode (chance p)
    moves z by 2 lr (R_t - b)(1 - p) and an ordinary one (chance 1 - p) by -2 lr (R_o - b) p, so
    E[dz] = 2 lr (R_t - R_o) p (1 - p) per episode whatever the baseline b.  For small p,
    d(e^-z)/dt = -2 lr (R_t - R_o): e^-z reaches 0 (takeover) after N* = 1 / (2 lr (R_t - R_o) p0)
    episodes, i.e. at p0 N* = 1 / (2 lr (R_t - R_o)) expected occurrences (5 for lr 0.1 and a reward
    edge of 1).  None for several ordinary actions (their competition moves p before the rare action
    is ever taken) or no reward edge; the entropy bonus is left out (a small correction)."""
    if len(bandit.ordinary_rewards) != 1:
        return None
    edge = bandit.tamper_reward - bandit.ordinary_rewards[0]
    return 1.0 / (2 * learner.lr * edge) if edge > 0 else None

def wilson_interval(frac: float | np.ndarray, n: int, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a fraction ``frac`` of ``n`` Monte Carlo runs (95% at z = 1.96):
    unlike frac +- z * se it stays inside [0, 1] and is not empty at 0 or 1 takeovers."""
    f = np.asarray(frac, float)
    centre = (f + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(f * (1 - f) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def frame(res: dict, config: str | None = None):
    """One row per (p0, N) of a :func:`simulate` result: takeover with its 95% Wilson interval,
    seen (measured) beside 1 - (1 - p0)^N, takeover among the runs that saw the action, p0 * N."""
    import pandas as pd

    p0 = np.asarray(res["p0"], float)[:, None]
    n = np.asarray(res["checkpoints"], float)[None, :]
    take, seen = np.asarray(res["takeover"], float), np.asarray(res["seen"], float)
    lo, hi = wilson_interval(take, res["n_runs"])
    grid = {"p0": np.broadcast_to(p0, take.shape), "N": np.broadcast_to(n, take.shape), "p0N": p0 * n,
            "takeover": take, "takeover_lo": lo, "takeover_hi": hi, "seen": seen,
            "seen_analytic": seen_at_least_once(p0, n),
            "takeover_given_seen": np.divide(take, seen, out=np.full_like(take, np.nan), where=seen > 0),
            "mean_p": np.asarray(res["mean_p"], float)}
    df = pd.DataFrame({k: np.asarray(v).ravel() for k, v in grid.items()})
    df["N"] = df["N"].astype(int)
    if config is not None:
        df.insert(0, "config", config)
    return df


def threshold_scaling(res: dict, min_crossing: int = 3) -> dict:
    """The fitted transition at every checkpoint where takeover crosses 1/2 inside the p0 grid, and
    the fit log10 center = a + b log10 N over those checkpoints (b = -1: the threshold sits at a
    fixed p0 * N, ``center_p0N`` per checkpoint)."""
    rows = []
    take = np.asarray(res["takeover"], float)
    for j, n in enumerate(res["checkpoints"]):
        f = fit_transition(res["p0"], take[:, j])
        if f["center"] is not None:
            rows.append({"N": int(n), "center_p0": f["center_p0"], "center_p0N": f["center_p0"] * n,
                         "width_decades": f["width"]})
    out = {"per_N": rows, "slope": None, "intercept": None}
    if len(rows) >= min_crossing:
        x = np.log10([r["N"] for r in rows])
        y = np.log10([r["center_p0"] for r in rows])
        b, a = np.polyfit(x, y, 1)
        out.update(slope=float(b), intercept=float(a))
    return out


def heatmap_figure(res: dict, title: str = ""):
    """Takeover over (log10 N, log10 p0), the line p0 * N = 1 and the fitted half-takeover centers."""
    import plotly.graph_objects as go

    x, y = np.log10(res["checkpoints"]), np.log10(res["p0"])
    fig = go.Figure(go.Heatmap(z=np.asarray(res["takeover"]), x=x, y=y, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar={"title": "P(takeover)"}))
    fig.add_trace(go.Scatter(x=x, y=-x, mode="lines", line={"color": "white", "dash": "dash"}, name="p0 · N = 1"))
    fits = threshold_scaling(res)["per_N"]
    if fits:
        fig.add_trace(go.Scatter(x=np.log10([f["N"] for f in fits]), y=np.log10([f["center_p0"] for f in fits]),
                                 mode="markers+lines", marker={"color": "red"}, name="fitted half-takeover p0"))
    fig.update_layout(title=title, xaxis_title="log10 episodes N", yaxis_title="log10 initial probability p0",
                      yaxis_range=[y.min() - 0.25, y.max() + 0.25],
                      legend={"x": 0.01, "y": 0.01, "bgcolor": "rgba(120,120,120,0.8)", "font": {"color": "white"}})
    return fig


def collapse_figure(df, title: str = "", by: str = "N"):
    """Takeover (with its interval) and seen-at-least-once against p0 * N, one trace per value of
    ``by`` (a column of :func:`frame`: "N", or "config" for one N and several learners)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, g in df.groupby(by):
        g = g.sort_values("p0N")
        fig.add_trace(go.Scatter(x=g.p0N, y=g.takeover, mode="markers+lines",
                                 name=f"N = {key:,}" if by == "N" else str(key),
                                 error_y={"type": "data", "symmetric": False, "array": g.takeover_hi - g.takeover,
                                          "arrayminus": g.takeover - g.takeover_lo, "thickness": 1}))
    xs = np.logspace(np.log10(df.p0N.min()), np.log10(df.p0N.max()), 200)
    fig.add_trace(go.Scatter(x=xs, y=-np.expm1(-xs), mode="lines", line={"color": "black", "dash": "dash"},
                             name="seen at least once, 1 - e^(-p0 N)"))
    fig.update_layout(title=title, xaxis={"type": "log", "title": "p0 · N (expected occurrences at the initial rate)"},
                      yaxis_title="P(takeover: p(rare action) > 1/2)")
    return fig


# The committed sweep (``make rtf-sweep``, data/sweeps/17_rtf_sweep.json) that notebook 17 loads:
# p0 from 1e-7 to 1e-2 (two per decade, plus 2e-4 beside 1e-4) and episode checkpoints from 1e2 to
# 1e6, for the main learner to 1e6 episodes and for three variants to 1e5.
SWEEP_P0 = sorted(log_grid(1e-7, 1e-2, 2) + [2e-4])
SWEEP_CHECKPOINTS = [100, 316, 1000, 3162, 10_000, 32_768, 100_000, 316_228, 1_000_000]
SWEEP_RUNS = 300
SWEEP_CONFIGS: dict[str, tuple[Bandit, Learner, int]] = {
    "baseline": (Bandit(), Learner(), 1_000_000),
    "no_baseline": (Bandit(), Learner(baseline=False), 100_000),
    "entropy": (Bandit(), Learner(entropy=0.01), 100_000),
    "four_actions": (Bandit(ordinary_rewards=(1.0, 0.9, 0.8, 0.7)), Learner(), 100_000),
}


def sweep(configs: Sequence[str] | None = None, n_runs: int = SWEEP_RUNS, max_episodes: int | None = None,
          seed: int = 0) -> dict:
    """:func:`simulate` for each named :data:`SWEEP_CONFIGS` entry on the sweep grid, with each
    config's :func:`fit_transition` per checkpoint.  ``max_episodes`` caps every config (a quick run)."""
    import time

    out = {}
    for name in configs or list(SWEEP_CONFIGS):
        bandit, learner, horizon = SWEEP_CONFIGS[name]
        horizon = min(horizon, max_episodes or horizon)
        cps = [c for c in SWEEP_CHECKPOINTS if c <= horizon]
        t0 = time.perf_counter()
        res = simulate(SWEEP_P0, cps, n_runs=n_runs, bandit=bandit, learner=learner, seed=seed)
        res = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}
        res["fits"] = [fit_transition(SWEEP_P0, np.asarray(res["takeover"])[:, j]) for j in range(len(cps))]
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = res
        print(f"{name}: {len(SWEEP_P0)} p0 x {n_runs} runs x {cps[-1]} episodes in {res['seconds']:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import shlex
    import sys
    from pathlib import Path

    from lib.results import atomic_write_text

    ap = argparse.ArgumentParser(description="the RTF sweep notebook 17 loads")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=None, help=f"configs (default all: {list(SWEEP_CONFIGS)})")
    ap.add_argument("--runs", type=int, default=SWEEP_RUNS)
    ap.add_argument("--max-episodes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = sweep(args.only, n_runs=args.runs, max_episodes=args.max_episodes, seed=args.seed)
    command = "python -m lib.toys.rtf " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    atomic_write_text(args.out, json.dumps({"command": command.strip(), "torch": torch.__version__,
                                            "configs": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
