"""Compressed computation: the residual MLP of APD (Braun et al. 2025), many copies trained at once.

One model, in the anchor's terms::

    x      in R^n, n = 100 features, each present with probability p, then uniform in [-1, 1]
    r      = x W_E                          W_E: (n, d) fixed, rows unit norm ("random")
    r'     = r + ReLU(r W_in) W_out         W_in: (d, h), W_out: (h, d); h = 50 neurons, no biases
    out    = r' W_E^T                       unembedding W_U = W_E^T
    label  y = x + ReLU(x)                  loss = mean over samples and features of (out - y)^2

Because W_E is fixed, the function depends on the trained weights only through the *effective*
matrices ``A = W_E W_in`` (n, h) and ``B = W_out W_E^T`` (h, n)::

    out = x G + ReLU(x A) B,    G = W_E W_E^T = I + mix,    mix = G - I (zero diagonal)
    out - y = ReLU(x A) B - [ReLU(x) - x mix]

What the target is compared against (a choice, documented here and in the notebook): like APD we
compare the read-off output with the label ``y = x + ReLU(x)``.  The residual path therefore
delivers ``x G``, not ``x``, and the MLP's effective target is ``ReLU(x) - x mix``: it must compute
the ReLUs *and* cancel (or exploit) the interference ``mix``.  The later analysis's point is that
this mixing term in the labels is what lets the trained model beat the naive baseline.

Embedding kinds (``ModelSpec.embedding``):

* ``"random"``: Gaussian rows normalised to unit norm (the paper); ``mix`` has off-diagonal RMS
  ``~ 1/sqrt(d)``.
* ``"clean"``: ``W_E W_E^T = I`` exactly: a random ``(n, d)`` matrix with orthonormal rows
  (``TrainConfig.clean_kind="orthonormal"``, default: dense in R^d like the random one) or one-hot
  rows (``"onehot"``).  Plus an optional explicit mixing term ``sigma * M0`` added to the readout
  (``ModelSpec.sigma``): ``M0`` symmetric, zero diagonal, off-diagonal RMS 1.  ``sigma = 0`` is the
  clean case; ``sigma = matched_sigma(d) = 1/sqrt(d)`` with ``ModelSpec.mixing="embedding"`` (M0 =
  the normalised ``mix`` of the same seed's random embedding) reproduces the random embedding's
  interference.
* ``"none"``: ``W_E = I_n`` (d = n): the MLP reads x directly and must output ``ReLU(x)``.

Clean and none have the same function class (any ``A``, ``B``): they differ only in how AdamW
sees the parameters, and that matters.  AdamW moves each coordinate of ``W_in`` by about lr, so a
dense ``W_E`` in R^d moves ``A = W_E W_in`` by ~``sqrt(2 d / pi)`` lr per entry (25x for d = 1000)
where one-hot / none moves it by lr.  ``TrainConfig.parametrization="full"`` (default) trains
``W_in``, ``W_out`` as APD does; ``"effective"`` trains ``A``, ``B`` directly (cheaper, same
function class and initial function, slower optimisation).

Loss per feature: the mean over features of each feature's MSE, i.e. the mean over samples *and*
features of ``(out - y)^2`` (APD's ``loss.mean()``).  It scales with p, so ``loss / p`` compares
different p.  The naive baseline (h features computed exactly, the rest left to the residual)
scores ``p/6 * (n - h)/n`` (``= p/12`` for n = 100, h = 50) in the clean problem.

This module holds the problem itself: configuration, data, embeddings and mixing, the model in
effective form, the naive baseline, and the specs of the notebook's sweeps.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

EMBEDDINGS = ("random", "clean", "none")
E_RELU_SQ = 1.0 / 6.0  # E[ReLU(u)^2] for u ~ U[-1, 1]
E_X_SQ = 1.0 / 3.0  # E[u^2] for u ~ U[-1, 1]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Sizes and optimiser shared by every model trained together (APD's residual-MLP set-up)."""

    n_features: int = 100
    d_resid: int = 1000
    d_mlp: int = 50
    batch_size: int = 2048
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.01  # AdamW, as APD
    clean_kind: str = "orthonormal"  # "orthonormal" (random orthonormal rows: dense, like random) | "onehot"
    parametrization: str = "full"  # "full": train W_in, W_out (APD); "effective": A = W_E W_in, B = W_out W_E^T
    log_every: int = 50  # record the training loss every this many steps
    num_threads: int | None = 1  # torch threads per training process (1: fastest on a busy CPU)
    workers: int = 2  # processes training jobs in parallel (1: in this process); results do not depend on it
    job_size: int = 6  # models per job: jobs share p; how models are split, so it fixes the results

    def __post_init__(self) -> None:
        if self.clean_kind not in ("orthonormal", "onehot"):
            raise ValueError(f"clean_kind must be 'orthonormal' or 'onehot', got {self.clean_kind!r}")
        if self.parametrization not in ("effective", "full"):
            raise ValueError(f"parametrization must be 'effective' or 'full', got {self.parametrization!r}")
        if self.d_resid < self.n_features:
            raise ValueError(
                f"d_resid={self.d_resid} < n_features={self.n_features}: a clean embedding needs "
                "d_resid >= n_features (and the random one would be rank-deficient). Raise d_resid."
            )


@dataclass(frozen=True)
class ModelSpec:
    """One model: feature probability, embedding kind, explicit mixing scale and kind, seed."""

    p: float
    embedding: str = "random"
    sigma: float = 0.0
    seed: int = 0
    mixing: str = "embedding"  # the M0 behind sigma: "embedding" | "gaussian" (see make_mixing)
    parametrization: str | None = None  # "full" | "effective"; None: TrainConfig.parametrization

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {self.p}")
        if self.sigma != 0.0 and self.embedding == "random":
            raise ValueError("sigma adds explicit mixing to a clean (or no) embedding; use embedding='clean'")
        if self.mixing not in ("embedding", "gaussian"):
            raise ValueError(f"mixing must be 'embedding' or 'gaussian', got {self.mixing!r}")
        if self.parametrization not in (None, "full", "effective"):
            raise ValueError(f"parametrization must be None, 'full' or 'effective', got {self.parametrization!r}")


def matched_sigma(d_resid: int) -> float:
    """Off-diagonal RMS of ``W_E W_E^T`` for unit-norm random rows in R^d: ``1/sqrt(d)``."""
    return 1.0 / math.sqrt(d_resid)


@contextmanager
def num_threads(n: int | None):
    """Run a block with ``n`` torch threads (``None``: leave as is), restoring the count after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _gen(*key: object) -> torch.Generator:
    """A CPU generator seeded deterministically from ``key`` (ints, floats, strings)."""
    s = repr(key).encode()
    h = 0
    for b in s:  # FNV-1a: stable across processes (unlike hash())
        h = ((h ^ b) * 0x100000001B3) % (1 << 63)
    return torch.Generator().manual_seed(h)


# ----------------------------------------------------------------------------------------------
# Data, embeddings, mixing
# ----------------------------------------------------------------------------------------------
def sample_features(
    batch: int, n_features: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(batch, n_features)``: each entry present with probability p, then uniform in [-1, 1]."""
    mask = torch.rand(batch, n_features, generator=generator) < p
    vals = torch.rand(batch, n_features, generator=generator) * 2 - 1
    return vals * mask


def sample_active_rows(
    n_rows: int, n_features: int, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """``n_rows`` samples conditioned on at least one feature present, and P(at least one).

    All-zero samples cost nothing (no biases: output 0, label 0), so
    ``E[loss] = P(active) * E[loss | active]`` exactly; evaluating on active rows only is much
    cheaper at small p.  Returns ``(x: (n_rows, n_features), P(active))``.
    """
    p_active = 1.0 - (1.0 - p) ** n_features
    chunk = max(1024, int(1.2 * n_rows / p_active))
    out: list[torch.Tensor] = []
    got = 0
    while got < n_rows:
        x = sample_features(chunk, n_features, p, generator)
        x = x[(x != 0).any(dim=1)]
        out.append(x)
        got += len(x)
    return torch.cat(out)[:n_rows], p_active


def make_embedding(
    kind: str, n_features: int, d_resid: int, generator: torch.Generator, clean_kind: str = "orthonormal"
) -> torch.Tensor:
    """The fixed embedding W_E: ``(n_features, d_resid)`` (``(n, n)`` identity for ``"none"``)."""
    if kind == "random":
        w = torch.randn(n_features, d_resid, generator=generator)
        return w / w.norm(dim=1, keepdim=True)
    if kind == "clean":
        if clean_kind == "onehot":
            return torch.eye(n_features, d_resid)
        q, _ = torch.linalg.qr(torch.randn(d_resid, n_features, generator=generator, dtype=torch.float64))
        return q.T.contiguous().float()
    if kind == "none":
        return torch.eye(n_features)
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")


def make_mixing(n_features: int, d_resid: int, generator: torch.Generator, kind: str = "embedding") -> torch.Tensor:
    """M0: ``(n, n)`` symmetric, zero diagonal, off-diagonal RMS exactly 1.

    ``"embedding"``: the off-diagonal of a random unit-row embedding's Gram matrix (drawn from
    ``generator`` exactly as ``make_embedding("random", ...)`` draws it), so ``sigma * M0`` with
    ``sigma`` = that matrix's RMS is the random embedding's interference.  ``"gaussian"``: a
    symmetric Gaussian matrix.
    """
    if kind == "embedding":
        w = make_embedding("random", n_features, d_resid, generator)
        m = w @ w.T
    elif kind == "gaussian":
        g = torch.randn(n_features, n_features, generator=generator)
        m = (g + g.T) / math.sqrt(2)
    else:
        raise ValueError(f"mixing kind must be 'embedding' or 'gaussian', got {kind!r}")
    m = m - torch.diag(torch.diag(m))
    off = ~torch.eye(n_features, dtype=torch.bool)
    return m / m[off].pow(2).mean().sqrt()


def model_matrices(spec: ModelSpec, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_E, mix)`` for one model: the embedding ``(n, d)`` and readout mixing ``(n, n)``.

    ``mix = W_E W_E^T - I + sigma * M0``: what the residual path adds to ``x`` at the readout.
    Models with the same seed share their random embedding / M0 at every p.
    """
    n, d = cfg.n_features, cfg.d_resid
    w_e = make_embedding(spec.embedding, n, d, _gen("embed", spec.embedding, spec.seed), cfg.clean_kind)
    mix = w_e @ w_e.T - torch.eye(n)
    if spec.embedding != "random":
        mix = torch.zeros(n, n)  # exactly clean, not QR's 1e-7
    if spec.sigma != 0.0:
        # same generator key as the random embedding of this seed: M0 is its normalised interference
        mix = mix + spec.sigma * make_mixing(n, d, _gen("embed", "random", spec.seed), spec.mixing)
    return w_e, mix


# ----------------------------------------------------------------------------------------------
# The model in effective form
# ----------------------------------------------------------------------------------------------
def mlp_out(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """What the MLP adds to the read-off features: ``ReLU(x A) B``.

    x: ``(..., R, n)``; A: ``(..., n, h)``; B: ``(..., h, n)`` -> ``(..., R, n)``.
    """
    return torch.relu(x @ A) @ B


def mlp_target(x: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """The MLP's effective target ``ReLU(x) - x mix`` (label ``x + ReLU(x)`` minus the residual ``x G``)."""
    t = torch.relu(x)
    return t if mix is None else t - x @ mix


def per_feature_loss(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, p_active: float = 1.0
) -> torch.Tensor:
    """Per-feature MSE ``(..., n)`` of ``out - y`` over the rows of x, times ``p_active``.

    With rows from ``sample_active_rows`` and its ``p_active`` this is the population loss.
    """
    err = mlp_out(x, A, B) - mlp_target(x, mix)
    return err.pow(2).mean(dim=-2) * p_active


def naive_weights(n_features: int, d_mlp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive solution in effective form: neuron j reads and writes feature j (j < h).

    Returns ``A: (n, h)``, ``B: (h, n)`` with ``A[j, j] = B[j, j] = 1``.
    """
    A = torch.zeros(n_features, d_mlp)
    B = torch.zeros(d_mlp, n_features)
    k = min(n_features, d_mlp)
    A[range(k), range(k)] = 1.0
    B[range(k), range(k)] = 1.0
    return A, B


def naive_loss_analytic(p: float, n_features: int = 100, d_mlp: int = 50, mix: torch.Tensor | None = None) -> float:
    """Expected loss per feature of ``naive_weights``: ``p/6 * (n-h)/n + p/3 * ||mix||_F^2 / n``.

    The first term: each uncomputed feature costs ``E[ReLU(x)^2] = p/6``.  The second (0 when
    clean): the uncorrected interference ``x mix``, independent of ``x_i`` and mean zero, costs
    ``p E[x^2] sum_j mix_ji^2`` on feature i.  ``= p/12`` for n = 100, h = 50, clean.
    """
    uncomputed = max(n_features - d_mlp, 0) / n_features
    loss = p * E_RELU_SQ * uncomputed
    if mix is not None:
        loss += p * E_X_SQ * float(mix.pow(2).sum()) / n_features
    return loss


def sample_sparse(
    batch: int, n_features: int, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of a ``(batch, n_features)`` sample, same law as ``sample_features``.

    Draws the (geometric) gaps between present entries of the flattened array, so the cost is
    proportional to the number present, not to ``batch * n``.  Returns ``(rows, cols, vals)``,
    each ``(nnz,)``, in row-major order.
    """
    total = batch * n_features
    if p >= 1.0:
        pos = torch.arange(total)
    else:
        log_q = math.log1p(-p)
        mean = total * p
        chunks, last = [], -1
        while last < total - 1:
            k = int(mean + 8 * math.sqrt(mean) + 16)
            u = 1.0 - torch.rand(k, generator=generator, dtype=torch.float64)  # (0, 1]
            gaps = torch.floor(torch.log(u) / log_q).long() + 1
            c = last + torch.cumsum(gaps, 0)
            chunks.append(c)
            last = int(c[-1])
        pos = torch.cat(chunks)
        pos = pos[pos < total]
    vals = torch.rand(len(pos), generator=generator) * 2 - 1
    return pos // n_features, pos % n_features, vals



# ----------------------------------------------------------------------------------------------
# The models of the notebook's sweeps
# ----------------------------------------------------------------------------------------------
def sweep_specs(
    ps: Sequence[float], seeds: int | dict[str, int], embeddings: Sequence[str] = EMBEDDINGS
) -> list[ModelSpec]:
    """Every (p, embedding, seed) of the feature-probability sweep; ``seeds`` per embedding or for all."""
    per = seeds if isinstance(seeds, dict) else {e: seeds for e in embeddings}
    return [ModelSpec(float(p), e, 0.0, s) for p in ps for e in per for s in range(per[e])]


def sigma_specs(
    p: float, scales: Sequence[float], seeds: int, d_resid: int, mixing: str = "embedding"
) -> list[ModelSpec]:
    """Clean embedding plus ``sigma * M0`` with ``sigma = scale * matched_sigma(d_resid)``."""
    sm = matched_sigma(d_resid)
    return [ModelSpec(float(p), "clean", float(k) * sm, s, mixing) for k in scales for s in range(seeds)]
