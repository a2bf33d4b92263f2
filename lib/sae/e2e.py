"""Notebook 08's protocol: local vs end-to-end SAEs compared along their L0-vs-CE-increase curves.

Braun et al. 2024 ("Identifying functionally important features with end-to-end sparse dictionary
learning") train one SAE class under three objectives (``TrainConfig.objective``):

- ``local``:  ``MSE(a, a_hat) + phi * L1`` (MSE averaged over elements),
- ``e2e``:    ``KL(p_orig || p_spliced) + phi * L1``, the SAE spliced in, the model frozen,
- ``e2e_ds``: ``kl_ds * KL + phi * L1 + beta * mean_k MSE(resid_k spliced, resid_k orig)`` over
  every later block's residual stream,

with ``phi = lambda / d_model`` and L1 summed over latents, averaged over tokens.

>>> setup = prepare_e2e("toy-4l", layers=[0, 1], n_train_docs=200, n_eval_docs=40, context_size=128)
>>> row = run_one(setup, Run(layer=1, objective="e2e", lam=4.0, ratio=8, steps=100))
>>> table = matched({"local": rows_l, "e2e": rows_e}, "ce_increase")  # L0, alive, MSE... at one CE increase

Every SAE is scored by :func:`lib.sae.metrics.evaluate` on the same held-out tokens: L0, alive
fraction, MSE (reported averaged over elements), CE clean / spliced / zero-ablated, the KL and the
downstream residual MSE of the spliced run.  ``python -m lib.sae.e2e`` runs a sweep (one JSON line
per SAE), sharded over processes for a GPU: the committed table of notebook 08 was made that way.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lib.activations import TokenBatch, tokenize
from lib.hooks import downstream_resid_hooks, hook_name
from lib.sae.base import SAE, SAEConfig
from lib.sae.buffer import TensorSource, TokenSource
from lib.sae.metrics import evaluate
from lib.sae.recipe import SAEData, prepare
from lib.sae.trainer import TrainConfig, train_sae

OBJECTIVES = ("local", "e2e", "e2e_ds")

# Braun et al. 2024, GPT-2 small, SAEs at blocks.6.hook_resid_pre, dictionary 60 x 768, clean CE 3.139
PAPER = {
    "model": "gpt2-small, blocks.6.hook_resid_pre, d_sae = 60 x 768 = 46,080, ~410M training tokens",
    "matched_ce": {"ce_increase": 0.145, "l0": {"local": 69.4, "e2e": 27.5, "e2e_ds": 36.8},
                   "alive_fraction": {"local": 0.56, "e2e": 0.48, "e2e_ds": 0.33}},
    "matched_l0": {"ce_increase": {"local": 0.228, "e2e": 0.099}},
    "kl_coefficient_ds": 0.5,  # their e2e+ds runs: KL weight 0.5, downstream weight 2.5 split over the later layers
    "downstream_coefficient": 2.5,
}


@dataclass
class Run:
    """One SAE of the sweep."""

    layer: int  # residual stream after this block (blocks.{layer}.hook_resid_post)
    objective: str  # local | e2e | e2e_ds
    lam: float  # lambda: the sparsity coefficient is lambda / d_model
    ratio: int = 60  # d_sae = ratio * d_model
    seed: int = 0
    steps: int = 1000
    seqs_per_step: int = 16  # sequences per step (the local SAE sees the same number of tokens per step)
    lr: float = 1e-3
    kl_coefficient_ds: float = PAPER["kl_coefficient_ds"]  # e2e_ds only (e2e: 1)
    downstream_coefficient: float = PAPER["downstream_coefficient"]  # e2e_ds only (beta)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


@dataclass
class E2ESetup:
    """The model, training tokens and activations at each layer, and the held-out evaluation tokens."""

    data: SAEData
    train_batch: TokenBatch
    eval_batch: TokenBatch
    layers: list[int]
    n_eval_tokens: int = 0

    @property
    def model(self):
        return self.data.model

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)


def prepare_e2e(model, layers: Sequence[int], n_train_docs: int, n_eval_docs: int, context_size: int = 128,
                seed: int = 0, device=None, docs: Sequence[str] | None = None) -> E2ESetup:
    """Corpus documents (or ``docs``: training ones first), their activations at each layer's
    residual stream (for the local SAEs) and the same documents as token batches (for the e2e ones)."""
    data = prepare(model, [hook_name(layer) for layer in layers], n_train_docs, n_eval_docs, context_size,
                   seed=seed, device=device, docs=docs)
    train = tokenize(data.model, data.train_docs, context_size)
    ev = data.eval_batch()
    return E2ESetup(data, train, ev, list(layers), int(ev.counted_mask().sum()))


def train_run(setup: E2ESetup, run: Run) -> tuple[SAE, float]:
    """Train ``run``'s SAE; returns it and the wall seconds per training step."""
    d = setup.d_model
    hook = hook_name(run.layer)
    tokens = TokenSource(setup.train_batch, run.seqs_per_step, seed=run.seed)
    per_step = tokens.tokens_per_batch
    common = dict(total_tokens=run.steps * per_step, batch_size=per_step, lr=run.lr, seed=run.seed,
                  sparsity_coefficient=run.lam / d, grad_clip=10.0, log_every=max(1, run.steps // 10),
                  lr_decay_frac=0.2, sparsity_warmup_frac=0.05)
    cfg_sae = SAEConfig(d_in=d, d_sae=run.ratio * d, hook_name=hook, model_name=setup.data.model_name,
                        context_size=setup.data.context_size)
    if run.objective == "local":
        data = TensorSource(setup.data.acts[hook], per_step, seed=run.seed, device=setup.data.device)
        tc = TrainConfig(recon="mse_mean", objective="local", **common)
    elif run.objective == "e2e":
        data, tc = tokens, TrainConfig(objective="e2e", **common)
    else:
        data, tc = tokens, TrainConfig(objective="e2e_ds", kl_coefficient=run.kl_coefficient_ds,
                                       downstream_coefficient=run.downstream_coefficient, **common)
    sync(setup.data.device)
    t0 = time.perf_counter()
    sae, _ = train_sae(cfg_sae, data, tc, device=setup.data.device, model=setup.model)
    sync(setup.data.device)
    return sae, (time.perf_counter() - t0) / run.steps


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(setup: E2ESetup, sae: SAE, batch_size: int = 32) -> dict:
    """The row of the results table for one SAE, on the held-out tokens (see the module docstring)."""
    hook = sae.cfg.hook_name
    r = evaluate(sae, setup.model, setup.eval_batch, batch_size=batch_size,
                 downstream=downstream_resid_hooks(setup.model, hook))
    return {"l0": r["l0"], "alive_fraction": r["frac_alive"], "ce_increase": r["ce_spliced"] - r["ce_clean"],
            "ce_recovered": r["loss_recovered"], "mse": r["mse"] / setup.d_model, "kl": r["kl"],
            "downstream_mse": r.get("downstream_mse", float("nan")), "ce_clean": r["ce_clean"],
            "ce_zero_ablated": r["ce_zero_ablated"], "n_eval_tokens": r["n_tokens"]}


def run_one(setup: E2ESetup, run: Run, batch_size: int = 32) -> dict:
    """Train and measure one SAE: ``{lambda, l0, alive_fraction, ce_increase, mse, seconds_per_step, ...}``."""
    sae, sps = train_run(setup, run)
    row = {"layer": run.layer, "objective": run.objective, "ratio": run.ratio, "seed": run.seed, "lambda": run.lam,
           **measure(setup, sae, batch_size), "seconds_per_step": sps, "steps": run.steps}
    return row


# --------------------------------------------------------------------------------------------
# comparing objectives along their curves
# --------------------------------------------------------------------------------------------
def frontier(rows: Sequence[dict], x: str = "ce_increase", y: str = "l0") -> tuple[np.ndarray, np.ndarray]:
    """The rows' ``(x, y)`` sorted by ``x`` (one objective's sweep over lambda)."""
    pts = sorted((float(r[x]), float(r[y])) for r in rows)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def interpolate(rows: Sequence[dict], x: str, at: float, y: str, log_y: bool | None = None) -> float:
    """``y`` at ``x = at`` by linear interpolation along the curve in ``log x`` (and ``log y`` for
    ``l0``, ``mse``, ``kl``, ``ce_increase``, ``downstream_mse``: positive quantities spanning decades;
    fractions are interpolated linearly).  NaN outside the range the sweep covered (no extrapolation)."""
    xs, ys = frontier(rows, x, y)
    if len(xs) == 0 or at <= 0 or xs[0] <= 0 or not (xs[0] <= at <= xs[-1]):
        return float("nan")
    log_y = (y in LOG_QUANTITIES) if log_y is None else log_y
    if log_y:
        return float(np.exp(np.interp(math.log(at), np.log(xs), np.log(ys))))
    return float(np.interp(math.log(at), np.log(xs), ys))


LOG_QUANTITIES = ("l0", "mse", "kl", "ce_increase", "downstream_mse")
MEASURES = ("l0", "alive_fraction", "ce_increase", "ce_recovered", "mse", "kl", "downstream_mse")


def overlap(curves: dict[str, Sequence[dict]], x: str) -> tuple[float, float]:
    """The range of ``x`` that every objective's sweep covers."""
    lo = max(min(float(r[x]) for r in rows) for rows in curves.values())
    hi = min(max(float(r[x]) for r in rows) for rows in curves.values())
    return lo, hi


def geometric_middle(lo: float, hi: float) -> float:
    return float(math.sqrt(lo * hi)) if lo > 0 and hi > 0 else (lo + hi) / 2


def select(rows: Sequence[dict], **where) -> list[dict]:
    """The rows whose keys equal ``where`` (e.g. ``layer=1, ratio=60, seed=0``)."""
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def by_objective(rows: Sequence[dict], objectives: Sequence[str] = OBJECTIVES) -> dict[str, list[dict]]:
    return {obj: [r for r in rows if r["objective"] == obj] for obj in objectives if any(r["objective"] == obj for r in rows)}


def matched(curves: dict[str, Sequence[dict]], x: str, at: float | None = None,
            measures: Sequence[str] = MEASURES) -> dict:
    """Every objective's ``measures`` at ``x = at`` along its own curve; ``at`` defaults to the
    geometric middle of the range all curves cover.  ``{"x": x, "at": at, "range": [lo, hi],
    objective: {measure: value}}``."""
    lo, hi = overlap(curves, x)
    at = geometric_middle(lo, hi) if at is None else at
    out = {"x": x, "at": at, "range": [lo, hi]}
    for obj, rows in curves.items():
        out[obj] = {m: interpolate(rows, x, at, m) for m in measures if m != x and all(m in r for r in rows)}
    return out


def across_seeds(rows: Sequence[dict], x: str, y: str, objectives: Sequence[str], at: float | None = None) -> dict:
    """``y`` at ``x = at`` for each seed's curve of each objective, one common ``at`` (default: the
    geometric middle of the range every seed's curve of every objective covers); with mean and std."""
    seeds = sorted({r["seed"] for r in rows if r["objective"] in objectives})
    per = {(obj, s): select(rows, objective=obj, seed=s) for obj in objectives for s in seeds}
    per = {k: v for k, v in per.items() if v}
    if at is None:
        at = geometric_middle(*overlap({f"{o}/{s}": v for (o, s), v in per.items()}, x))
    out = {"x": x, "y": y, "at": at}
    for obj in objectives:
        vals = [interpolate(per[(obj, s)], x, at, y) for s in seeds if (obj, s) in per]
        out[obj] = {"seeds": [s for s in seeds if (obj, s) in per], "values": vals,
                    "mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
    return out


def layers_table(rows: Sequence[dict], keys: Sequence[str] = ("lambda", "ratio", "seed", "l0", "alive_fraction",
                                                                "ce_increase", "ce_recovered", "mse", "kl",
                                                                "downstream_mse", "seconds_per_step")) -> dict:
    """``{layer: {objective: [{lambda, l0, alive_fraction, ce_increase, mse, seconds_per_step, ...}]}}``."""
    out: dict = {}
    for r in rows:
        out.setdefault(str(r["layer"]), {}).setdefault(r["objective"], []).append({k: r[k] for k in keys if k in r})
    return out


def frontier_figure(rows: Sequence[dict], layers: Sequence[int], ratios: Sequence[int], seed: int = 0,
                    marks: dict | None = None):
    """L0 against CE increase (both log) per layer: one curve per objective and dictionary ratio."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = {"local": "#1f77b4", "e2e": "#d62728", "e2e_ds": "#2ca02c"}
    dashes = dict(zip(ratios, ("solid", "dash", "dot")))
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"{hook_name(la)}" for la in layers])
    for col, layer in enumerate(layers, 1):
        for ratio in ratios:
            for obj, curve in by_objective(select(rows, layer=layer, ratio=ratio, seed=seed)).items():
                xs, ys = frontier(curve, "ce_increase", "l0")
                fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=f"{obj}, {ratio} x d_model",
                                line=dict(color=colors[obj], dash=dashes[ratio]), legendgroup=f"{obj}{ratio}",
                                showlegend=col == 1, row=1, col=col)
        for obj, (x, y) in (marks or {}).get(layer, {}).items():
            fig.add_scatter(x=[x], y=[y], mode="markers", marker=dict(symbol="star", size=14, color=colors[obj]),
                            name=f"{obj} at matched CE increase", legendgroup=f"m{obj}", showlegend=col == 1,
                            row=1, col=col)
    fig.update_xaxes(type="log", title_text="CE increase when spliced (nats)")
    fig.update_yaxes(type="log", title_text="L0 (latents per token)")
    fig.update_layout(title="Local vs end-to-end SAEs: latents needed for a given CE increase", height=460, width=1000)
    return fig


def compare_all(rows: Sequence[dict], layers: Sequence[int], ratios: Sequence[int], seed: int = 0) -> tuple[dict, dict]:
    """``(matched_ce, matched_l0)``: :func:`matched` at the middle of the shared CE-increase range and
    of the shared L0 range, for each layer and dictionary ratio (``{layer: {ratio: ...}}``)."""
    ce, l0 = {}, {}
    for layer in layers:
        for ratio in ratios:
            curves = by_objective(select(rows, layer=layer, ratio=ratio, seed=seed))
            ce.setdefault(str(layer), {})[str(ratio)] = matched(curves, "ce_increase")
            l0.setdefault(str(layer), {})[str(ratio)] = matched(curves, "l0")
    return ce, l0


def matched_frame(table: dict, measures: Sequence[str]):
    """A DataFrame (layer, ratio, objective) x measures of :func:`compare_all`'s output."""
    import pandas as pd

    recs = []
    for layer, by_ratio in table.items():
        for ratio, m in by_ratio.items():
            for obj in OBJECTIVES:
                if obj in m:
                    recs.append({"layer": int(layer), "ratio": int(ratio), "objective": obj, m["x"]: m["at"],
                                 **{k: m[obj][k] for k in measures if k in m[obj]}})
    return pd.DataFrame(recs).set_index(["layer", "ratio", "objective"])


def load_sweep(path) -> dict:
    """A committed sweep file (``data/sweeps/08_end_to_end_sae.json``): ``{"config", "rows", ...}``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------
# the sweep, sharded over processes (python -m lib.sae.e2e)
# --------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """Which SAEs the full sweep of notebook 08 trains."""

    model: str = "toy-4l"
    layers: list[int] = field(default_factory=lambda: [0, 1])
    ratios: list[int] = field(default_factory=lambda: [60, 8])
    lambdas: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])  # every run
    headline_seeds: list[int] = field(default_factory=lambda: [1, 2])  # extra seeds at headline_layer, ratio 60
    headline_layer: int = 1
    headline_objectives: list[str] = field(default_factory=lambda: ["local", "e2e"])
    steps: int = 1000
    seqs_per_step: int = 16
    lr: float = 1e-3
    context_size: int = 128
    n_train_docs: int = 6000
    n_eval_docs: int = 800  # 800 x 127 counted tokens = 101,600 >= 100k

    def runs(self) -> list[Run]:
        """Every SAE, most important first (a sweep cut short by time keeps the headline): the
        headline layer at the largest ratio (all seeds), then the other layers, then the other ratios."""
        big, layers = self.ratios[0], [self.headline_layer] + [la for la in self.layers if la != self.headline_layer]

        def block(layer: int, ratio: int, seed: int, objectives: Sequence[str]) -> list[Run]:
            return [Run(layer, obj, lam, ratio, seed, self.steps, self.seqs_per_step, self.lr)
                    for obj in objectives for lam in self.lambdas[obj]]

        out = []
        for seed in self.seeds:
            out += block(self.headline_layer, big, seed, OBJECTIVES)
        for seed in self.headline_seeds:
            out += block(self.headline_layer, big, seed, self.headline_objectives)
        for ratio in self.ratios:
            for layer in layers:
                if (layer, ratio) != (self.headline_layer, big):
                    for seed in self.seeds:
                        out += block(layer, ratio, seed, OBJECTIVES)
        return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train and measure notebook 08's sweep of local / e2e / e2e_ds SAEs.")
    p.add_argument("--config", required=True, help="JSON file with SweepConfig fields (or a sweep file whose "
                   "'config' holds them, e.g. data/sweeps/08_end_to_end_sae.json)")
    p.add_argument("--docs", default=None, help="JSON (or .json.xz) {train: [...], eval: [...]} of documents "
                   "(default: generate them, as prepare does)")
    p.add_argument("--out", required=True, help="JSON-lines file to append one row per SAE to")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th SAE starting at i")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    with open(a.config, encoding="utf-8") as fh:
        given = json.load(fh)
    cfg = SweepConfig(**given.get("config", given))  # a sweep config, or a committed sweep file holding one
    i, n = (int(v) for v in a.shard.split("/"))
    docs = None
    if a.docs:
        opener = lzma.open if a.docs.endswith(".xz") else open
        with opener(a.docs, "rt", encoding="utf-8") as fh:
            d = json.load(fh)
        docs = d["train"][: cfg.n_train_docs] + d["eval"][: cfg.n_eval_docs]
    torch.manual_seed(0)
    setup = prepare_e2e(cfg.model, cfg.layers, cfg.n_train_docs, cfg.n_eval_docs, cfg.context_size,
                        device=a.device, docs=docs)
    for run in cfg.runs()[i::n]:
        row = {**run_one(setup, run, batch_size=64), "run": asdict(run)}
        line = json.dumps(row) + "\n"
        fd = os.open(a.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # one write per row: shards may share the file
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        print(f"[{i}/{n}] {run.objective} L{run.layer} x{run.ratio} s{run.seed} lam {run.lam}: l0 {row['l0']:.1f} "
              f"dCE {row['ce_increase']:.4f} alive {row['alive_fraction']:.2f} {row['seconds_per_step']*1e3:.0f} ms/step",
              flush=True)


if __name__ == "__main__":
    main()
