"""Inference-time optimisation (ITO): re-solve an SAE's sparse code per input, with its decoder fixed.

Given decoder rows ``W_dec`` [d_sae, d_in] and bias ``b_dec`` [d_in], find for each input ``x``
a code ``c`` [d_sae] with at most ``k`` non-zeros minimising ``||x - (c @ W_dec + b_dec)||^2``.

Two greedy solvers, batched over inputs, on whatever device the tensors live:

- ``"gp"``, gradient pursuit (Blumensath & Davies 2008): each iteration adds the atom most
  correlated with the residual to the support, then takes one exact line-search gradient step on
  the coefficients of the support (``step = ||g||^2 / ||g @ W_dec||^2``).  With orthonormal atoms
  this is orthogonal matching pursuit and recovers a ``k``-sparse code exactly in ``k`` steps.
- ``"mp"``, matching pursuit: each iteration adds ``<d_i, r> / ||d_i||^2`` to the best atom's
  coefficient (an atom may be chosen again, so L0 can end below ``k``).

With ``nonneg=True`` (SAE latents are non-negative) atoms are chosen by the largest *positive*
correlation, coefficients are clamped at zero after each step, and a row stops early once no atom
correlates positively with its residual.  ``k`` is one integer or one per input (e.g. the
encoder's own per-token L0, for a comparison at matched L0).
"""
from __future__ import annotations

from typing import Callable

import torch


def _as_k(k: int | torch.Tensor, n: int, device) -> torch.Tensor:
    if isinstance(k, torch.Tensor):
        if k.shape != (n,):
            raise ValueError(f"k must be an int or a tensor of shape ({n},), got {tuple(k.shape)}")
        return k.to(device=device, dtype=torch.long)
    return torch.full((n,), int(k), dtype=torch.long, device=device)


@torch.no_grad()
def _pursuit(W: torch.Tensor, y: torch.Tensor, k: torch.Tensor, method: str, nonneg: bool,
             refine_steps: int) -> torch.Tensor:
    """y [n, d] (centred inputs), W [m, d], k [n] -> codes [n, m]."""
    n, m = y.shape[0], W.shape[0]
    norms = W.norm(dim=-1).clamp_min(1e-12)
    c = y.new_zeros(n, m)
    support = torch.zeros(n, m, dtype=torch.bool, device=y.device)
    r = y.clone()
    live = k > 0
    rows = torch.arange(n, device=y.device)
    for step in range(int(k.max()) if n else 0):
        live = live & (step < k)
        if not bool(live.any()):
            break
        corr = r @ W.T  # [n, m]
        score = corr / norms
        if not nonneg:
            score = score.abs()
        if method == "gp":
            score = score.masked_fill(support, float("-inf"))
        best, idx = score.max(-1)
        if nonneg:
            live = live & (best > 0)
        if method == "gp":
            support[rows[live], idx[live]] = True
            _gp_step(W, y, c, r, support, live, nonneg)
        else:
            delta = corr[rows, idx] / norms[idx].pow(2)
            upd = torch.zeros_like(c)
            upd[rows[live], idx[live]] = delta[live]
            c = c + upd
            if nonneg:
                c = c.clamp_min(0)
            r = y - c @ W
    if method == "gp":
        everyone = k > 0
        for _ in range(refine_steps):
            _gp_step(W, y, c, r, support & (c != 0) if nonneg else support, everyone, nonneg)
    return c


def _gp_step(W, y, c, r, support, live, nonneg) -> None:
    """One exact line-search gradient step on the support (in place on c and r = y - c @ W)."""
    g = (r @ W.T) * support  # minus the gradient of 0.5 ||r||^2, restricted to the support
    Wg = g @ W
    denom = Wg.pow(2).sum(-1)
    step = torch.where(denom > 0, g.pow(2).sum(-1) / denom.clamp_min(1e-30), torch.zeros_like(denom))
    step = torch.where(live, step, torch.zeros_like(step))
    c.add_(step[:, None] * g)
    if nonneg:
        c.clamp_(min=0)
    r.copy_(y - c @ W)


def ito_encode(W_dec: torch.Tensor, b_dec: torch.Tensor | None, x: torch.Tensor, k: int | torch.Tensor,
               method: str = "gp", nonneg: bool = True, refine_steps: int = 0,
               batch_size: int = 4096) -> torch.Tensor:
    """Sparse codes [n, d_sae] of ``x`` [n, d_in] for the fixed decoder ``W_dec`` [d_sae, d_in] (+ ``b_dec``).

    ``k``: target L0 (int or [n]); ``method``: ``"gp"`` | ``"mp"``; ``refine_steps``: extra
    gradient steps on the final support (gp only); computed in batches of ``batch_size`` inputs
    on the device of ``W_dec`` and returned there, in ``x``'s dtype.
    """
    if method not in ("gp", "mp"):
        raise ValueError(f"method must be 'gp' (gradient pursuit) or 'mp' (matching pursuit), got {method!r}")
    if x.shape[-1] != W_dec.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} dims but the decoder writes {W_dec.shape[-1]}")
    dev = W_dec.device
    W = W_dec.detach().double()
    b = b_dec.detach().double() if b_dec is not None else torch.zeros(W.shape[1], dtype=W.dtype, device=dev)
    kk = _as_k(k, len(x), dev)
    out = []
    for i in range(0, len(x), batch_size):
        y = x[i: i + batch_size].detach().to(dev).double() - b
        out.append(_pursuit(W, y, kk[i: i + batch_size], method, nonneg, refine_steps))
    return torch.cat(out).to(x.dtype) if out else x.new_zeros(0, W.shape[0])


@torch.no_grad()
def _support_lstsq(W: torch.Tensor, y: torch.Tensor, support: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """y [n, d] (centred), W [m, d], support [n, m] bool -> codes [n, m]: least squares on each row's
    support, batched; with ``nonneg`` the rows whose solution has a negative coefficient are
    re-solved exactly by non-negative least squares (Lawson-Hanson, scipy), one by one."""
    n, m = support.shape
    kmax = int(support.sum(-1).max()) if n else 0
    if kmax == 0:
        return y.new_zeros(n, m)
    # each row's support atoms, padded with zero rows (masked out) to kmax
    order = torch.sort(support.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :kmax]
    valid = torch.gather(support, 1, order)  # [n, kmax]
    A = W[order] * valid[..., None]  # [n, kmax, d]
    gram = A @ A.transpose(1, 2)  # [n, kmax, kmax]
    scale = gram.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-30)
    eye = torch.eye(kmax, dtype=W.dtype, device=W.device)
    # padded slots get a unit diagonal (their coefficient solves to 0); a tiny ridge keeps a
    # rank-deficient support (duplicate atoms) solvable
    gram = gram + eye * (~valid)[..., None].to(W.dtype) + eye * (1e-12 * scale)[:, None, None]
    coef = torch.linalg.solve(gram, A @ y[..., None])[..., 0] * valid  # [n, kmax]
    if nonneg:
        from scipy.optimize import nnls

        for i in ((coef < 0) & valid).any(-1).nonzero()[:, 0].tolist():
            k = int(valid[i].sum())
            sol, _ = nnls(A[i, :k].T.cpu().numpy(), y[i].cpu().numpy(), maxiter=50 * k)
            coef[i] = 0
            coef[i, :k] = torch.from_numpy(sol).to(coef)
    return y.new_zeros(n, m).scatter(1, order, coef)


def refit_support(W_dec: torch.Tensor, b_dec: torch.Tensor | None, x: torch.Tensor, codes: torch.Tensor,
                  nonneg: bool = True, batch_size: int = 4096) -> torch.Tensor:
    """Codes [n, d_sae] with the support of ``codes`` (the encoder's choice of latents) and the
    magnitudes that minimise ``||x - (c @ W_dec + b_dec)||^2`` on that support: exact least squares
    per input, with ``nonneg`` (SAE latents are non-negative) exact non-negative least squares.

    The control that separates better *latents* from better *magnitudes*: ITO may change both,
    this only the second, so encoder -> refit -> ITO splits the gain in two.
    """
    if codes.shape != (len(x), W_dec.shape[0]):
        raise ValueError(f"codes must be [n, d_sae] = [{len(x)}, {W_dec.shape[0]}], got {tuple(codes.shape)}")
    dev = W_dec.device
    W = W_dec.detach().double()
    b = b_dec.detach().double() if b_dec is not None else torch.zeros(W.shape[1], dtype=W.dtype, device=dev)
    out = []
    for i in range(0, len(x), batch_size):
        y = x[i: i + batch_size].detach().to(dev).double() - b
        out.append(_support_lstsq(W, y, codes[i: i + batch_size].to(dev) != 0, nonneg))
    return torch.cat(out).to(x.dtype) if out else x.new_zeros(0, W.shape[0])


def refit_sae(sae, x: torch.Tensor, codes: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """:func:`refit_support` for ``sae``'s decoder on the encoder's own support (or ``codes``'s)."""
    p = next(sae.parameters())
    x = x.to(p.device, p.dtype)
    if codes is None:
        with torch.no_grad():
            codes = sae.encode(x)
    return refit_support(sae.W_dec, sae.b_dec, x, codes, **kwargs)


def ito_sae(sae, x: torch.Tensor, k: int | torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """ITO codes for ``sae``'s decoder; ``k=None`` matches the encoder's per-input L0."""
    p = next(sae.parameters())
    x = x.to(p.device, p.dtype)
    if k is None:
        with torch.no_grad():
            k = (sae.encode(x) != 0).sum(-1)
    return ito_encode(sae.W_dec, sae.b_dec, x, k, **kwargs)


def threshold_codes(f: torch.Tensor, T: float) -> torch.Tensor:
    """Zero every activation with ``|f| < T`` (the seed's "round activations below T down to 0")."""
    return torch.where(f.abs() < T, torch.zeros_like(f), f)


def code_replacement(sae, coder: str = "encoder", T: float = 0.0, **ito_kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice function ``a [..., d_in] -> decode(threshold(code(a), T))`` for ``lib.sae.splice``,
    carrying the SAE's ``hook_name`` (so splicing it needs no hook argument).

    ``coder``: ``"encoder"`` (the SAE's own code), ``"support_refit"`` (the encoder's support with
    least-squares magnitudes, :func:`refit_sae`) or ``"ito"`` (ITO at the encoder's per-token L0;
    ``ito_kwargs`` go to :func:`ito_sae`).
    """
    coders = {"encoder": lambda flat: sae.encode(flat), "support_refit": lambda flat: refit_sae(sae, flat),
              "ito": lambda flat: ito_sae(sae, flat, **ito_kwargs)}
    if coder not in coders:
        raise ValueError(f"coder must be one of {', '.join(map(repr, coders))}, got {coder!r}")
    p = next(sae.parameters())

    @torch.no_grad()
    def fn(a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(-1, a.shape[-1]).to(p.device, p.dtype)
        f = coders[coder](flat)
        return sae.decode(threshold_codes(f, T)).reshape(a.shape).to(a.device, a.dtype)

    fn.hook_name = sae.cfg.hook_name
    return fn


def threshold_sweep(sae, model, x: torch.Tensor, tokens, thresholds, codes: dict[str, torch.Tensor],
                    refine_steps: int = 0, context_size: int = 128) -> dict:
    """Reconstruction and spliced CE of each code in ``codes`` (``"encoder"`` / ``"support_refit"`` / ``"ito"``: [n, d_sae]
    codes of ``x`` [n, d_in]) after zeroing activations below each threshold ``T``.

    Returns ``{"thresholds", "{name}_mse", "{name}_ve" (variance explained), "{name}_ce" (CE with
    the thresholded code spliced in over ``tokens``, recomputed per token by
    :func:`code_replacement`), "{name}_l0", "ce_clean"}``, lists over ``thresholds``.
    """
    from lib.sae.metrics import splice_check

    tv = float((x - x.mean(0)).pow(2).sum(-1).mean())
    curves: dict = {"thresholds": list(thresholds)}
    curves.update({f"{name}_{k}": [] for k in ("mse", "ve", "ce", "l0") for name in codes})
    for T in thresholds:
        for name, f in codes.items():
            ft = threshold_codes(f, T)
            with torch.no_grad():
                mse = float((sae.decode(ft) - x).pow(2).sum(-1).mean())
            ce = splice_check(model, tokens, code_replacement(sae, name, T, refine_steps=refine_steps),
                              context_size=context_size)
            curves[f"{name}_mse"].append(mse)
            curves[f"{name}_ve"].append(1 - mse / tv)
            curves[f"{name}_ce"].append(ce["ce_spliced"])
            curves[f"{name}_l0"].append(float((ft != 0).sum(-1).float().mean()))
    curves["ce_clean"] = ce["ce_clean"]
    return curves
