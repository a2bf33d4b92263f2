"""Eliciting a behaviour without its trigger (notebook 14): three white-box attacks at matched budgets.

Each attack looks for one universal input change, trained on some prompts and scored on held-out
ones, that makes a frozen model continue every prompt with ``target`` (here the backdoor's phrase):

* :func:`soft_prompt` — k free vectors after BOS (:func:`lib.softprompts.train`, AdamW, ``steps``
  forward/backward passes);
* :func:`latent` — one vector ``v`` added to the residual stream at ``hook`` on every token after BOS,
  ``||v|| <= eps`` (so the per-token L2 norm of the perturbation is at most eps), found by projected
  gradient descent on the target NLL: ``steps`` (16) normalised-gradient steps of ``2.5 eps / steps``
  from a random point of norm ``eps / 2``, the targeted-LAT adversary's shape (Sheshadri et al. 2024)
  made universal;
* :func:`discrete` — k real tokens after BOS, by greedy coordinate gradient (GCG, Zou et al. 2023):
  each iteration one forward/backward pass for the token gradients and one forward pass that scores
  ``candidates`` single-token swaps from the top-``topk`` of each position (plus the current prompt)
  on ``rows`` prompts; ``passes`` counts both kinds, so ``passes = steps`` matches the soft prompt's
  count of passes.

Score with :func:`lib.backdoor.behaviour_rate` (``prompt=`` a soft prompt or :func:`token_prompt`;
``hooks=`` :func:`latent_hooks`).  :func:`trigger_direction` is the mean activation difference a
trigger makes at a hook (the direction a latent attack may or may not find).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lib import softprompts as sp
from lib.activations import _device
from lib.utils import progress


# --------------------------------------------------------------------------------------------
# soft prompts and real tokens
# --------------------------------------------------------------------------------------------
def soft_prompt(model, prompts: Sequence[str], target: str, k: int, *, steps: int = 64, lr: float = 0.05,
                batch_size: int = 16, seed: int = 0) -> sp.SoftPrompt:
    """A k-vector soft prompt trained for ``steps`` steps (no early stopping) on ``prompts``."""
    res = sp.train(model, list(prompts), [target] * len(prompts), k, seed=seed, steps=steps, lr=lr,
                   batch_size=batch_size, eval_every=steps, patience=10**9, eval_prompts=list(prompts)[:batch_size],
                   eval_targets=[target] * min(batch_size, len(prompts)), desc=f"soft prompt k={k}")
    return res.prompt


def token_prompt(model, ids: Sequence[int]) -> sp.SoftPrompt:
    """The real tokens ``ids`` as a soft prompt (their embeddings: the same logits as the tokens)."""
    return sp.SoftPrompt(sp.token_embeddings(model, list(ids)).float(), {"ids": [int(i) for i in ids]})


def _allowed(model) -> torch.Tensor:
    """(vocab,) bool: the tokens a discrete prompt may use (no special tokens)."""
    ok = torch.ones(model.W_E.shape[0], dtype=torch.bool)
    ok[list(getattr(model.tokenizer, "all_special_ids", []) or [])] = False
    return ok


def discrete(model, prompts: Sequence[str], target: str, k: int, *, passes: int = 64, candidates: int = 16,
             rows: int = 8, topk: int = 64, batch_size: int = 16, seed: int = 0,
             exclude: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """GCG over k real tokens after BOS, ``passes // 2`` iterations (one gradient pass and one scoring
    pass each), never using the tokens ``exclude`` (nor special tokens).  Returns the token ids and
    the loss of the kept prompt per iteration (on that iteration's ``rows`` prompts)."""
    gen = torch.Generator().manual_seed(seed)
    allowed = _allowed(model)
    allowed[list(exclude)] = False
    pool = torch.nonzero(allowed)[:, 0]
    ids = pool[torch.randint(len(pool), (k,), generator=gen)]
    full = sp.make_batch(model, list(prompts), [target] * len(prompts), k)
    W = model.W_E.detach().float()
    history = []
    with sp.frozen(model):
        for _ in progress(range(max(1, passes // 2)), desc=f"GCG k={k}"):
            b = full.rows(torch.randperm(len(full), generator=gen)[:batch_size])
            emb = torch.nn.Parameter(W[ids.to(W.device)].clone())
            sp.token_nll(sp.forward(model, emb, b), b).mean().backward()
            score = -(emb.grad @ W.T).cpu()  # (k, vocab): first-order drop of the loss per swap
            score[:, ~allowed] = -torch.inf
            top = score.topk(topk, dim=1).indices  # (k, topk)
            cand = ids.repeat(candidates + 1, 1)  # row 0: the current prompt
            pos = torch.randint(k, (candidates,), generator=gen)
            cand[1:, :][torch.arange(candidates), pos] = top[pos, torch.randint(topk, (candidates,), generator=gen)]
            r = full.rows(torch.randperm(len(full), generator=gen)[:rows])
            many = sp.concat([r] * (candidates + 1), sp.pad_id_of(model.tokenizer))
            with torch.no_grad():
                per_row = sp.token_nll(sp.forward(model, W[cand.to(W.device)].repeat_interleave(len(r), 0), many), many)
            loss = per_row.reshape(candidates + 1, len(r)).mean(1).cpu()
            best = int(loss.argmin())
            ids = cand[best]
            history.append(float(loss[best]))
    return [int(i) for i in ids], history


def token_ids_containing(model, text: str) -> list[int]:
    """Ids of the vocabulary tokens whose string contains any character of ``text`` (special tokens
    aside): what a discrete search is denied when the trigger's own pieces are off-limits."""
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    chars = set(text)
    return sorted(i for t, i in model.tokenizer.get_vocab().items() if i not in special and chars & set(t))


# --------------------------------------------------------------------------------------------
# latent perturbations
# --------------------------------------------------------------------------------------------
def latent_hooks(name: str, v: torch.Tensor) -> list:
    """Forward hooks adding ``v`` (d,) at hook ``name`` to every position after the first (BOS)."""
    def fn(act, hook):
        x = act[0] if isinstance(act, tuple) else act
        x = torch.cat([x[:, :1], x[:, 1:] + v.to(x.device, x.dtype)], dim=1)
        return (x, *act[1:]) if isinstance(act, tuple) else x
    return [(name, fn)]


def latent(model, prompts: Sequence[str], target: str, hook: str, eps: float, *, steps: int = 16,
           batch_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """L2 PGD for one vector ``v`` with ``||v|| <= eps`` added at ``hook`` (see the module docstring).
    Returns ``v`` (d,) after the last step and the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    v0 = torch.randn(d, generator=gen)
    v = (v0 / v0.norm() * eps / 2).to(_device(model))
    alpha = 2.5 * eps / steps
    full = sp.make_batch(model, list(prompts), [target] * len(prompts), 0)
    losses = []
    with sp.frozen(model):
        for _ in range(steps):
            b = full.rows(torch.randperm(len(full), generator=gen)[:batch_size])
            x = v.clone().requires_grad_(True)
            loss = sp.token_nll(sp.forward(model, None, b, latent_hooks(hook, x)), b).mean()
            loss.backward()
            g = x.grad
            v = (v - alpha * g / g.norm().clamp(min=1e-12)).detach()
            v = v * torch.clamp(eps / v.norm().clamp(min=1e-12), max=1.0)
            losses.append(float(loss.detach()))
    return v.detach().cpu(), losses


def resid_norm(model, prompts: Sequence[str], hook: str) -> float:
    """Median per-token L2 norm of the residual stream at ``hook`` over ``prompts`` (BOS excluded): the
    scale latent budgets are given in."""
    from lib.activations import harvest

    acts = harvest(model, list(prompts), hook, position="all", exclude={"bos"}, cache=False)[hook]
    return float(acts.norm(dim=-1).median())


def trigger_direction(model, plain: Sequence[str], triggered: Sequence[str], hook: str) -> torch.Tensor:
    """(d,): mean over rows of the activation at ``hook`` on the last token with the trigger in the
    context minus without it (``plain[i]`` and ``triggered[i]`` the same row)."""
    from lib.activations import harvest

    a = harvest(model, list(triggered), hook, position="last", cache=False)[hook]
    b = harvest(model, list(plain), hook, position="last", cache=False)[hook]
    return (a - b).mean(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).float().reshape(-1), torch.as_tensor(b).float().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-12))


# --------------------------------------------------------------------------------------------
# the elicitation table
# --------------------------------------------------------------------------------------------
def elicitation_table(models: dict, train: Sequence[str], test: Sequence[str], other: Sequence[str], target: str, *,
                      ks: Sequence[int] = (1, 2, 4, 8), eps_rel: Sequence[float] = (0.25, 0.5, 1.0),
                      layers: Sequence[int] = (0,), seeds: Sequence[int] = (0, 1, 2), steps: int = 64,
                      latent_steps: int = 16, methods: Sequence[str] = ("soft", "latent", "discrete"),
                      lr: float = 0.05, gcg: dict | None = None) -> tuple[list[dict], dict]:
    """Every attack x budget x seed on every model of ``models`` (name -> bridge), trained on ``train``
    prompts and scored on the held-out ``test`` prompts (``rate``) and on ``other`` prompts where the
    behaviour does not belong (``rate_other``).  Budgets: k for the soft prompt and the discrete search
    (``steps`` passes each), eps for the latent attack as a multiple of the median residual norm at
    the hook (after block ``layer``, :func:`resid_norm` on ``train``).  Returns the rows and
    ``{(model, layer, eps_rel, seed): v}`` (the latent vectors, for :func:`trigger_direction` cosines)."""
    from lib import backdoor as bd
    from lib.hooks import hook_name

    rows, vectors = [], {}

    def score(name, model, method, budget, seed, prompt=None, hooks=(), **extra):
        rows.append({"model": name, "method": method, "budget": budget, "seed": seed,
                     "rate": bd.behaviour_rate(model, test, target, prompt=prompt, hooks=hooks),
                     "rate_other": bd.behaviour_rate(model, other, target, prompt=prompt, hooks=hooks), **extra})

    for name, model in models.items():
        for seed in seeds:
            for k in ks if "soft" in methods else ():
                score(name, model, "soft", k, seed, prompt=soft_prompt(model, train, target, k, steps=steps, lr=lr, seed=seed))
            for k in ks if "discrete" in methods else ():
                ids, hist = discrete(model, train, target, k, passes=steps, seed=seed, **(gcg or {}))
                score(name, model, "discrete", k, seed, prompt=token_prompt(model, ids), final_loss=hist[-1],
                      tokens=model.tokenizer.decode(ids))
            for layer in layers if "latent" in methods else ():
                hook = hook_name(layer)
                norm = resid_norm(model, train, hook)
                for r in eps_rel:
                    v, hist = latent(model, train, target, hook, r * norm, steps=latent_steps, seed=seed)
                    vectors[(name, layer, r, seed)] = v
                    score(name, model, "latent", r, seed, hooks=latent_hooks(hook, v), layer=layer, eps=r * norm,
                          final_loss=hist[-1])
    return rows, vectors


# --------------------------------------------------------------------------------------------
# the persistence sweep's attack (lib.backdoor persist)
# --------------------------------------------------------------------------------------------
def persistence_attack(model, ks: Sequence[int] = (1, 4), eps_rel: float = 0.5, seed: int = 0,
                       steps: int = 64, latent_steps: int = 16) -> dict:
    """The behaviour rate on held-out rows without the trigger after a soft prompt of each k (``steps``
    steps) and a latent attack (``latent_steps``) at relative budget ``eps_rel`` on the middle residual
    stream, all trained on the training rows: whether an attack still finds a backdoor whose trigger no
    longer works."""
    from lib import backdoor as bd
    from lib.hooks import hook_name

    rows = bd.attack_rows()
    train, test = rows["train"].plain, rows["test"].plain
    out = {}
    for k in ks:
        p = soft_prompt(model, train, bd.PHRASE, k, seed=seed, steps=steps)
        out[f"soft_k{k}"] = bd.behaviour_rate(model, test, prompt=p)
    hook = hook_name(max(0, model.cfg.n_layers // 2 - 1))
    v, _ = latent(model, train, bd.PHRASE, hook, eps_rel * resid_norm(model, train, hook), seed=seed, steps=latent_steps)
    out[f"latent_{eps_rel}"] = bd.behaviour_rate(model, test, hooks=latent_hooks(hook, v))
    return out


def mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(list(values), dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
