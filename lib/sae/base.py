"""SAE architectures: each a plain ``nn.Module`` with ``encode`` / ``decode`` / ``forward`` / ``loss``.

All architectures share SAELens's parameter layout, so saving and loading is a rename-free copy:

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]   (+ threshold [d_sae])

Row ``i`` of ``W_dec`` is latent ``i``'s decoder direction (a *column* of the decoder matrix in
dictionary_learning's ``nn.Linear`` convention).  With ``cfg.normalize_decoder`` (the default) the
trainer keeps every row at unit norm, so the L1 penalty ``sum_i f_i`` equals the decoder-norm
weighted penalty ``sum_i f_i * ||W_dec[i]||``.

The decoder bias centres the input: ``encode(x) = act((x - b_dec) @ W_enc + b_enc)`` and
``decode(f) = f @ W_dec + b_dec``.

Architectures (``SAEConfig.architecture``):

- ``"relu"``: ReLU latents, L1 sparsity penalty (Bricken et al. 2023; SAELens's "standard").
- ``"topk"``: keep the ``k`` largest pre-activations per token (ReLU'd), no sparsity penalty; an
  AuxK loss (Gao et al. 2024) teaches dead latents to model the residual.  Trained through the
  sparse kernels of :mod:`lib.sae.sparse` (``cfg.sparse_decode``; the dense path is the reference).
- ``"batchtopk"``: keep the ``B * k`` largest pre-activations of the whole batch (Bussmann et al.
  2024); at inference a single threshold, a running average of the smallest kept value, replaces
  the batch (saved in SAELens's format as a JumpReLU SAE with that threshold for every latent).
- ``"jumprelu"``: ``f = z * (z > threshold)`` with a learned per-latent threshold, trained with a
  straight-through estimator and an L0 penalty (Rajamanoharan et al. 2024).

A new architecture (the gated SAE of notebook 04) subclasses :class:`SAE`, registers itself
with ``@register("gated")``, and overrides ``encode`` plus, when its training graph differs,
``training_features`` / ``sparsity_penalty`` / ``aux_loss`` (or ``loss`` itself, keeping the
returned keys).  Everything downstream (trainer, metrics, splicing, I/O) only uses
``encode``, ``decode``, ``forward``, ``loss``, ``W_dec``, ``b_dec`` and ``cfg``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

from lib.sae import sparse

RECON_LOSSES = ("mse", "mse_mean", "mse_batch_var", "l2")


@dataclass
class SAEConfig:
    """What an SAE is: sizes, architecture, and where in which model it reads activations."""

    d_in: int
    d_sae: int
    architecture: str = "relu"  # "relu" | "topk" | "jumprelu" (| "gated" from notebook 04)
    hook_name: str = ""  # TransformerLens hook point, e.g. "blocks.1.hook_resid_post"
    model_name: str = ""
    k: int = 32  # topk: latents kept per token
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 0.05  # width of the rectangle kernel of the straight-through estimator
    normalize_decoder: bool = True  # keep each decoder row at unit norm during training
    context_size: int | None = None  # tokens per context in training (metadata, saved with the SAE)
    prepend_bos: bool = True  # whether training contexts started with BOS (metadata)
    sparse_decode: bool = True  # topk / batchtopk: train through the sparse kernels of lib.sae.sparse (False: dense reference)
    objective: str = "local"  # what it was trained to preserve: "local" | "e2e" | "e2e_ds" (metadata, set by the trainer)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, what in (("d_in", "d_in"), ("d_sae", "d_sae"), ("k", "k (TopK latents per token)")):
            setattr(self, name, positive_int(getattr(self, name), f"SAEConfig.{what}"))
        if self.architecture == "topk" and self.k > self.d_sae:
            raise ValueError(f"SAEConfig.k = {self.k} exceeds d_sae = {self.d_sae}: a TopK SAE keeps k of its d_sae latents")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"SAEConfig.jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth!r}")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"SAEConfig.dtype {self.dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int >= 1 (NumPy and torch integers too), or a ``ValueError`` naming ``what``."""
    import operator

    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return number


ARCHITECTURES: dict[str, type["SAE"]] = {}


def register(name: str) -> Callable[[type["SAE"]], type["SAE"]]:
    """Class decorator: make ``SAEConfig(architecture=name)`` build this class (see :func:`make_sae`)."""

    def deco(cls: type["SAE"]) -> type["SAE"]:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


def make_sae(cfg: SAEConfig, seed: int | None = None) -> "SAE":
    """Build a freshly initialised SAE of ``cfg.architecture``."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"Unknown SAE architecture {cfg.architecture!r}. Known: {sorted(ARCHITECTURES)}. "
            "A new one subclasses lib.sae.base.SAE and registers with @register(name)."
        )
    if seed is not None:
        torch.manual_seed(seed)
    return ARCHITECTURES[cfg.architecture](cfg)


@register("relu")
class SAE(nn.Module):
    """The ReLU SAE with decoder-bias centring; the base class of every architecture."""

    architecture = "relu"
    nonnegative_latents = True  # true of every architecture here; one with signed latents sets False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, dtype=dtype)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        if not cfg.normalize_decoder:
            w_dec = 0.1 * w_dec
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))

    # --- the model -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae]: ``(x - b_dec) @ W_enc + b_enc``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> latents [..., d_sae]."""
        self._check_input(x)
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """latents [..., d_sae] -> reconstruction [..., d_in]: ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruct ``x`` [..., d_in]; with ``output_features`` return ``(x_hat, f)``."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"This SAE reads {self.cfg.d_in}-dimensional activations "
                f"(hook {self.cfg.hook_name or '?'}), got last dimension {x.shape[-1]}. "
                "Check the hook point and the model the SAE was trained on."
            )

    # --- training ---------------------------------------------------------------------------
    def training_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, pre)`` with a training-time graph (straight-through estimators live here)."""
        pre = self.pre_acts(x)
        return self.activation(pre), pre

    def sparsity_penalty(self, f: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of the per-token penalty; ReLU: L1 ``sum_i |f_i| * ||W_dec[i]||``.

        ReLU latents are non-negative, so ``|f_i| = f_i`` (an architecture with signed latents
        overrides this method)."""
        if self.cfg.normalize_decoder:
            return f.sum(-1).mean()
        return (f * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                 dead_mask: torch.Tensor | None) -> torch.Tensor:
        """Architecture-specific auxiliary term (none for ReLU)."""
        return x.new_zeros(())

    def loss(self, x: torch.Tensor, sparsity_coefficient: float = 0.0, recon: str = "mse",
             dead_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss on a batch ``x`` [batch, d_in]; returns a dict of terms.

        ``loss = recon + sparsity_coefficient * sparsity + aux`` where ``recon`` is

        - ``"mse"``: ``mean_t sum_d (x_hat - x)^2`` (summed over the activation dimension),
        - ``"mse_mean"``: ``mean_t mean_d (x_hat - x)^2`` (averaged over elements: ``F.mse_loss``, the
          convention of Braun et al. 2024, whose sparsity coefficient is ``lambda / d_in``),
        - ``"mse_batch_var"``: that divided by the batch variance ``mean_t sum_d (x - mean_t x)^2``,
        - ``"l2"``: ``mean_t ||x_hat - x||_2`` (the unsquared norm: scales like the L1 term).

        Keys: ``loss``, ``recon``, ``mse`` (always the summed MSE, detached), ``sparsity``,
        ``aux``, ``features`` [batch, d_sae] and ``x_hat`` (both detached).  The sparse path of
        TopK / BatchTopK returns ``features`` as a sparse COO tensor and adds ``fired`` [d_sae]
        (bool) and ``l0`` (mean active latents per token), which it gets for free.  Statistics such as
        L0 are left to the caller (the trainer computes them only on logging steps: counting
        non-zeros over a [batch, d_sae] tensor costs as much as a small matmul on a CPU).
        """
        self._check_input(x)
        f, pre = self.training_features(x)
        x_hat = self.decode(f)
        sparsity = self.sparsity_penalty(f, pre)
        aux = self.aux_loss(x, x_hat, pre, dead_mask)
        return self._loss_terms(x, x_hat, sparsity_coefficient, recon, sparsity, aux, f.detach())

    @staticmethod
    def _loss_terms(x, x_hat, sparsity_coefficient, recon, sparsity, aux, features) -> dict[str, torch.Tensor]:
        """The dict :meth:`loss` returns, from the reconstruction and the penalty terms."""
        sq = (x_hat - x).pow(2).sum(-1)
        if recon == "mse":
            recon_term = sq.mean()
        elif recon == "mse_mean":
            recon_term = sq.mean() / x.shape[-1]
        elif recon == "mse_batch_var":
            recon_term = sq.mean() / (x - x.mean(0)).pow(2).sum(-1).mean().detach()
        elif recon == "l2":
            recon_term = (sq + 1e-12).sqrt().mean()
        else:
            raise ValueError(f"recon must be one of {RECON_LOSSES}, got {recon!r}")
        total = recon_term + sparsity_coefficient * sparsity + aux
        return {
            "loss": total,
            "recon": recon_term,
            "mse": sq.mean().detach(),
            "sparsity": sparsity,
            "aux": aux,
            "features": features,
            "x_hat": x_hat.detach(),
        }

    # --- the unit-norm decoder constraint ----------------------------------------------------
    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """After an optimizer step: rescale every decoder row to unit norm (if ``cfg.normalize_decoder``)."""
        if self.cfg.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_grads_(self) -> None:
        """Before an optimizer step: remove the part of ``W_dec.grad`` parallel to each (unit) row, so a step stays near the sphere."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    def extra_repr(self) -> str:
        return f"{self.architecture}: d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, hook={self.cfg.hook_name!r}"


@register("topk")
class TopKSAE(SAE):
    """Keep the ``cfg.k`` largest pre-activations per token (ReLU'd); AuxK for dead latents."""

    aux_k_coefficient = 1 / 32  # Gao et al. 2024, appendix A.2

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        k = min(self.cfg.k, pre.shape[-1])
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def select(self, pre: torch.Tensor):
        """The active entries of ``pre`` [B, d_sae] for the sparse path: ``(Pattern, values)``."""
        return sparse.topk_pattern(pre, self.cfg.k)

    def sparsity_penalty(self, f: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return f.new_zeros(())

    def aux_k(self, dead_mask: torch.Tensor) -> int:
        return min(self.cfg.d_in // 2, int(dead_mask.sum()))

    def aux_loss(self, x, x_hat, pre, dead_mask):
        """``||e - W_dec^T topk_aux(pre over dead latents)||^2`` with ``e = x - x_hat`` detached."""
        if dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        vals, idx = masked.topk(self.aux_k(dead_mask), dim=-1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        residual = (x - x_hat).detach()
        return self.aux_k_coefficient * (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()

    def loss(self, x: torch.Tensor, sparsity_coefficient: float = 0.0, recon: str = "mse",
             dead_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As :meth:`SAE.loss`; with ``cfg.sparse_decode`` through the sparse kernels (same values and gradients)."""
        if not self.cfg.sparse_decode:
            return super().loss(x, sparsity_coefficient, recon, dead_mask)
        self._check_input(x)
        x_c = x - self.b_dec
        with torch.no_grad():  # the one dense matmul: every pre-activation, only to choose the active ones
            pre = x_c @ self.W_enc + self.b_enc
            pattern, pre_vals = self.select(pre)
        v = torch.relu(sparse.sparse_encode(x_c, self.W_enc, self.b_enc, pattern, pre_vals))
        x_hat = sparse.sparse_decode(v, self.W_dec, pattern).to(x.dtype) + self.b_dec
        aux = x.new_zeros(())
        if dead_mask is not None and bool(dead_mask.any()):
            with torch.no_grad():
                aux_pattern, aux_pre = sparse.topk_pattern(pre.masked_fill(~dead_mask, float("-inf")),
                                                           self.aux_k(dead_mask))
            v_aux = torch.relu(sparse.sparse_encode(x_c, self.W_enc, self.b_enc, aux_pattern, aux_pre))
            residual = (x - x_hat).detach()
            aux = self.aux_k_coefficient * (sparse.sparse_decode(v_aux, self.W_dec, aux_pattern)
                                            - residual).pow(2).sum(-1).mean()
        del pre
        active = v.detach() > 0
        out = self._loss_terms(x, x_hat, sparsity_coefficient, recon, x.new_zeros(()), aux,
                               pattern.coo(v.detach()))
        # (an accumulating index_put, not a boolean index: deterministic and no synchronisation on a GPU)
        out["fired"] = x.new_zeros(self.cfg.d_sae, dtype=torch.float32).index_put_(
            (pattern.cols,), active.float(), accumulate=True) > 0
        out["l0"] = active.sum() / x.shape[0]
        return out


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): the ``B * k`` largest pre-activations of a batch, ReLU'd.

    In training the batch decides; in ``eval()`` mode ``f = pre * (pre > threshold)`` with the
    threshold a running average (set by the first batch, then momentum ``threshold_momentum``) of
    the smallest positive kept value, stored for every latent (``threshold`` [d_sae], a buffer) so that the SAE saves as
    the JumpReLU SAE it is at inference.
    """

    threshold_momentum = 0.01

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=getattr(torch, cfg.dtype)))

    def select(self, pre: torch.Tensor):
        pattern, vals = sparse.batch_topk_pattern(pre, self.cfg.k)
        if self.training:
            self._update_threshold(vals)
        return pattern, vals

    @torch.no_grad()
    def _update_threshold(self, vals: torch.Tensor) -> None:
        positive = vals[vals > 0]
        if positive.numel():
            smallest = positive.min().to(self.threshold.dtype)
            if bool((self.threshold == 0).all()):  # the first batch sets it, later ones average in
                self.threshold.fill_(smallest)
            else:
                m = self.threshold_momentum
                self.threshold.mul_(1 - m).add_(m * smallest)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            pattern, vals = self.select(pre)
            return pattern.dense(vals.relu())
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``z * (z > theta)``; d/dz = 1[z > theta]; d/dtheta = -(theta/eps) K((z - theta)/eps) (STE)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = (z > theta).to(g.dtype) * g
        gtheta = -(theta / eps) * _rectangle((z - theta) / eps) * g
        return gz, gtheta.reshape(-1, theta.shape[-1]).sum(0), None


class _StepFn(torch.autograd.Function):
    """``1[z > theta]``; no gradient to z; d/dtheta = -(1/eps) K((z - theta)/eps) (STE)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gtheta = -(1.0 / eps) * _rectangle((z - theta) / eps) * g
        return None, gtheta.reshape(-1, theta.shape[-1]).sum(0), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    """``f = z * (z > threshold)``, threshold learned through a straight-through estimator; L0 penalty."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold,
                                                 dtype=getattr(torch, cfg.dtype)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def training_features(self, x):
        pre = self.pre_acts(x)
        return _JumpReLUFn.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth), pre

    def sparsity_penalty(self, f, pre):
        """Expected L0 ``mean_t sum_i 1[z_i > threshold_i]`` (gradient to the thresholds only)."""
        return _StepFn.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        super().apply_constraints_()
        self.threshold.clamp_(min=0.0)
