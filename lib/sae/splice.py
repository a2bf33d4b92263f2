"""Splice an SAE (or any replacement) into a model at a hook point, at chosen positions.

A splice replaces the activation ``a`` [batch, pos, d] at ``hook`` by ``fn(a)`` where ``positions``
[batch, pos] is True, and leaves it untouched elsewhere.  ``torch.where`` keeps the untouched
entries bit for bit, so splicing ``fn = identity`` reproduces the clean forward pass exactly: the
sanity check of the seed ("plug the correct activations back in: do you get the clean CE?").

>>> logits = run_spliced(model, tokens, "blocks.1.hook_resid_post", sae, positions=mask)
"""
from __future__ import annotations

from typing import Callable

import torch

Replacement = Callable[[torch.Tensor], torch.Tensor]


def sae_replacement(sae) -> Replacement:
    """``a -> sae(a)`` computed in the SAE's dtype and device, returned in ``a``'s."""
    p = next(sae.parameters())

    def fn(a: torch.Tensor) -> torch.Tensor:
        return sae(a.to(p.device, p.dtype)).to(a.device, a.dtype)

    return fn


def zero_replacement(a: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(a)


def identity_replacement(a: torch.Tensor) -> torch.Tensor:
    return a


def tensor_replacement(values: torch.Tensor) -> Replacement:
    """Replace by precomputed activations ``values`` [batch, pos, d] (e.g. from a cache)."""

    def fn(a: torch.Tensor) -> torch.Tensor:
        if values.shape != a.shape:
            raise ValueError(f"replacement activations {tuple(values.shape)} do not match the hook's {tuple(a.shape)}")
        return values.to(a.device, a.dtype)

    return fn


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
def run_spliced(model, tokens: torch.Tensor, hook: str, replacement, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, pos, vocab] with ``replacement`` spliced in at ``hook``.

    ``replacement`` is an SAE (an ``nn.Module`` with ``encode``/``decode``), or a function
    ``a -> a'``, or None for the clean run.
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    if replacement is None:
        return model(tokens, return_type="logits")
    if hook not in model.hook_dict:
        raise KeyError(f"hook {hook!r} not in the model; see lib.models.hook_names(model)")
    fn = sae_replacement(replacement) if hasattr(replacement, "decode") else replacement
    return model.run_with_hooks(tokens, fwd_hooks=[(hook, splice_hook(fn, positions))], return_type="logits")
