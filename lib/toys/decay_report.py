"""Tables and figures of notebook 10 (out-of-distribution capability decay), from ``decay`` runs.

Works on ``decay.compact`` runs (plain JSON data), so the notebook's fresh default run and the
committed full grid are read the same way.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lib.toys import decay as dc
from lib.toys import languages as lang

COLORS = {"A": "#1f77b4", "B": "#d62728", "C": "#2ca02c", "C-all": "#9467bd", "D": "#ff7f0e"}


def rows_frame(runs: list[dict]) -> pd.DataFrame:
    """Every model's summary row (``decay.summarise``) with its stack's size and regularisation."""
    return pd.DataFrame(dc.rows_of(runs))


def decay_figure(run: dict, relearn_offset: int | None = None) -> go.Figure:
    """One panel per condition: the dropped language's exact match (thin: each seed; thick: mean)
    and the kept languages' mean (dashed), from the first evaluation through the drop (step 0) to
    the end of the decay phase, then the relearning phase appended (after the dotted line)."""
    conds = [c for c in lang.CONDITIONS if any(r["condition"] == c for r in run["summary"])]
    fig = make_subplots(rows=1, cols=len(conds), shared_yaxes=True, subplot_titles=conds, horizontal_spacing=0.02)
    steps = np.array(run["steps"])
    end = int(steps[-1]) if relearn_offset is None else relearn_offset
    r_steps = end + np.array(run["relearn_steps_axis"])
    for col, c in enumerate(conds, start=1):
        idx = [i for i, r in enumerate(run["summary"]) if r["condition"] == c and not r["never_saw"]]
        dropped = np.array([run["dropped"][i] for i in idx])
        relearn = np.array([run["relearn_acc"][i] for i in idx])
        kept = np.array([run["kept"][i] for i in idx]).mean(0)
        for i, d in enumerate(dropped):
            fig.add_trace(go.Scatter(x=np.r_[steps, r_steps], y=np.r_[d, relearn[i]], mode="lines",
                                     line=dict(color=COLORS[c], width=0.8), opacity=0.45, showlegend=False), 1, col)
        fig.add_trace(go.Scatter(x=np.r_[steps, r_steps], y=np.r_[dropped.mean(0), relearn.mean(0)], mode="lines",
                                 line=dict(color=COLORS[c], width=3), name=f"{c}: dropped"), 1, col)
        fig.add_trace(go.Scatter(x=steps, y=kept, mode="lines", line=dict(color="gray", dash="dash"),
                                 name="kept (mean)", showlegend=col == 1), 1, col)
        fig.add_vline(x=0, line=dict(color="black", width=1), row=1, col=col)
        fig.add_vline(x=end, line=dict(color="black", width=1, dash="dot"), row=1, col=col)
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.update_yaxes(title_text="exact match", row=1, col=1)
    fig.update_xaxes(title_text="steps after the drop")
    fig.update_layout(title="Dropped language (colour) vs kept languages (grey): drop at 0, relearning after the dotted line",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def shared_vs_unrelated(rows: pd.DataFrame, proto: dc.Protocol, reference: str = "A") -> pd.DataFrame:
    """Half-life of each condition against ``reference``, paired by seed (same initialisation, same
    dropped index): mean and std over seeds of the difference and of the ratio.  Censored
    half-lives count as the horizon (lower bounds)."""
    t = rows[~rows.never_saw].copy()
    t["hl"] = t.half_life_steps.fillna(proto.decay_steps)
    ref = t[t.condition == reference].set_index("seed").hl
    out = []
    for c in lang.CONDITIONS:
        if c == reference or c not in set(t.condition):
            continue
        hl = t[t.condition == c].set_index("seed").hl
        diff = hl - ref
        out.append({"condition": c, "half_life": hl.mean(), f"{reference}_half_life": ref.mean(),
                    "difference": diff.mean(), "difference_std": diff.std(ddof=1),
                    "ratio_of_means": hl.mean() / ref.mean() if ref.mean() > 0 else float("nan"),
                    "seeds_slower": int((diff > 0).sum()), "seeds_faster": int((diff < 0).sum())})
    return pd.DataFrame(out).set_index("condition")


def grid_table(rows: pd.DataFrame, proto: dc.Protocol, by: list[str]) -> pd.DataFrame:
    """Half-life (censored at the horizon) and final dropped accuracy, mean ± std over seeds,
    by condition and the columns ``by`` (e.g. ``["n_params"]`` or ``["weight_decay", "dropout"]``)."""
    t = rows[~rows.never_saw].copy()
    t["half_life"] = t.half_life_steps.fillna(proto.decay_steps)
    t["censored"] = t.half_life_steps.isna()
    g = t.groupby(by + ["condition"])
    return pd.DataFrame({"half_life": g.half_life.mean(), "half_life_std": g.half_life.std(ddof=1),
                         "censored": g.censored.sum(), "acc_at_drop": g.acc_at_drop.mean(),
                         "final_dropped_acc": g.final_dropped_acc.mean(),
                         "final_kept_acc": g.final_kept_acc.mean()})


def scaling_figure(rows: pd.DataFrame, proto: dc.Protocol, fits: dict) -> go.Figure:
    """Half-life against parameter count (log-log), per condition, with the fitted power law;
    only the unregularised stacks.  Censored points sit at the horizon (open markers); a condition
    without a fit (one size only) gets no line."""
    t = rows[(~rows.never_saw) & (rows.weight_decay == 0) & (rows.dropout == 0)].copy()
    fig = go.Figure()
    for c in lang.CONDITIONS:
        s = t[t.condition == c]
        if s.empty:
            continue
        hl = s.half_life_steps.fillna(proto.decay_steps)
        jitter = 1 + 0.04 * (lang.CONDITIONS.index(c) - 2)
        fig.add_trace(go.Scatter(x=s.n_params * jitter, y=hl, mode="markers", name=c,
                                 marker=dict(color=COLORS[c], symbol=np.where(s.half_life_steps.isna(), "circle-open", "circle"))))
        m = s.assign(hl=hl).groupby("n_params").hl.mean()
        fig.add_trace(go.Scatter(x=m.index * jitter, y=m.values, mode="lines", line=dict(color=COLORS[c], width=1),
                                 showlegend=False))
        f = fits[c]
        if f["exponent"] != f["exponent"]:
            continue
        xs = np.array([m.index.min(), m.index.max()])
        fig.add_trace(go.Scatter(x=xs, y=f["prefactor"] * xs ** f["exponent"], mode="lines",
                                 line=dict(color=COLORS[c], dash="dot"), name=f"{c} fit: exponent {f['exponent']:+.2f}"))
    fig.add_hline(y=proto.decay_steps, line=dict(color="gray", dash="dash"),
                  annotation_text="horizon (open markers: never halved)")
    fig.update_xaxes(type="log", title_text="parameters")
    fig.update_yaxes(type="log", title_text="half-life of the dropped language (steps)")
    fig.update_layout(title="Half-life vs model size (no regularisation; 3 seeds per point)")
    return fig


def regularisation_figure(table: pd.DataFrame) -> go.Figure:
    """Grouped bars: half-life (mean ± std over seeds) per condition, per (weight decay, dropout)."""
    fig = go.Figure()
    t = table.reset_index()
    for c in lang.CONDITIONS:
        s = t[t.condition == c]
        if s.empty:
            continue
        labels = [f"wd {w:g}, dropout {p:g}" for w, p in zip(s.weight_decay, s.dropout)]
        fig.add_trace(go.Bar(x=labels, y=s.half_life, error_y=dict(array=s.half_life_std), name=c,
                             marker_color=COLORS[c]))
    fig.update_layout(barmode="group", title="Half-life of the dropped language vs regularisation (size 2x32)",
                      yaxis_title="half-life (steps; censored at the horizon)")
    return fig
