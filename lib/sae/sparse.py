"""Sparse encoding and decoding for SAEs whose latents are chosen by selection (TopK, BatchTopK).

A TopK SAE keeps ``k`` of ``d_sae`` latents per token, yet the usual implementation decodes with
a dense ``[B, d_sae] @ [d_sae, d_in]`` matmul and backpropagates through the dense encoder too:
five dense matmuls of ``2 * B * d_in * d_sae`` FLOPs each per step.  Only the *selection* needs
every pre-activation; everything after it touches ``nnz = B * k`` entries.  Here:

1. ``pre = (x - b_dec) @ W_enc + b_enc`` is computed without a graph and only to choose the
   active entries (TopK per row, or BatchTopK over the batch): one dense matmul;
2. :class:`SampledEncode` returns the chosen pre-activations as a differentiable ``[nnz]`` vector;
   its backward is sparse: ``dW_enc[:, c] += g_n * x_c[r]``, ``db_enc[c] += g_n``,
   ``dx_c[r] += g_n * W_enc[:, c]`` (CSR matmuls over the ``nnz`` entries);
3. :class:`SparseDecode` computes ``x_hat[r] = sum_n v_n * W_dec[c_n]`` (CSR matmul) with the
   backward ``g_v[n] = <g[r_n], W_dec[c_n]>`` (a sampled dense-dense product, SDDMM) and
   ``dW_dec[c] += v_n * g[r]`` (CSR matmul of the transposed pattern).

FLOPs per training step, batch ``B``, ``d = d_in``, ``m = d_sae``, ``nnz = B * k`` (no gradient
for the input): dense path ``10 * B * d * m``; this path ``2 * B * d * m + 8 * nnz * d`` (encoder
forward; decode forward, SDDMM, decoder gradient and encoder gradient at ``2 * nnz * d`` each).
For ``d = 768, m = 12,288, k = 32`` that is 4.9 times fewer.

The dense path of :class:`~lib.sae.base.TopKSAE` (``SAEConfig.sparse_decode = False``) is the
reference: outputs and gradients agree with this one to float rounding (``tests/test_sae_sparse.py``).
Sparse kernels run in float32 whatever the autocast dtype (``torch.sparse`` matmuls have no
bfloat16 kernels on every backend); the dense encoder matmul follows autocast.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

# CSR tensors are "beta" in torch 2.x; the operations used here (CSR @ dense, sampled_addmm) are
# the stable core of it, checked against the dense path in tests/test_sae_sparse.py.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class Pattern:
    """Which entries of a ``[n_rows, n_cols]`` latent matrix are active: ``rows[i], cols[i]``, sorted by row.

    Holds the CSR structure by row (for decoding) and, built once on first use, the transposed
    CSR structure by column (for the weight gradients), shared by the encode and decode backward.
    """

    rows: torch.Tensor  # [nnz] long, non-decreasing
    cols: torch.Tensor  # [nnz] long
    n_rows: int
    n_cols: int
    _crow: torch.Tensor | None = field(default=None, repr=False)
    _by_col: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def crow(self) -> torch.Tensor:
        """CSR row pointers ``[n_rows + 1]``."""
        if self._crow is None:
            counts = torch.bincount(self.rows, minlength=self.n_rows)
            self._crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self._crow

    @property
    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(perm, ccol, rows[perm])``: the entries sorted by column and the column pointers ``[n_cols + 1]``."""
        if self._by_col is None:
            cols_sorted, perm = torch.sort(self.cols, stable=True)
            ccol = torch.searchsorted(cols_sorted, torch.arange(self.n_cols + 1, device=self.cols.device))
            self._by_col = (perm, ccol, self.rows[perm])
        return self._by_col

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The ``[n_rows, n_cols]`` CSR matrix with ``values`` [nnz] at the pattern."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values, (self.n_rows, self.n_cols),
                                       check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """The transposed ``[n_cols, n_rows]`` CSR matrix with ``values`` [nnz] (in pattern order)."""
        perm, ccol, rows_t = self.by_col
        return torch.sparse_csr_tensor(ccol, rows_t, values[perm], (self.n_cols, self.n_rows),
                                       check_invariants=False)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``[n_rows, n_cols]`` dense matrix (for tests and statistics; costs a full matrix)."""
        out = values.new_zeros(self.n_rows, self.n_cols)
        out[self.rows, self.cols] = values
        return out

    def coo(self, values: torch.Tensor) -> torch.Tensor:
        """A ``torch.sparse_coo_tensor`` ``[n_rows, n_cols]`` (coalesced by construction: sorted, unique)."""
        return torch.sparse_coo_tensor(torch.stack([self.rows, self.cols]), values, (self.n_rows, self.n_cols),
                                       is_coalesced=True, check_invariants=False)

    def fired(self) -> torch.Tensor:
        """``[n_cols]`` bool: columns with at least one entry."""
        return torch.bincount(self.cols, minlength=self.n_cols) > 0


def topk_pattern(pre: torch.Tensor, k: int) -> tuple[Pattern, torch.Tensor]:
    """The ``k`` largest entries of each row of ``pre`` [B, m]: ``(pattern, their values [B * k])``."""
    k = min(k, pre.shape[-1])
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)  # columns sorted within a row: a canonical CSR
    vals = vals.gather(-1, order)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return Pattern(rows, idx.reshape(-1), pre.shape[0], pre.shape[1]), vals.reshape(-1)


def batch_topk_pattern(pre: torch.Tensor, k: int) -> tuple[Pattern, torch.Tensor]:
    """BatchTopK (Bussmann et al. 2024): the ``B * k`` largest entries of the whole batch ``pre`` [B, m]."""
    n = min(k * pre.shape[0], pre.numel())
    vals, flat = pre.reshape(-1).topk(n, sorted=False)
    flat, order = flat.sort()  # row-major order: sorted by row, then column
    vals = vals[order]
    m = pre.shape[1]
    return Pattern(flat // m, flat % m, pre.shape[0], m), vals


class SampledEncode(torch.autograd.Function):
    """``pre[r, c] = x_c[r] @ W_enc[:, c] + b_enc[c]`` at a pattern, given its values; sparse backward.

    forward(x_c [B, d], W_enc [d, m], b_enc [m], pattern, values [nnz]) -> values (differentiable).
    The values were read off the dense pre-activations that chose the pattern, so they are not
    recomputed; the backward never forms a ``[B, m]`` matrix.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, pattern, values):
        ctx.save_for_backward(x_c, W_enc)
        ctx.pattern = pattern
        return values.detach().float().clone()

    @staticmethod
    def backward(ctx, g):
        x_c, W_enc = ctx.saved_tensors
        p = ctx.pattern
        g = g.float()
        gx = gW = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # [m, B] @ [B, d + 1]: the weight gradient (transposed) and, from the ones column, the bias gradient
            rhs = torch.cat([x_c.float(), x_c.new_ones(x_c.shape[0], 1, dtype=torch.float32)], 1)
            both = torch.sparse.mm(p.csr_t(g), rhs)
            gW = both[:, :-1].t().to(W_enc.dtype) if ctx.needs_input_grad[1] else None
            gb = both[:, -1].to(W_enc.dtype) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            gx = torch.sparse.mm(p.csr(g), W_enc.float().t()).to(x_c.dtype)
        return gx, gW, gb, None, None


class SparseDecode(torch.autograd.Function):
    """``out[r] = sum_n v_n * W_dec[c_n]`` over a pattern's entries; sparse forward and backward.

    forward(values [nnz], W_dec [m, d], pattern) -> [B, d] (float32).
    """

    @staticmethod
    def forward(ctx, values, W_dec, pattern):
        values = values.float()
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        with torch.autocast(W_dec.device.type, enabled=False):
            return torch.sparse.mm(pattern.csr(values), W_dec.float())

    @staticmethod
    def backward(ctx, g):
        values, W_dec = ctx.saved_tensors
        p = ctx.pattern
        g = g.float().contiguous()
        gv = gW = None
        if ctx.needs_input_grad[0]:  # SDDMM: g @ W_dec^T sampled at the pattern
            gv = torch.sparse.sampled_addmm(p.csr(values.new_zeros(p.nnz)), g, W_dec.float().t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            gW = torch.sparse.mm(p.csr_t(values), g).to(W_dec.dtype)
        return gv, gW, None


def sparse_encode(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pattern: Pattern,
                  values: torch.Tensor) -> torch.Tensor:
    """Differentiable pre-activations ``[nnz]`` at ``pattern`` (see :class:`SampledEncode`)."""
    return SampledEncode.apply(x_c, W_enc, b_enc, pattern, values)


def sparse_decode(values: torch.Tensor, W_dec: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """``[B, d_in]`` = the pattern's sparse latents times ``W_dec`` (no bias; see :class:`SparseDecode`)."""
    return SparseDecode.apply(values, W_dec, pattern)


def step_flops(batch: int, d_in: int, d_sae: int, k: int | None = None) -> int:
    """FLOPs of one training step's matmuls: dense ``10 B d m``; sparse TopK ``2 B d m + 8 B k d``."""
    if k is None:
        return 10 * batch * d_in * d_sae
    return 2 * batch * d_in * d_sae + 8 * batch * k * d_in
