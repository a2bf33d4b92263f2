"""Splice an SAE (or any replacement) into a model at a hook point, at chosen positions.

A splice replaces the activation ``a`` [batch, pos, d] at ``hook`` by ``fn(a)`` where ``positions``
[batch, pos] is True, and leaves it untouched elsewhere.  ``torch.where`` keeps the untouched
entries bit for bit, so splicing ``fn = identity`` reproduces the clean forward pass exactly: the
sanity check of the seed ("plug the correct activations back in: do you get the clean CE?").

>>> logits = run_spliced(model, tokens, sae, positions=mask)      # at sae.cfg.hook_name
>>> logits = run_spliced(model, tokens, fn, hook="blocks.1.hook_resid_post")  # any function

The hook is the replacement's own unless ``hook`` says otherwise: an SAE's ``cfg.hook_name``, or
the ``hook_name`` attribute of a function (:func:`lib.sae.ito.code_replacement` sets one).

End-to-end training (Braun et al. 2024) splices with gradients: :func:`clean_pass` runs the model
once unmodified (the hook's activations, the logits, the downstream residuals), then
:func:`e2e_loss` runs it again with the SAE's reconstruction spliced in and returns
``KL(p_orig || p_spliced) + coefficient * L1 (+ downstream residual MSE)``, differentiable in the
SAE's parameters through the frozen later layers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from lib.hooks import check_hooks

Replacement = Callable[[torch.Tensor], torch.Tensor]


def sae_replacement(sae) -> Replacement:
    """``a -> sae(a)`` computed in the SAE's dtype and device, returned in ``a``'s."""
    p = next(sae.parameters())

    def fn(a: torch.Tensor) -> torch.Tensor:
        return sae(a.to(p.device, p.dtype)).to(a.device, a.dtype)

    return fn


def zero_replacement(a: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(a)


def tensor_replacement(values: torch.Tensor) -> Replacement:
    """Replace by precomputed activations ``values`` [batch, pos, d] (e.g. from a cache)."""

    def fn(a: torch.Tensor) -> torch.Tensor:
        if values.shape != a.shape:
            raise ValueError(f"replacement activations {tuple(values.shape)} do not match the hook's {tuple(a.shape)}")
        return values.to(a.device, a.dtype)

    return fn


def replacement_hook(replacement, hook: str | None = None) -> str:
    """The hook ``replacement`` splices at: ``hook`` when given, else the SAE's ``cfg.hook_name``
    or the function's ``hook_name``."""
    found = hook or getattr(getattr(replacement, "cfg", None), "hook_name", None) or getattr(replacement, "hook_name", None)
    if not found:
        raise ValueError("no hook to splice at: pass hook=..., or an SAE whose cfg.hook_name is set")
    return found


def as_replacement(replacement) -> Replacement:
    """An SAE (anything with ``encode``/``decode``) becomes :func:`sae_replacement`; a function stays."""
    return sae_replacement(replacement) if hasattr(replacement, "decode") else replacement


def splice_hook(fn: Replacement, positions: torch.Tensor | None = None):
    """A TransformerLens forward hook applying ``fn`` where ``positions`` [batch, pos] is True (all if None)."""

    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:  # noqa: ARG001 - TransformerLens passes the HookPoint
        new = fn(act)
        if positions is None:
            return new
        m = positions.to(act.device)
        if m.shape != act.shape[:2]:
            raise ValueError(f"positions {tuple(m.shape)} do not match activations {tuple(act.shape[:2])}")
        return torch.where(m[..., None], new, act)

    return hook


@torch.no_grad()
def run_spliced(model, tokens: torch.Tensor, replacement, positions: torch.Tensor | None = None, *,
                hook: str | None = None, keep: Sequence[str] | None = None):
    """Logits [batch, pos, vocab] with ``replacement`` spliced in at its hook (see the module docstring).

    ``replacement`` is an SAE (an ``nn.Module`` with ``encode``/``decode``), or a function
    ``a -> a'``, or None for the clean run, or a dict ``{hook: replacement}`` to splice at several
    hooks at once (every block's residual stream, notebook 11).  With ``keep`` (hook names, e.g. the
    residual stream downstream), returns ``(logits, {hook: activation [batch, pos, d]})`` of the
    spliced run, also when ``keep`` is empty (an SAE at the last block has no downstream residual).
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    wanted = keep is not None
    keep = [keep] if isinstance(keep, str) else list(keep or ())
    seen: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def fn(act: torch.Tensor, hook=None) -> None:  # noqa: ARG001
            seen[name] = act

        return fn

    hooks = [(h, keeper(h)) for h in keep]
    if isinstance(replacement, dict):
        check_hooks(model, [*replacement, *keep])
        hooks = [*[(h, splice_hook(as_replacement(r), positions)) for h, r in replacement.items()], *hooks]
    elif replacement is not None:
        hook = replacement_hook(replacement, hook)
        check_hooks(model, [hook, *keep])
        hooks = [(hook, splice_hook(as_replacement(replacement), positions)), *hooks]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits") if hooks else \
        model(tokens, return_type="logits")
    return (logits, seen) if wanted else logits


# --------------------------------------------------------------------------------------------
# end-to-end training: the SAE spliced in, the model frozen, the loss read at the output
# --------------------------------------------------------------------------------------------
E2E_OBJECTIVES = ("e2e", "e2e_ds")


@dataclass
class CleanPass:
    """What the unmodified model computes on a token batch (no gradient).

    tokens [B, T]; positions [B, T] bool (where the SAE is spliced: real tokens but BOS);
    act [B, T, d] at the SAE's hook; logits [B, T, vocab]; downstream {hook: [B, T, d]}.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    act: torch.Tensor
    logits: torch.Tensor
    downstream: dict[str, torch.Tensor]

    @property
    def x(self) -> torch.Tensor:
        """[n, d]: the activations the SAE reads (the spliced positions, row-major)."""
        return self.act[self.positions]


def clean_pass(model, batch, hook: str, downstream: Sequence[str] = ()) -> CleanPass:
    """Run ``model`` on ``batch`` (a :class:`~lib.activations.TokenBatch`) and keep the activation at
    ``hook``, the logits and the residuals at ``downstream`` hooks (read by :func:`lib.activations.batch_activations`).

    The splice positions are ``batch.counted_mask()`` (real tokens, BOS excluded), as in :mod:`lib.sae.metrics`.
    Padding is on the right and the model is causal, so real positions never see it."""
    from lib.activations import batch_activations

    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)
    logits, acts = batch_activations(model, tokens, [hook, *downstream], logits=True)
    return CleanPass(tokens, batch.counted_mask().to(device), acts[hook], logits,
                     {h: acts[h] for h in downstream})


def e2e_loss(sae, model, clean: CleanPass, sparsity_coefficient: float | torch.Tensor, *, hook: str | None = None,
             kl_coefficient: float = 1.0, downstream_coefficient: float = 0.0) -> dict[str, torch.Tensor]:
    """The end-to-end SAE loss (Braun et al. 2024) on one batch, with gradients for the SAE only.

    The SAE reconstructs the clean activations at the spliced positions, the reconstruction is
    spliced in at ``hook`` (default the SAE's own), and the frozen model runs on from there:

    ``loss = kl_coefficient * KL + sparsity_coefficient * L1 + downstream_coefficient * ds_mse``

    - ``KL``: ``mean_t KL(p_orig(t) || p_spliced(t))`` over the spliced positions, computed as
      ``kl_div(log_softmax(spliced), log_softmax(orig), log_target=True, reduction="batchmean")``
      (the e2e_sae convention);
    - ``L1``: the SAE's sparsity penalty, ``mean_t sum_i f_ti`` for ReLU (pass ``lambda / d_model``
      as the coefficient for the paper's ``phi``);
    - ``ds_mse``: the mean over ``clean.downstream`` hooks of the MSE (averaged over elements)
      between spliced and original residuals at the spliced positions.

    Returns the keys of :meth:`SAE.loss` (``loss, recon, mse, sparsity, aux, features, x_hat``;
    ``recon`` is the KL) plus ``kl`` and ``downstream`` (detached)."""
    hook = replacement_hook(sae, hook)
    x = clean.x
    p = next(sae.parameters())
    f, pre = sae.training_features(x.to(p.device, p.dtype))
    x_hat = sae.decode(f)
    mask = clean.positions[..., None]
    seen: dict[str, torch.Tensor] = {}

    def splice(act: torch.Tensor, hook=None) -> torch.Tensor:  # noqa: ARG001
        return act.masked_scatter(mask.expand_as(act), x_hat.to(act.dtype))

    def keeper(name: str):
        def keep(act: torch.Tensor, hook=None) -> None:  # noqa: ARG001
            seen[name] = act

        return keep

    names = list(clean.downstream)
    logits = model.run_with_hooks(clean.tokens, fwd_hooks=[(hook, splice), *[(h, keeper(h)) for h in names]],
                                  return_type="logits")
    pos = clean.positions
    kl = torch.nn.functional.kl_div(logits[pos].float().log_softmax(-1), clean.logits[pos].float().log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    if names:
        ds = torch.stack([(seen[h][pos].float() - clean.downstream[h][pos].float()).pow(2).mean() for h in names]).mean()
    else:
        ds = kl.new_zeros(())
    sparsity = sae.sparsity_penalty(f, pre)
    total = kl_coefficient * kl + sparsity_coefficient * sparsity
    if downstream_coefficient:
        total = total + downstream_coefficient * ds
    return {"loss": total, "recon": kl, "kl": kl.detach(), "downstream": ds.detach(),
            "mse": (x_hat.detach() - x).pow(2).sum(-1).mean(), "sparsity": sparsity, "aux": kl.new_zeros(()),
            "features": f.detach(), "x_hat": x_hat.detach()}
