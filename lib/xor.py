"""Probing for basic features and their XORs (notebook 02; Marks 2024, "What's up with LLMs
representing XORs of arbitrary features?").

A *basic* feature is a 0/1 column of a dataset (``has_true``, ``has_banana``, ``label``); its XORs
are the parity columns ``"a^b"`` that :func:`lib.datasets.add_xor_columns` adds.  The question is
whether a linear probe reads each of them from the residual stream, in the trained model and in
the same architecture with its training destroyed (:func:`lib.models.reset_model`).

>>> split = xor.split_rows(frame, groups=frame["filler"])           # one held-out split for all
>>> table = xor.probe_table({"0": X0, "1": X1}, frame, features, split)  # layer x feature accuracy
>>> xor.constant_b_generalization(X1, frame["has_true"], frame["has_banana"], split)

Probes are logistic regression with a bias on standardised activations (the scaling is fitted on
the training rows only; scikit-learn's objective, solved by Newton's method in a dozen steps),
accuracy on held-out rows.  The held-out rows are the same for every
feature and layer, so two cells of a table differ only in what is probed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.datasets import XOR_SEP


@dataclass(frozen=True)
class Split:
    """Row indices of one held-out split (each sorted)."""

    train: np.ndarray
    test: np.ndarray

    def __post_init__(self):
        if len(np.intersect1d(self.train, self.test)):
            raise ValueError("train and test rows overlap")


def split_rows(frame: pd.DataFrame, groups: Sequence | pd.Series | None = None, test_fraction: float = 0.2,
               seed: int = 0) -> Split:
    """An 80/20 split of ``frame``'s rows.

    With ``groups`` (one key per row, e.g. the city or the filler text) whole groups are held
    out, so two rows that share their content never straddle the split: a probe that memorised a
    city (or a filler) could otherwise score *below* chance on its partner row with the opposite
    label.  Without, a uniformly random split.
    """
    n = len(frame)
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        k = int(round(test_fraction * n))
        return Split(np.sort(order[k:]), np.sort(order[:k]))
    from lib.probes import train_test_indices  # the grouped split notebook 01 uses

    train, test = train_test_indices(np.zeros(n, dtype=np.int64), test_fraction, seed=seed, groups=list(groups))
    return Split(train, test)


def _bits(y) -> np.ndarray:
    y = np.asarray(y).astype(np.int64)
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"a feature must be 0/1, got values {sorted(set(np.unique(y).tolist()))[:5]}")
    return y


@dataclass
class Probe:
    """A fitted logistic-regression probe: ``predict(X) = 1[((X - mean) / scale) @ w + b > 0]``."""

    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray
    b: float
    n_iter: int

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.w + self.b

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(np.int64)


def logistic_newton(Z: np.ndarray, y: np.ndarray, C: float = 1.0, tol: float = 1e-8,
                    max_iter: int = 100) -> tuple[np.ndarray, float, int]:
    """L2-regularised logistic regression with an unpenalised bias, solved by Newton's method.

    Minimises ``0.5 ||w||^2 + C * sum_i log(1 + exp(-s_i (z_i . w + b)))`` (``s_i = 2 y_i - 1``):
    scikit-learn's ``LogisticRegression(C=C)`` objective, so the solutions agree.  The problem is
    strictly convex in ``w`` and the Hessian is only (d+1) x (d+1), so a dozen damped Newton
    steps reach the optimum where lbfgs needs hundreds of iterations on correlated activations
    (and thousands on separable ones).  Returns ``(w, b, iterations)``.
    """
    n, d = Z.shape
    A = np.hstack([Z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.ones(d + 1)
    reg[-1] = 0.0  # the bias is not penalised
    s = 2.0 * y - 1.0

    def objective(t):
        m = s * (A @ t)
        return 0.5 * np.sum(reg * t * t) + C * np.sum(np.logaddexp(0.0, -m))

    f = objective(theta)
    it = 0
    for it in range(1, max_iter + 1):
        m = s * (A @ theta)
        sig = 0.5 * (1.0 + np.tanh(-0.5 * m))  # = 1 / (1 + exp(m)), overflow-free
        grad = reg * theta - C * (A.T @ (s * sig))
        weights = C * sig * (1.0 - sig)
        H = (A * weights[:, None]).T @ A + np.diag(reg) + 1e-10 * np.eye(d + 1)
        step = np.linalg.solve(H, grad)
        decrement = float(grad @ step)
        t = 1.0
        while True:  # backtracking line search (Armijo)
            cand = theta - t * step
            f_new = objective(cand)
            if f_new <= f - 0.25 * t * decrement or t < 1e-8:
                break
            t *= 0.5
        theta, f = cand, f_new
        if decrement / 2.0 < tol * max(1.0, abs(f)):
            break
    return theta[:-1], float(theta[-1]), it


NEWTON_MAX_DIM = 1024  # above this width a Newton step's (d x d) solve costs more than lbfgs's whole fit


def fit_probe(X: np.ndarray, y, train: np.ndarray, C: float = 1.0, solver: str = "auto") -> Probe:
    """Logistic regression with a bias on ``X[train]`` standardised with the training rows' mean and
    standard deviation (scikit-learn's objective).

    ``solver``: ``"newton"`` (:func:`logistic_newton`), ``"lbfgs"`` (scikit-learn, ``tol=1e-6``)
    or ``"auto"``: Newton up to ``NEWTON_MAX_DIM`` dimensions (the toy models, GPT-2 small), lbfgs
    beyond (each Newton step costs ``n d^2``: for a 5120-wide model, seconds per step).
    """
    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {solver!r}")
    y = _bits(y)
    if len(np.unique(y[train])) < 2:
        raise ValueError("the training rows hold only one class of this feature; no probe can be fitted")
    Xt = np.asarray(X[train], dtype=np.float64)
    mean = Xt.mean(0)
    scale = Xt.std(0)
    scale[scale == 0] = 1.0
    Z = (Xt - mean) / scale
    if solver == "newton" or (solver == "auto" and Z.shape[1] <= NEWTON_MAX_DIM):
        w, b, n_iter = logistic_newton(Z, y[train].astype(np.float64), C=C)
        return Probe(mean, scale, w, b, n_iter)
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(Z, y[train])
    return Probe(mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), int(lr.n_iter_[0]))


def probe_accuracy(X: np.ndarray, y, split: Split, C: float = 1.0) -> float:
    """Held-out accuracy of a probe for ``y`` trained on ``split.train``."""
    y = _bits(y)
    probe = fit_probe(X, y, split.train, C=C)
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
        y = _bits(frame[f])
        majority = int(y[split.train].mean() >= 0.5)
        out[f] = float((y[split.test] == majority).mean())
    return pd.Series(out)


def chance_band(n_test: int, z: float = 3.0) -> tuple[float, float]:
    """The range a guessing probe stays in (``z`` binomial standard deviations around 0.5) on ``n_test`` rows."""
    half = z * 0.5 / np.sqrt(n_test)
    return 0.5 - half, 0.5 + half


def constant_b_generalization(X: np.ndarray, a, b, split: Split, b_train: int = 1, seed: int = 0,
                              C: float = 1.0) -> dict[str, float]:
    """The generalization failure XORs predict: a probe for ``a`` trained where ``b`` is constant.

    - ``b_constant_train``: trained on the training rows with ``b == b_train``, tested on the
      held-out rows with ``b`` flipped (``b != b_train``).
    - ``b_varied_train``: trained on as many training rows drawn regardless of ``b``, tested on
      the same flipped rows.
    - ``*_same_b``: the two probes on held-out rows with ``b == b_train`` (in distribution for both).

    If the model represents ``a^b`` as strongly as ``a``, the b-constant probe's direction mixes
    ``a`` with ``a^b`` (within its data they are the same feature) and its accuracy drops, even
    below chance, once ``b`` flips.  Varying ``b`` in training decorrelates them.
    """
    a, b = _bits(a), _bits(b)
    rng = np.random.default_rng(seed)
    const = split.train[b[split.train] == b_train]
    varied = np.sort(rng.choice(split.train, size=len(const), replace=False))
    flipped = split.test[b[split.test] != b_train]
    same = split.test[b[split.test] == b_train]
    out = {}
    for name, rows in (("b_constant_train", const), ("b_varied_train", varied)):
        probe = fit_probe(X, a, rows, C=C)
        for suffix, test in (("", flipped), ("_same_b", same)):
            pred = probe.predict(X[test])
            out[name + suffix] = float((pred == a[test]).mean())
    out["n_train"] = int(len(const))
    out["n_test_flipped"] = int(len(flipped))
    return out


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
def layer_hooks(model) -> dict[str, str]:
    """``{"embed": "blocks.0.hook_resid_pre", "0": "blocks.0.hook_resid_post", ...}``: the residual
    stream before the first block and after each block."""
    hooks = {"embed": "blocks.0.hook_resid_pre"}
    hooks.update({str(layer): f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)})
    return hooks


def layer_activations(model, texts: Sequence[str], dataset: str, batch_size: int = 64,
                      cache=True) -> dict[str, np.ndarray]:
    """Last-token residual activations at every :func:`layer_hooks` point: ``{layer: (n, d_model)}``."""
    from lib.activations import harvest

    hooks = layer_hooks(model)
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
