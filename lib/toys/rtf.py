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
