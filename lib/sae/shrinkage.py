"""Relative reconstruction bias (shrinkage) of an SAE, Rajamanoharan et al. 2024 (arXiv 2404.16014), section 4.2.

    gamma = argmin_gamma  E_t ||x_hat_t / gamma - x_t||^2

(the paper's definition: ``1/gamma`` is the factor by which the reconstructions should be rescaled
to minimise the L2 reconstruction loss).  Writing ``u = 1/gamma``, the objective
``u^2 E||x_hat||^2 - 2u E<x_hat, x> + E||x||^2`` is a parabola in ``u`` with minimum at
``u* = E<x_hat, x> / E||x_hat||^2``, so

    gamma = E||x_hat||^2 / E<x_hat, x>                                     (:func:`gamma_closed_form`)

``gamma < 1`` means the SAE shrinks its reconstructions.  Other expressions that appear beside it:

- ``E<x_hat, x> / E||x||^2`` (:func:`gamma_reverse_form`) minimises the *other* problem
  ``argmin_g E||g x - x_hat||^2`` (scale ``x`` towards ``x_hat``);
- ``E_t[<x_hat_t, x_t> / ||x_t||^2]`` (:func:`gamma_projection_form`): the per-token projection
  coefficient averaged over tokens, the expression a public comment on the paper's LessWrong
  post (by S. Marks, per issue 15) proposed as the correct one;
- ``sqrt(E||x_hat||^2 / (E||x||^2 - E||x_hat - x||^2))`` (:func:`gamma_pythagorean_form`): NOT a
  sourced formula.  It is a hypothesis for the form first printed as the paper's equation (10),
  chosen because it reproduces that comment's 1-D number (1/sqrt(3) for ``x = 1``,
  ``x_hat = 1/2``) and the authors' reply that they "treated E||x_hat - x||^2 as though it were
  E||x_hat - gamma x||^2".  The printed formula itself was not recovered (notebook 04 records the
  sources, ``eq10_sources``); do not call this "eq. (10)".
- ``E<x_hat, x> / E||x_hat||^2`` (:func:`gamma_inverse_form`) is ``1/gamma``.

On one 1-D sample every form but the last two gives ``x_hat / x``; they part as soon as the
reconstructions are not one common multiple of their inputs: several 1-D samples (``x = (1, 2)``,
``x_hat = (1, 1)``: correct 2/3, reverse 3/5, projection 3/4), or a vector reconstructed at an angle.

:func:`gamma_numeric` minimises the defining objective directly (golden-section search over
``log gamma``), independently of every closed form.
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
    """``E<x_hat, x> / E||x||^2``: the argmin of ``E||g x - x_hat||^2`` over ``g`` (not of the definition)."""
    _, hx, xx = _moments(x_hat, x)
    return hx / xx


def gamma_inverse_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``E<x_hat, x> / E||x_hat||^2 = 1 / gamma``: the minimiser over ``u = 1/gamma``."""
    hh, hx, _ = _moments(x_hat, x)
    return hx / hh


def gamma_projection_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``E_t[<x_hat_t, x_t> / ||x_t||^2]``: per-token projection coefficients of ``x_hat`` on ``x``,
    averaged (the comment's proposed expression; tokens with ``x_t = 0`` are skipped)."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape")
    a, b = x_hat.double().reshape(-1, x.shape[-1]), x.double().reshape(-1, x.shape[-1])
    xx = b.pow(2).sum(-1)
    keep = xx > 0
    return float(((a * b).sum(-1)[keep] / xx[keep]).mean())


def gamma_pythagorean_form(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``sqrt(E||x_hat||^2 / (E||x||^2 - E||x_hat - x||^2))``: an UNSOURCED reconstruction of the
    first-printed equation (10) (see the module docstring); NaN when the denominator is <= 0
    (below 1e-6 of ``E||x_hat||^2``: zero up to float32 rounding)."""
    hh, hx, _ = _moments(x_hat, x)
    denom = 2 * hx - hh  # = E||x||^2 - E||x_hat - x||^2, without the cancellation of computing both
    return math.sqrt(hh / denom) if denom > 1e-6 * hh else float("nan")


def gamma_forms(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Every form side by side, with the direct numerical argmin of the definition."""
    return {"numeric_argmin": gamma_numeric(x_hat, x), "correct_closed_form": gamma_closed_form(x_hat, x),
            "reverse_form": gamma_reverse_form(x_hat, x), "projection_form": gamma_projection_form(x_hat, x),
            "pythagorean_form": gamma_pythagorean_form(x_hat, x)}


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


@torch.no_grad()
def shrinkage_point(sae, x: torch.Tensor) -> dict[str, float]:
    """``gamma`` (correct closed form), ``l0`` (mean non-zero latents per token) and
    ``var_explained`` (``1 - E||x - x_hat||^2 / E||x - mean x||^2``) of ``sae`` on ``x`` [n, d_in]."""
    p = next(sae.parameters())
    xb = x.to(p.device, p.dtype)
    x_hat, f = sae(xb, output_features=True)
    resid = (xb - x_hat).double().pow(2).sum(-1).mean()
    total = (xb - xb.mean(0)).double().pow(2).sum(-1).mean()
    return {"gamma": gamma_closed_form(x_hat, xb), "l0": float((f != 0).sum(-1).double().mean()),
            "var_explained": float(1 - resid / total)}


def value_at(xs, ys, x0: float, log_x: bool = True) -> float:
    """Piecewise-linear interpolation of the curve ``(xs, ys)`` at ``x0`` (in ``log x`` when
    ``log_x``); ``xs`` need not be sorted.  NaN outside the curve's range: no extrapolation."""
    pts = sorted(zip(xs, ys))
    if not pts or not (pts[0][0] <= x0 <= pts[-1][0]):
        return float("nan")
    t = (lambda v: math.log(v)) if log_x else (lambda v: v)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        if xa <= x0 <= xb:
            if xb == xa:
                return (ya + yb) / 2
            w = (t(x0) - t(xa)) / (t(xb) - t(xa))
            return ya + w * (yb - ya)
    return pts[0][1]  # a single point equal to x0


def mean_std(values) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite numbers in ``values`` (std with ddof = 1, 0 for one
    value; mean and std NaN when none is finite): a spread over training seeds."""
    v = [float(a) for a in values if a is not None and math.isfinite(float(a))]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(v) / len(v)
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(v)}
