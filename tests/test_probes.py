"""Probes on synthetic data with known answers: directions, LDA vs DIM, the logistic solvers, CCS,
the splitter, generalization helpers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import lib.probes as probes
from lib.probes import (
    PROBES,
    CCSProbe,
    DiffMeanProbe,
    LDAProbe,
    LogisticProbe,
    Split,
    center,
    diagonal_mean,
    generalization_matrix,
    logistic_newton,
    offdiagonal_mean,
    pca,
    train_test_indices,
)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def gaussian_classes(n=400, d=6, seed=0, shift=1.0, cov=None):
    """Two classes at +-shift/2 along e_0; noise with covariance ``cov`` (identity by default)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    cov = np.eye(d) if cov is None else cov
    X = rng.multivariate_normal(np.zeros(d), cov, size=n)
    X[:, 0] += (y - 0.5) * shift
    return X, y


def test_diff_mean_direction_and_bias():
    X, y = gaussian_classes()
    p = DiffMeanProbe().fit(X, y)
    assert np.allclose(p.direction, X[y == 1].mean(0) - X[y == 0].mean(0))
    assert p.bias == 0.0
    pb = DiffMeanProbe(fit_bias=True).fit(X + 5.0, y)  # off-centre data: the bias puts the threshold at the midpoint
    assert pb.score(X + 5.0, y) == pytest.approx(DiffMeanProbe().fit(center(X), y).score(center(X), y), abs=0.02)
    assert np.allclose(p.unit_direction() @ p.unit_direction(), 1.0)


def test_lda_matches_sklearn_and_reduces_to_dim_at_full_shrinkage():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    d = 5
    A = np.random.default_rng(1).normal(size=(d, d))
    X, y = gaussian_classes(n=600, d=d, cov=A @ A.T + 0.1 * np.eye(d))
    ours = LDAProbe(shrinkage=0.0).fit(X, y).direction
    ref = LinearDiscriminantAnalysis(solver="lsqr").fit(X, y).coef_[0]
    assert cos(ours, ref) > 0.9999
    full = LDAProbe(shrinkage=1.0).fit(X, y).direction
    assert cos(full, DiffMeanProbe().fit(X, y).direction) > 0.9999


def test_lda_beats_dim_when_noise_is_correlated():
    # a large-variance nuisance direction tilted towards the class axis fools DIM, not LDA
    d = 4
    cov = np.eye(d)
    cov[:2, :2] = [[4.0, 3.9], [3.9, 4.0]]
    X, y = gaussian_classes(n=2000, d=d, shift=2.0, cov=cov, seed=2)
    Xt, yt = gaussian_classes(n=2000, d=d, shift=2.0, cov=cov, seed=3)
    dim = DiffMeanProbe().fit(center(X), y).score(center(Xt), yt)
    lda = LDAProbe(shrinkage=0.01).fit(center(X), y).score(center(Xt), yt)
    # Bayes accuracy Phi(2.25) = 0.99 (LDA); along e_0 alone Phi(0.5) = 0.69 (DIM)
    assert lda > 0.95 and dim < 0.75


def test_logistic_matches_sklearn_and_accepts_torch():
    from sklearn.linear_model import LogisticRegression

    X, y = gaussian_classes(shift=3.0)
    p = LogisticProbe(C=0.5).fit(torch.tensor(X, dtype=torch.float32), torch.tensor(y))
    ref = LogisticRegression(C=0.5, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(X.astype(np.float32), y)
    np.testing.assert_allclose(p.direction, ref.coef_[0], atol=1e-5, rtol=1e-5)
    assert p.bias == 0.0 and p.n_iter_ < 40  # Newton by default at this width
    assert p.score(X, y) > 0.9 and p.predict(X).dtype == np.int64


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("fit_bias", [False, True])
def test_newton_solves_scikit_learns_problem(separable, fit_bias):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    n, d = 600, 12
    Z = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5  # correlated, off-centre columns
    y = (Z @ rng.standard_normal(d) + (0 if separable else 2.0 * rng.standard_normal(n)) > 0.3).astype(float)
    w, b, n_iter = logistic_newton(Z, y, C=0.5, fit_bias=fit_bias)
    ref = LogisticRegression(C=0.5, fit_intercept=fit_bias, tol=1e-10, max_iter=100_000).fit(Z, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-4, rtol=1e-4)
    assert b == pytest.approx(ref.intercept_[0] if fit_bias else 0.0, abs=1e-4)
    assert n_iter < 40


def test_solvers_agree_and_auto_switches_by_width(monkeypatch):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((800, 10)) @ rng.standard_normal((10, 10)) + 3.0
    y = (X[:, 0] + rng.standard_normal(800) > 3).astype(int)
    fit = dict(C=1.0, fit_bias=True, standardize=True)
    newton = LogisticProbe(solver="newton", **fit).fit(X[:600], y[:600])
    lbfgs = LogisticProbe(solver="lbfgs", **fit).fit(X[:600], y[:600])
    np.testing.assert_allclose(newton.direction, lbfgs.direction, atol=1e-3)
    assert (newton.predict(X[600:]) == lbfgs.predict(X[600:])).all()
    monkeypatch.setattr(probes, "NEWTON_MAX_DIM", 5)  # narrower than X: auto takes lbfgs
    np.testing.assert_array_equal(LogisticProbe(**fit).fit(X[:600], y[:600]).direction, lbfgs.direction)
    with pytest.raises(ValueError, match="solver"):
        LogisticProbe(solver="sgd").fit(X, y)


def test_standardised_probe_scores_in_the_original_coordinates():
    """``direction``/``bias`` map the standardised fit back to X: X @ direction + bias is the score."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 6)) * np.array([1.0, 10.0, 0.1, 1.0, 5.0, 1.0]) + 7.0
    y = ((X[:, 1] - 7) / 10 + (X[:, 2] - 7) * 10 + rng.standard_normal(500) > 0).astype(int)
    p = LogisticProbe(fit_bias=True, standardize=True).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    w, b, _ = logistic_newton(Z, y.astype(float), C=1.0)
    np.testing.assert_array_equal(p.decision_function(X), Z @ w + b)  # the fit's own arithmetic
    np.testing.assert_allclose(X @ p.direction + p.bias, Z @ w + b, atol=1e-9)


def contrast_pairs(n=300, d=8, seed=0):
    """Pairs whose only consistent direction is v: x_pos = noise + t v, x_neg = noise' - t v."""
    rng = np.random.default_rng(seed)
    v = np.zeros(d)
    v[3] = 1.0
    t = rng.choice([-1.0, 1.0], size=n)
    common = rng.normal(size=(n, d)) * 0.5
    common[:, 3] = 0  # the shared content (which city) carries no truth
    x_pos = common + 2.0 * t[:, None] * v + rng.normal(size=(n, d)) * 0.1
    x_neg = common - 2.0 * t[:, None] * v + rng.normal(size=(n, d)) * 0.1
    return x_pos, x_neg, (t > 0).astype(int), v


def test_ccs_finds_the_consistent_direction_and_is_oriented_by_labels():
    x_pos, x_neg, y, v = contrast_pairs()
    p = CCSProbe(n_restarts=3, n_steps=300, seed=0).fit(x_pos, x_neg, y)
    assert cos(p.direction, v) > 0.9
    assert p.score(center(x_pos), y) > 0.95
    assert np.mean(p.predict_pairs(center(x_pos), center(x_neg)) == y) > 0.95
    flipped = CCSProbe(n_restarts=3, n_steps=300, seed=0).fit(x_pos, x_neg, 1 - y)
    assert cos(flipped.direction, v) < -0.9
    again = CCSProbe(n_restarts=3, n_steps=300, seed=0).fit(x_pos, x_neg, y)
    assert np.array_equal(again.direction, p.direction)  # seeded: deterministic


def test_fit_errors_are_explained():
    with pytest.raises(ValueError, match="only label 1"):
        DiffMeanProbe().fit(np.zeros((4, 2)), np.ones(4))
    with pytest.raises(ValueError, match="0/1"):
        LDAProbe().fit(np.zeros((4, 2)), np.array([0, 1, 2, 1]))
    with pytest.raises(RuntimeError, match="not fitted"):
        DiffMeanProbe().predict(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="matching"):
        CCSProbe().fit(np.zeros((4, 2)), np.zeros((3, 2)))


def test_one_splitter_stratified_grouped_or_uniform():
    y = np.array([0] * 50 + [1] * 30)
    split = train_test_indices(y, 0.2, seed=0)
    tr, te = split  # a Split unpacks as (train, test)
    assert isinstance(split, Split) and split.train is tr and split.test is te
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 80
    assert (y[te] == 0).sum() == 10 and (y[te] == 1).sum() == 6
    assert np.array_equal(te, train_test_indices(y, 0.2, seed=0).test)
    groups = np.repeat(np.arange(40), 2)  # 40 facts, two rows each
    tr, te = train_test_indices(y, 0.25, seed=1, groups=groups)
    assert len(te) == 20 and not set(groups[tr]) & set(groups[te])
    assert np.array_equal(train_test_indices(80, 0.25, seed=1, groups=groups).test, te)  # labels play no part
    # a row count alone: a uniformly random held-out quarter, sorted
    plain = train_test_indices(80, 0.25, seed=3)
    order = np.random.default_rng(3).permutation(80)
    assert np.array_equal(plain.test, np.sort(order[:20])) and np.array_equal(plain.train, np.sort(order[20:]))
    with pytest.raises(ValueError, match="overlap"):
        Split(np.array([0, 1]), np.array([1, 2]))
    with pytest.raises(ValueError, match="keys"):
        train_test_indices(y, groups=groups[:10])


def test_generalization_matrix_and_summaries():
    a = gaussian_classes(seed=0, shift=4.0)
    flipped = (a[0], 1 - a[1])  # the same data with the opposite labels
    train = {"a": a, "flipped": flipped, "none": None}
    test = {"a": a, "flipped": flipped}
    m = generalization_matrix(DiffMeanProbe, train, test)
    assert list(m.index) == ["a", "flipped", "none"] and list(m.columns) == ["a", "flipped"]
    assert m.loc["a", "a"] > 0.9 and m.loc["a", "flipped"] == pytest.approx(1 - m.loc["a", "a"])
    assert m.loc["none"].isna().all()
    assert diagonal_mean(m) == pytest.approx((m.loc["a", "a"] + m.loc["flipped", "flipped"]) / 2)
    assert offdiagonal_mean(m) == pytest.approx((m.loc["a", "flipped"] + m.loc["flipped", "a"]) / 2)
    joined = pd.DataFrame([[1.0, 0.5, 0.2]], index=["a+b"], columns=["a", "b", "c"])
    assert offdiagonal_mean(joined) == pytest.approx(0.2)
    assert set(PROBES) == {"dim", "lda", "lr", "ccs"}


def test_pca_recovers_the_dominant_axis_with_stable_signs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 5)) * np.array([5.0, 2.0, 0.5, 0.5, 0.5])
    coords, comps, ratio = pca(X, k=2)
    assert abs(comps[0, 0]) > 0.99 and abs(comps[1, 1]) > 0.99
    assert comps[0, 0] > 0 and comps[1, 1] > 0
    assert coords.shape == (500, 2) and ratio[0] > ratio[1] > 0
    assert np.allclose(coords, center(X) @ comps.T)


def test_a_dataset_of_one_class_is_refused_for_probing():
    """A dataset whose labels are all 1 (a filtered CSV, a broken label column) used to split and
    probe into meaningless accuracies: each entry point now says what is wrong."""
    X, y = np.random.default_rng(0).normal(size=(40, 3)), np.ones(40, dtype=int)
    with pytest.raises(ValueError, match=r"only label 1 \(true\) in all 40 rows.*both classes, true \(1\) and false \(0\)"):
        train_test_indices(y, 0.2)
    with pytest.raises(ValueError, match="only label 1"):
        LogisticProbe().fit(X, y)
    good = (X, np.arange(40) % 2)
    with pytest.raises(ValueError, match="training set 'all_true' has only label 1"):
        generalization_matrix(DiffMeanProbe, {"ok": good, "all_true": (X, y)}, {"ok": good})
    with pytest.raises(ValueError, match="empty test set"):
        DiffMeanProbe().fit(*good).score(X[:0], y[:0])
    with pytest.raises(ValueError, match="NaN or infinite.*row 3"):
        bad = X.copy()
        bad[3, 1] = np.nan
        DiffMeanProbe().fit(bad, good[1])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_indices(good[1], 1.5)
