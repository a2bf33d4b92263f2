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


def paired_verdict(diff) -> str:
    """``"below"`` / ``"above"`` when the 95% t-interval of the mean of ``diff`` (one paired
    difference per seed) excludes 0, ``"within noise"`` when it does not, ``"one seed"`` for one."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diff, dtype=float)
    if len(d) < 2:
        return "one seed"
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    m = float(d.mean())
    return "below" if m + half < 0 else "above" if m - half > 0 else "within noise"


def _naive_ref(g) -> float:
    """Loss / p of the naive network in the clean problem, measured on the models' own samples at
    this p (all models at a p share their evaluation samples); the analytic 1/12 without one."""
    clean = g[g.embedding != "random"]
    if len(clean) and "naive_empirical" in g:
        return float(clean.naive_empirical.iloc[0] / clean.p.iloc[0])
    return float(g.naive_loss_per_feature.iloc[0] / g.p.iloc[0])


def naive_comparison(df):
    """Per (p, embedding) of the sigma = 0 models: loss / p over seeds and its paired difference
    from the naive network measured on the same samples (``naive_emp``).

    Columns: ``seeds``, ``mean``, ``sd`` (across seeds, ddof 1), ``naive_emp``, ``diff`` (mean of
    loss / p minus naive_emp), ``ci95`` (half-width of its 95% t-interval) and ``vs_naive``
    (:func:`paired_verdict`: "below", "above" or "within noise").
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    rows = []
    for p, g in df[df.sigma == 0].groupby("p"):
        ref = _naive_ref(g)
        for e in EMBEDDINGS:
            v = g[g.embedding == e].loss_over_p.to_numpy(dtype=float)
            if not len(v):
                continue
            d = v - ref
            sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v))) if len(v) > 1 else float("nan")
            rows.append({"p": float(p), "embedding": e, "seeds": len(v), "mean": float(v.mean()), "sd": sd,
                         "naive_emp": ref, "diff": float(d.mean()), "ci95": half, "vs_naive": paired_verdict(d)})
    return pd.DataFrame(rows)


def _pm(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if sd != sd else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def sweep_table(df, digits: int = 4):
    """Loss / p per p (rows) and embedding (columns) of the sigma = 0 models, mean ± sd over seeds,
    with the naive baseline analytic (1/12) and measured on the same samples (``naive_emp``),
    each embedding's verdict against the latter (:func:`naive_comparison`) and ``naive_random``,
    the naive network left in the random embedding (interference uncorrected, analytic)."""
    import pandas as pd

    cmp = naive_comparison(df)
    rows = []
    for p, g in cmp.groupby("p"):
        sel = df[(df.p == p) & (df.sigma == 0)]
        row = {"p": p, "naive": round(float(sel.naive_loss_per_feature.iloc[0] / p), digits),
               "naive_emp": round(float(g.naive_emp.iloc[0]), digits)}
        for _, r in g.iterrows():
            row[r.embedding] = _pm(r["mean"], r["sd"], digits)
            row[f"{r.embedding} vs naive"] = r.vs_naive
        rnd = sel[sel.embedding == "random"]
        if not rnd.empty:
            row["naive_random"] = round(float(rnd.naive_in_setting.mean() / p), digits)
        rows.append(row)
    return pd.DataFrame(rows).set_index("p")


def length_table(long, short, digits: int = 4):
    """Loss / p of the sigma = 0 models at two training lengths (``long`` and ``short`` frames,
    each with a ``steps`` column), mean ± sd over seeds, and the mean change long - short
    (paired by seed: same embedding, initialisation and data stream)."""
    import pandas as pd

    rows = []
    key = ["p", "embedding", "seed"]
    a = long[long.sigma == 0].set_index(key).loss_over_p
    b = short[short.sigma == 0].set_index(key).loss_over_p
    both = pd.concat({"long": a, "short": b}, axis=1).dropna()
    n_long, n_short = int(long.steps.iloc[0]), int(short.steps.iloc[0])
    for (p, e), g in both.groupby(level=["p", "embedding"], sort=True):
        d = g["long"] - g["short"]
        rows.append({"p": p, "embedding": e, f"{n_short} steps": _pm(g["short"].mean(), g["short"].std(ddof=1), digits),
                     f"{n_long} steps": _pm(g["long"].mean(), g["long"].std(ddof=1), digits),
                     "change": _pm(d.mean(), d.std(ddof=1), digits),
                     "change %": round(100 * d.mean() / g["short"].mean(), 1),
                     "verdict": paired_verdict(d.to_numpy())})
    order = {e: i for i, e in enumerate(EMBEDDINGS)}
    out = pd.DataFrame(rows)
    return out.sort_values(["p", "embedding"], key=lambda c: c.map(order) if c.name == "embedding" else c)\
        .set_index(["p", "embedding"])


def sigma_table(df, p: float, digits: int = 4):
    """Loss / p of the clean-plus-mixing models at p against sigma (mean, sd over seeds, and the
    verdict against the naive network measured on the same samples), and the random embedding's."""
    import pandas as pd

    at_p = df[df.p == p]
    ref = _naive_ref(at_p)
    sel = at_p[at_p.embedding == "clean"]
    rows = []

    def row(mixing, scale, sigma, v):
        return {"mixing": mixing, "sigma / matched": scale, "sigma": sigma, "mean": round(float(v.mean()), digits),
                "sd": round(float(v.std(ddof=1)), digits) if len(v) > 1 else float("nan"), "seeds": len(v),
                "vs naive": paired_verdict(v.to_numpy(dtype=float) - ref)}

    for (mixing, scale), g in sel.groupby(["mixing", "sigma_scale"]):
        rows.append(row(mixing or "zero (clean)", round(float(scale), 2), round(float(g.sigma.iloc[0]), 4),
                        g.loss_over_p))
    r = at_p[at_p.embedding == "random"].loss_over_p
    if not r.empty:
        rows.append(row("random embedding", float("nan"), float("nan"), r))
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
        fig.add_trace(go.Scatter(x=m.p, y=m["mean"], mode="lines+markers", name=label, line=dict(color=_COLORS[e]),
                                 error_y=dict(type="data", array=m["std"].fillna(0), visible=True)))
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
                             line=dict(color=_COLORS["clean"]),
                             error_y=dict(type="data", array=m["std"].fillna(0), visible=True)))
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


def plot_curves(runs: list[dict], p: float, steps: int):
    """Training loss / p (batch estimates) against step of the sigma = 0, full-parametrization
    models at ``p`` trained for ``steps`` (the sweep's stored ``runs``): mean over seeds per
    embedding, and the naive baseline 1/12."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for e in EMBEDDINGS:
        sel = [r for r in runs if r["p"] == p and r["steps"] == steps and r["embedding"] == e and r["sigma"] == 0
               and r["parametrization"] == "full"]
        if not sel:
            continue
        curve = np.mean([r["curve"] for r in sel], axis=0) / p
        fig.add_trace(go.Scatter(x=sel[0]["curve_steps"], y=curve, mode="lines", line=dict(color=_COLORS[e]),
                                 name=f"{e} embedding ({len(sel)} seeds, mean)" if e != "none" else
                                 f"no embedding ({len(sel)} seeds, mean)"))
    fig.add_hline(y=1 / 12, line_dash="dash", line_color=_COLORS["naive"], annotation_text="naive (1/12)")
    fig.update_layout(title=f"Training loss / p at p = {p} ({steps} steps, cosine schedule)", xaxis_title="step",
                      yaxis_title="training loss per feature / p (batch estimate)", yaxis_range=[0.05, 0.12])
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


def results_record(long, short, live, anatomy, attr_table: dict, completeness: dict, config: dict) -> dict:
    """Notebook 07's key numbers as ``data/results/07_compressed_computation.json`` stores them.

    ``long`` / ``short``: the sweep's models at the long and short training lengths (rows of
    :func:`results_frame` plus ``steps``; all parametrizations); ``live``: the models retrained
    in the notebook, each with ``sweep_loss_over_p``, the same model's loss in the sweep.
    Stored: the p sweep's rows and their summary (:func:`naive_comparison`), the short runs, the
    sigma sweep's rows and summary (:func:`sigma_table`), the parametrization check, the live
    models, the anatomy table and the attribution comparison; ``config`` records the settings.
    """
    full = long[long.parametrization == config["parametrization"]]
    sigma_p = config["sigma_p"]
    sweep_rows = full[full.sigma == 0][["p", "embedding", "seed", "loss_per_feature", "naive_loss_per_feature",
                                        "loss_over_p", "naive_in_setting", "naive_empirical"]]
    sigma_rows = full[(full.p == sigma_p) & (full.embedding == "clean")][
        ["sigma", "sigma_scale", "mixing", "seed", "loss_per_feature", "loss_over_p"]]
    check = long[(long.p == sigma_p) & (long.sigma == 0) & long.embedding.isin(["random", "clean"])]
    return {
        "config": config,
        "sweep": sweep_rows.to_dict("records"),
        "sweep_summary": naive_comparison(full).to_dict("records"),
        "short_runs": short[short.sigma == 0][["p", "embedding", "seed", "loss_over_p"]].to_dict("records"),
        "sigma_sweep": sigma_rows.assign(mixing=sigma_rows.mixing.replace("", "zero")).to_dict("records"),
        "sigma_summary": sigma_table(full, sigma_p, digits=8).to_dict("records"),
        "parametrization_check": check[["embedding", "parametrization", "seed", "loss_over_p"]].to_dict("records"),
        "live": live[["p", "embedding", "sigma_scale", "seed", "loss_over_p", "sweep_loss_over_p"]].to_dict("records"),
        "anatomy": anatomy.reset_index().to_dict("records"),
        "attribution": {m: attr_table[m]["per_input_pearson"] for m in attr_table},
        "attribution_detail": attr_table,
        "attribution_completeness": completeness,
    }
