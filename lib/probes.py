"""Linear probes on activations: difference-in-means, LDA, logistic regression and CCS.

Every probe is a direction ``w`` (and a bias ``b``, zero unless ``fit_bias``): it scores an
activation ``x`` as ``w . x + b`` and predicts "true" (1) when the score is positive.  Arrays in
(NumPy or torch, shape (n, d)), nothing about datasets: callers centre and split the data.

* ``DiffMeanProbe``  (mass-mean): ``w = mu_true - mu_false``.
* ``LDAProbe``       (mass-mean with the inverse of the pooled within-class covariance):
  ``w = (Sigma_w + shrinkage)^-1 (mu_true - mu_false)``; the shrinkage pulls ``Sigma_w`` towards a
  multiple of the identity, so it stays invertible with fewer samples than dimensions.
* ``LogisticProbe``  (logistic regression, L2-regularised, scikit-learn's objective): solved by
  Newton's method (:func:`logistic_newton`, a dozen steps) up to ``NEWTON_MAX_DIM`` features and
  by scikit-learn's lbfgs above, where a Newton step's ``d x d`` solve stops paying.
* ``CCSProbe``       (contrast-consistent search, Burns et al. 2022): unsupervised, fitted on
  contrast pairs ``(x_pos, x_neg)`` (a statement and its negation) so that
  ``p(x_pos) ~ 1 - p(x_neg)`` and one of them is confident; labels, when given, only choose the
  sign of the direction (CCS cannot tell "true" from "false" by itself).

With ``fit_bias=False`` (the default, as in the Geometry of Truth) a probe has no bias and expects
data centred per dataset (``center``).  ``generalization_matrix`` trains a probe on each training
set and scores it on each test set.  :func:`train_test_indices` is the one held-out splitter
(stratified, uniform, or by groups), returning a :class:`Split`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_array(x: ArrayLike) -> np.ndarray:
    """A float64 NumPy copy of a NumPy array or torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def as_labels(y: ArrayLike) -> np.ndarray:
    """(n,) int64 0/1 labels from any 0/1 (or boolean) array, list, Series or tensor."""
    y = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y).reshape(-1)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1, True, False}:
        raise ValueError(f"labels must be 0/1, got values {sorted(values)[:10]}")
    return y.astype(np.int64)


def _check_xy(X: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    X, y = as_array(X), as_labels(y)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape}, y {y.shape}")
    check_two_classes(y)
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(1))
        raise ValueError(f"X has NaN or infinite values in {len(bad)} row(s) (first: row {int(bad[0])}); "
                         "check the activations (a float16 overflow?) before fitting a probe")
    return X, y


def check_two_classes(y: ArrayLike, what: str = "the training data") -> None:
    """Refuse labels of one class only: no probe (and no held-out accuracy) means anything there."""
    y = as_labels(y)
    if len(y) == 0:
        raise ValueError(f"{what} has no rows; a probe needs examples of both classes")
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        only = int(np.argmax(counts))
        raise ValueError(
            f"{what} has only label {only} ({'true' if only else 'false'}) in all {len(y)} rows; a probe needs "
            "both classes, true (1) and false (0) statements. Check the dataset's label column, or the split.")


def center(X: ArrayLike) -> np.ndarray:
    """``X - X.mean(0)``: the per-dataset centring probes without a bias expect.  (n, d)."""
    X = as_array(X)
    return X - X.mean(axis=0, keepdims=True)


class LinearProbe:
    """Base class: ``direction`` (d,), ``bias``; score ``X @ direction + bias``; predict score > 0."""

    name = "linear"
    direction: np.ndarray
    bias: float = 0.0

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """(n,) signed scores; positive means "true"."""
        if not hasattr(self, "direction"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit first")
        return as_array(X) @ self.direction + self.bias

    def predict(self, X: ArrayLike) -> np.ndarray:
        """(n,) 0/1 predictions."""
        return (self.decision_function(X) > 0).astype(np.int64)

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        """Accuracy on ``(X, y)``."""
        y = as_labels(y)
        if len(y) == 0:
            raise ValueError("no rows to score the probe on (an empty test set)")
        pred = self.predict(X)
        if len(pred) != len(y):
            raise ValueError(f"X has {len(pred)} rows but y has {len(y)} labels")
        return float(np.mean(pred == y))

    def unit_direction(self) -> np.ndarray:
        """The direction scaled to unit L2 norm (d,)."""
        return self.direction / np.linalg.norm(self.direction)


def _midpoint_bias(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float(-0.5 * (X[y == 1].mean(0) + X[y == 0].mean(0)) @ w)


@dataclass
class DiffMeanProbe(LinearProbe):
    """Difference-in-means (mass-mean) probe: ``direction = mean(X[y==1]) - mean(X[y==0])``."""

    fit_bias: bool = False
    name = "dim"

    def fit(self, X: ArrayLike, y: ArrayLike) -> "DiffMeanProbe":
        X, y = _check_xy(X, y)
        self.direction = X[y == 1].mean(0) - X[y == 0].mean(0)
        self.bias = _midpoint_bias(self.direction, X, y) if self.fit_bias else 0.0
        return self


def best_threshold(scores: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """``(t, accuracy)``: the threshold t that maximises the accuracy of ``scores > t`` as a
    predictor of ``y`` (one orientation: higher scores mean 1), placed midway between consecutive
    sorted scores (never between equal ones) or just outside their range; ties go to the lowest t."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = as_labels(y)
    if len(s) != len(y) or not len(s):
        raise ValueError(f"need as many labels as scores, at least one (got {len(s)} and {len(y)})")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # cut i: the i lowest scores predicted 0, the rest 1; correct = zeros below + ones above
    correct = np.concatenate([[0], np.cumsum(y == 0)]) + (y.sum() - np.concatenate([[0], np.cumsum(y == 1)]))
    cuts = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    allowed = np.concatenate([[True], s[:-1] < s[1:], [True]])
    best = int(np.argmax(np.where(allowed, correct, -1)))
    return float(cuts[best]), float(correct[best] / len(s))


def pooled_within_class_covariance(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(d, d): covariance of ``X`` after subtracting each class's own mean."""
    centred = np.concatenate([X[y == c] - X[y == c].mean(0) for c in (0, 1)])
    return centred.T @ centred / len(centred)


@dataclass
class LDAProbe(LinearProbe):
    """Mass-mean with the inverse within-class covariance (Fisher's LDA direction).

    ``direction = ((1 - s) Sigma_w + s * tr(Sigma_w) / d * I)^-1 (mu_1 - mu_0)`` with ``s = shrinkage``.
    """

    shrinkage: float = 0.1
    fit_bias: bool = False
    name = "lda"

    def fit(self, X: ArrayLike, y: ArrayLike) -> "LDAProbe":
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        X, y = _check_xy(X, y)
        sigma = pooled_within_class_covariance(X, y)
        d = sigma.shape[0]
        target = np.trace(sigma) / d * np.eye(d)
        reg = (1 - self.shrinkage) * sigma + self.shrinkage * target
        diff = X[y == 1].mean(0) - X[y == 0].mean(0)
        self.direction = np.linalg.lstsq(reg, diff, rcond=None)[0] if self.shrinkage == 0 else np.linalg.solve(reg, diff)
        self.bias = _midpoint_bias(self.direction, X, y) if self.fit_bias else 0.0
        return self


def logistic_newton(Z: np.ndarray, y: np.ndarray, C: float = 1.0, fit_bias: bool = True, tol: float = 1e-8,
                    max_iter: int = 100) -> tuple[np.ndarray, float, int]:
    """L2-regularised logistic regression (with an unpenalised bias when ``fit_bias``) by Newton's method.

    Minimises ``0.5 ||w||^2 + C * sum_i log(1 + exp(-s_i (z_i . w + b)))`` (``s_i = 2 y_i - 1``):
    scikit-learn's ``LogisticRegression(C=C)`` objective, so the solutions agree.  The problem is
    strictly convex in ``w`` and the Hessian is only (d+1) x (d+1), so a dozen damped Newton
    steps reach the optimum where lbfgs needs hundreds of iterations on correlated activations
    (and thousands on separable ones).  Returns ``(w, b, iterations)`` (``b = 0`` without a bias).
    """
    n, d = Z.shape
    A = np.hstack([Z, np.ones((n, 1))]) if fit_bias else Z
    k = A.shape[1]
    theta = np.zeros(k)
    reg = np.ones(k)
    if fit_bias:
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
        H = (A * weights[:, None]).T @ A + np.diag(reg) + 1e-10 * np.eye(k)
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
    return (theta[:-1], float(theta[-1]), it) if fit_bias else (theta, 0.0, it)


NEWTON_MAX_DIM = 1024  # above this width a Newton step's (d x d) solve costs more than lbfgs's whole fit


@dataclass
class LogisticProbe(LinearProbe):
    """L2-regularised logistic regression; ``C`` is the inverse strength (scikit-learn's objective).

    ``solver``: ``"auto"`` (Newton up to ``NEWTON_MAX_DIM`` features: the toy models, GPT-2 small;
    lbfgs above, where each Newton step's ``n d^2`` costs seconds), ``"newton"`` or ``"lbfgs"``
    (scikit-learn, ``tol=1e-6``).  ``standardize``: fit on the features standardised with the
    training rows' mean and standard deviation; ``direction`` and ``bias`` are then those of the
    original features, and scoring standardises exactly as the fit did.
    """

    C: float = 1.0
    fit_bias: bool = False
    standardize: bool = False
    solver: str = "auto"
    max_iter: int = 5000  # lbfgs only
    name = "lr"
    n_iter_: int = field(default=0, init=False)

    def fit(self, X: ArrayLike, y: ArrayLike) -> "LogisticProbe":
        if self.solver not in ("auto", "newton", "lbfgs"):
            raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {self.solver!r}")
        X, y = _check_xy(X, y)
        self.mean_, self.scale_ = np.zeros(X.shape[1]), np.ones(X.shape[1])
        if self.standardize:
            self.mean_, self.scale_ = X.mean(0), X.std(0)
            self.scale_[self.scale_ == 0] = 1.0
            X = (X - self.mean_) / self.scale_
        if self.solver == "newton" or (self.solver == "auto" and X.shape[1] <= NEWTON_MAX_DIM):
            self.w_, self.b_, self.n_iter_ = logistic_newton(X, y.astype(np.float64), C=self.C, fit_bias=self.fit_bias)
        else:
            from sklearn.linear_model import LogisticRegression

            lr = LogisticRegression(C=self.C, fit_intercept=self.fit_bias, tol=1e-6, max_iter=self.max_iter).fit(X, y)
            self.w_ = lr.coef_[0].astype(np.float64)
            self.b_, self.n_iter_ = (float(lr.intercept_[0]) if self.fit_bias else 0.0), int(lr.n_iter_[0])
        self.direction = self.w_ / self.scale_
        self.bias = self.b_ - float(self.mean_ @ self.direction)
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        if not self.standardize or not hasattr(self, "w_"):
            return super().decision_function(X)
        return ((as_array(X) - self.mean_) / self.scale_) @ self.w_ + self.b_


@dataclass
class CCSProbe(LinearProbe):
    """Contrast-consistent search on pairs ``(x_pos, x_neg)``: (n, d) each, row k a statement and its negation.

    Each side is centred on its own mean and scaled to unit mean norm; the probe
    ``p(x) = sigmoid(w . x)`` minimises ``mean((p(x_pos) - (1 - p(x_neg)))^2) + mean(min(p_pos, p_neg)^2)``
    with Adam from ``n_restarts`` random unit-norm starts (optimised together), keeping the best.  ``y`` (labels of ``x_pos``)
    only orients ``w``: it is flipped when it scores below 50% on the pairs it was fitted on.
    """

    n_restarts: int = 10
    n_steps: int = 400
    lr: float = 5e-2
    weight_decay: float = 0.0
    seed: int = 0
    name = "ccs"
    loss_: float = field(default=float("nan"), init=False)

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(0, keepdims=True)
        return x / max(np.linalg.norm(x, axis=1).mean(), 1e-12)

    def fit(self, x_pos: ArrayLike, x_neg: ArrayLike, y: ArrayLike | None = None) -> "CCSProbe":
        x_pos, x_neg = as_array(x_pos), as_array(x_neg)
        if x_pos.shape != x_neg.shape or x_pos.ndim != 2:
            raise ValueError(f"x_pos and x_neg must be matching (n, d) arrays; got {x_pos.shape} and {x_neg.shape}")
        a, b = self._normalise(x_pos), self._normalise(x_neg)
        rng = np.random.default_rng(self.seed)
        # all restarts optimised at once: W is (n_restarts, d), each row an independent probe
        # started from a random unit-norm direction; Adam with the analytic gradient
        W = rng.normal(size=(self.n_restarts, a.shape[1]))
        W /= np.linalg.norm(W, axis=1, keepdims=True)
        m, v = np.zeros_like(W), np.zeros_like(W)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.n_steps + 1):
            grad = self._loss_and_grad(a, b, W)[1] + self.weight_decay * W
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad**2
            W -= self.lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
        losses = self._loss_and_grad(a, b, W)[0]
        best = int(np.argmin(losses))
        best_loss, w = float(losses[best]), W[best].copy()
        if y is not None:
            y = as_labels(y)
            if len(y) != len(x_pos):
                raise ValueError(f"y must label the {len(x_pos)} rows of x_pos, got {len(y)}")
            pair_scores = a @ w - b @ w
            if np.mean((pair_scores > 0) == (y == 1)) < 0.5:
                w = -w
        self.direction = w
        self.bias = 0.0
        self.loss_ = best_loss
        return self

    @staticmethod
    def _loss_and_grad(a: np.ndarray, b: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CCS loss of each row of ``W`` (R, d) on pairs ``a``, ``b`` (n, d): ``((R,), (R, d) gradient)``."""
        p_a = 1.0 / (1.0 + np.exp(-(a @ W.T)))  # (n, R)
        p_b = 1.0 / (1.0 + np.exp(-(b @ W.T)))
        n = a.shape[0]
        gap = p_a + p_b - 1.0
        low = np.minimum(p_a, p_b)
        loss = (gap**2).mean(0) + (low**2).mean(0)
        a_low = p_a <= p_b
        d_pa = (2 * gap + 2 * low * a_low) / n
        d_pb = (2 * gap + 2 * low * ~a_low) / n
        grad = (d_pa * p_a * (1 - p_a)).T @ a + (d_pb * p_b * (1 - p_b)).T @ b
        return loss, grad

    def predict_pairs(self, x_pos: ArrayLike, x_neg: ArrayLike) -> np.ndarray:
        """(n,) 0/1: whether ``x_pos`` is the true one, from ``(p(x_pos) + 1 - p(x_neg)) / 2 > 0.5``."""
        return (self.decision_function(x_pos) - self.decision_function(x_neg) > 0).astype(np.int64)


PROBES: dict[str, Callable[[], LinearProbe]] = {
    "dim": DiffMeanProbe,
    "lda": LDAProbe,
    "lr": LogisticProbe,
    "ccs": CCSProbe,
}


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Row indices of one held-out split, each sorted; unpacks as ``train, test = split``."""

    train: np.ndarray
    test: np.ndarray

    def __post_init__(self):
        if len(np.intersect1d(self.train, self.test)):
            raise ValueError("train and test rows overlap")

    def __iter__(self):
        return iter((self.train, self.test))


def train_test_indices(y: ArrayLike | int, test_fraction: float = 0.2, seed: int = 0,
                       groups: Sequence | None = None) -> Split:
    """The held-out split of the compendium: a :class:`Split` of sorted row indices.

    - ``groups`` (one hashable key per row): whole groups are held out (a random ``test_fraction``
      of the distinct keys), so rows that share a key (the true and the false statement about
      one city, two rows with the same filler text) never straddle the split.
    - else, labels ``y``: stratified, ``test_fraction`` of each class held out.
    - else, ``y`` a number of rows: a uniformly random ``test_fraction`` of them.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = int(y) if isinstance(y, (int, np.integer)) else len(as_labels(y))
    if groups is not None:
        keys = pd.Series(list(groups)).astype(str).to_numpy()
        if len(keys) != n:
            raise ValueError(f"groups has {len(keys)} keys for {n} rows")
        unique = np.unique(keys)
        held = set(rng.permutation(unique)[: int(round(test_fraction * len(unique)))].tolist())
        in_test = np.array([k in held for k in keys])
        return Split(np.flatnonzero(~in_test), np.flatnonzero(in_test))
    if isinstance(y, (int, np.integer)):
        order = rng.permutation(n)
        k = int(round(test_fraction * n))
        return Split(np.sort(order[k:]), np.sort(order[:k]))
    y = as_labels(y)
    check_two_classes(y, "the dataset to split")  # a stratified split holds out both classes
    train, test = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(test)))


def generalization_matrix(make_probe: Callable[[], LinearProbe], train_sets: Mapping[str, tuple | None],
                          test_sets: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> pd.DataFrame:
    """Accuracy of a probe trained on each training set (rows) and scored on each test set (columns).

    ``train_sets[name]`` holds the arguments of ``probe.fit`` (``(X, y)``, or ``(x_pos, x_neg, y)``
    for CCS), or None for a probe that cannot be trained there (its row is NaN).
    ``test_sets[name]`` is ``(X, y)``.
    """
    rows: dict[str, dict[str, float]] = {}
    for train_name, args in train_sets.items():
        if args is None:
            rows[train_name] = {t: np.nan for t in test_sets}
            continue
        y_train = args[-1] if args[-1] is not None else None
        if y_train is not None:
            check_two_classes(y_train, f"training set {train_name!r}")
        probe = make_probe().fit(*args)
        rows[train_name] = {t: probe.score(X, y) for t, (X, y) in test_sets.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    return frame.reindex(index=list(train_sets), columns=list(test_sets))


def in_distribution(train_name: str, test_name: str) -> bool:
    """Whether ``test_name`` is one of the sets joined by ``+`` in ``train_name``."""
    return test_name in train_name.split("+")


def offdiagonal_mean(matrix: pd.DataFrame, rows=None, columns=None) -> float:
    """Mean accuracy over the (train, test) cells where the test set was not trained on."""
    rows = list(matrix.index if rows is None else rows)
    columns = list(matrix.columns if columns is None else columns)
    values = [matrix.loc[r, c] for r in rows for c in columns if not in_distribution(r, c)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def diagonal_mean(matrix: pd.DataFrame) -> float:
    """Mean held-out accuracy over the cells where a probe is tested on (held-out rows of) its own set."""
    values = [matrix.loc[r, c] for r in matrix.index for c in matrix.columns if r == c]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def pca(X: ArrayLike, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` principal components of ``X`` (n, d): ``(coords (n, k), components (k, d), explained ratio (k,))``.

    Signs are fixed (each component's largest-magnitude loading is positive) so results are stable.
    """
    X = center(X)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    comps = vt[:k]
    flip = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps = comps * flip[:, None]
    ratio = (s[:k] ** 2) / max((s**2).sum(), 1e-300)
    return X @ comps.T, comps, ratio

