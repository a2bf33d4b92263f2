"""Relative reconstruction bias (shrinkage) of an SAE, Rajamanoharan et al. 2024, section 5.

    gamma = argmin_gamma  E_t ||x_hat_t / gamma - x_t||^2

Writing ``u = 1/gamma``, the objective ``u^2 E||x_hat||^2 - 2u E<x_hat, x> + E||x||^2`` is a
parabola in ``u`` with minimum at ``u* = E<x_hat, x> / E||x_hat||^2``, so

    gamma = E||x_hat||^2 / E<x_hat, x>                                     (:func:`gamma_closed_form`)

``gamma < 1`` means the SAE shrinks its reconstructions.  The form recorded for the paper's
first-printed equation (10), ``E<x_hat, x> / E||x||^2`` (:func:`gamma_reverse_form`), minimises
the *other* problem ``argmin_g E||g x - x_hat||^2`` (scaling ``x`` towards ``x_hat``).  The two
agree for a single 1-D sample (both ``x_hat / x``) and whenever ``x_hat = c x`` for one ``c``
across all tokens; they part as soon as reconstructions are not exact multiples of their inputs
with one common factor: several 1-D samples (``x = (1, 2)``, ``x_hat = (1, 1)``: correct 2/3,
reverse 3/5), or one vector reconstructed at an angle.  ``E<x_hat, x> / E||x_hat||^2``
(:func:`gamma_inverse_form`) is ``1/gamma``: the other way to misread the argmin.

:func:`gamma_numeric` minimises the defining objective directly (golden-section search over
``log gamma``), independently of either closed form.
"""
from __future__ import annotations

import math

import torch


def _moments(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float]:
    """``(E||x_hat||^2, E<x_hat, x>, E||x||^2)`` over the tokens of ``x_hat``, ``x`` [n, d] (float64)."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape")
    a, b = x_hat.double().reshape(-1, x.shape[-1]), x.double().reshape(-1, x.shape[-1])
    return float(a.pow(2).sum(-1).mean()), float((a * b).sum(-1).mean()), float(b.pow(2).sum(-1).mean())


def gamma_closed_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """The correct closed form ``E||x_hat||^2 / E<x_hat, x>`` (x_hat, x: [..., d])."""
    hh, hx, _ = _moments(x_hat, x)
    if hx <= 0:
        raise ValueError("E<x_hat, x> <= 0: no positive gamma minimises ||x_hat/gamma - x||^2")
    return hh / hx


def gamma_reverse_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """The form first printed as equation (10): ``E<x_hat, x> / E||x||^2`` (not the argmin)."""
    _, hx, xx = _moments(x_hat, x)
    return hx / xx


def gamma_inverse_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``E<x_hat, x> / E||x_hat||^2 = 1 / gamma``: the minimiser over ``u = 1/gamma``."""
    hh, hx, _ = _moments(x_hat, x)
    return hx / hh


def shrinkage_objective(gamma: float, x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``E_t ||x_hat_t / gamma - x_t||^2`` computed directly (float64)."""
    diff = x_hat.double() / gamma - x.double()
    return float(diff.pow(2).sum(-1).mean())


def gamma_numeric(x_hat: torch.Tensor, x: torch.Tensor, lo: float = 1e-3, hi: float = 1e3,
                  tol: float = 1e-12, max_iter: int = 500) -> float:
    """Minimise ``E||x_hat/gamma - x||^2`` over ``gamma`` in ``[lo, hi]`` by golden-section search
    on ``log gamma`` (the objective is unimodal in gamma > 0 when ``E<x_hat, x> > 0``)."""
    a, b = math.log(lo), math.log(hi)
    inv_phi = (math.sqrt(5) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = shrinkage_objective(math.exp(c), x_hat, x), shrinkage_objective(math.exp(d), x_hat, x)
    for _ in range(max_iter):
        if b - a < tol:
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = shrinkage_objective(math.exp(c), x_hat, x)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = shrinkage_objective(math.exp(d), x_hat, x)
    return math.exp((a + b) / 2)


def gamma_check(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """The three numbers side by side: ``numeric_argmin``, ``correct_closed_form``, ``reverse_closed_form``."""
    return {"numeric_argmin": gamma_numeric(x_hat, x),
            "correct_closed_form": gamma_closed_form(x_hat, x),
            "reverse_closed_form": gamma_reverse_form(x_hat, x)}


@torch.no_grad()
def sae_gamma(sae, x: torch.Tensor, batch_size: int = 4096) -> float:
    """Shrinkage ``gamma`` of ``sae`` on activations ``x`` [n, d_in] (correct closed form, batched)."""
    p = next(sae.parameters())
    hh = hx = 0.0
    n = 0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size].to(p.device, p.dtype)
        xh = sae(xb).double()
        hh += float(xh.pow(2).sum())
        hx += float((xh * xb.double()).sum())
        n += len(xb)
    return hh / hx
