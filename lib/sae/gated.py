"""The gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Two paths share one encoder direction ``W_gate = W_enc`` [d_in, d_sae]:

- gate:      ``pi_gate = (x - b_dec) @ W_enc + b_enc``            (``b_enc`` is the paper's ``b_gate``)
- magnitude: ``pi_mag  = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag``  (per-latent rescaling ``r_mag``)

and the latents are ``f = 1[pi_gate > 0] * relu(pi_mag)``.  The Heaviside step passes no
gradient, but ``W_gate`` is tied to the magnitude path's weights (``W_mag = W_enc * exp(r_mag)``),
so the shared ``W_enc`` does receive the reconstruction gradient through ``pi_mag``; only the
gate's bias ``b_enc`` (``b_gate``) learns solely through the two extra loss terms:

    L = ||x - x_hat(f)||^2                                           (reconstruction)
      + lambda * sum_i relu(pi_gate)_i * ||W_dec[i]||                 (sparsity, on the gate)
      + ||x - (relu(pi_gate) @ sg(W_dec) + sg(b_dec))||^2             (auxiliary, frozen decoder)

``sg`` is stop-gradient (``detach``).  ``aux=False`` (or ``architecture="gated_noaux"``) drops the
auxiliary term: the ablation of notebook 04, where the gate's bias is then trained by the
sparsity penalty alone, which pushes every ``pi_gate`` down (``W_enc`` still learns through the
magnitude path).

Parameters follow the base layout (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) plus ``r_mag`` and
``b_mag`` [d_sae], so the trainer, metrics and splicing take it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from lib.sae.base import SAE, SAEConfig, register


@register("gated")
class GatedSAE(SAE):
    """Gated SAE; ``aux`` switches the auxiliary (frozen-decoder) reconstruction term on or off."""

    use_aux: bool = True

    def __init__(self, cfg: SAEConfig, aux: bool | None = None):
        super().__init__(cfg)
        dtype = getattr(torch, cfg.dtype)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        if aux is not None:
            self.use_aux = aux

    # --- the model ---------------------------------------------------------------------------
    def gate_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae]: ``pi_gate`` (the same as :meth:`pre_acts`)."""
        return self.pre_acts(x)

    def mag_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae]: ``pi_mag = exp(r_mag) * ((x - b_dec) @ W_enc) + b_mag``."""
        return ((x - self.b_dec) @ self.W_enc) * self.r_mag.exp() + self.b_mag

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gate_pre_acts(x)
        f = (gate > 0).to(gate.dtype) * torch.relu(self.mag_pre_acts(x))
        return f, gate

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> latents [..., d_sae]: ``1[pi_gate > 0] * relu(pi_mag)``."""
        self._check_input(x)
        return self._features(x)[0]

    # --- training ----------------------------------------------------------------------------
    def training_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, pi_gate)``; the Heaviside factor carries no gradient (it is a comparison)."""
        return self._features(x)

    def sparsity_penalty(self, f: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """``mean_t sum_i relu(pi_gate)_ti * ||W_dec[i]||`` (on the gate, not on ``f``)."""
        return (torch.relu(pre) * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                 dead_mask: torch.Tensor | None) -> torch.Tensor:
        """``mean_t ||x - (relu(pi_gate) @ W_dec.detach() + b_dec.detach())||^2`` (0 with ``aux=False``)."""
        if not self.use_aux:
            return x.new_zeros(())
        via_gate = torch.relu(pre) @ self.W_dec.detach() + self.b_dec.detach()
        return (via_gate - x).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", aux={self.use_aux}"


@torch.no_grad()
def gate_statistics(sae: GatedSAE, x: torch.Tensor) -> dict[str, float]:
    """How open the gates are on activations ``x`` [n, d_in]: gates open per token (``pi_gate > 0``),
    the mean gate pre-activation, and the fraction of latents that fire on some input."""
    gate = sae.gate_pre_acts(x)
    return {"gate_open_per_token": float((gate > 0).float().sum(-1).mean()),
            "mean_gate_preact": float(gate.mean()), "frac_alive": float((sae.encode(x) != 0).any(0).float().mean())}


@register("gated_noaux")
class GatedNoAuxSAE(GatedSAE):
    """The gated SAE trained without the auxiliary term (the paper's ablation)."""

    use_aux = False
