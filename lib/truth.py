"""The Geometry of Truth protocol (notebook 01's home, as :mod:`lib.xor` is 02's).

Truth datasets (:mod:`lib.datasets.truth`) and their last-token activations become
:class:`TruthProbeData`: centred per dataset, split into training and held-out rows by fact (a
city, a Spanish word, a pair of numbers: all statements about it, in both polarities, on one
side), with the combined training sets ``"cities+neg_cities"`` and CCS's contrast pairs.
:func:`probe_study` runs the whole protocol on one model at one layer (probes of every kind,
their generalization matrices, the causal check of the probe directions); notebook 01's main
section is one call, its scale section the same call once per model size.

>>> study = probe_study("toy-2l", frames, layer=0, alphas=[-0.5, 0.5])
>>> study.gen["lda"]          # accuracy: train set (rows) x test set (columns)
>>> study.size_row()          # the numbers the scale table compares across models
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.datasets.truth import (NEGATED, NEGATIONS, contrast_pairs, fact_keys, negation_partner,
                                object_features)
from lib.probes import (PROBES, LogisticProbe, as_labels, center, check_two_classes, diagonal_mean, generalization_matrix,
                        offdiagonal_mean, train_test_indices)


# --------------------------------------------------------------------------------------------
# the probing protocol: per-dataset centring, fact-consistent held-out splits, combined sets
# --------------------------------------------------------------------------------------------
@dataclass
class TruthProbeData:
    """Activations of several truth datasets, arranged for training and testing probes.

    X: name -> (n, d) activations, centred on the dataset's own mean when ``centred``; y: name ->
    (n,) labels; train / test: name -> row indices.  Splits are stratified and consistent across
    a dataset and its negation (a statement and its negation fall on the same side), so a probe
    trained on ``cities`` never saw the facts of the ``neg_cities`` rows it is tested on.
    """

    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    pairs: dict[str, tuple[np.ndarray, np.ndarray, str]]
    centred: bool = True

    def train_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of the training rows of ``name``, or of several joined by ``+`` ("cities+neg_cities")."""
        parts = name.split("+")
        return (np.concatenate([self.X[p][self.train[p]] for p in parts]),
                np.concatenate([self.y[p][self.train[p]] for p in parts]))

    def test_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of the held-out rows of ``name``."""
        return self.X[name][self.test[name]], self.y[name][self.test[name]]

    def ccs_train_set(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(x_pos, x_neg, y)`` for CCS: training rows of ``name`` (all ``+`` parts) and their negations.

        None when no part of ``name`` has a negated partner among the loaded datasets.
        """
        pos, neg, ys = [], [], []
        for part in name.split("+"):
            if part not in self.pairs:
                continue
            rows, partner_rows, partner = self.pairs[part]
            keep = np.isin(rows, self.train[part])
            pos.append(self.X[part][rows[keep]])
            neg.append(self.X[partner][partner_rows[keep]])
            ys.append(self.y[part][rows[keep]])
        if not pos:
            return None
        return np.concatenate(pos), np.concatenate(neg), np.concatenate(ys)

    def train_sets(self, names: Iterable[str], probe: str = "dim") -> dict[str, tuple | None]:
        """Arguments of ``probe.fit`` for each training set: ``(X, y)``, or CCS's pairs when ``probe == "ccs"``."""
        return {n: self.ccs_train_set(n) if probe == "ccs" else self.train_set(n) for n in names}

    def test_sets(self, names: Iterable[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: self.test_set(n) for n in (self.X if names is None else names)}


def truth_probe_data(frames: dict[str, pd.DataFrame], acts: dict[str, np.ndarray], test_fraction: float = 0.2,
                     seed: int = 0, centred: bool = True) -> TruthProbeData:
    """Build ``TruthProbeData`` from validated frames and their activations (``acts[name]``: (n, d)).

    The held-out rows are whole facts (:func:`fact_keys`): a random ``test_fraction`` of the
    cities (Spanish words, number pairs) with every statement about them, chosen once for a
    dataset and its negation together, so a probe is always tested on facts it never saw, in
    either polarity.  Sets whose statements fit no template (conjunctions, disjunctions) are
    split row by row, stratified.
    """
    names = [n for n in frames if n in acts]
    X = {n: (center(acts[n]) if centred else np.asarray(acts[n], dtype=np.float64)) for n in names}
    y = {n: frames[n]["label"].to_numpy(np.int64) for n in names}
    for n in names:
        if len(X[n]) != len(y[n]):
            raise ValueError(f"{n}: {len(X[n])} activation rows for {len(y[n])} statements")
        check_two_classes(y[n], f"dataset {n!r}")  # the grouped split never looks at labels
    pairs: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for n in names:
        if negation_partner(n) in names:
            try:
                pairs[n] = contrast_pairs(frames, n)
            except KeyError:
                pass
    train, test = {}, {}
    for k, n in enumerate(names):
        if n in test:
            continue
        keys = fact_keys(frames[n])
        partner = negation_partner(n)
        family = [n] + ([partner] if partner in names else [])
        if all(key.startswith("row:") for key in keys):
            train[n], test[n] = train_test_indices(y[n], test_fraction, seed=seed + k)
            family = [n]
            held = None
        else:
            family_keys = np.concatenate([fact_keys(frames[m]) for m in family])
            family_y = np.concatenate([y[m] for m in family])
            _, test_rows = train_test_indices(family_y, test_fraction, seed=seed + k, groups=family_keys)
            held = set(family_keys[test_rows].tolist())
        for m in family:
            if held is None:
                continue
            in_test = np.array([key in held for key in fact_keys(frames[m])])
            train[m], test[m] = np.flatnonzero(~in_test), np.flatnonzero(in_test)
    return TruthProbeData(X, y, train, test, pairs, centred)


# --------------------------------------------------------------------------------------------
# the protocol on one model at one layer
# --------------------------------------------------------------------------------------------
def training_sets(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    """Every dataset, then each affirmative dataset joined with its negation (``"cities+neg_cities"``)."""
    pairs = [f"{a}+{b}" for a, (b, _) in NEGATIONS.items() if a in frames and b in frames]
    return list(frames) + pairs


def generalization(data: TruthProbeData, train_names: Sequence[str],
                   probes: Iterable[str] = tuple(PROBES)) -> dict[str, pd.DataFrame]:
    """``{probe: accuracy matrix}``, train set (rows, ``train_names``) x held-out test set (columns)."""
    return {p: generalization_matrix(PROBES[p], data.train_sets(train_names, probe=p), data.test_sets()) for p in probes}


def layer_sweep(frames: Mapping[str, pd.DataFrame], acts: Mapping, layers: Sequence[int], seed: int = 0,
                probes: Sequence[str] = ("dim", "lda", "lr")) -> pd.DataFrame:
    """Held-out accuracy of each probe on each dataset (trained on that dataset) at each layer:
    columns ``layer, probe, dataset, accuracy``.  ``acts[name]`` is a :class:`lib.activations.Activations`
    holding every layer's ``hook_resid_post``."""
    from lib.hooks import hook_name

    names = list(frames)
    rows = []
    for layer in layers:
        data = truth_probe_data(frames, {n: acts[n].numpy(hook_name(layer)) for n in names}, seed=seed)
        for p in probes:
            m = generalization_matrix(PROBES[p], data.train_sets(names), data.test_sets())
            rows += [{"layer": layer, "probe": p, "dataset": n, "accuracy": m.loc[n, n]} for n in names]
    return pd.DataFrame(rows)


@dataclass
class ProbeStudy:
    """Everything :func:`probe_study` measured on one model at one layer.

    acts: dataset -> (n, d_model) last-token activations at ``hook``; gen: probe -> generalization
    matrix; directions: ``"dim"`` / ``"lr"`` -> unit direction trained on ``cities+neg_cities``;
    norm: mean residual norm at the period of ``cities`` (the unit of ``alpha``); gap: distance
    between the true and false class means of that training set; held_out: the held-out
    ``cities`` rows the causal check steers; sweep / baseline / nie: :func:`lib.interventions.causal_sweep`'s
    frame (alpha in units of ``norm``), the unsteered logit differences, and the normalised
    indirect effect at each positive alpha.
    """

    model_name: str
    n_layers: int
    d_model: int
    n_params: int
    layer: int
    hook: str
    names: list[str]
    acts: dict[str, np.ndarray]
    data: TruthProbeData
    gen: dict[str, pd.DataFrame]
    directions: dict[str, np.ndarray]
    norm: float
    gap: float
    held_out: pd.DataFrame
    alphas: list[float]
    sweep: pd.DataFrame
    baseline: np.ndarray
    nie: pd.DataFrame

    @property
    def truth(self) -> np.ndarray:
        """(n,) bool labels of :attr:`held_out`."""
        return self.held_out["label"].to_numpy(bool)

    @property
    def judgement_accuracy(self) -> float:
        """How often the model's own logit(true) - logit(false) has the sign of the label."""
        return float(np.mean((self.baseline > 0) == self.truth))

    def claims(self) -> pd.DataFrame:
        """Mean held-out accuracy per probe in distribution (diagonal) and out of it (single-set rows)."""
        return pd.DataFrame({p: {"in-distribution": diagonal_mean(g), "out-of-distribution": offdiagonal_mean(g, rows=self.names)}
                             for p, g in self.gen.items()}).T

    def size_row(self, alpha: float = 0.5) -> dict:
        """The scale table's row: size, layer, judgement accuracy, transfer, and the causal effect
        (normalised indirect effect, false to true) at ``alpha``."""
        return {"n_layers": self.n_layers, "d_model": self.d_model, "params": self.n_params, "layer": self.layer,
                "judgement acc": self.judgement_accuracy, "dim in-dist": diagonal_mean(self.gen["dim"]),
                **{f"{p} off-diag": offdiagonal_mean(g, rows=self.names) for p, g in self.gen.items()},
                **{f"NIE {p}": self.nie.loc[(alpha, p), "false_to_true"] for p in self.directions}}


def probe_study(model, frames: Mapping[str, pd.DataFrame], layer: int | None = None, *,
                alphas: Sequence[float] = (-0.5, 0.5), seed: int = 0, batch_size: int = 32,
                acts: Mapping[str, np.ndarray] | None = None, device=None, dtype=None) -> ProbeStudy:
    """The truth-probe protocol on ``model`` (a name, loaded with ``device`` / ``dtype``, or a loaded
    model) at the residual stream after block ``layer`` (default: the middle one; negative counts from the end, -1 the last).

    Harvests the last-token activations of every dataset (unless ``acts`` gives them), trains every
    probe of :data:`lib.probes.PROBES` on every training set (:func:`training_sets`), scores each on
    every held-out set, and adds ``alpha * norm`` times the DIM and LR directions (trained on
    ``cities+neg_cities``) at the period of the held-out ``cities`` statements for each of
    ``alphas`` (:func:`lib.interventions.causal_sweep`).
    """
    from lib.activations import harvest
    from lib.hooks import hook_name
    from lib.interventions import causal_sweep, normalized_indirect_effect
    from lib.models import load_model

    lm = load_model(model, device=device, dtype=dtype) if isinstance(model, str) else model
    layer = (lm.cfg.n_layers - 1) // 2 if layer is None else layer % lm.cfg.n_layers  # -1: the last block
    hook = hook_name(layer)
    if acts is None:
        acts = {n: harvest(lm, f["statement"].tolist(), hook, prepend_bos=True, batch_size=batch_size, dataset=n).numpy(hook)
                for n, f in frames.items()}
    data = truth_probe_data(frames, acts, seed=seed)
    gen = generalization(data, training_sets(frames))
    X_tr, y_tr = data.train_set("cities+neg_cities")
    directions = {p: PROBES[p]().fit(X_tr, y_tr).unit_direction() for p in ("dim", "lr")}
    norm = float(np.linalg.norm(acts["cities"], axis=1).mean())
    gap = float(np.linalg.norm(X_tr[y_tr == 1].mean(0) - X_tr[y_tr == 0].mean(0)))
    held_out = frames["cities"].iloc[data.test["cities"]]
    truth = held_out["label"].to_numpy(bool)
    sweep, baseline = causal_sweep(lm, held_out["statement"].tolist(), truth, hook, directions,
                                   [a * norm for a in alphas], prepend_bos=True, batch_size=batch_size)
    sweep["alpha"] = (sweep["alpha"] / norm).round(6)  # back to units of the residual norm
    nie = pd.concat({a: normalized_indirect_effect(sweep, baseline, truth, a) for a in alphas if a > 0},
                    names=["alpha", "direction"])
    return ProbeStudy(str(getattr(lm, "compendium_name", model)), lm.cfg.n_layers, lm.cfg.d_model,
                      sum(p.numel() for p in lm.parameters()), layer, hook, list(frames), dict(acts), data, gen,
                      directions, norm, gap, held_out, list(alphas), sweep, baseline, nie)


def size_table(rows: Mapping[str, dict]) -> pd.DataFrame:
    """:meth:`ProbeStudy.size_row` of several models, one row each."""
    return pd.DataFrame(rows).T.astype(float).astype({"n_layers": int, "d_model": int, "params": int, "layer": int})


# --------------------------------------------------------------------------------------------
# tables of notebook 01
# --------------------------------------------------------------------------------------------
def negation_pairing(gen: Mapping[str, pd.DataFrame], names: Sequence[str], train_names: Sequence[str],
                     probes: Sequence[str] = ("dim", "lda", "lr")) -> pd.DataFrame:
    """Does training on a dataset together with its negation help transfer?  Mean accuracy on the
    other unnegated and the other negated datasets, trained alone vs with the negation."""
    affirmative = [n for n in names if n not in NEGATED]
    negated = [n for n in names if n in NEGATED]
    rows = []
    for a, (b, _) in NEGATIONS.items():
        if f"{a}+{b}" not in train_names:
            continue
        to_aff, to_neg = [t for t in affirmative if t != a], [t for t in negated if t != b]
        for p in probes:
            g = gen[p]
            rows.append({"train": a, "probe": p, "unnegated: alone": g.loc[a, to_aff].mean(),
                         "unnegated: + negation": g.loc[f"{a}+{b}", to_aff].mean(),
                         "negated: alone": g.loc[a, to_neg].mean(), "negated: + negation": g.loc[f"{a}+{b}", to_neg].mean()})
    return pd.DataFrame(rows).set_index(["train", "probe"])


# the paper's numbers for LLaMA-2-13B (Marks & Tegmark 2023): (train -> test, probe, accuracy)
PAPER_ANCHORS = [
    ("cities", "neg_cities", "lr", "0.14"), ("cities", "neg_cities", "dim", "0.32"),
    ("cities+neg_cities", "neg_cities", "lr", "1.00"), ("cities+neg_cities", "neg_cities", "dim", "1.00"),
    ("larger_than", "smaller_than", "lr", "0.00-0.07"), ("larger_than", "smaller_than", "dim", "0.00-0.07"),
]


def anchor_table(gen: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's anchor numbers beside ours (NaN where a set was not loaded)."""
    def cell(p, train, test):
        g = gen[p]
        return g.loc[train, test] if train in g.index and test in g.columns else float("nan")

    return pd.DataFrame([(f"{tr} -> {te}", p, cell(p, tr, te), paper) for tr, te, p, paper in PAPER_ANCHORS],
                        columns=["transfer", "probe", "ours", "LLaMA-2-13B (paper)"]).set_index(["transfer", "probe"])


def results_record(study: ProbeStudy, frames: Mapping[str, pd.DataFrame], pairing: pd.DataFrame,
                   likelihood: pd.DataFrame, size_rows: Mapping[str, dict],
                   baseline: Mapping[str, dict] | None = None, *, spread: dict | None = None,
                   reset: pd.DataFrame | None = None, sites: pd.DataFrame | None = None,
                   causal: pd.DataFrame | None = None) -> dict:
    """Notebook 01's key numbers, as ``data/results/01_truth_probes.json`` stores them.

    ``baseline``: :func:`object_only_baseline` per dataset; ``reset``: :func:`reset_baseline`'s
    frame (both under ``baselines``); ``spread``: :func:`generalization_spread` at the study's
    site (the generalization matrices and claims become means over splits, with ``*_std``);
    ``sites``: :func:`site_sweep`'s frame; ``causal``: :func:`causal_sites`'s frame."""
    sweep = study.sweep
    gen = study.gen if spread is None else spread["mean"]
    claims = study.claims().to_dict(orient="index")
    extra: dict = {}
    if spread is not None:
        c = group_mean_std(spread["claims"], ["probe"], ["in-distribution", "out-of-distribution"])
        claims = {p: {k: float(v) for k, v in row.items()} for p, row in c.to_dict(orient="index").items()}
        extra["generalization_std"] = {p: g.to_dict(orient="index") for p, g in spread["std"].items()}
        extra["split_seeds"] = int(spread["claims"]["seed"].nunique())
    baselines = {}
    if baseline is not None:
        baselines["object_only"] = {n: dict(b) for n, b in baseline.items()}
    if reset is not None:
        r = group_mean_std(reset, ["mode", "probe", "dataset"], ["accuracy"])
        baselines["reset"] = {mode: {probe: {d: {"accuracy": float(r.loc[(mode, probe, d), "accuracy"]),
                                                 "accuracy_std": float(r.loc[(mode, probe, d), "accuracy_std"])}
                                             for d in reset["dataset"].unique()}
                                     for probe in reset["probe"].unique()}
                              for mode in reset["mode"].unique()}
        baselines["reset_draws"] = int(reset["draw"].nunique())
    if baselines:
        extra["baselines"] = baselines
    if sites is not None:
        per_seed = sites.groupby(["position", "layer", "probe", "seed"], sort=False).accuracy.mean().reset_index()
        m = group_mean_std(per_seed, ["position", "layer", "probe"], ["accuracy"])
        extra["layer_position_sweep"] = {
            f"{pos}@{layer}": {p: {k: float(m.loc[(pos, layer, p), k]) for k in ("accuracy", "accuracy_std")}
                               for p in sites["probe"].unique()}
            for pos, layer in dict.fromkeys(zip(sites["position"], sites["layer"]))}
    if causal is not None:
        m = group_mean_std(causal, ["position", "layer", "direction"],
                           ["false_to_true", "true_to_false", "decodability"])
        extra["causal_sites"] = {f"{pos}@{layer}": {d: {k: float(m.loc[(pos, layer, d), k]) for k in m.columns}
                                                   for d in causal["direction"].unique()}
                                 for pos, layer in dict.fromkeys(zip(causal["position"], causal["layer"]))}
    return {
        "model": study.model_name, "layer": study.layer, "hook": study.hook,
        "datasets": {n: len(f) for n, f in frames.items()},
        "generalization": {p: g.to_dict(orient="index") for p, g in gen.items()},
        "in_vs_out_of_distribution": claims,
        "pairing_with_negations": {f"{t}/{p}": row for (t, p), row in pairing.to_dict(orient="index").items()},
        "likelihood_correlation": likelihood["r(logp, label)"].to_dict(),
        "likelihood_classifier_accuracy": likelihood["likelihood clf acc"].to_dict(),
        "by_model_size": {m: {"mean_offdiagonal_accuracy": r["dim off-diag"], "probe": "dim",
                              **{k.replace(" ", "_").replace("-", "_"): v for k, v in r.items()}}
                          for m, r in size_rows.items()},
        "causal": {"scales": study.alphas, "scale_unit": "mean residual-stream norm at the period", "unit_norm": study.norm,
                   "class_mean_distance": study.gap, "direction": "dim (unit), trained on cities+neg_cities",
                   "statements": "held-out cities", "judgement_accuracy": study.judgement_accuracy,
                   "delta_logit_true_minus_false": sweep[sweep["direction"] == "dim"]["mean_delta"].tolist(),
                   "by_direction": {d: sweep[sweep["direction"] == d]["mean_delta"].tolist() for d in study.directions},
                   "nie": {f"{d}@{a}": row for (a, d), row in study.nie.to_dict(orient="index").items()}},
        **extra,
    }


def object_only_baseline(frame: pd.DataFrame, seeds: Sequence[int] = range(5), test_fraction: float = 0.3) -> dict:
    """What a statement's objects alone say about its label: a logistic regression (with bias) on
    one-hot objects (:func:`lib.datasets.object_features`: the country, each clause's country, the
    English word, the two numbers), trained and tested on held-out facts (grouped by
    :func:`lib.datasets.fact_keys`).  ``{"accuracy", "auroc"}`` (means over ``seeds``) and their
    standard deviations.  The baseline every truth probe must beat."""
    from sklearn.metrics import roc_auc_score

    X, y, keys = object_features(frame), as_labels(frame["label"].to_numpy()), fact_keys(frame)
    accs, aucs = [], []
    for seed in seeds:
        tr, te = train_test_indices(y, test_fraction, seed=seed, groups=keys)
        probe = LogisticProbe(C=1.0, fit_bias=True).fit(X[tr], y[tr])
        accs.append(probe.score(X[te], y[te]))
        aucs.append(roc_auc_score(y[te], probe.decision_function(X[te])))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "auroc": float(np.mean(aucs)), "auroc_std": float(np.std(aucs))}


# --------------------------------------------------------------------------------------------
# spreads and controls (issue 15): split seeds, positions, reset networks, causal sites
# --------------------------------------------------------------------------------------------
POSITIONS = ("period", "answer")  # the statement's last token; the " is" of " That is" appended after it


def judgement_texts(frame: pd.DataFrame) -> list[str]:
    """Each statement followed by the judgement prefix (" That is"): read at its last token, the
    ``"answer"`` position, where the model's next token is its judgement."""
    from lib.world.templates import JUDGEMENT_PREFIX

    return [s + JUDGEMENT_PREFIX for s in frame["statement"]]


def site_sweep(frames: Mapping[str, pd.DataFrame], acts_by_position: Mapping[str, Mapping], layers: Sequence[int],
               seeds: Sequence[int] = range(5), probes: Sequence[str] = ("dim", "lda", "lr")) -> pd.DataFrame:
    """:func:`layer_sweep` at each position (``acts_by_position[position][dataset]``, an
    :class:`lib.activations.Activations` of every layer) and each split seed: columns ``position,
    seed, layer, probe, dataset, accuracy`` (held-out, trained on the same dataset)."""
    parts = []
    for position, acts in acts_by_position.items():
        for seed in seeds:
            part = layer_sweep(frames, acts, layers, seed=seed, probes=probes)
            parts.append(part.assign(position=position, seed=seed))
    return pd.concat(parts, ignore_index=True)[["position", "seed", "layer", "probe", "dataset", "accuracy"]]


def generalization_spread(frames: Mapping[str, pd.DataFrame], acts: Mapping[str, np.ndarray],
                          seeds: Sequence[int] = range(5), probes: Iterable[str] = tuple(PROBES)) -> dict:
    """The generalization matrices over several held-out splits: ``{"mean": {probe: matrix}, "std":
    {probe: matrix}, "claims": frame}`` where ``claims`` has one row per (seed, probe) with the
    in-distribution (diagonal) and out-of-distribution (single-set rows) means."""
    names, train_names, probes = list(frames), training_sets(frames), list(probes)
    per_seed, claims = {p: [] for p in probes}, []
    for seed in seeds:
        gen = generalization(truth_probe_data(frames, acts, seed=seed), train_names, probes)
        for p, g in gen.items():
            per_seed[p].append(g)
            claims.append({"seed": seed, "probe": p, "in-distribution": diagonal_mean(g),
                           "out-of-distribution": offdiagonal_mean(g, rows=names)})
    # a cell a probe cannot fill (CCS without a negated partner) is NaN in every split: mean and std stay NaN
    stack = {p: pd.concat(gs, keys=range(len(gs))).groupby(level=1, sort=False) for p, gs in per_seed.items()}
    order = {p: per_seed[p][0] for p in probes}
    return {"mean": {p: s.mean().loc[order[p].index, order[p].columns] for p, s in stack.items()},
            "std": {p: s.std(ddof=0).loc[order[p].index, order[p].columns] for p, s in stack.items()},
            "claims": pd.DataFrame(claims)}


def reset_baseline(model_name: str, frames: Mapping[str, pd.DataFrame], layer: int, *,
                   modes: Sequence[str] = ("reinit", "shuffle"), draws: int = 3, seed: int = 0,
                   probes: Sequence[str] = ("dim", "lda", "lr"), max_rows: int | None = None, batch_size: int = 128,
                   device=None, dtype=None) -> pd.DataFrame:
    """The same probes, trained and tested the same way (held-out facts, split ``seed``), on reset
    copies of ``model_name`` (:func:`lib.models.reset_model`: re-initialised, or its weights
    shuffled), ``draws`` of each: what the architecture and the tokens alone make readable.
    ``max_rows``: at most this many statements per dataset (a random subset, the same for every
    network).  Columns ``mode, draw, probe, dataset, accuracy`` (the held-out diagonal)."""
    from lib.activations import harvest
    from lib.hooks import hook_name
    from lib.models import reset_model

    if max_rows is not None:
        frames = {n: f.sample(min(len(f), max_rows), random_state=seed).sort_index() for n, f in frames.items()}
    rows, names = [], list(frames)
    for mode in modes:
        for draw in range(draws):
            net = reset_model(model_name, mode, seed=draw, device=device, dtype=dtype)
            hook = hook_name(layer % net.cfg.n_layers)
            acts = {n: harvest(net, f["statement"].tolist(), hook, prepend_bos=True, batch_size=batch_size,
                               cache=False).numpy(hook) for n, f in frames.items()}
            data = truth_probe_data(frames, acts, seed=seed)
            for p in probes:
                m = generalization_matrix(PROBES[p], data.train_sets(names), data.test_sets())
                rows += [{"mode": mode, "draw": draw, "probe": p, "dataset": n, "accuracy": float(m.loc[n, n])}
                         for n in names]
            del net
    return pd.DataFrame(rows)


def causal_sites(model, frames: Mapping[str, pd.DataFrame], acts_by_position: Mapping[str, Mapping],
                 sites: Sequence[tuple[str, int]], *, seeds: Sequence[int] = range(5), alpha: float = 0.5,
                 n_statements: int | None = 200, batch_size: int = 128) -> pd.DataFrame:
    """The causal check at several sites ``(position, layer)``, each split seed its own probes and
    held-out statements.

    At each site the DIM and LR directions are trained on the training rows of ``cities +
    neg_cities`` (activations ``acts_by_position[position][dataset]`` at ``layer``), and a random
    unit direction (seeded by the split) is the control; ``alpha`` times the mean residual norm at
    the site is added (and subtracted) at that position of the held-out ``cities`` statements (at
    most ``n_statements`` of them).  Rows: ``position, layer, seed, direction, false_to_true,
    true_to_false`` (:func:`lib.interventions.normalized_indirect_effect`), ``decodability`` (the
    LR probe's held-out accuracy on ``cities`` at the site) and ``judgement_accuracy`` (the
    unsteered model on those statements).
    """
    from lib.hooks import hook_name
    from lib.interventions import causal_sweep, normalized_indirect_effect

    pair = {n: frames[n] for n in ("cities", "neg_cities")}
    rows = []
    for position, layer in sites:
        hook = hook_name(layer)
        site_acts = {n: acts_by_position[position][n].numpy(hook) for n in pair}
        norm = float(np.linalg.norm(site_acts["cities"], axis=1).mean())
        for seed in seeds:
            data = truth_probe_data(pair, site_acts, seed=seed)
            X_tr, y_tr = data.train_set("cities+neg_cities")
            rng = np.random.default_rng(seed)
            directions = {p: PROBES[p]().fit(X_tr, y_tr).unit_direction() for p in ("dim", "lr")}
            directions["random"] = (v := rng.standard_normal(X_tr.shape[1])) / np.linalg.norm(v)
            decodability = PROBES["lr"]().fit(*data.train_set("cities")).score(*data.test_set("cities"))
            test_rows = data.test["cities"]
            if n_statements is not None and len(test_rows) > n_statements:
                test_rows = np.sort(rng.choice(test_rows, n_statements, replace=False))
            held = frames["cities"].iloc[test_rows]
            truth = held["label"].to_numpy(bool)
            sweep, base = causal_sweep(model, held["statement"].tolist(), truth, hook, directions,
                                       [-alpha * norm, alpha * norm], batch_size=batch_size, position=position)
            nie = normalized_indirect_effect(sweep, base, truth, alpha * norm)
            for d, r in nie.iterrows():
                rows.append({"position": position, "layer": layer, "seed": seed, "direction": d,
                             "false_to_true": r["false_to_true"], "true_to_false": r["true_to_false"],
                             "decodability": decodability, "judgement_accuracy": float(np.mean((base > 0) == truth))})
    return pd.DataFrame(rows)


def group_mean_std(frame: pd.DataFrame, by: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation (population, over the rows of each group) of ``values``:
    columns ``{value}``, ``{value}_std`` for each value in turn."""
    g = frame.groupby(list(by), sort=False)[list(values)]
    out = g.mean().join(g.std(ddof=0).add_suffix("_std"))
    return out[[c for v in values for c in (v, f"{v}_std")]]
