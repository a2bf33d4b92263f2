"""Notebook 07's tables and figures: one row per model, the sweep and sigma tables, the plots."""
from __future__ import annotations

import numpy as np
import torch

from lib.toys.compressed_computation.analysis import (classify_features, eigenspace_overlap, feature_fidelity,
                                                      feature_response, feature_summary)
from lib.toys.compressed_computation.model import EMBEDDINGS, matched_sigma, naive_loss_analytic
from lib.toys.compressed_computation.train import TrainedModels


def results_frame(trained: TrainedModels, losses: torch.Tensor | None = None, naive_losses: torch.Tensor | None = None):
    """One row per model: its spec, loss per feature, loss / p and both naive references.

    ``naive_loss_per_feature``: the naive solution in the clean problem, ``p/6 (n-h)/n`` (the
    reference line).  ``naive_in_setting``: the same hand-built network in this model's setting
    (its interference uncorrected), analytic; ``naive_empirical``: that network evaluated on the
    models' own evaluation samples (``naive_losses``, from ``evaluate(naive_models(trained))``).
    """
    import pandas as pd

    cfg = trained.config
    losses = trained.losses if losses is None else losses
    naive_losses = trained.naive_losses if naive_losses is None else naive_losses
    if losses is None:
        raise ValueError("no losses: pass them, or train with train_models(..., eval_rows=...)")
    sm = matched_sigma(cfg.d_resid)
    rows = []
    for i, s in enumerate(trained.specs):
        lpf = float(losses[i].mean())
        rows.append(
            {
                "p": s.p,
                "embedding": s.embedding,
                "sigma": s.sigma,
                "sigma_scale": s.sigma / sm,
                "mixing": s.mixing if s.sigma else "",
                "parametrization": s.parametrization or cfg.parametrization,
                "seed": s.seed,
                "loss_per_feature": lpf,
                "loss_over_p": lpf / s.p,
                "naive_loss_per_feature": naive_loss_analytic(s.p, cfg.n_features, cfg.d_mlp),
                "naive_in_setting": naive_loss_analytic(s.p, cfg.n_features, cfg.d_mlp, trained.mix[i]),
            }
        )
        if naive_losses is not None:
            rows[-1]["naive_empirical"] = float(naive_losses[i].mean())
    return pd.DataFrame(rows)


def sweep_table(df, digits: int = 3):
    """Loss / p per (p, embedding) of the sigma = 0 models, and whether they beat the naive baseline.

    Columns: the naive baseline analytic (1/12) and measured on the same evaluation samples as
    the models (``naive_emp``); per embedding the mean over seeds with the seeds' range, and
    ``beats``: "yes" when every seed's loss is below the measured naive loss (a paired
    comparison: same samples), "no" when every seed's is above, "mixed" otherwise;
    ``naive_random``: the naive network left in the random embedding (interference uncorrected).
    """
    import pandas as pd

    sweep = df[df.sigma == 0]
    fmt = f"{{:.{digits}f}}"
    rows = []
    for p, g in sweep.groupby("p"):
        clean_naive = g[g.embedding != "random"].naive_empirical
        ref = clean_naive.iloc[0] / p if len(clean_naive) else g.naive_loss_per_feature.iloc[0] / p
        row = {"p": p, "naive": fmt.format(g.naive_loss_per_feature.iloc[0] / p), "naive_emp": fmt.format(ref)}
        for e in EMBEDDINGS:
            v = g[g.embedding == e].loss_over_p
            if v.empty:
                continue
            rng = f" [{fmt.format(v.min())}, {fmt.format(v.max())}]" if len(v) > 1 else ""
            row[e] = fmt.format(v.mean()) + rng
            row[f"{e}_beats"] = "yes" if (v < ref).all() else "no" if (v > ref).all() else "mixed"
        r = g[g.embedding == "random"]
        if not r.empty:
            row["naive_random"] = fmt.format(r.naive_in_setting.mean() / p)
        rows.append(row)
    return pd.DataFrame(rows).set_index("p")


def sigma_table(df, p: float, digits: int = 3):
    """Loss / p of the clean-plus-mixing models at p against sigma, and the random embedding's."""
    import pandas as pd

    sel = df[(df.p == p) & (df.embedding == "clean")]
    rows = []
    for (mixing, scale), g in sel.groupby(["mixing", "sigma_scale"]):
        rows.append(
            {
                "mixing": mixing or "zero (clean)",
                "sigma / matched": round(scale, 2),
                "sigma": round(g.sigma.iloc[0], 4),
                "mean": round(g.loss_over_p.mean(), digits),
                "sd": round(g.loss_over_p.std(ddof=1), digits) if len(g) > 1 else float("nan"),
                "seeds": len(g),
            }
        )
    r = df[(df.p == p) & (df.embedding == "random")].loss_over_p
    if not r.empty:
        sd = round(r.std(ddof=1), digits) if len(r) > 1 else float("nan")
        rows.append({"mixing": "random embedding", "sigma / matched": float("nan"), "sigma": float("nan"),
                     "mean": round(r.mean(), digits), "sd": sd, "seeds": len(r)})
    return pd.DataFrame(rows).sort_values(["mixing", "sigma / matched"]).reset_index(drop=True)


_COLORS = {"random": "#d62728", "clean": "#1f77b4", "none": "#2ca02c", "naive": "#555555"}


def plot_sweep(df):
    """Loss / p against p for each embedding (seeds as points, mean as a line) and the baselines."""
    import plotly.graph_objects as go

    sweep = df[df.sigma == 0]
    fig = go.Figure()
    for e in EMBEDDINGS:
        g = sweep[sweep.embedding == e]
        if g.empty:
            continue
        m = g.groupby("p").loss_over_p.agg(["mean", "std"]).reset_index()
        label = "trained, no embedding" if e == "none" else f"trained, {e} embedding"
        fig.add_trace(go.Scatter(x=m.p, y=m["mean"], mode="lines+markers", name=label, line=dict(color=_COLORS[e])))
        fig.add_trace(go.Scatter(x=g.p, y=g.loss_over_p, mode="markers", showlegend=False, opacity=0.45,
                                 marker=dict(color=_COLORS[e], size=6, symbol="circle-open")))
    ps = sorted(sweep.p.unique())
    naive = [sweep[sweep.p == p].naive_loss_per_feature.iloc[0] / p for p in ps]
    fig.add_trace(go.Scatter(x=ps, y=naive, mode="lines", name="naive: 50 features exact, 50 dropped (1/12)",
                             line=dict(color=_COLORS["naive"], dash="dash")))
    r = sweep[sweep.embedding == "random"]
    if not r.empty:
        nr = r.groupby("p").naive_in_setting.mean() / np.array(sorted(r.p.unique()))
        fig.add_trace(go.Scatter(x=nr.index, y=nr.values, mode="lines", name="naive in the random embedding",
                                 line=dict(color=_COLORS["random"], dash="dot")))
    fig.update_layout(title="Loss per feature / p against feature probability", xaxis_title="feature probability p",
                      yaxis_title="loss per feature / p", xaxis_type="log", legend=dict(x=0.01, y=0.99))
    return fig


def plot_sigma(df, p: float):
    """Loss / p against the explicit mixing scale sigma (clean embedding), with the references."""
    import plotly.graph_objects as go

    sel = df[(df.p == p) & (df.embedding == "clean")]
    fig = go.Figure()
    g = sel[sel.mixing != "gaussian"]
    m = g.groupby("sigma_scale").loss_over_p.agg(["mean", "std"]).reset_index()
    fig.add_trace(go.Scatter(x=m.sigma_scale, y=m["mean"], mode="lines+markers",
                             name="clean + sigma x (random embedding's mixing, normalised)",
                             line=dict(color=_COLORS["clean"])))
    fig.add_trace(go.Scatter(x=g.sigma_scale, y=g.loss_over_p, mode="markers", showlegend=False, opacity=0.45,
                             marker=dict(color=_COLORS["clean"], symbol="circle-open")))
    gs = sel[sel.mixing == "gaussian"]
    if not gs.empty:
        fig.add_trace(go.Scatter(x=gs.sigma_scale, y=gs.loss_over_p, mode="markers", name="clean + Gaussian mixing",
                                 marker=dict(color="#9467bd", symbol="diamond", size=9)))
    r = df[(df.p == p) & (df.embedding == "random")]
    if not r.empty:
        fig.add_trace(go.Scatter(x=[1.0] * len(r), y=r.loss_over_p, mode="markers", name="random embedding",
                                 marker=dict(color=_COLORS["random"], symbol="x", size=10)))
    fig.add_hline(y=sel.naive_loss_per_feature.iloc[0] / p, line_dash="dash", line_color=_COLORS["naive"],
                  annotation_text="naive (1/12)")
    fig.update_layout(title=f"Is it the noise? Loss / p against mixing scale at p = {p}",
                      xaxis_title="sigma / (1/sqrt(d_resid))  (1 = the random embedding's interference)",
                      yaxis_title="loss per feature / p")
    return fig


def plot_responses(models: dict[str, tuple[torch.Tensor, torch.Tensor]], features: dict[str, list[int]]):
    """Per-feature output (MLP part) against the feature's input, alone, for a few features."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(models)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    xs = torch.linspace(-1, 1, 101)
    palette = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    for c, name in enumerate(names, start=1):
        A, B = models[name]
        f = feature_response(A, B, xs)
        kinds = classify_features(feature_fidelity(A, B))
        for k, i in enumerate(features[name]):
            fig.add_trace(go.Scatter(x=xs, y=f[i], mode="lines", name=f"{name}: feature {i} ({kinds[i]})",
                                     line=dict(color=palette[k % len(palette)])), row=1, col=c)
        fig.add_trace(go.Scatter(x=xs, y=torch.relu(xs), mode="lines", name="target ReLU(x)",
                                 line=dict(color="black", dash="dash"), showlegend=c == 1), row=1, col=c)
    fig.update_layout(title="What the MLP adds to feature i when only x_i is present")
    fig.update_xaxes(title_text="x_i")
    fig.update_yaxes(title_text="MLP output on feature i", col=1)
    return fig


def example_features(A: torch.Tensor, B: torch.Tensor) -> list[int]:
    """Three features to look at: the best computed, the median and the worst (by fidelity)."""
    order = torch.argsort(feature_fidelity(A, B), stable=True).tolist()
    return [order[0], order[len(order) // 2], order[-1]]


def mlp_anatomy(models: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], threshold: float = 0.1):
    """Per model: features computed exactly / approximately / dropped, how many features the
    neurons serve, and where the neurons' input directions lie relative to the mixing matrix."""
    import pandas as pd

    rows = []
    for name, (A, B, mix) in models.items():
        fs = feature_summary(A, B, threshold)
        per = torch.tensor(fs["features_per_neuron"])
        row = {
            "model": name,
            "exact": fs["exact"],
            "approximate": fs["approximate"],
            "dropped": fs["dropped"],
            "neurons serving 0": int((per == 0).sum()),
            "1": int((per == 1).sum()),
            "2": int((per == 2).sum()),
            ">=3": int((per >= 3).sum()),
            "features per neuron (mean)": round(float(per.float().mean()), 2),
        }
        if bool(mix.abs().max() > 0):
            ov = eigenspace_overlap(A, mix)
            row["in top-50 eigenspace of mix"] = round(ov["top"], 2)
            row["in bottom-50"] = round(ov["bottom"], 2)
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def plot_loss_panels(df, sigma_p: float):
    """``plot_sweep`` and ``plot_sigma`` side by side in one figure (one image to render)."""
    from plotly.subplots import make_subplots

    left, right = plot_sweep(df), plot_sigma(df, sigma_p)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.08,
                        subplot_titles=["loss / p against feature probability p",
                                        f"loss / p against mixing scale (clean embedding, p = {sigma_p})"])
    for tr in left.data:
        fig.add_trace(tr, row=1, col=1)
    for tr in right.data:
        fig.add_trace(tr, row=1, col=2)
    naive = df.naive_loss_per_feature.iloc[0] / df.p.iloc[0]
    fig.add_hline(y=naive, line_dash="dash", line_color=_COLORS["naive"], row=1, col=2)
    fig.update_xaxes(type="log", title_text="feature probability p", row=1, col=1)
    fig.update_xaxes(title_text="sigma x sqrt(d_resid)  (1: the random embedding's interference)", row=1, col=2)
    fig.update_yaxes(title_text="loss per feature / p", row=1, col=1)
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0), margin=dict(b=160))
    return fig


def results_record(main, check, anatomy, attr_table: dict, completeness: dict, config: dict) -> dict:
    """Notebook 07's key numbers as ``data/results/07_compressed_computation.json`` stores them:
    the p sweep and the sigma sweep (rows of :func:`results_frame`), the parametrization check,
    the anatomy table and the attribution comparison; ``config`` records the run's settings."""
    sweep_rows = main[main.sigma == 0][["p", "embedding", "seed", "loss_per_feature", "naive_loss_per_feature",
                                         "loss_over_p", "naive_in_setting", "naive_empirical"]]
    sigma_rows = main[(main.p == config["sigma_p"]) & (main.embedding == "clean")][
        ["sigma", "sigma_scale", "mixing", "seed", "loss_per_feature", "loss_over_p"]]
    return {
        "config": config,
        "sweep": sweep_rows.to_dict("records"),
        "sigma_sweep": sigma_rows.assign(mixing=sigma_rows.mixing.replace("", "zero")).to_dict("records"),
        "parametrization_check": check[["embedding", "parametrization", "loss_over_p"]].to_dict("records"),
        "anatomy": anatomy.reset_index().to_dict("records"),
        "attribution": {m: attr_table[m]["per_input_pearson"] for m in attr_table},
        "attribution_detail": attr_table,
        "attribution_completeness": completeness,
    }
