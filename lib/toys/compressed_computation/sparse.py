"""The batched products the fast training engine runs on: one sparse sample shared by K models.

At small p almost every entry of a batch is zero, so the products the loss needs are computed
from the present entries only: CSR matrices (with their transposes pre-built for the backward
pass) below ``_Batch.DENSE_FROM``, dense matmuls above.  ``_objective`` is the squared error of
:mod:`.train`'s reference loop up to a constant (``- ||t||^2``), in a Gram form that forms no
``(R, n)`` output; the tests hold it to the dense squared error.
"""
from __future__ import annotations

import warnings

import torch

from lib.toys.compressed_computation.model import sample_sparse


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
