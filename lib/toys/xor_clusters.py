"""Synthetic activations for two boolean features ``a, b``: when is ``a XOR b`` linearly readable?

The model of the seed's discussion (Marks 2024 and its comments): the four cells ``(a, b)`` are
class-conditional distributions around means that add up,

    x | (a, b)  ~  D(a * mu_a + b * mu_b + c * (a XOR b) * mu_x, sigma)

With ``c = 0`` the cell means are additive, ``mu_00 + mu_11 = mu_01 + mu_10``, so along every
direction the two XOR classes have the same mean and, if each cell is concentrated around its
mean (unimodal, mode = mean, spread small next to the mean differences), no line separates them:
the best linear probe of ``a XOR b`` gets 3 of the 4 cells right, 75%.  ``c > 0`` adds an XOR
direction ``mu_x`` and the probe reads XOR perfectly.  Large ``sigma`` blurs all of it.

:func:`uniform_square` is the comments' counterexample to the four-point picture: ``x`` uniform
on ``[0, 1]^2`` with ``a = x_1 > 1/2`` and ``b = x_2 > 1/2``.  Each cell is a flat square (no
single mode, and the mode is not the mean), ``a`` and ``b`` are read perfectly, but ``a AND b``
is no longer linearly readable, which the four-point argument says it must be: the line through
the midpoint of the cell means (``x_1 + x_2 = 3/2``) gets 7/8, the best line (``x_1 + x_2 = 4/3``)
11/12.
Also from the comments: the variance of ``U([0,1]^2)`` is 1/12 along every direction, the
diagonal included.

Directions are orthonormal in ``R^d`` (the first two or three basis vectors), so ``sigma`` is
measured in units of the mean difference of ``a`` (and of ``b``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.probes import LogisticProbe, best_threshold, train_test_indices

FEATURES = ("a", "b", "a^b", "a&b")


@dataclass
class Clusters:
    X: np.ndarray  # (n, d)
    a: np.ndarray  # (n,) 0/1
    b: np.ndarray

    def feature(self, name: str) -> np.ndarray:
        return {"a": self.a, "b": self.b, "a^b": self.a ^ self.b, "a&b": self.a & self.b}[name]


def _cells(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows, the four cells equally often (n // 4 each, the rest spread), shuffled."""
    cell = rng.permutation(np.arange(n) % 4)
    return (cell >> 1) & 1, cell & 1


def gaussian_clusters(n: int = 4000, *, sigma: float = 0.2, xor_strength: float = 0.0, d: int = 3,
                      seed: int = 0) -> Clusters:
    """Isotropic Gaussian cells: ``x = a e_1 + b e_2 + xor_strength (a^b) e_3 + sigma * N(0, I_d)``."""
    if d < 3:
        raise ValueError("d must be at least 3 (a, b and the XOR direction)")
    rng = np.random.default_rng(seed)
    a, b = _cells(n, rng)
    X = sigma * rng.standard_normal((n, d))
    X[:, 0] += a
    X[:, 1] += b
    X[:, 2] += xor_strength * (a ^ b)
    return Clusters(X, a.astype(np.int64), b.astype(np.int64))


def uniform_square(n: int = 4000, *, xor_strength: float = 0.0, d: int = 3, seed: int = 0) -> Clusters:
    """``x_1, x_2 ~ U(0, 1)``, ``a = x_1 > 1/2``, ``b = x_2 > 1/2``; other coordinates 0 except
    ``xor_strength * (a^b)`` on ``e_3``.  The cells are balanced by drawing each within its quadrant."""
    rng = np.random.default_rng(seed)
    a, b = _cells(n, rng)
    X = np.zeros((n, d))
    X[:, 0] = 0.5 * a + 0.5 * rng.random(n)
    X[:, 1] = 0.5 * b + 0.5 * rng.random(n)
    X[:, 2] = xor_strength * (a ^ b)
    return Clusters(X, a.astype(np.int64), b.astype(np.int64))


def _fit(data: Clusters, feature: str, test_fraction: float, seed: int):
    """The probe of this module (logistic regression with a bias, weak regularisation ``C = 100``)
    fitted on a uniformly random ``1 - test_fraction`` of the rows: ``(probe, y, split)``."""
    y = data.feature(feature)
    split = train_test_indices(len(y), test_fraction, seed=seed)
    return LogisticProbe(C=100.0, fit_bias=True).fit(data.X[split.train], y[split.train]), y, split


def linear_accuracy(data: Clusters, feature: str, test_fraction: float = 0.25, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (with bias, weak regularisation) for ``feature``."""
    probe, y, split = _fit(data, feature, test_fraction, seed)
    return probe.score(data.X[split.test], y[split.test])


def best_threshold_accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """The best accuracy any threshold on the 1-D ``scores`` achieves (either orientation): the
    ceiling of a linear probe along that one direction."""
    return max(best_threshold(scores, y)[1], best_threshold(-np.asarray(scores), y)[1])


def best_linear_accuracy(data: Clusters, feature: str, n_angles: int = 720) -> float:
    """The best accuracy of a threshold on any direction in the ``(e_1, e_2)`` plane, or on ``e_3``
    alone (where the XOR direction lives): the ceiling a linear probe can reach in these
    scenarios (a scan, so a lower bound on the exact optimum over all of ``R^d``)."""
    y = data.feature(feature)
    best = best_threshold_accuracy(data.X[:, 2], y) if data.X.shape[1] > 2 else 0.0
    for theta in np.linspace(0.0, np.pi, n_angles, endpoint=False):
        best = max(best, best_threshold_accuracy(np.cos(theta) * data.X[:, 0] + np.sin(theta) * data.X[:, 1], y))
    return best


def probe_report(data: Clusters, feature: str, test_fraction: float = 0.25, seed: int = 0) -> dict[str, float]:
    """What the logistic probe of :func:`linear_accuracy` did: its accuracy on its own training rows
    and on the held-out rows, and the norm of its weight vector (near 0: no direction found, the
    boundary is a line through the data placed by sampling noise)."""
    probe, y, split = _fit(data, feature, test_fraction, seed)
    return {"train_accuracy": probe.score(data.X[split.train], y[split.train]),
            "test_accuracy": probe.score(data.X[split.test], y[split.test]),
            "weight_norm": float(np.linalg.norm(probe.direction))}
