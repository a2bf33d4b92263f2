"""Interventions: add a scaled direction to the residual stream (or any hook point) at chosen positions.

>>> from lib.interventions import add_direction_hook, judgement_logit_diff
>>> hooks = [("blocks.0.hook_resid_post", add_direction_hook(direction, alpha=4.0, columns=cols))]
>>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
>>> diff = judgement_logit_diff(model, statements, "blocks.0.hook_resid_post", direction, alpha=4.0)

``judgement_logit_diff`` is the causal check of the truth probes: it appends the judgement prefix
(" That is") to each statement, adds ``alpha * direction`` at the statement's last token (the
period, where the probe reads) at one hook point, and returns logit(" true") - logit(" false")
at the last position.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.activations import TokenBatch, next_token_logits, tokenize
from lib.world.templates import JUDGEMENT_FALSE, JUDGEMENT_PREFIX, JUDGEMENT_TRUE


def add_direction_hook(direction: torch.Tensor | np.ndarray, alpha: float | torch.Tensor = 1.0,
                       columns: torch.Tensor | None = None):
    """A forward hook adding ``alpha * direction`` to the activation.

    direction: (d,).  alpha: a float, or (B,) one scale per row.  columns: (B,) the position in
    each row to change, or None for every position.  Works on (B, T, d) activations.
    """
    direction = torch.as_tensor(np.asarray(direction) if not isinstance(direction, torch.Tensor) else direction)

    def hook_fn(act, hook):
        x = act[0] if isinstance(act, tuple) else act
        vec = direction.to(x.device, x.dtype)
        scale = torch.as_tensor(alpha, device=x.device, dtype=x.dtype)
        if columns is None:
            x = x + (scale.reshape(-1, 1, 1) if scale.dim() else scale) * vec
        else:
            x = x.clone()
            rows = torch.arange(x.shape[0], device=x.device)
            cols = columns.to(x.device)
            x[rows, cols] = x[rows, cols] + (scale.reshape(-1, 1) if scale.dim() else scale) * vec
        return (x, *act[1:]) if isinstance(act, tuple) else x

    return hook_fn


def judgement_token_ids(model, prefix: str = JUDGEMENT_PREFIX, true: str = JUDGEMENT_TRUE,
                        false: str = JUDGEMENT_FALSE) -> tuple[int, int]:
    """Ids of the first tokens where ``prefix + true`` and ``prefix + false`` differ (any tokenizer)."""
    a, b = tokenize(model, [prefix + true, prefix + false], prepend_bos=False).sequences()
    for x, y in zip(a, b):
        if x != y:
            return int(x), int(y)
    raise ValueError(f"{prefix + true!r} and {prefix + false!r} tokenize to the same prefix")


def statement_end_positions(model, statements: Sequence[str], prefix: str = JUDGEMENT_PREFIX,
                            prepend_bos: bool = True) -> np.ndarray:
    """(n,) position of each statement's last token inside ``statement + prefix``.

    Raises ``ValueError`` if appending the prefix changes how the statement itself tokenizes.
    """
    alone = tokenize(model, statements, prepend_bos=prepend_bos).sequences()
    joined = tokenize(model, [s + prefix for s in statements], prepend_bos=prepend_bos).sequences()
    for i, (a, j) in enumerate(zip(alone, joined)):
        if len(j) <= len(a) or not np.array_equal(j[: len(a)], a):
            raise ValueError(f"appending {prefix!r} re-tokenizes statement {i} ({statements[i]!r}); "
                             "its last token cannot be located")
    return np.array([len(a) - 1 for a in alone])


INTERVENTION_POSITIONS = ("period", "answer")


def judgement_logit_diff(model, statements: Sequence[str], hook: str | None = None,
                         direction: torch.Tensor | np.ndarray | None = None, alpha: float = 0.0, *,
                         prefix: str = JUDGEMENT_PREFIX, prepend_bos: bool = True,
                         batch_size: int = 32, position: str = "period") -> np.ndarray:
    """(n,) logit(true) - logit(false) after ``statement + prefix``, with ``alpha * direction`` added
    at ``hook`` (no intervention when ``hook`` is None or alpha is 0) on one token of each row:
    ``position="period"``, the statement's last token (where the truth probes read); ``"answer"``,
    the prefix's last token (the " is" of " That is", where the next token is the judgement).
    """
    if position not in INTERVENTION_POSITIONS:
        raise ValueError(f"position must be one of {INTERVENTION_POSITIONS}, got {position!r}")
    true_id, false_id = judgement_token_ids(model, prefix)
    texts = [s + prefix for s in statements]
    fwd = None
    if hook is not None and direction is not None and alpha != 0:
        if position == "period":
            ends = torch.as_tensor(statement_end_positions(model, statements, prefix, prepend_bos))
        else:
            ends = tokenize(model, texts, prepend_bos=prepend_bos).lengths - 1

        def fwd(batch: TokenBatch):
            cols = batch.column(ends[batch.index])
            return [(hook, add_direction_hook(direction, alpha, cols))]

    logits = next_token_logits(model, texts, [true_id, false_id], prepend_bos=prepend_bos,
                               batch_size=batch_size, fwd_hooks_for=fwd)
    return logits[:, 0] - logits[:, 1]


def causal_sweep(model, statements: Sequence[str], labels: Sequence[int], hook: str,
                 directions: Mapping[str, np.ndarray], alphas: Sequence[float],
                 **kwargs) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-direction, per-alpha effect of adding ``alpha * direction`` at each statement's last token.

    Returns a long frame with columns ``direction, alpha, mean_delta`` (mean change of
    logit(true) - logit(false) over all statements), ``mean_delta_true`` / ``mean_delta_false``
    (over the true / false statements) and ``flip_rate`` (the fraction of statements whose
    judgement sign ends up on the side the intervention pushes towards: "true" for alpha > 0,
    "false" for alpha < 0, among those that started on the other side).  The attribute
    ``frame.attrs["baseline"]`` keeps the unsteered (n,) logit differences.
    """
    labels = np.asarray(labels).astype(bool)
    base = judgement_logit_diff(model, statements, **kwargs)
    rows = []
    for name, vec in directions.items():
        for a in alphas:
            diff = base if a == 0 else judgement_logit_diff(model, statements, hook, vec, a, **kwargs)
            delta = diff - base
            start = base <= 0 if a > 0 else base > 0
            moved = (diff > 0) if a > 0 else (diff <= 0)
            rows.append({
                "direction": name, "alpha": float(a), "mean_delta": float(delta.mean()),
                "mean_delta_true": float(delta[labels].mean()) if labels.any() else float("nan"),
                "mean_delta_false": float(delta[~labels].mean()) if (~labels).any() else float("nan"),
                "flip_rate": float(moved[start].mean()) if a != 0 and start.any() else 0.0,
            })
    return pd.DataFrame(rows), base


def normalized_indirect_effect(sweep: pd.DataFrame, baseline: np.ndarray, labels: Sequence[int],
                               alpha: float) -> pd.DataFrame:
    """The Geometry of Truth's normalised indirect effect (NIE) from ``causal_sweep``'s frame and baseline.

    On logit(true) - logit(false) with baseline class means ``m_true`` and ``m_false``:
    ``false_to_true`` = (mean change of the false statements at ``+alpha``) / (m_true - m_false),
    ``true_to_false`` = -(mean change of the true statements at ``-alpha``) / (m_true - m_false).
    1 means the intervention makes false statements look exactly as true as true ones (or the
    reverse); 0 means no effect.  One row per direction.
    """
    labels = np.asarray(labels).astype(bool)
    gap = float(baseline[labels].mean() - baseline[~labels].mean())
    rows = {}
    for name, part in sweep.groupby("direction", sort=False):
        up = part.loc[np.isclose(part["alpha"], alpha)]
        down = part.loc[np.isclose(part["alpha"], -alpha)]
        if up.empty or down.empty:
            raise KeyError(f"the sweep has no alpha = +-{alpha} for direction {name!r}")
        rows[name] = {"false_to_true": float(up["mean_delta_false"].iloc[0]) / gap,
                      "true_to_false": -float(down["mean_delta_true"].iloc[0]) / gap}
    return pd.DataFrame.from_dict(rows, orient="index")
