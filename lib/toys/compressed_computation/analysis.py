"""What a trained compressed-computation MLP does: per-feature responses and fidelity, which
neurons serve which features, where their input directions lie, and parameter-component
attributions (a component is one neuron) compared with true ablations."""
from __future__ import annotations

import numpy as np
import torch

from lib.toys.compressed_computation.model import _gen, mlp_target, num_threads, sample_active_rows


@torch.no_grad()
def feature_response(A: torch.Tensor, B: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """MLP output on feature i when only feature i is present with value x: ``(n, len(xs))``.

    ``f_i(x) = sum_j ReLU(x A_ij) B_ji``; the target is ``ReLU(x)`` (mix has zero diagonal).
    """
    pre = xs[None, :, None] * A[:, None, :]  # (n, X, h)
    return (torch.relu(pre) * B.T[:, None, :]).sum(-1)


@torch.no_grad()
def feature_fidelity(A: torch.Tensor, B: torch.Tensor, n_grid: int = 201) -> torch.Tensor:
    """Per feature, ``int (f_i - ReLU)^2 / int ReLU^2`` over x in [-1, 1]: 0 exact, 1 dropped. ``(n,)``."""
    xs = torch.linspace(-1, 1, n_grid)
    f = feature_response(A, B, xs)
    r = torch.relu(xs)
    return (f - r).pow(2).mean(-1) / r.pow(2).mean()


def classify_features(fidelity: torch.Tensor, exact: float = 0.05, dropped: float = 0.5) -> list[str]:
    """``"exact"`` (relative error < exact), ``"dropped"`` (>= dropped) or ``"approximate"``."""
    return ["exact" if e < exact else "dropped" if e >= dropped else "approximate" for e in fidelity.tolist()]


@torch.no_grad()
def neuron_feature_counts(A: torch.Tensor, B: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """How many features each neuron serves: ``#{i : A_ij > 0 and A_ij B_ji > threshold}``. ``(h,)``.

    ``A_ij B_ji`` is the slope neuron j adds to feature i's own output for positive x_i (target
    slope 1); a neuron "serves" i when it supplies more than ``threshold`` of it.
    """
    slope = A * B.T  # (n, h)
    return ((A > 0) & (slope > threshold)).sum(0)


@torch.no_grad()
def eigenspace_overlap(A: torch.Tensor, mix: torch.Tensor, k: int | None = None) -> dict[str, float]:
    """Fraction of ``||A||_F^2`` (neuron input directions) in mix's top-k / bottom-k eigenspaces.

    A random A puts ``k/n`` in each.  ``k`` defaults to h.
    """
    n, h = A.shape
    k = k or h
    evals, evecs = torch.linalg.eigh(mix.double())  # ascending
    a = A.double()
    tot = float(a.pow(2).sum())
    top = float((evecs[:, -k:].T @ a).pow(2).sum()) / tot
    bottom = float((evecs[:, :k].T @ a).pow(2).sum()) / tot
    return {"top": top, "bottom": bottom, "chance": k / n}


# ----------------------------------------------------------------------------------------------
# Parameter-component attribution (a component = one neuron: column j of W_in, row j of W_out)
# ----------------------------------------------------------------------------------------------
def masked_sample_loss(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, masks: torch.Tensor
) -> torch.Tensor:
    """Per-sample loss with each component's parameters scaled by its mask.

    Scaling component j's parameters (``A[:, j]`` and ``B[j, :]``) by ``m_j`` gives
    ``out = (ReLU((x A) * m) * m) B``.  x: ``(R, n)``; masks: ``(..., R, h)`` or ``(h,)``;
    returns ``(..., R)``: the mean over features of the squared error per sample.
    """
    pre = (x @ A) * masks
    err = (torch.relu(pre) * masks) @ B - mlp_target(x, mix)
    return err.pow(2).mean(-1)


def component_attributions(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    mix: torch.Tensor | None,
    ig_steps: int = 32,
    chunk: int = 10,
) -> dict[str, torch.Tensor]:
    """Per-sample, per-component estimates of the loss change from ablating the component.

    Returns ``(R, h)`` tensors, each "how much the sample's loss rises when component j is removed":

    * ``"ablation"``: ``L(m = 1 - e_j) - L(1)``: the true loss change (one forward per component).
    * ``"gradient"``: gradient x weight, ``sum_theta theta dL/dtheta`` over the component's
      parameters ``= dL/dm_j`` at m = 1, times the change ``0 - 1``: first-order Taylor.
    * ``"integrated_gradients"``: minus the IG of m_j on the straight path from all components
      ablated (m = 0) to none (m = 1), ``-int_0^1 dL/dm_j(a 1) da`` (midpoint rule, ``ig_steps``);
      completeness: they sum over j to ``L(0) - L(1)``, the change from ablating all.

    Averaging over samples gives the attribution for the mean loss (all three are linear in it).
    """
    R, h = x.shape[0], A.shape[1]
    ones = torch.ones(R, h)
    with torch.no_grad():
        base = masked_sample_loss(x, A, B, mix, ones)  # (R,)
        abl = torch.zeros(R, h)
        eye = torch.eye(h)
        for j0 in range(0, h, chunk):
            js = range(j0, min(h, j0 + chunk))
            m = (1 - eye[list(js)])[:, None, :].expand(len(js), R, h)
            abl[:, j0 : j0 + len(js)] = (masked_sample_loss(x, A, B, mix, m) - base).T
    m = ones.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(masked_sample_loss(x, A, B, mix, m).sum(), m)
    grad_attr = -g
    ig = torch.zeros(R, h)
    for k in range(ig_steps):
        a = (k + 0.5) / ig_steps
        m = (a * ones).requires_grad_(True)
        (g,) = torch.autograd.grad(masked_sample_loss(x, A, B, mix, m).sum(), m)
        ig += g / ig_steps
    return {"ablation": abl, "gradient": grad_attr, "integrated_gradients": -ig}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else float("nan")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.from_numpy(np.argsort(np.argsort(a.flatten().numpy(), kind="stable"), kind="stable").astype(float))
    rb = torch.from_numpy(np.argsort(np.argsort(b.flatten().numpy(), kind="stable"), kind="stable").astype(float))
    return _pearson(ra, rb)


def attribution_table(attr: dict[str, torch.Tensor], truth: str = "ablation") -> dict[str, dict[str, float]]:
    """Correlation of each method with the true loss change (``attr[truth]``).

    ``per_input_pearson``: over all (sample, component) pairs; ``per_input_spearman``: same, rank;
    ``mean_pearson`` / ``mean_spearman``: over the h components of the sample-averaged values.
    """
    t = attr[truth]
    out = {}
    for name, a in attr.items():
        out[name] = {
            "per_input_pearson": _pearson(a, t),
            "per_input_spearman": _spearman(a, t),
            "mean_pearson": _pearson(a.mean(0), t.mean(0)),
            "mean_spearman": _spearman(a.mean(0), t.mean(0)),
        }
    return out


def feature_summary(A: torch.Tensor, B: torch.Tensor, threshold: float = 0.1) -> dict[str, object]:
    """Counts of exactly / approximately computed / dropped features and features per neuron."""
    fid = feature_fidelity(A, B)
    kinds = classify_features(fid)
    counts = neuron_feature_counts(A, B, threshold)
    return {
        "exact": kinds.count("exact"),
        "approximate": kinds.count("approximate"),
        "dropped": kinds.count("dropped"),
        "features_per_neuron": counts.tolist(),
        "fidelity": fid,
        "kinds": kinds,
    }


def attribution_experiment(
    A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, p: float, n_rows: int = 2000, ig_steps: int = 32,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, float]]:
    """Component attributions on ``n_rows`` inputs with a feature present, their correlation table,
    and IG's completeness check (mean over inputs of the IG sum and of the ablate-everything change)."""
    with num_threads(1):
        x, _ = sample_active_rows(n_rows, A.shape[0], p, _gen("attribution", seed, float(p)))
        attr = component_attributions(x, A, B, mix, ig_steps=ig_steps)
        h = A.shape[1]
        with torch.no_grad():
            all_off = masked_sample_loss(x, A, B, mix, torch.zeros(h)) - masked_sample_loss(x, A, B, mix, torch.ones(h))
    completeness = {
        "ig_sum": float(attr["integrated_gradients"].sum(1).mean()),
        "ablate_all": float(all_off.mean()),
        "sum_of_single_ablations": float(attr["ablation"].sum(1).mean()),
    }
    return attr, attribution_table(attr), completeness
