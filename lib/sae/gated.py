"""The gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Two paths share one encoder direction ``W_gate = W_enc`` [d_in, d_sae]:

- gate:      ``pi_gate = (x - b_dec) @ W_enc + b_enc``            (``b_enc`` is the paper's ``b_gate``)
- magnitude: ``pi_mag  = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag``  (per-latent rescaling ``r_mag``)

and the latents are ``f = 1[pi_gate > 0] * relu(pi_mag)``.  The Heaviside step passes no
gradient, but ``W_gate`` is tied to ``W_mag`` (``W_mag = W_gate * exp(r_mag)``, column-wise), so
``W_gate`` receives the reconstruction gradient through the magnitude path; only ``b_gate``
(``b_enc``) does not: it learns only from the sparsity and auxiliary terms:

    L = ||x - x_hat(f)||^2                                           (reconstruction)
      + lambda * sum_i relu(pi_gate)_i * ||W_dec[i]||                 (sparsity, on the gate)
      + ||x - (relu(pi_gate) @ sg(W_dec) + sg(b_dec))||^2             (auxiliary, frozen decoder)

``sg`` is stop-gradient (``detach``).  ``aux=False`` (or ``architecture="gated_noaux"``) drops the
auxiliary term: the ablation of notebook 04.  Then ``b_gate`` learns from the sparsity penalty
alone, whose gradient on it is >= 0 everywhere (it only pushes gates shut), while ``W_gate`` still
learns from the reconstruction (through ``W_mag``) and the sparsity term; since ``r_mag`` can grow
while ``W_gate`` shrinks, gate pre-activations can become small without changing the magnitudes
(the mechanism behind the "tiny but barely positive gates" hypothesis that
:func:`gate_statistics` measures, and :func:`train_with_gate_trace` follows over training).

Parameters follow the base layout (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) plus ``r_mag`` and
``b_mag`` [d_sae], so the trainer, metrics and splicing take it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from lib.sae.base import SAE, SAEConfig, make_sae, register


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
def gate_statistics(sae: GatedSAE, x: torch.Tensor, tiny: float = 0.05) -> dict[str, float]:
    """How open the gates are on activations ``x`` [n, d_in], and how large the open ones are.

    - ``gate_open_per_token``: mean number of latents with ``pi_gate > 0``;
    - ``mean_gate_preact``: mean ``pi_gate`` over all latents and tokens;
    - ``frac_alive``: fraction of latents that fire (``f != 0``) on some input;
    - ``open_gate_median`` / ``open_mag_median``: medians of ``pi_gate`` and of ``f`` over the open
      gates (so their ratio says how small a gate is next to the magnitude it lets through);
    - ``frac_open_tiny``: fraction of open gates with ``pi_gate < tiny * f`` on the same (token,
      latent): gates "barely positive" next to their own magnitude (0 when no gate is open);
    - ``gate_l1_per_token``: the sparsity term ``mean_t sum_i relu(pi_gate)_ti ||W_dec[i]||``;
    - ``mean_exp_r_mag``: mean magnitude-path rescaling ``exp(r_mag)`` (``W_mag = W_gate * exp(r_mag)``);
    - ``mean_w_gate_norm``: mean column norm of ``W_gate``.
    """
    gate = sae.gate_pre_acts(x)
    f = sae.encode(x)
    open_ = gate > 0
    g_open, f_open = gate[open_], f[open_]
    n_open = g_open.numel()
    return {"gate_open_per_token": float(open_.float().sum(-1).mean()),
            "mean_gate_preact": float(gate.mean()),
            "frac_alive": float((f != 0).any(0).float().mean()),
            "open_gate_median": float(g_open.median()) if n_open else float("nan"),
            "open_mag_median": float(f_open.median()) if n_open else float("nan"),
            "frac_open_tiny": float((g_open < tiny * f_open).float().mean()) if n_open else 0.0,
            "gate_l1_per_token": float((torch.relu(gate) * sae.W_dec.norm(dim=-1)).sum(-1).mean()),
            "mean_exp_r_mag": float(sae.r_mag.exp().mean()),
            "mean_w_gate_norm": float(sae.W_enc.norm(dim=0).mean())}


def train_with_gate_trace(cfg, tc, data, x_eval: torch.Tensor, every: int, device="cpu",
                          tiny: float = 0.05) -> tuple[GatedSAE, list[dict]]:
    """Train a gated SAE (``cfg``: an ``SAEConfig`` of architecture ``gated`` / ``gated_noaux``;
    ``tc``: a ``TrainConfig``; ``data``: its batch source) and record :func:`gate_statistics` on
    ``x_eval`` [n, d_in] at step 0 and every ``every`` steps (and at the end).  The run is the one
    ``train_sae`` would make (the trainer is only paused to measure).  Returns ``(sae, trace)``,
    each trace row ``{"step": s, **gate_statistics}``."""
    from lib.sae.trainer import Trainer  # (here: the trainer's imports reach back into lib.sae)

    sae = make_sae(cfg, seed=tc.seed).to(device)
    if not isinstance(sae, GatedSAE):
        raise ValueError(f"train_with_gate_trace needs a gated architecture, got {cfg.architecture!r}")
    trainer = Trainer(sae, data, tc)
    x_eval = x_eval.to(device)
    trace = [{"step": 0, **gate_statistics(sae, x_eval, tiny)}]
    while trainer.step < tc.n_steps:
        trainer.fit(stop_at=min(tc.n_steps, trainer.step + every))
        trace.append({"step": trainer.step, **gate_statistics(sae, x_eval, tiny)})
    return sae, trace


@register("gated_noaux")
class GatedNoAuxSAE(GatedSAE):
    """The gated SAE trained without the auxiliary term (the paper's ablation)."""

    use_aux = False
