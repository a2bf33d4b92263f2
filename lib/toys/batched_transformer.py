"""M small causal transformers trained as one: every weight has a leading model axis.

Pure torch, nanoGPT-shaped (pre-LayerNorm blocks, learned positions, untied unembedding), with
the models stacked so that one ``bmm`` serves all of them: M seeds / conditions / regularisation
settings of one size train in a single loop on one core.  The models never mix: the loss is a
sum of per-model losses and AdamW is elementwise, so each model's update depends on its own
parameters, gradients and data only (weight decay and dropout are per model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Size:
    """One model size: layers, residual width, heads (MLP width 4 * d_model)."""
    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4

    def n_params(self, vocab: int, seq_len: int) -> int:
        d, L = self.d_model, self.n_layers
        block = 4 * d + 3 * d * d + d * d + 4 * d * d + 4 * d + 4 * d * d + d
        return vocab * d + seq_len * d + L * block + 2 * d + d * vocab


def init_params(size: Size, vocab: int, seq_len: int, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Parameters of ``len(seeds)`` models, model ``m`` drawn from a generator seeded by ``seeds[m]``
    (so a model's initial weights depend on its seed and size only, not on the rest of the stack)."""
    d, L = size.d_model, size.n_layers
    shapes = {"emb": (vocab, d), "pos": (seq_len, d)}
    for layer in range(L):
        shapes |= {f"{layer}.ln1_g": (d,), f"{layer}.ln1_b": (d,), f"{layer}.qkv": (d, 3 * d),
                   f"{layer}.out": (d, d), f"{layer}.ln2_g": (d,), f"{layer}.ln2_b": (d,),
                   f"{layer}.fc1": (d, 4 * d), f"{layer}.fc1_b": (4 * d,), f"{layer}.fc2": (4 * d, d),
                   f"{layer}.fc2_b": (d,)}
    shapes |= {"lnf_g": (d,), "lnf_b": (d,), "unemb": (d, vocab)}
    per_model = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        p = {}
        for name, shape in shapes.items():
            if name.endswith("_g"):
                p[name] = torch.ones(shape)
            elif name.endswith("_b"):
                p[name] = torch.zeros(shape)
            elif name in ("emb", "pos"):
                p[name] = 0.1 * torch.randn(shape, generator=g)
            else:
                std = 1 / math.sqrt(shape[0])
                if name.endswith(".out") or name.endswith(".fc2"):
                    std /= math.sqrt(2 * L)
                p[name] = std * torch.randn(shape, generator=g)
        per_model.append(p)
    return {k: torch.stack([p[k] for p in per_model]).requires_grad_(True) for k in shapes}


def decayed(name: str) -> bool:
    """Weight decay applies to matrices and embeddings, not to LayerNorm gains or biases."""
    return not (name.endswith("_g") or name.endswith("_b"))


def _ln(x, g, b):
    return F.layer_norm(x, x.shape[-1:]) * g[:, None, None, :] + b[:, None, None, :]


def _dropout(x: torch.Tensor, p: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    if p is None or not bool((p > 0).any()):
        return x
    keep = 1 - p.view(-1, 1, 1, 1).to(x.dtype)
    mask = torch.rand(x.shape, generator=gen, dtype=x.dtype) < keep
    return x * mask / keep


def forward(params: dict[str, torch.Tensor], size: Size, tokens: torch.Tensor, n_out: int,
            dropout: torch.Tensor | None = None, gen: torch.Generator | None = None,
            return_resid: bool = False):
    """Logits of the last ``n_out`` positions: ``tokens`` [M, B, T] -> [M, B, n_out, V].

    ``dropout`` [M] is each model's residual dropout rate (training only).  With ``return_resid``
    also returns the final residual stream before the last LayerNorm, [M, B, T, d].
    """
    M, B, T = tokens.shape
    d, H = size.d_model, size.n_heads
    x = params["emb"][torch.arange(M)[:, None, None], tokens] + params["pos"][:, None, :T]
    for layer in range(size.n_layers):
        h = _ln(x, params[f"{layer}.ln1_g"], params[f"{layer}.ln1_b"])
        qkv = torch.bmm(h.reshape(M, B * T, d), params[f"{layer}.qkv"])
        q, k, v = qkv.view(M * B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [M*B, H, T, dh]
        a = a.transpose(1, 2).reshape(M, B * T, d)
        x = x + _dropout(torch.bmm(a, params[f"{layer}.out"]).view(M, B, T, d), dropout, gen)
        h = _ln(x, params[f"{layer}.ln2_g"], params[f"{layer}.ln2_b"])
        h = F.gelu(torch.bmm(h.reshape(M, B * T, d), params[f"{layer}.fc1"]) + params[f"{layer}.fc1_b"][:, None])
        h = torch.bmm(h, params[f"{layer}.fc2"]) + params[f"{layer}.fc2_b"][:, None]
        x = x + _dropout(h.view(M, B, T, d), dropout, gen)
    last = _ln(x[:, :, T - n_out:], params["lnf_g"], params["lnf_b"])
    logits = torch.bmm(last.reshape(M, B * n_out, d), params["unemb"]).view(M, B, n_out, -1)
    return (logits, x) if return_resid else logits


class AdamW:
    """AdamW over stacked parameters with a per-model weight decay ``weight_decay`` [M]."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, weight_decay: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.wd = weight_decay
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for k, p in self.params.items():
            g = p.grad
            self.m[k].mul_(b1).add_(g, alpha=1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            if decayed(k):
                p.mul_((1 - self.lr * self.wd).view(-1, *([1] * (p.dim() - 1))))
            p.addcdiv_(self.m[k] / c1, (self.v[k] / c2).sqrt_().add_(self.eps), value=-self.lr)
            p.grad = None
