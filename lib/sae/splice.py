"""Splice an SAE (or any replacement) into a model at a hook point, at chosen positions.

A splice replaces the activation ``a`` [batch, pos, d] at ``hook`` by ``fn(a)`` where ``positions``
[batch, pos] is True, and leaves it untouched elsewhere.  ``torch.where`` keeps the untouched
entries bit for bit, so splicing ``fn = identity`` reproduces the clean forward pass exactly: the
sanity check of the seed ("plug the correct activations back in: do you get the clean CE?").

>>> logits = run_spliced(model, tokens, sae, positions=mask)      # at sae.cfg.hook_name
>>> logits = run_spliced(model, tokens, fn, hook="blocks.1.hook_resid_post")  # any function

The hook is the replacement's own unless ``hook`` says otherwise: an SAE's ``cfg.hook_name``, or
the ``hook_name`` attribute of a function (:func:`lib.sae.ito.code_replacement` sets one).
"""
from __future__ import annotations

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
                hook: str | None = None) -> torch.Tensor:
    """Logits [batch, pos, vocab] with ``replacement`` spliced in at its hook (see the module docstring).

    ``replacement`` is an SAE (an ``nn.Module`` with ``encode``/``decode``), or a function
    ``a -> a'``, or None for the clean run.
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    if replacement is None:
        return model(tokens, return_type="logits")
    hook = replacement_hook(replacement, hook)
    check_hooks(model, hook)
    fn = as_replacement(replacement)
    return model.run_with_hooks(tokens, fwd_hooks=[(hook, splice_hook(fn, positions))], return_type="logits")
