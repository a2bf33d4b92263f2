"""Probing for basic features and their XORs (notebook 02; Marks 2024, "What's up with LLMs
representing XORs of arbitrary features?").

A *basic* feature is a 0/1 column of a dataset (``has_true``, ``has_banana``, ``label``); its XORs
are the parity columns ``"a^b"`` that :func:`lib.datasets.add_xor_columns` adds.  The question is
whether a linear probe reads each of them from the residual stream, in the trained model and in
the same architecture with its training destroyed (:func:`lib.models.reset_model`).

>>> split = train_test_indices(len(frame), groups=frame["filler"])  # lib.probes: one held-out split for all
>>> table = xor.probe_table({"0": X0, "1": X1}, frame, features, split)  # layer x feature accuracy
>>> xor.constant_b_generalization(X1, frame["has_true"], frame["has_banana"], split)

Probes are :class:`lib.probes.LogisticProbe` with a bias on standardised activations (the scaling
is fitted on the training rows only; scikit-learn's objective, solved by Newton's method in a
dozen steps), accuracy on held-out rows.  The held-out rows are the same for every
feature and layer, so two cells of a table differ only in what is probed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from lib.datasets import XOR_SEP
from lib.probes import LinearProbe, LogisticProbe, Split, as_labels, best_threshold


def xor_probe(C: float = 1.0) -> LogisticProbe:
    """The probe of this experiment: logistic regression with a bias on standardised activations."""
    return LogisticProbe(C=C, fit_bias=True, standardize=True)


def probe_accuracy(X: np.ndarray, y, split: Split, C: float = 1.0) -> float:
    """Held-out accuracy of a probe for ``y`` trained on ``split.train``."""
    y = as_labels(y)
    probe = xor_probe(C).fit(X[split.train], y[split.train])
    return float((probe.predict(X[split.test]) == y[split.test]).mean())


def probe_table(acts: Mapping[str, np.ndarray], frame: pd.DataFrame, features: Sequence[str], split: Split,
                C: float = 1.0, progress: bool = True) -> pd.DataFrame:
    """Held-out accuracy for every (layer, feature): a DataFrame indexed by layer (``acts``' keys)."""
    from lib.utils import as_names, progress as bar

    features = as_names(features, "features")
    rows = {}
    cells = [(layer, f) for layer in acts for f in features]
    for layer, f in bar(cells, desc="probes", **({} if progress else {"disable": True})):
        rows.setdefault(layer, {})[f] = probe_accuracy(np.asarray(acts[layer]), frame[f], split, C=C)
    table = pd.DataFrame.from_dict(rows, orient="index")[list(features)]
    table.index.name = "layer"
    return table


def majority_baseline(frame: pd.DataFrame, features: Sequence[str], split: Split) -> pd.Series:
    """Accuracy of always answering the training rows' majority class, per feature (about 0.5 on
    balanced data: the chance line of the heatmaps)."""
    from lib.utils import as_names

    features = as_names(features, "features")
    out = {}
    for f in features:
        y = as_labels(frame[f])
        majority = int(y[split.train].mean() >= 0.5)
        out[f] = float((y[split.test] == majority).mean())
    return pd.Series(out)


def chance_band(n_test: int, z: float = 3.0) -> tuple[float, float]:
    """The range a guessing probe stays in (``z`` binomial standard deviations around 0.5) on ``n_test`` rows."""
    half = z * 0.5 / np.sqrt(n_test)
    return 0.5 - half, 0.5 + half


def constant_b_generalization(X: np.ndarray, a, b, split: Split, b_train: int = 1, seed: int = 0,
                              C: float = 1.0, probe: Callable[[], LinearProbe] | None = None) -> dict[str, float]:
    """The generalization failure XORs predict: a probe for ``a`` trained where ``b`` is constant.

    - ``b_constant_train``: trained on the training rows with ``b == b_train``, tested on the
      held-out rows with ``b`` flipped (``b != b_train``).
    - ``b_varied_train``: trained on as many training rows drawn regardless of ``b``, tested on
      the same flipped rows.
    - ``*_same_b``: the two probes on held-out rows with ``b == b_train`` (in distribution for both).
    - ``*_auroc``: each probe's AUROC on the flipped rows (threshold-free: 0.5 = no information,
      below 0.5 = the direction points the wrong way);
    - ``*_bias_refit``: its accuracy on the flipped rows once only its threshold is refit on the
      training rows with ``b`` flipped (:func:`lib.probes.best_threshold`), direction and sign kept.  A drop
      that the refit undoes is a threshold shift, not a direction flip.

    If the model represents ``a^b`` as strongly as ``a``, the b-constant probe's direction mixes
    ``a`` with ``a^b`` (within its data they are the same feature) and its accuracy drops, even
    below chance, once ``b`` flips.  Varying ``b`` in training decorrelates them.  ``probe``
    builds the probe (default :func:`xor_probe` with ``C``).
    """
    from sklearn.metrics import roc_auc_score

    a, b = as_labels(a), as_labels(b)
    make = probe or (lambda: xor_probe(C))
    rng = np.random.default_rng(seed)
    const = split.train[b[split.train] == b_train]
    varied = np.sort(rng.choice(split.train, size=len(const), replace=False))
    flipped = split.test[b[split.test] != b_train]
    same = split.test[b[split.test] == b_train]
    train_flipped = split.train[b[split.train] != b_train]
    out = {}
    for name, rows in (("b_constant_train", const), ("b_varied_train", varied)):
        fitted = make().fit(X[rows], a[rows])
        for suffix, test in (("", flipped), ("_same_b", same)):
            out[name + suffix] = float((fitted.predict(X[test]) == a[test]).mean())
        score = fitted.decision_function(X[flipped])
        out[name + "_auroc"] = float(roc_auc_score(a[flipped], score))
        # the direction (and its sign) kept, only the threshold refit on training rows with b flipped
        t, _ = best_threshold(fitted.decision_function(X[train_flipped]), a[train_flipped])
        out[name + "_bias_refit"] = float(((score > t) == a[flipped]).mean())
    out["n_train"] = int(len(const))
    out["n_test_flipped"] = int(len(flipped))
    return out


def normalised_xor(table: pd.DataFrame, xor_feature: str) -> pd.Series:
    """Per layer (rows of a :func:`probe_table`), how readable ``xor_feature`` is relative to the
    weaker of its inputs: (acc(a^b) - 0.5) / (min over inputs of acc - 0.5); NaN where an input is
    at chance or below (no input to compare with)."""
    inputs = split_xor_name(xor_feature)
    weaker = table[inputs].min(axis=1) - 0.5
    return ((table[xor_feature] - 0.5) / weaker.where(weaker > 0)).rename(xor_feature)


def synthetic_constant_b(xor_strength: float, sigma: float = 0.3, n: int = 4000, d: int = 3,
                         seed: int = 0) -> dict[str, float]:
    """:func:`constant_b_generalization` on the synthetic Gaussian cells of
    :func:`lib.toys.xor_clusters.gaussian_clusters`: trained on ``2n`` rows (``b = 1`` only, or
    as many rows of all four cells), tested on ``2n`` fresh rows with ``b = 0``; the probe is
    weakly regularised logistic regression with a bias on the raw coordinates.

    Within ``b = 1`` the means of ``a=0`` and ``a=1`` differ by ``e_1 - xor_strength e_3``, so the
    b-constant probe leans on the XOR direction; on ``b = 0`` that direction points the other way
    (``e_1 + xor_strength e_3``) and the probe's margin is ``1 - xor_strength^2``: past
    ``xor_strength = 1`` it is worse than chance.
    """
    from lib.toys.xor_clusters import gaussian_clusters

    train = gaussian_clusters(2 * n, sigma=sigma, xor_strength=xor_strength, d=d, seed=seed)
    test = gaussian_clusters(2 * n, sigma=sigma, xor_strength=xor_strength, d=d, seed=seed + 1)
    split = Split(np.arange(2 * n), 2 * n + np.arange(2 * n))
    r = constant_b_generalization(np.vstack([train.X, test.X]), np.concatenate([train.a, test.a]),
                                  np.concatenate([train.b, test.b]), split, b_train=1, seed=seed,
                                  probe=lambda: LogisticProbe(C=100.0, fit_bias=True))
    return {k: r[k] for k in ("b_constant_train", "b_varied_train")}


def split_xor_name(feature: str) -> list[str]:
    """``"a^b"`` -> ``["a", "b"]``; a basic feature -> ``[feature]``."""
    return feature.split(XOR_SEP)


def feature_order(features: Sequence[str]) -> list[str]:
    """Basic features first, then XORs by arity (the column order of the tables)."""
    from lib.utils import as_names

    features = as_names(features, "features")
    return sorted(features, key=lambda f: (len(split_xor_name(f)), list(features).index(f)))


# --------------------------------------------------------------------------------------------
# activations and figures
# --------------------------------------------------------------------------------------------
def layer_activations(model, texts: Sequence[str], dataset: str, batch_size: int = 64,
                      cache=True) -> dict[str, np.ndarray]:
    """Last-token residual activations before the first block and after each block
    (:func:`lib.hooks.residual_stream_hooks`): ``{layer: (n, d_model)}``."""
    from lib.activations import harvest
    from lib.hooks import residual_stream_hooks

    hooks = residual_stream_hooks(model)
    acts = harvest(model, list(texts), list(hooks.values()), position="last", dataset=dataset,
                   batch_size=batch_size, cache=cache)
    return {label: acts.numpy(hook) for label, hook in hooks.items()}


def heatmaps(tables: Mapping[str, pd.DataFrame], title: str, zmin: float = 0.0, zmax: float = 1.0):
    """One accuracy heatmap (layer x feature) per table, side by side, on a shared colour scale
    centred at chance (0.5: white; red below, blue above)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(tables)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True,
                        horizontal_spacing=0.03)
    for k, name in enumerate(names):
        t = tables[name]
        fig.add_trace(go.Heatmap(
            z=t.to_numpy(), x=[c.replace(XOR_SEP, " ^ ") for c in t.columns], y=[str(i) for i in t.index],
            zmin=zmin, zmax=zmax, zmid=0.5, colorscale="RdBu", showscale=k == len(names) - 1,
            text=np.round(t.to_numpy(), 2), texttemplate="%{text:.2f}", textfont={"size": 10},
            colorbar={"title": "accuracy"}), row=1, col=k + 1)
        fig.update_xaxes(tickangle=-40, row=1, col=k + 1)
    fig.update_yaxes(title_text="layer (residual stream after)", autorange="reversed", row=1, col=1)
    fig.update_layout(title=title, margin={"t": 80, "b": 150})
    return fig


# the trained model and the two controls of the seed's thread, in the order the tables show them
NETWORKS: dict[str, str | None] = {"trained": None, "reset (re-initialised)": "reinit",
                                   "reset (weights shuffled)": "shuffle"}


def networks(model_name: str, reset_seed: int = 0, device=None, trained=None):
    """Yield ``(name, model)`` for each of :data:`NETWORKS`, building each when it is reached, so
    that a large model is in memory once at a time (pass an already loaded ``trained`` to reuse it)."""
    from lib.models import load_model, reset_model

    for name, mode in NETWORKS.items():
        if mode is None:
            model = trained if trained is not None else load_model(model_name, device=device)
        else:
            model = reset_model(model_name, mode, seed=reset_seed, device=device)
        yield name, model
        del model


def synthetic_scatter(scenarios: Mapping, feature: str = "a^b", every: int = 4):
    """One panel per synthetic scenario (:mod:`lib.toys.xor_clusters` data), the ``feature`` classes
    coloured, in the plane where they separate or fail to: ``(x1 + x2, x1 - x2)``, or
    ``(x1 - x2, x3)`` for scenarios with an XOR direction (names containing "XOR")."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(scenarios), subplot_titles=[n.split(" (")[0] for n in scenarios],
                        horizontal_spacing=0.05)
    colors = {0: "#1f77b4", 1: "#d62728"}
    for k, (name, d) in enumerate(scenarios.items()):
        y, idx = d.feature(feature), np.arange(0, len(d.a), every)
        has_xor = "XOR" in name
        x_axis = d.X[idx, 0] - d.X[idx, 1] if has_xor else d.X[idx, 0] + d.X[idx, 1]
        y_axis = d.X[idx, 2] if has_xor else d.X[idx, 0] - d.X[idx, 1]
        for v in (0, 1):
            m = y[idx] == v
            fig.add_trace(go.Scattergl(x=x_axis[m], y=y_axis[m], mode="markers", name=f"{feature} = {v}",
                                       marker={"size": 3, "color": colors[v], "opacity": 0.5}, showlegend=k == 0),
                          row=1, col=k + 1)
        fig.update_xaxes(title_text="x1 - x2" if has_xor else "x1 + x2", row=1, col=k + 1)
        fig.update_yaxes(title_text="x3 (XOR direction)" if has_xor else "x1 - x2", row=1, col=k + 1)
    fig.update_layout(title=f"The XOR classes in each scenario ({feature} = 1 red, 0 blue)", margin={"t": 80})
    return fig


GENERALIZATION_BARS = {"b_constant_train_same_b": "b-constant probe, b unchanged",
                       "b_constant_train": "b-constant probe, b flipped", "b_varied_train": "b-varied probe, b flipped"}


def generalization_bars(rows: pd.DataFrame, title: str):
    """Grouped bars of :func:`constant_b_generalization`'s three accuracies, one group per
    ``(dataset, a, b)`` row of ``rows``, with the chance line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = [f"{r.dataset}: a={r.a}, b={r.b}" for r in rows.itertuples()]
    for col, name in GENERALIZATION_BARS.items():
        fig.add_bar(x=labels, y=rows[col], name=name)
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_layout(barmode="group", title=title, yaxis_title="held-out accuracy", yaxis_range=[0, 1],
                      margin={"b": 140})
    return fig


SHORT_NAMES = {"trained": "trained", "reset (re-initialised)": "reset", "reset (weights shuffled)": "reset_shuffled"}


def results_record(model_name: str, n_rows: int, tables: Mapping[str, pd.DataFrame], split_std: Mapping[str, float],
                   split_min: Mapping[str, float], city_tables: Mapping[tuple[str, str], pd.DataFrame],
                   gen_model: pd.DataFrame, gen_synth: pd.DataFrame, synth: pd.DataFrame, grid: pd.DataFrame,
                   layer: str, reset_draws: Mapping[str, dict] | None = None,
                   normalised: Mapping[str, Mapping[str, pd.Series]] | None = None) -> dict:
    """Notebook 02's key numbers as ``data/results/02_xor_features.json`` stores them: the probe
    tables by network (``tables``, and ``city_tables[dataset, network]``), their spread over
    splits, the generalization failure (headline: ``has_true`` with ``has_banana`` fixed, at
    ``layer``, with the AUROC and bias-refit accuracy of both probes on the flipped rows), the
    synthetic tables (``grid``: sigma x c), and optionally the reset networks over several draws
    (``reset_draws[network] = {"mean", "std"}`` tables and ``"n"``) and the XOR readability
    relative to the weaker input (``normalised[network][xor] = `` a series over layers)."""
    def by_layer(t: pd.DataFrame) -> dict:
        return {row: t.loc[row].to_dict() for row in t.index}

    city: dict[str, dict] = {}
    for (ds, name), t in city_tables.items():
        city.setdefault(ds, {})[SHORT_NAMES[name]] = by_layer(t)
    head = gen_model[(gen_model["dataset"] == "xor") & (gen_model["a"] == "has_true") & (gen_model["b"] == "has_banana")
                     & (gen_model["layer"] == layer)].iloc[0]
    return {
        "model": model_name, "n_rows": n_rows,
        "probes": {SHORT_NAMES[name]: by_layer(t) for name, t in tables.items()},
        "probes_split_std": {SHORT_NAMES[name]: split_std[name] for name in tables},
        "probes_lowest_over_splits": {SHORT_NAMES[name]: split_min[name] for name in tables},
        "city_probes": city,
        "generalization_failure": {
            "dataset": "xor", "a": "has_true", "b": "has_banana", "layer": layer,
            **{k: float(head[k]) for k in ("b_constant_train", "b_varied_train", "b_constant_train_same_b")},
            "auroc": {k: float(head[f"{k}_auroc"]) for k in ("b_constant_train", "b_varied_train")},
            "bias_refit": {k: float(head[f"{k}_bias_refit"]) for k in ("b_constant_train", "b_varied_train")},
            "all": gen_model.to_dict(orient="records"),
            "synthetic": {str(c): r for c, r in gen_synth.to_dict(orient="index").items()},
        },
        **({"reset_draws": {SHORT_NAMES[name]: {"n": int(d["n"]), "mean": by_layer(d["mean"]), "std": by_layer(d["std"])}
                            for name, d in reset_draws.items()}} if reset_draws else {}),
        **({"xor_normalised": {SHORT_NAMES[name]: {f: {k: (None if np.isnan(v) else float(v)) for k, v in ser.items()}
                                                   for f, ser in got.items()} for name, got in normalised.items()}}
           if normalised else {}),
        "synthetic": synth.to_dict(orient="index"),
        "synthetic_xor_grid": {str(s): {str(c): float(grid.loc[s, c]) for c in grid.columns} for s in grid.index},
    }
