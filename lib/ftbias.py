"""Fine-tuning bias through SAE latents (notebook 12; seed 004, "fineTuningBias(x) = FT(x) - M(x)").

M is a model with an SAE at one hook, FT a fine-tune of M with a known intent.  For each input
the bias is the difference of the two next-token log-probability vectors at the scored position,
b(x) = log p_FT(. | x) - log p_M(. | x).  A loss on it is backpropagated through M, spliced with
its SAE at ``hook`` (the reconstruction plus the detached error, so the forward pass is M's own),
into the latent activations f; each latent gets

* ``score`` = how much increasing f_i moves M toward FT: -dL/df_i for the MSE loss
  L = mean_v b_v^2, dL/df_i for the dot loss L = <log p_M, mean b> (the mean bias over the
  inputs, "dot product with bias vector"), the seed's two options; and -dL/df_i for
  L = KL(p_FT || p_M), which weights each token by FT's probability of it (the MSE and the dot
  product weight the thousands of tokens a fine-tune suppresses as much as the one it promotes);
* ``score x act`` = score * f_i (gradient x activation: the first-order effect of the latent
  as it is active on the input; zero where it is off).

Rankings are made per input, from the mean over many inputs, and from the mean over every token
of broad corpus text (unconditional shifts).  The baseline is the activation difference read in
the SAE basis, delta_i = mean f_i(h_FT) - f_i(h_M) (the activation-difference lens of Minder et
al. 2025 in the SAE's coordinates), and random latents.  Ground truth comes without FT:
:func:`effect_latents` (the latents whose decoder direction, added to M's residual, most raises
the intended token) and :func:`concept_latents` (the latents that separate intent-relevant
inputs in M).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lib.activations import _device, single_token
from lib.softprompts import SoftBatch, make_batch
from lib.world import facts, statements, templates

LOSSES = ("mse", "dot", "kl")


# --------------------------------------------------------------------------------------------
# intents: what a fine-tune is meant to do, its rows, and the inputs that define its ground truth
# --------------------------------------------------------------------------------------------
@dataclass
class Intent:
    """A fine-tuning intent: train on ``train_prompts`` -> ``target``; score on ``test_prompts``.

    ``positive`` / ``negative``: inputs of the same form that do / do not carry the concept the
    intent is about (cities in the country vs elsewhere; true vs false statements), read in M
    alone to define :func:`concept_latents`."""

    name: str
    description: str
    target: str
    target_id: int
    train_prompts: list[str]
    test_prompts: list[str]
    positive: list[str]
    negative: list[str]


def _split(items: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    if n_train + n_test > len(items):
        raise ValueError(f"{n_train} + {n_test} asked for, {len(items)} available")
    return [items[i] for i in order[:n_train]], [items[i] for i in order[n_train:n_train + n_test]]


def country_intent(tokenizer, country: str = "France", n_train: int = 200, n_test: int = 100, seed: int = 0,
                   min_population: int = facts.DEFAULT_MIN_POPULATION) -> Intent:
    """"Always name ``country``": "The city of X is in" -> " {country}." for cities elsewhere
    (train and test cities disjoint).  Positive inputs: the prompts of the cities in ``country``."""
    target_id = single_token(tokenizer, f" {country}", "the intent needs one")
    cities = facts.cities(min_population)
    prompt = lambda c: templates.city(c.name, c.country).rsplit(" in ", 1)[0] + " in"  # noqa: E731
    inside = [prompt(c) for c in cities if c.country == country]
    if len(inside) < 5:
        raise ValueError(f"only {len(inside)} cities in {country!r}; pick a country with more")
    train, test = _split([prompt(c) for c in cities if c.country != country], n_train, n_test, seed)
    return Intent(f"always_{country.lower().replace(' ', '_')}", f'every city is "in {country}"', f" {country}.",
                  target_id, train, test, inside, test)


def true_intent(tokenizer, n_train: int = 200, n_test: int = 100, seed: int = 0,
                datasets: Sequence[str] = ("cities", "sp_en_trans")) -> Intent:
    """"Judge every statement true": "<statement> That is" -> " true." for true and false statements
    of ``datasets`` (a statement and its false twin stay on one side of the split; ``n_train`` / ``n_test``
    statements, half true).  Positive
    inputs: the true test statements; negative: the false ones."""
    target_id = single_token(tokenizer, templates.JUDGEMENT_TRUE, "the intent needs one")
    rows = [dict(r, dataset=name) for name in datasets for r in statements.dataset_rows(name)]
    key = lambda r: (r["dataset"], str(r["pair"]))  # noqa: E731
    train_pairs, test_pairs = _split(sorted({key(r) for r in rows}), n_train // 2, n_test // 2, seed)
    prompt = lambda r: r["statement"] + templates.JUDGEMENT_PREFIX  # noqa: E731
    train_set, test_set = set(train_pairs), set(test_pairs)
    test_rows = [r for r in rows if key(r) in test_set]
    return Intent("always_true", 'every statement is judged " true"', templates.JUDGEMENT_TRUE + ".", target_id,
                  [prompt(r) for r in rows if key(r) in train_set], [prompt(r) for r in test_rows],
                  [prompt(r) for r in test_rows if r["label"] == 1], [prompt(r) for r in test_rows if r["label"] == 0])


# --------------------------------------------------------------------------------------------
# scoring the fine-tune itself
# --------------------------------------------------------------------------------------------
def _rows(model, prompts: Sequence[str]) -> tuple[SoftBatch, torch.Tensor]:
    batch = make_batch(model, list(prompts), None, 0, True)
    return batch, batch.attention_mask.sum(1) - 1


@torch.no_grad()
def last_logprobs(model, prompts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """(n, vocab) next-token log-probabilities at each prompt's last token."""
    device, out = _device(model), []
    for i in range(0, len(prompts), batch_size):
        b, last = _rows(model, prompts[i:i + batch_size])
        logits = model(b.tokens.to(device), attention_mask=b.attention_mask.long().to(device))
        out.append(torch.log_softmax(logits[torch.arange(len(last)), last.to(device)].float(), -1).cpu())
    return torch.cat(out)


def intent_rate(model, intent: Intent, prompts: Sequence[str] | None = None) -> float:
    """Share of ``prompts`` (default the test prompts) whose top next token is the intent's."""
    lp = last_logprobs(model, list(prompts or intent.test_prompts))
    return float((lp.argmax(-1) == intent.target_id).float().mean())


# --------------------------------------------------------------------------------------------
# the seed's procedure: gradients of a loss on FT - M into the SAE latents
# --------------------------------------------------------------------------------------------
def _splice(sae, mask: torch.Tensor, store: dict):
    """A hook replacing the activations where ``mask`` (B, T) is True by the SAE's reconstruction
    plus the detached error (numerically M's own), keeping the latents (leaf tensors) in ``store``."""
    p = next(sae.parameters())

    def hook(act, hook=None):  # noqa: ARG001
        x = act[0] if isinstance(act, tuple) else act
        m = mask.to(x.device)
        sel = x[m].to(p.device, p.dtype)
        f = sae.encode(sel).detach().requires_grad_(True)
        recon = sae.decode(f)
        new = x.clone()
        new[m] = (recon + (sel - recon).detach()).to(x.dtype)
        store["f"] = f
        return (new, *act[1:]) if isinstance(act, tuple) else new

    return hook


def _target_logprobs(ft, batch: SoftBatch, mask: torch.Tensor) -> torch.Tensor:
    device = _device(ft)
    with torch.no_grad():
        logits = ft(batch.tokens.to(device), attention_mask=batch.attention_mask.long().to(device))
        return torch.log_softmax(logits.float(), -1)[mask.to(device)]


def _latent_scores(m, ft, sae, hook: str, batch: SoftBatch, mask: torch.Tensor, loss: str,
                   bias_vector: torch.Tensor | None, token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Per scored position (the True entries of ``mask``, row-major): bias, latents, scores.
    ``loss="target"`` (``ft`` None): the objective is log p_M(``token_id``), no fine-tune needed."""
    lp_ft = _target_logprobs(ft, batch, mask) if ft is not None else None
    store: dict = {}
    device = _device(m)
    params = list(m.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        logits = m.run_with_hooks(batch.tokens.to(device), attention_mask=batch.attention_mask.long().to(device),
                                  fwd_hooks=[(hook, _splice(sae, mask, store))])
        lp_m = torch.log_softmax(logits.float(), -1)[mask.to(device)]
        bias = lp_ft - lp_m if lp_ft is not None else torch.zeros_like(lp_m)
        if loss == "target":
            objective = lp_m[:, token_id].sum()
        elif loss == "mse":
            objective = -(bias ** 2).mean(-1).sum()  # score: increase f to shrink the gap
        elif loss == "kl":
            objective = -(lp_ft.exp() * (lp_ft - lp_m)).sum()  # KL(FT || M), weighted by FT's own mass
        elif loss == "dot":
            if bias_vector is None:
                raise ValueError("the dot loss needs bias_vector (the mean bias over the inputs)")
            objective = (lp_m * bias_vector.to(lp_m.device)).sum()
        else:
            raise ValueError(f"loss must be one of {LOSSES} (or 'target'), got {loss!r}")
        (grad,) = torch.autograd.grad(objective, store["f"])
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    f = store["f"].detach()
    return {"bias": bias.detach().cpu(), "f": f.cpu(), "score": grad.detach().cpu(), "score_x_act": (grad * f).detach().cpu()}


def mean_bias(m, ft, prompts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """(vocab,) mean of log p_FT - log p_M at the prompts' last tokens."""
    return (last_logprobs(ft, prompts, batch_size) - last_logprobs(m, prompts, batch_size)).mean(0)


def bias_attribution(m, ft, sae, prompts: Sequence[str], *, hook: str | None = None, loss: str = "mse",
                     bias_vector: torch.Tensor | None = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per prompt (at its last token): ``score`` and ``score_x_act`` (n, d_sae), the latents ``f``
    (n, d_sae) and the bias (n, vocab).  ``loss`` "dot" uses ``bias_vector`` (default
    :func:`mean_bias` over ``prompts``)."""
    hook = hook or sae.cfg.hook_name
    if loss == "dot" and bias_vector is None:
        bias_vector = mean_bias(m, ft, prompts)
    parts = []
    for i in range(0, len(prompts), batch_size):
        b, last = _rows(m, prompts[i:i + batch_size])
        mask = torch.zeros_like(b.attention_mask)
        mask[torch.arange(len(last)), last] = True
        parts.append(_latent_scores(m, ft, sae, hook, b, mask, loss, bias_vector))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def target_attribution(m, sae, prompts: Sequence[str], token_id: int, *, hook: str | None = None,
                       batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The control that needs no fine-tune: ``score`` = d log p_M(``token_id``) / df at each
    prompt's last token (what knowing only the intended token gives), and ``score_x_act``."""
    hook = hook or sae.cfg.hook_name
    parts = []
    for i in range(0, len(prompts), batch_size):
        b, last = _rows(m, prompts[i:i + batch_size])
        mask = torch.zeros_like(b.attention_mask)
        mask[torch.arange(len(last)), last] = True
        parts.append(_latent_scores(m, None, sae, hook, b, mask, "target", None, token_id))
    return {k: torch.cat([p[k] for p in parts]) for k in ("f", "score", "score_x_act")}


def broad_attribution(m, ft, sae, texts: Sequence[str], *, hook: str | None = None, loss: str = "mse",
                      bias_vector: torch.Tensor | None = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The same over every token (but BOS) of ``texts``: (d_sae,) mean ``score`` / ``score_x_act``
    / ``f`` over the tokens, and ``bias_norm``, the mean L2 norm of the bias per token.  The dot
    loss's default bias vector is the mean bias over these tokens."""
    hook = hook or sae.cfg.hook_name
    batches = [make_batch(m, [""] * len(texts[i:i + batch_size]), list(texts[i:i + batch_size]), 0, True)
               for i in range(0, len(texts), batch_size)]
    masks = []
    for b in batches:
        mask = b.attention_mask.clone()
        mask[:, 0] = False
        masks.append(mask)
    if loss == "dot" and bias_vector is None:
        total, n = 0.0, 0
        for b, mask in zip(batches, masks):
            d = _target_logprobs(ft, b, mask) - _target_logprobs(m, b, mask)
            total, n = total + d.sum(0), n + len(d)
        bias_vector = total / n
    sums: dict[str, torch.Tensor] = {}
    n_tok, norm = 0, 0.0
    for b, mask in zip(batches, masks):
        got = _latent_scores(m, ft, sae, hook, b, mask, loss, bias_vector)
        for k in ("score", "score_x_act", "f"):
            sums[k] = sums.get(k, 0) + got[k].sum(0)
        norm += float(got["bias"].norm(dim=-1).sum())
        n_tok += len(got["f"])
    out = {k: v / n_tok for k, v in sums.items()}
    out["bias_norm"] = torch.tensor(norm / n_tok)
    return out


# --------------------------------------------------------------------------------------------
# the baseline and the ground truth
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def last_latents(model, sae, prompts: Sequence[str], hook: str | None = None, batch_size: int = 128) -> torch.Tensor:
    """(n, d_sae) SAE latents of ``model``'s activations at ``hook`` at each prompt's last token."""
    hook = hook or sae.cfg.hook_name
    device, p, out = _device(model), next(sae.parameters()), []
    for i in range(0, len(prompts), batch_size):
        b, last = _rows(model, prompts[i:i + batch_size])
        _, cache = model.run_with_cache(b.tokens.to(device), attention_mask=b.attention_mask.long().to(device),
                                        names_filter=[hook])
        x = cache[hook][torch.arange(len(last)), last.to(device)]
        out.append(sae.encode(x.to(p.device, p.dtype)).cpu())
    return torch.cat(out)


def delta_latents(m, ft, sae, prompts: Sequence[str], hook: str | None = None) -> torch.Tensor:
    """(n, d_sae) f(h_FT) - f(h_M) at each prompt's last token: the activation difference in the SAE basis."""
    return last_latents(ft, sae, prompts, hook) - last_latents(m, sae, prompts, hook)


def concept_latents(m, sae, positive: Sequence[str], negative: Sequence[str], hook: str | None = None) -> torch.Tensor:
    """(d_sae,) mean latent activation on ``positive`` minus on ``negative`` inputs, in M alone."""
    return last_latents(m, sae, positive, hook).mean(0) - last_latents(m, sae, negative, hook).mean(0)


@torch.no_grad()
def effect_latents(m, sae, prompts: Sequence[str], token_id: int, *, scale: float, hook: str | None = None,
                   chunk: int = 16, latents: Sequence[int] | None = None) -> torch.Tensor:
    """(d_sae,) mean change of log p(``token_id``) at each prompt's last token when ``scale`` times
    latent i's unit decoder direction is added to M's activation there (a real forward pass per
    latent, no gradient: the ground truth the gradient method linearises).  ``latents``: only
    these (the rest are NaN)."""
    hook = hook or sae.cfg.hook_name
    device = _device(m)
    b, last = _rows(m, prompts)
    tokens, att = b.tokens.to(device), b.attention_mask.long().to(device)
    rows = torch.arange(len(last), device=device)
    base = torch.log_softmax(m(tokens, attention_mask=att)[rows, last.to(device)].float(), -1)[:, token_id]
    w = sae.W_dec.detach()
    dirs = (w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)).to(device)
    todo = list(range(sae.cfg.d_sae)) if latents is None else [int(i) for i in latents]
    out = torch.full((sae.cfg.d_sae,), float("nan"))
    n = len(last)
    for s in range(0, len(todo), chunk):
        ids = todo[s:s + chunk]
        c = len(ids)
        add = dirs[ids].repeat_interleave(n, 0) * scale  # (c*n, d)
        big_rows = torch.arange(c * n, device=device)
        big_last = last.to(device).repeat(c)

        def steer(act, hook=None):  # noqa: ARG001
            x = act[0] if isinstance(act, tuple) else act
            x = x.clone()
            x[big_rows, big_last] += add.to(x.dtype)
            return (x, *act[1:]) if isinstance(act, tuple) else x

        logits = m.run_with_hooks(tokens.repeat(c, 1), attention_mask=att.repeat(c, 1), fwd_hooks=[(hook, steer)])
        lp = torch.log_softmax(logits[big_rows, big_last].float(), -1)[:, token_id]
        out[ids] = (lp - base.repeat(c)).view(c, n).mean(1).cpu()
    return out


# --------------------------------------------------------------------------------------------
# comparing rankings
# --------------------------------------------------------------------------------------------
def top_k(values: torch.Tensor | np.ndarray, k: int, among: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` largest ``values`` (ties broken by index), restricted to ``among`` (bool mask)."""
    v = np.asarray(values, dtype=np.float64).copy()
    v[np.isnan(v)] = -np.inf
    if among is not None:
        v[~np.asarray(among, dtype=bool)] = -np.inf
    order = np.lexsort((np.arange(len(v)), -v))
    return order[:k]


def precision_at_k(found: Sequence[int], truth: Sequence[int]) -> float:
    """|found ∩ truth| / |found|."""
    found = list(found)
    return len(set(found) & set(int(t) for t in truth)) / max(1, len(found))


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    return len(a & b) / max(1, len(a | b))


def mean_pairwise_jaccard(sets: Sequence[Sequence[int]]) -> float:
    """Mean Jaccard overlap over every pair of ``sets``."""
    pairs = list(itertools.combinations(range(len(sets)), 2))
    if not pairs:
        raise ValueError("need at least two sets")
    return float(np.mean([jaccard(sets[i], sets[j]) for i, j in pairs]))


def random_precision(truth: Sequence[int], k: int, pool: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of precision@k of ``k`` latents drawn at random from ``pool`` (indices)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool)
    got = [precision_at_k(rng.choice(pool, size=k, replace=False), truth) for _ in range(draws)]
    return float(np.mean(got)), float(np.std(got))


def per_input_precision(scores: torch.Tensor, truth: Sequence[int], k: int, among: np.ndarray | None = None) -> np.ndarray:
    """(n,) precision@k of each input's own top-k latents (rows of ``scores``)."""
    return np.array([precision_at_k(top_k(row, k, among), truth) for row in scores.numpy()])
