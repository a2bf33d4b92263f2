"""Probes on synthetic data with known answers: directions, LDA vs DIM, CCS, generalization helpers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lib.probes import (
    PROBES,
    CCSProbe,
    DiffMeanProbe,
    LDAProbe,
    LogisticProbe,
    center,
    diagonal_mean,
    generalization_matrix,
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
    ref = LogisticRegression(C=0.5, fit_intercept=False, max_iter=2000).fit(X.astype(np.float32), y)
    assert cos(p.direction, ref.coef_[0]) > 0.999
    assert p.score(X, y) > 0.9 and p.predict(X).dtype == np.int64


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
    with pytest.raises(ValueError, match="both classes"):
        DiffMeanProbe().fit(np.zeros((4, 2)), np.ones(4))
    with pytest.raises(ValueError, match="0/1"):
        LDAProbe().fit(np.zeros((4, 2)), np.array([0, 1, 2, 1]))
    with pytest.raises(RuntimeError, match="not fitted"):
        DiffMeanProbe().predict(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="matching"):
        CCSProbe().fit(np.zeros((4, 2)), np.zeros((3, 2)))


def test_train_test_indices_are_stratified_and_disjoint():
    y = np.array([0] * 50 + [1] * 30)
    tr, te = train_test_indices(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 80
    assert (y[te] == 0).sum() == 10 and (y[te] == 1).sum() == 6
    assert np.array_equal(te, train_test_indices(y, 0.2, seed=0)[1])
    groups = np.repeat(np.arange(40), 2)  # 40 facts, two rows each
    tr, te = train_test_indices(y, 0.25, seed=1, groups=groups)
    assert len(te) == 20 and not set(groups[tr]) & set(groups[te])


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
