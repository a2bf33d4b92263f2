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
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lib.utils import progress

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


# ----------------------------------------------------------------------------------------------
# Batched training
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainedModels:
    """Many trained models in effective form (stacked on a leading model axis M).

    A: ``(M, n, h)``; B: ``(M, h, n)``; mix: ``(M, n, n)``; loss_curves: ``(M, steps // log_every)``
    training loss per feature (batch estimates) at steps ``curve_steps``.  With ``eval_rows``
    given to ``train_models``: ``losses`` ``(M, n)``, each model's loss per feature (``evaluate``),
    and ``naive_losses`` ``(M, n)``, the naive network's in the same setting on the same samples.
    """

    specs: list[ModelSpec]
    A: torch.Tensor
    B: torch.Tensor
    mix: torch.Tensor
    loss_curves: torch.Tensor
    curve_steps: list[int]
    config: TrainConfig
    losses: torch.Tensor | None = None
    naive_losses: torch.Tensor | None = None

    def index(self, **match: object) -> list[int]:
        """Indices of the models whose spec fields equal ``match`` (floats compared with isclose)."""
        out = []
        for i, s in enumerate(self.specs):
            ok = True
            for k, v in match.items():
                sv = getattr(s, k)
                ok &= math.isclose(sv, v, rel_tol=1e-9, abs_tol=1e-12) if isinstance(v, float) else sv == v
            if ok:
                out.append(i)
        return out

    def model(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, mix)`` of model i."""
        return self.A[i], self.B[i], self.mix[i]


def _stored_width(spec: ModelSpec, cfg: TrainConfig) -> int:
    """Rows of W_in actually trained: d_resid, or n when the model is trained in effective form.

    ``parametrization="effective"`` trains ``A = W_E W_in`` and ``B = W_out W_E^T`` directly
    (``(n, h)``, ``(h, n)``), initialised to the full model's initial A and B: the same function
    class and initial function, only AdamW's coordinates differ.  A one-hot clean embedding is
    always trained this way: its other ``d - n`` rows of W_in never touch the output (zero
    gradient, AdamW only decays them), so it *is* the full model, without the dead weight.
    """
    if (spec.parametrization or cfg.parametrization) == "effective" or spec.embedding == "none":
        return cfg.n_features
    if spec.embedding == "clean" and cfg.clean_kind == "onehot":
        return cfg.n_features
    return cfg.d_resid


class _Group(torch.nn.Module):
    """Models sharing p and stored width: trainable W_in ``(M, width, h)``, W_out ``(M, h, width)``."""

    def __init__(self, specs: list[ModelSpec], cfg: TrainConfig, width: int):
        super().__init__()
        n, h = cfg.n_features, cfg.d_mlp
        embeds, mixes, w_in, w_out = [], [], [], []
        for s in specs:
            w_e, mix = model_matrices(s, cfg)
            d_e = w_e.shape[1]  # n for "none", d_resid otherwise
            g = _gen("init", s.seed, s.embedding)  # same init for a seed at every p and sigma
            wi = (torch.rand(d_e, h, generator=g) * 2 - 1) / math.sqrt(d_e)  # nn.Linear(d_e, h) init
            wo = (torch.rand(h, d_e, generator=g) * 2 - 1) / math.sqrt(h)  # nn.Linear(h, d_e) init
            if width == n and d_e != n:  # effective form: A = W_E W_in, B = W_out W_E^T
                wi, wo, w_e = w_e @ wi, wo @ w_e.T, torch.eye(n)
            embeds.append(w_e)
            mixes.append(mix)
            w_in.append(wi)
            w_out.append(wo)
        self.identity = width == n
        self.register_buffer("w_e", torch.stack(embeds))  # (M, n, width)
        self.register_buffer("mix", torch.stack(mixes))  # (M, n, n)
        self.has_mix = torch.tensor([bool(m.abs().max() > 0) for m in mixes])
        self.W_in = torch.nn.Parameter(torch.stack(w_in))
        self.W_out = torch.nn.Parameter(torch.stack(w_out))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = W_E W_in`` ``(M, n, h)`` and ``B = W_out W_E^T`` ``(M, h, n)``."""
        if self.identity:
            return self.W_in, self.W_out
        return self.w_e @ self.W_in, self.W_out @ self.w_e.transpose(1, 2)


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


def _cosine_lr(step: int, steps: int, lr: float) -> float:
    """APD's half-period cosine from lr (step 0) to 0 (last step)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))


class _SpMM(torch.autograd.Function):
    """``S @ D`` for a fixed sparse CSR ``S`` whose transpose ``ST`` is given (no re-sorting)."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, ST: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        ctx.ST = ST
        return S @ D

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.ST @ grad.contiguous()


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a matmul is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


class _Sample:
    """One batch in sparse form, all-zero rows dropped: ``R`` rows, entries row-major.

    ``r``, ``c``, ``v``: row (0..R-1), feature and value of each present entry; ``perm`` orders
    them by feature (for the transposes); ``crow`` / ``ccol``: CSR row / column pointers.
    """

    def __init__(self, batch: int, n: int, p: float, gen: torch.Generator):
        rows, self.c, self.v = sample_sparse(batch, n, p, gen)
        if len(rows):
            _, self.r = torch.unique_consecutive(rows, return_inverse=True)
            self.R = int(self.r[-1]) + 1
        else:
            self.r, self.R = rows, 0
        self.n = n
        self.crow = torch.zeros(self.R + 1, dtype=torch.long)
        self.crow[1:] = torch.cumsum(torch.bincount(self.r, minlength=self.R), 0)
        self.perm = torch.argsort(self.c, stable=True)
        self.ccol = torch.zeros(n + 1, dtype=torch.long)
        self.ccol[1:] = torch.cumsum(torch.bincount(self.c, minlength=n), 0)

    def dense(self) -> torch.Tensor:
        x = torch.zeros(self.R, self.n)
        x[self.r, self.c] = self.v
        return x


class _Batch:
    """The products the loss needs for the K models sharing one sample.

    Sparse CSR products (transposes pre-built for the backward pass) when few entries are
    present, dense matmuls otherwise, whichever is faster at this density on a CPU.
    """

    DENSE_FROM = 0.03  # feature probability from which dense matmuls beat CSR ones

    def __init__(self, sm: _Sample, p: float):
        self.sm, self.R, self.n = sm, max(sm.R, 1), sm.n
        self.sparse = p < self.DENSE_FROM
        if self.sparse:
            R, n = self.R, self.n
            crow = sm.crow if sm.R else torch.zeros(2, dtype=torch.long)
            rt, vt = sm.r[sm.perm], sm.v[sm.perm]
            self.X = _csr(crow, sm.c, sm.v, (R, n))
            self.XR = _csr(crow, sm.c, torch.relu(sm.v), (R, n))
            self.XT = _csr(sm.ccol, rt, vt, (n, R))
            self.XRT = _csr(sm.ccol, rt, torch.relu(vt), (n, R))
        else:
            self.x = sm.dense() if sm.R else torch.zeros(1, self.n)
            self.xr = torch.relu(self.x)

    def x_at(self, D: torch.Tensor) -> torch.Tensor:
        """``x @ D``: ``(R, n) @ (n, k)``."""
        return _SpMM.apply(self.X, self.XT, D) if self.sparse else self.x @ D

    def relu_x_t_at(self, H: torch.Tensor) -> torch.Tensor:
        """``relu(x)^T @ H``: ``(n, R) @ (R, k)``."""
        return _SpMM.apply(self.XRT, self.XR, H) if self.sparse else self.xr.T @ H

    def x_t_at(self, H: torch.Tensor) -> torch.Tensor:
        """``x^T @ H``: ``(n, R) @ (R, k)``."""
        return _SpMM.apply(self.XT, self.X, H) if self.sparse else self.x.T @ H

    def products(self, A: torch.Tensor, mix: torch.Tensor, mixed: list[int]):
        """``G = H^T H`` ``(K, h, h)`` and ``H^T t`` ``(K, h, n)``; ``H = ReLU(x A)``, ``t = ReLU(x) - x mix``.

        A: ``(K, n, h)``; mix: ``(K, n, n)``; mixed: the models whose mix is non-zero.
        """
        K, n, h = A.shape
        R = self.R
        H = torch.relu(self.x_at(A.permute(1, 0, 2).reshape(n, K * h)))  # (R, K h)
        Hk = H.view(R, K, h).transpose(0, 1)  # (K, R, h)
        gram = torch.bmm(Hk.transpose(1, 2), Hk)
        HtT = self.relu_x_t_at(H).view(n, K, h).permute(1, 2, 0)  # (K, h, n): H^T relu(x)
        if mixed:
            km = len(mixed)
            Hm = H.view(R, K, h)[:, mixed].reshape(R, km * h)
            Htx = self.x_t_at(Hm).view(n, km, h).permute(1, 2, 0)  # (km, h, n): H^T x
            corr = torch.zeros(K, h, n)
            corr[mixed] = torch.bmm(Htx, mix[mixed])
            HtT = HtT - corr
        return gram, HtT

    @torch.no_grad()
    def target_sq(self, mix: torch.Tensor) -> torch.Tensor:
        """``sum_r t_ri^2`` per model and feature, ``(K, n)``."""
        sm = self.sm
        rr = torch.zeros(self.n).index_add_(0, sm.c, torch.relu(sm.v).pow(2))
        out = rr.expand(len(mix), self.n).clone()
        if bool(mix.abs().amax(dim=(1, 2)).gt(0).any()):
            x = sm.dense()
            xm = x[None] @ mix
            out = out - 2 * (torch.relu(x)[None] * xm).sum(1) + xm.pow(2).sum(1)
        return out


def _mixed(mix: torch.Tensor) -> list[int]:
    return [k for k in range(len(mix)) if bool(mix[k].abs().max() > 0)]


def _dense_error(sb: _Batch, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor):
    """Dense path: ``(err, t)``, both ``(K, R, n)``: ``err = ReLU(x A) B - t``, ``t = ReLU(x) - x mix``."""
    K, n, h = A.shape
    R = sb.R
    H = torch.relu(sb.x @ A.permute(1, 0, 2).reshape(n, K * h)).view(R, K, h).transpose(0, 1)
    t = sb.xr.expand(K, R, n)
    mixed = _mixed(mix)
    if mixed:
        t = t.clone()
        t[mixed] = t[mixed] - sb.x[None] @ mix[mixed]
    return torch.bmm(H, B) - t, t


def _objective(sb: _Batch, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``sum_r ||ReLU(x_r A) B - t_r||^2 - ||t||^2`` per model, ``(K,)``.

    Dense x: the plain squared error.  Sparse x: the Gram form ``<H^T H, B B^T> - 2 <H^T t, B>``,
    which forms no ``(R, n)`` output activations and whose products with x cost ~p n per row.
    """
    if not sb.sparse:
        err, t = _dense_error(sb, A, B, mix)
        return err.pow(2).sum((1, 2)) - t.pow(2).sum((1, 2))
    gram, HtT = sb.products(A, mix, _mixed(mix))
    return (gram * (B @ B.transpose(1, 2))).sum((1, 2)) - 2 * (HtT * B).sum((1, 2))


@torch.no_grad()
def _per_feature_sse(sb: _Batch, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``sum_r (ReLU(x A) B - t)_ri^2`` per model and feature, ``(K, n)``."""
    if not sb.sparse:
        return _dense_error(sb, A, B, mix)[0].pow(2).sum(1)
    gram, HtT = sb.products(A, mix, _mixed(mix))
    return ((gram @ B) * B).sum(1) - 2 * (HtT * B).sum(1) + sb.target_sq(mix)


def _train_same_p(specs: list[ModelSpec], cfg: TrainConfig, bar) -> tuple[torch.Tensor, ...]:
    """Train models that share p on one data stream (common random numbers across models).

    The loss per model is APD's: the mean over the *full* batch and the features of the squared
    error.  All-zero samples have zero output and label (no biases), so they are dropped before
    the products and only counted in the ``batch * n`` denominator: the same loss and gradient.
    """
    n, h = cfg.n_features, cfg.d_mlp
    p = specs[0].p
    width_of = [_stored_width(s, cfg) for s in specs]
    groups, members = [], []
    for w in sorted(set(width_of)):
        idx = [i for i, wi in enumerate(width_of) if wi == w]
        groups.append(_Group([specs[i] for i in idx], cfg, w))
        members.append(idx)
    opt = torch.optim.AdamW(
        [q for g in groups for q in g.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    gen = _gen("data", float(p))  # one data stream per p, shared by all its models
    n_log = cfg.steps // cfg.log_every
    curves = torch.zeros(len(specs), n_log)
    norm = cfg.batch_size * n
    for step in range(cfg.steps):
        for grp in opt.param_groups:
            grp["lr"] = _cosine_lr(step, cfg.steps, cfg.lr)
        sb = _Batch(_Sample(cfg.batch_size, n, p, gen), p)
        log = (step + 1) % cfg.log_every == 0 and (step + 1) // cfg.log_every <= n_log
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for g, idx in zip(groups, members):
            A, B = g.effective()
            obj = _objective(sb, A, B, g.mix)
            total = total + obj.sum() / norm
            if log:
                curves[idx, (step + 1) // cfg.log_every - 1] = (obj.detach() + sb.target_sq(g.mix).sum(1)) / norm
        total.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    A = torch.zeros(len(specs), n, h)
    B = torch.zeros(len(specs), h, n)
    mix = torch.zeros(len(specs), n, n)
    with torch.no_grad():
        for g, idx in zip(groups, members):
            a, b = g.effective()
            A[idx], B[idx], mix[idx] = a, b, g.mix
    return A, B, mix, curves


def _jobs(specs: list[ModelSpec], cfg: TrainConfig) -> list[list[int]]:
    """Spec indices per job: same p, at most ``job_size`` models, nearly equal chunks in spec order."""
    jobs = []
    for p in sorted({s.p for s in specs}):
        idx = [i for i, s in enumerate(specs) if s.p == p]
        k = math.ceil(len(idx) / cfg.job_size)
        bounds = [round(j * len(idx) / k) for j in range(k + 1)]
        jobs += [idx[bounds[j] : bounds[j + 1]] for j in range(k)]
    return jobs


def _job_cost(specs: list[ModelSpec], cfg: TrainConfig) -> float:
    """Rough relative cost of a job, for scheduling only: active rows per model, plus W_E products."""
    p = specs[0].p
    rows = 1.0 - (1.0 - p) ** cfg.n_features
    return sum(0.2 + rows + (0.3 if _stored_width(s, cfg) > cfg.n_features else 0.0) for s in specs)


def _run_job(specs: list[ModelSpec], cfg: TrainConfig, eval_rows: int | None) -> tuple:
    """Train one job's models (all with the same p) in this process, and evaluate them if asked."""
    with num_threads(cfg.num_threads):
        A, B, mix, curves = _train_same_p(specs, cfg, None)
        if not eval_rows:
            return A, B, mix, curves, None, None
        tm = TrainedModels(specs, A, B, mix, curves, [], cfg)
        return A, B, mix, curves, evaluate(tm, eval_rows), evaluate(naive_models(tm), eval_rows)


def _init_worker() -> None:
    import os

    os.environ["COMPENDIUM_QUIET"] = "1"
    torch.set_num_threads(1)


def train_models(
    specs: Sequence[ModelSpec], cfg: TrainConfig | None = None, eval_rows: int | None = None
) -> TrainedModels:
    """Train every spec (AdamW, cosine lr, MSE on the read-off features), batched on a model axis.

    Models with the same p train together on one data stream (common random numbers: settings
    and seeds see the same batches, seeds differ in embedding and initialisation), in jobs of at
    most ``job_size`` models run by ``workers`` processes.  With ``eval_rows``, each job also
    evaluates its models and the naive network (``evaluate``, same samples for all models at a
    p).  Deterministic given the specs and config; the number of workers changes the speed only.
    """
    cfg = cfg or TrainConfig()
    specs = list(specs)
    if not specs:
        raise ValueError("train_models needs at least one ModelSpec")
    n, h, M = cfg.n_features, cfg.d_mlp, len(specs)
    A, B, mix = torch.zeros(M, n, h), torch.zeros(M, h, n), torch.zeros(M, n, n)
    curves = torch.zeros(M, cfg.steps // cfg.log_every)
    losses = torch.zeros(M, n) if eval_rows else None
    naive = torch.zeros(M, n) if eval_rows else None
    jobs = sorted(_jobs(specs, cfg), key=lambda j: -_job_cost([specs[i] for i in j], cfg))  # longest first
    bar = progress(total=len(jobs), desc="training jobs")

    def store(j, out):
        A[j], B[j], mix[j], curves[j] = out[:4]
        if eval_rows:
            losses[j], naive[j] = out[4], out[5]
        bar.update(1)

    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork (Linux): no re-import of torch per worker, as DataLoader workers do; spawn elsewhere
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            max_workers=min(cfg.workers, len(jobs)), mp_context=mp.get_context(method), initializer=_init_worker
        ) as pool:
            futures = [(j, pool.submit(_run_job, [specs[i] for i in j], cfg, eval_rows)) for j in jobs]
            for j, fut in futures:
                store(j, fut.result())
    else:
        for j in jobs:
            store(j, _run_job([specs[i] for i in j], cfg, eval_rows))
    bar.close()
    steps = [(k + 1) * cfg.log_every for k in range(cfg.steps // cfg.log_every)]
    return TrainedModels(specs, A, B, mix, curves, steps, cfg, losses, naive)


@torch.no_grad()
def evaluate(trained: TrainedModels, active_rows: int = 200_000, key: object = "eval") -> torch.Tensor:
    """Population loss per feature of every model, ``(M, n)`` (each feature's MSE).

    Fresh samples per p, shared by all models with that p (common random numbers), enough of
    them for about ``active_rows`` samples with a feature present (the rest cost nothing and are
    only counted).
    """
    cfg = trained.config
    n = cfg.n_features
    out = torch.zeros(len(trained.specs), n)
    per_chunk = 8192  # rows with a feature present per evaluation chunk
    with num_threads(cfg.num_threads):
        for p in sorted({s.p for s in trained.specs}):
            idx = [i for i, s in enumerate(trained.specs) if s.p == p]
            gen = _gen(key, float(p))
            p_active = 1.0 - (1.0 - p) ** n
            chunk = math.ceil(per_chunk / p_active)
            n_chunks = max(1, math.ceil(active_rows / per_chunk))
            sse = torch.zeros(len(idx), n)
            A, B, mix = trained.A[idx], trained.B[idx], trained.mix[idx]
            for _ in range(n_chunks):
                sse += _per_feature_sse(_Batch(_Sample(chunk, n, p, gen), p), A, B, mix)
            out[idx] = sse / (n_chunks * chunk)
    return out


@torch.no_grad()
def evaluate_weights(
    A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, p: float, n_rows: int = 20_000, seed: int = 0,
    key: object = "eval",
) -> torch.Tensor:
    """Population loss per feature ``(n,)`` of one model given in effective form (e.g. the naive one)."""
    x, pa = sample_active_rows(n_rows, A.shape[0], p, _gen(key, seed, float(p)))
    return per_feature_loss(x, A, B, mix, pa)


# ----------------------------------------------------------------------------------------------
# What the trained MLP does
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def feature_response(A: torch.Tensor, B: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """MLP output on feature i when only feature i is present with value x: ``(n, len(xs))``.

    ``f_i(x) = sum_j ReLU(x A_ij) B_ji``; the target is ``ReLU(x)`` (mix has zero diagonal).
    """
    pre = xs[None, :, None] * A[:, None, :]  # (n, X, h)
    return (torch.relu(pre) * B.T[:, None, :]).sum(-1)


@torch.no_grad()
def feature_fidelity(A: torch.Tensor, B: torch.Tensor, n_grid: int = 201) -> torch.Tensor:
    """Per feature, ``int (f_i - ReLU)^2 / int ReLU^2`` over x in [-1, 1]: 0 exact, 1 dropped. ``(n,)``."""
    xs = torch.linspace(-1, 1, n_grid)
    f = feature_response(A, B, xs)
    r = torch.relu(xs)
    return (f - r).pow(2).mean(-1) / r.pow(2).mean()


def classify_features(fidelity: torch.Tensor, exact: float = 0.05, dropped: float = 0.5) -> list[str]:
    """``"exact"`` (relative error < exact), ``"dropped"`` (>= dropped) or ``"approximate"``."""
    return ["exact" if e < exact else "dropped" if e >= dropped else "approximate" for e in fidelity.tolist()]


@torch.no_grad()
def neuron_feature_counts(A: torch.Tensor, B: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """How many features each neuron serves: ``#{i : A_ij > 0 and A_ij B_ji > threshold}``. ``(h,)``.

    ``A_ij B_ji`` is the slope neuron j adds to feature i's own output for positive x_i (target
    slope 1); a neuron "serves" i when it supplies more than ``threshold`` of it.
    """
    slope = A * B.T  # (n, h)
    return ((A > 0) & (slope > threshold)).sum(0)


@torch.no_grad()
def eigenspace_overlap(A: torch.Tensor, mix: torch.Tensor, k: int | None = None) -> dict[str, float]:
    """Fraction of ``||A||_F^2`` (neuron input directions) in mix's top-k / bottom-k eigenspaces.

    A random A puts ``k/n`` in each.  ``k`` defaults to h.
    """
    n, h = A.shape
    k = k or h
    evals, evecs = torch.linalg.eigh(mix.double())  # ascending
    a = A.double()
    tot = float(a.pow(2).sum())
    top = float((evecs[:, -k:].T @ a).pow(2).sum()) / tot
    bottom = float((evecs[:, :k].T @ a).pow(2).sum()) / tot
    return {"top": top, "bottom": bottom, "chance": k / n}


# ----------------------------------------------------------------------------------------------
# Parameter-component attribution (a component = one neuron: column j of W_in, row j of W_out)
# ----------------------------------------------------------------------------------------------
def masked_sample_loss(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, masks: torch.Tensor
) -> torch.Tensor:
    """Per-sample loss with each component's parameters scaled by its mask.

    Scaling component j's parameters (``A[:, j]`` and ``B[j, :]``) by ``m_j`` gives
    ``out = (ReLU((x A) * m) * m) B``.  x: ``(R, n)``; masks: ``(..., R, h)`` or ``(h,)``;
    returns ``(..., R)``: the mean over features of the squared error per sample.
    """
    pre = (x @ A) * masks
    err = (torch.relu(pre) * masks) @ B - mlp_target(x, mix)
    return err.pow(2).mean(-1)


def component_attributions(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    mix: torch.Tensor | None,
    ig_steps: int = 32,
    chunk: int = 10,
) -> dict[str, torch.Tensor]:
    """Per-sample, per-component estimates of the loss change from ablating the component.

    Returns ``(R, h)`` tensors, each "how much the sample's loss rises when component j is removed":

    * ``"ablation"``: ``L(m = 1 - e_j) - L(1)``: the true loss change (one forward per component).
    * ``"gradient"``: gradient x weight, ``sum_theta theta dL/dtheta`` over the component's
      parameters ``= dL/dm_j`` at m = 1, times the change ``0 - 1``: first-order Taylor.
    * ``"integrated_gradients"``: minus the IG of m_j on the straight path from all components
      ablated (m = 0) to none (m = 1), ``-int_0^1 dL/dm_j(a 1) da`` (midpoint rule, ``ig_steps``);
      completeness: they sum over j to ``L(0) - L(1)``, the change from ablating all.

    Averaging over samples gives the attribution for the mean loss (all three are linear in it).
    """
    R, h = x.shape[0], A.shape[1]
    ones = torch.ones(R, h)
    with torch.no_grad():
        base = masked_sample_loss(x, A, B, mix, ones)  # (R,)
        abl = torch.zeros(R, h)
        eye = torch.eye(h)
        for j0 in range(0, h, chunk):
            js = range(j0, min(h, j0 + chunk))
            m = (1 - eye[list(js)])[:, None, :].expand(len(js), R, h)
            abl[:, j0 : j0 + len(js)] = (masked_sample_loss(x, A, B, mix, m) - base).T
    m = ones.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(masked_sample_loss(x, A, B, mix, m).sum(), m)
    grad_attr = -g
    ig = torch.zeros(R, h)
    for k in range(ig_steps):
        a = (k + 0.5) / ig_steps
        m = (a * ones).requires_grad_(True)
        (g,) = torch.autograd.grad(masked_sample_loss(x, A, B, mix, m).sum(), m)
        ig += g / ig_steps
    return {"ablation": abl, "gradient": grad_attr, "integrated_gradients": -ig}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else float("nan")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.from_numpy(np.argsort(np.argsort(a.flatten().numpy(), kind="stable"), kind="stable").astype(float))
    rb = torch.from_numpy(np.argsort(np.argsort(b.flatten().numpy(), kind="stable"), kind="stable").astype(float))
    return _pearson(ra, rb)


def attribution_table(attr: dict[str, torch.Tensor], truth: str = "ablation") -> dict[str, dict[str, float]]:
    """Correlation of each method with the true loss change (``attr[truth]``).

    ``per_input_pearson``: over all (sample, component) pairs; ``per_input_spearman``: same, rank;
    ``mean_pearson`` / ``mean_spearman``: over the h components of the sample-averaged values.
    """
    t = attr[truth]
    out = {}
    for name, a in attr.items():
        out[name] = {
            "per_input_pearson": _pearson(a, t),
            "per_input_spearman": _spearman(a, t),
            "mean_pearson": _pearson(a.mean(0), t.mean(0)),
            "mean_spearman": _spearman(a.mean(0), t.mean(0)),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Experiment helpers for the notebook
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


def naive_models(trained: TrainedModels) -> TrainedModels:
    """The hand-built naive network (``naive_weights``) in each trained model's setting (its mix)."""
    A, B = naive_weights(trained.config.n_features, trained.config.d_mlp)
    M = len(trained.specs)
    return TrainedModels(
        list(trained.specs), A.expand(M, -1, -1).clone(), B.expand(M, -1, -1).clone(), trained.mix.clone(),
        torch.zeros(M, 0), [], trained.config,
    )


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


def feature_summary(A: torch.Tensor, B: torch.Tensor, threshold: float = 0.1) -> dict[str, object]:
    """Counts of exactly / approximately computed / dropped features and features per neuron."""
    fid = feature_fidelity(A, B)
    kinds = classify_features(fid)
    counts = neuron_feature_counts(A, B, threshold)
    return {
        "exact": kinds.count("exact"),
        "approximate": kinds.count("approximate"),
        "dropped": kinds.count("dropped"),
        "features_per_neuron": counts.tolist(),
        "fidelity": fid,
        "kinds": kinds,
    }


def attribution_experiment(
    A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, p: float, n_rows: int = 2000, ig_steps: int = 32,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, float]]:
    """Component attributions on ``n_rows`` inputs with a feature present, their correlation table,
    and IG's completeness check (mean over inputs of the IG sum and of the ablate-everything change)."""
    with num_threads(1):
        x, _ = sample_active_rows(n_rows, A.shape[0], p, _gen("attribution", seed, float(p)))
        attr = component_attributions(x, A, B, mix, ig_steps=ig_steps)
        h = A.shape[1]
        with torch.no_grad():
            all_off = masked_sample_loss(x, A, B, mix, torch.zeros(h)) - masked_sample_loss(x, A, B, mix, torch.ones(h))
    completeness = {
        "ig_sum": float(attr["integrated_gradients"].sum(1).mean()),
        "ablate_all": float(all_off.mean()),
        "sum_of_single_ablations": float(attr["ablation"].sum(1).mean()),
    }
    return attr, attribution_table(attr), completeness


# ----------------------------------------------------------------------------------------------
# Tables and figures for the notebook
# ----------------------------------------------------------------------------------------------
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


def plot_attributions(attr: dict[str, torch.Tensor]):
    """Per-component attributions (averaged over inputs) against the true ablation loss change."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    truth = attr["ablation"].mean(0)
    methods = ["gradient", "integrated_gradients"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["gradient x weight", "integrated gradients"])
    for c, m in enumerate(methods, start=1):
        fig.add_trace(go.Scatter(x=truth, y=attr[m].mean(0), mode="markers", showlegend=False,
                                 marker=dict(color="#1f77b4")), row=1, col=c)
        lo, hi = float(min(truth.min(), attr[m].mean(0).min())), float(max(truth.max(), attr[m].mean(0).max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", showlegend=False,
                                 line=dict(color="grey", dash="dash")), row=1, col=c)
    fig.update_xaxes(title_text="true loss change when the neuron is ablated")
    fig.update_yaxes(title_text="attributed loss change", col=1)
    fig.update_layout(title="Attribution of each neuron (rank-one component) vs ablating it, mean over inputs")
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
