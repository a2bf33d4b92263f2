"""Soft prompts: k trainable input embeddings prepended to the input of a frozen model.

The soft vectors replace the token embeddings of k placeholder positions at ``hook_embed`` (the
token embedding, before positional embeddings are added), so they enter every model
:func:`lib.models.load_model` returns the way a token does; a soft prompt made of real token
embeddings gives exactly the logits of those tokens.  Each row is laid out as

    [BOS] [soft_1 ... soft_k] prompt tokens  target tokens

and the behavioural loss is the NLL of the target tokens (or any differentiable score of the
logits, ``loss_fn``).  The model's weights never change and never receive gradients.

>>> from lib import softprompts as sp
>>> result = sp.train(model, prompts, targets, k=4, steps=200)
>>> sp.target_nll(model, result.prompt, held_prompts, held_targets)   # nats per row
>>> sp.generate(model, result.prompt, ["The city of Paris is in"], max_new_tokens=3)
>>> result.prompt.save("data/softprompts/france.pt"); sp.SoftPrompt.load(...)
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.activations import _device, pad_id_of
from lib.utils import progress

EMBED_HOOK = "hook_embed"
INITS = ("random", "vocab", "text")
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# the prompt
# --------------------------------------------------------------------------------------------
@dataclass
class SoftPrompt:
    """``embeddings``: (k, d_model) float tensor; ``meta``: how it was made (init, steps, loss)."""

    embeddings: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.embeddings.shape[0])

    def save(self, path: str | Path) -> Path:
        from lib.results import atomic_output

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            torch.save({"embeddings": self.embeddings.detach().cpu(), "meta": self.meta}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SoftPrompt":
        blob = torch.load(Path(path), weights_only=True)
        return cls(blob["embeddings"], blob.get("meta", {}))

    def perturbed(self, eps: float, generator: torch.Generator | None = None) -> "SoftPrompt":
        """A copy moved by a random direction of norm ``eps * ||e_i||`` in each vector ``e_i``."""
        e = self.embeddings.detach()
        return SoftPrompt(e + random_moves(e, eps, 1, generator)[0], {**self.meta, "perturbed_eps": eps})


def random_moves(e: torch.Tensor, eps: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, k, d): random directions, one per soft vector e_i, each of norm ``eps * ||e_i||``."""
    noise = torch.randn((n,) + tuple(e.shape), generator=generator, dtype=e.dtype).to(e.device)
    return noise / noise.norm(dim=-1, keepdim=True) * e.norm(dim=-1, keepdim=True) * eps


def token_embeddings(model, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(len(ids), d_model): what ``hook_embed`` carries for these token ids."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.W_E.device)
    return model.W_E[ids].detach().clone()


def init_embeddings(model, k: int, init: str = "vocab", text: str | None = None, seed: int = 0) -> torch.Tensor:
    """Starting vectors for a k-token soft prompt.

    - ``"random"``: Gaussian with the per-coordinate mean and std of the embedding matrix.
    - ``"vocab"``: the embeddings of k vocabulary tokens drawn at random (no special tokens).
    - ``"text"``: the embeddings of ``text``'s tokens, cut to k or cycled up to k.
    """
    if k < 1:
        raise ValueError(f"a soft prompt needs k >= 1 vectors, got {k}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    W = model.W_E.detach()
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        mean, std = W.mean(0).cpu(), W.std(0).cpu()
        return (mean + std * torch.randn(k, W.shape[1], generator=gen)).to(W.device, W.dtype)
    if init == "vocab":
        special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        pool = torch.tensor([i for i in range(W.shape[0]) if i not in special])
        return token_embeddings(model, pool[torch.randint(len(pool), (k,), generator=gen)])
    if not text:
        raise ValueError("init='text' needs the text to start from: init_embeddings(model, k, 'text', text='...')")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"text {text!r} has no tokens")
    return token_embeddings(model, [ids[i % len(ids)] for i in range(k)])


# --------------------------------------------------------------------------------------------
# batches: [BOS] [k placeholders] prompt target
# --------------------------------------------------------------------------------------------
@dataclass
class SoftBatch:
    """tokens / attention_mask: (B, T); target_mask: (B, T) True on the target tokens;
    soft_start: column of the first soft vector; k: number of soft columns."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    soft_start: int
    k: int

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, idx: torch.Tensor | Sequence[int]) -> "SoftBatch":
        """The rows ``idx``, trimmed to their longest row."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        width = int(self.attention_mask[idx].sum(1).max())
        return SoftBatch(self.tokens[idx, :width], self.attention_mask[idx, :width], self.target_mask[idx, :width],
                         self.soft_start, self.k)

    def chunks(self, size: int):
        """Consecutive batches of at most ``size`` rows."""
        for s in range(0, len(self), size):
            yield self.rows(range(s, min(s + size, len(self))))

    def to(self, device) -> "SoftBatch":
        return SoftBatch(self.tokens.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                         self.soft_start, self.k)


def _ids(model, texts: Sequence[str]) -> list[list[int]]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string; wrap it in a list")
    return [list(x) for x in model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if len(texts) else []


def make_batch(model, prompts: Sequence[str], targets: Sequence[str] | None, k: int,
               prepend_bos: bool = True, placeholder: int | None = None) -> SoftBatch:
    """Right-padded rows ``[BOS] + k placeholders + prompt + target`` (targets may be None or "").

    ``k = 0`` gives the plain model's rows (no soft prompt), the baseline of every curve."""
    targets = [""] * len(prompts) if targets is None else list(targets)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    tok = model.tokenizer
    if prepend_bos and tok.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
    fill = pad_id_of(tok) if placeholder is None else int(placeholder)
    head = ([tok.bos_token_id] if prepend_bos else []) + [fill] * k
    p_ids, t_ids = _ids(model, prompts), _ids(model, [t for t in targets])
    rows = [head + p + t for p, t in zip(p_ids, t_ids)]
    if not rows:
        raise ValueError("no prompts")
    if not any(p_ids[i] or head for i in range(len(rows))):
        raise ValueError("a row has nothing before its target: give a prompt, k >= 1 or prepend_bos")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    width = max(len(r) for r in rows)
    if n_ctx and width > n_ctx:
        raise ValueError(f"a row is {width} tokens long (k={k} soft + prompt + target), more than n_ctx={n_ctx}")
    tokens = torch.full((len(rows), width), pad_id_of(tok), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, t) in enumerate(zip(rows, t_ids)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        target[i, len(r) - len(t):len(r)] = True
    return SoftBatch(tokens, mask, target, len(head) - k, k)


def soft_hook(embeddings: torch.Tensor, start: int):
    """A ``hook_embed`` hook that writes ``embeddings`` into columns ``start .. start+k-1``: (k, d)
    the same vectors in every row, or (B, k, d) one prompt per row."""
    k = embeddings.shape[-2]

    def hook_fn(act, hook):
        x = act[0] if isinstance(act, tuple) else act
        e = embeddings.to(x.device, x.dtype)
        e = e.unsqueeze(0).expand(x.shape[0], -1, -1) if e.dim() == 2 else e
        x = torch.cat([x[:, :start], e, x[:, start + k:]], dim=1)
        return (x, *act[1:]) if isinstance(act, tuple) else x

    return hook_fn


def forward(model, prompt: SoftPrompt | torch.Tensor | None, batch: SoftBatch, hooks: Sequence = ()) -> torch.Tensor:
    """Logits (B, T, vocab) of ``batch`` with the soft vectors in place (``prompt`` None: k = 0;
    a (B, k, d) tensor: one prompt per row); ``hooks``: more ``(name, fn)`` forward hooks (e.g. a
    latent perturbation, :mod:`lib.elicitation`)."""
    emb = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    k = 0 if emb is None else emb.shape[-2]
    if k != batch.k:
        raise ValueError(f"the batch was made for k={batch.k} soft tokens, the prompt has {k}")
    if emb is not None and emb.dim() == 3 and emb.shape[0] != len(batch):
        raise ValueError(f"{emb.shape[0]} per-row prompts for a batch of {len(batch)} rows")
    device = _device(model)
    hooks = ([] if emb is None else [(EMBED_HOOK, soft_hook(emb, batch.soft_start))]) + list(hooks)
    return model.run_with_hooks(batch.tokens.to(device), fwd_hooks=hooks,
                                attention_mask=batch.attention_mask.long().to(device))


def token_nll(logits: torch.Tensor, batch: SoftBatch) -> torch.Tensor:
    """(B,) summed NLL (nats) of each row's target tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tokens, target = batch.tokens.to(logits.device), batch.target_mask.to(logits.device)
    lp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return -(lp * target[:, 1:]).sum(-1)


def _mean_nll(logits: torch.Tensor, batch: SoftBatch) -> torch.Tensor:
    return token_nll(logits, batch).mean()


def target_nll(model, prompt: SoftPrompt | torch.Tensor | None, prompts: Sequence[str], targets: Sequence[str],
               batch_size: int = 64, prepend_bos: bool = True) -> np.ndarray:
    """(n,) NLL in nats of each target given [BOS] + soft prompt + prompt (None: no soft prompt)."""
    emb = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    k = 0 if emb is None else emb.shape[0]
    full = make_batch(model, list(prompts), list(targets), k, prepend_bos)
    with torch.no_grad():
        return np.concatenate([token_nll(forward(model, emb, b), b).double().cpu().numpy()
                               for b in full.chunks(batch_size)])


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(model):
    """The model's parameters with ``requires_grad=False`` inside the block (restored after)."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class TrainResult:
    prompt: SoftPrompt
    log: dict  # "step", "loss" (train, mean nats per row), "eval_step", "eval_loss"
    steps_run: int
    stopped_early: bool


LossFn = Callable[[torch.Tensor, SoftBatch], torch.Tensor]


@dataclass
class Task:
    """One soft prompt to train: its (prompt, target) rows, optional held-out rows for early
    stopping (default: the training rows), its seed (initialisation and row order), an optional
    loss ``loss_fn(logits, batch) -> scalar`` (default: mean summed target NLL) and a name."""

    prompts: Sequence[str]
    targets: Sequence[str]
    eval_prompts: Sequence[str] | None = None
    eval_targets: Sequence[str] | None = None
    seed: int = 0
    loss_fn: LossFn | None = None
    init_text: str | None = None
    name: str = ""

    def __post_init__(self):
        self.prompts, self.targets = list(self.prompts), list(self.targets)
        if len(self.prompts) != len(self.targets) or not self.prompts:
            raise ValueError(f"need as many targets as prompts (got {len(self.prompts)} and "
                             f"{len(self.targets)}), at least one")
        if (self.eval_prompts is None) != (self.eval_targets is None):
            raise ValueError("give eval_prompts and eval_targets together")


def concat(batches: Sequence[SoftBatch], pad_id: int = 0) -> SoftBatch:
    """The rows of several batches of one layout (same ``soft_start`` and ``k``) in one batch."""
    if len({(b.soft_start, b.k) for b in batches}) != 1:
        raise ValueError("batches with different soft-prompt layouts cannot be joined")
    width = max(b.tokens.shape[1] for b in batches)

    def grow(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    return SoftBatch(torch.cat([grow(b.tokens, pad_id) for b in batches]),
                     torch.cat([grow(b.attention_mask, False) for b in batches]),
                     torch.cat([grow(b.target_mask, False) for b in batches]), batches[0].soft_start, batches[0].k)


def train(model, prompts: Sequence[str], targets: Sequence[str], k: int, *, eval_prompts=None, eval_targets=None,
          seed: int = 0, loss_fn: LossFn | None = None, init_text: str | None = None, **options) -> TrainResult:
    """Train a k-token soft prompt so that the frozen ``model`` continues each prompt with its target.

    One :class:`Task` through :func:`train_many`; ``options`` are its (init, steps, lr, ...)."""
    task = Task(prompts, targets, eval_prompts, eval_targets, seed=seed, loss_fn=loss_fn, init_text=init_text)
    return train_many(model, [task], k, **options)[0]


def train_many(model, tasks: Sequence[Task], k: int, *, init: str = "vocab", steps: int = 300, lr: float = 0.05,
               weight_decay: float = 0.0, warmup: int = 10, batch_size: int = 32, eval_every: int = 25,
               patience: int = 4, target_loss: float | None = None, prepend_bos: bool = True,
               desc: str | None = None) -> list[TrainResult]:
    """Train one k-token soft prompt per task, all in the same forward passes.

    Each step draws ``batch_size`` rows of every task still training; row r sees its task's
    prompt, and the loss is the sum over tasks of each task's mean loss, so each prompt's gradient
    is the one it would get alone.  AdamW (elementwise, so the prompts do not interact) with a
    cosine schedule after ``warmup`` steps.  Early stopping per task: every ``eval_every`` steps
    its held-out loss is measured; a task stops after ``patience`` checks without improvement or
    once below ``target_loss``, keeps its best prompt, and leaves the batch.  Training one prompt
    per seed or behavior this way fills a GPU; on a CPU, which a batch of ~64 rows already keeps
    busy, it is about as fast as one run after another.
    """
    if not tasks:
        raise ValueError("no tasks to train")
    device = _device(model)
    P = len(tasks)
    start = torch.stack([init_embeddings(model, k, init, text=t.init_text, seed=t.seed).float() for t in tasks])
    emb = torch.nn.Parameter(start.to(device))
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    gens = [torch.Generator().manual_seed(t.seed) for t in tasks]
    full = [make_batch(model, t.prompts, t.targets, k, prepend_bos) for t in tasks]  # tokenized once
    ev = [make_batch(model, t.eval_prompts or t.prompts, t.eval_targets or t.targets, k, prepend_bos) for t in tasks]
    pad = pad_id_of(model.tokenizer)

    def evaluate(p: int) -> float:
        fn = tasks[p].loss_fn or _mean_nll
        with torch.no_grad():
            return float(sum(fn(forward(model, emb[p].detach(), b), b) * len(b) for b in ev[p].chunks(128))) / len(ev[p])

    logs = [{"step": [], "loss": [], "eval_step": [], "eval_loss": []} for _ in tasks]
    best = [math.inf] * P
    best_emb = [emb[p].detach().clone() for p in range(P)]
    bad, steps_run = [0] * P, [steps] * P
    active = list(range(P))
    with frozen(model):
        for step in progress(range(steps), desc=desc or f"soft prompts k={k} x{P}", leave=False):
            parts = [full[p].rows(torch.randperm(len(full[p]), generator=gens[p])[:batch_size]) for p in active]
            b = concat(parts, pad)
            owner = torch.cat([torch.full((len(x),), p, dtype=torch.long) for p, x in zip(active, parts)]).to(device)
            logits = forward(model, emb[owner], b)
            row_nll = token_nll(logits, b) if any(tasks[p].loss_fn is None for p in active) else None
            losses, row = [], 0
            for p, x in zip(active, parts):  # one NLL pass for all rows: slicing logits per task costs more
                fn = tasks[p].loss_fn
                losses.append(row_nll[row:row + len(x)].mean() if fn is None
                              else fn(logits[row:row + len(x), :x.tokens.shape[1]], x))
                row += len(x)
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            opt.step()
            sched.step()
            for p, value in zip(active, losses):
                logs[p]["step"].append(step)
                logs[p]["loss"].append(float(value.detach()))
            if (step + 1) % eval_every == 0 or step == steps - 1:
                for p in list(active):
                    value = evaluate(p)
                    logs[p]["eval_step"].append(step + 1)
                    logs[p]["eval_loss"].append(value)
                    if value < best[p] - 1e-4:
                        best[p], best_emb[p], bad[p] = value, emb[p].detach().clone(), 0
                    else:
                        bad[p] += 1
                    if (target_loss is not None and value <= target_loss) or bad[p] >= patience:
                        active.remove(p)
                        steps_run[p] = step + 1
                if not active:
                    break
    results = []
    for p, t in enumerate(tasks):
        meta = {"k": k, "init": init, "seed": t.seed, "lr": lr, "steps_run": steps_run[p], "best_eval_loss": best[p],
                "task": t.name, "model": getattr(model, "compendium_name", None)}
        results.append(TrainResult(SoftPrompt(best_emb[p], meta), logs[p], steps_run[p], steps_run[p] < steps))
    return results


def loss_gradient_norm(model, prompt: SoftPrompt, prompts: Sequence[str], targets: Sequence[str],
                       prepend_bos: bool = True) -> tuple[float, float]:
    """(mean target NLL, norm of its gradient with respect to the soft vectors) at ``prompt``."""
    emb = torch.nn.Parameter(prompt.embeddings.detach().float().clone().to(_device(model)))
    with frozen(model):
        b = make_batch(model, list(prompts), list(targets), prompt.k, prepend_bos)
        loss = token_nll(forward(model, emb, b), b).mean()
        loss.backward()
    return float(loss.detach()), float(emb.grad.norm())


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    logits = logits.float().cpu()
    if temperature > 0:
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
    return logits.argmax(-1)


@torch.no_grad()
def generate_ids(hf, rows: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, emb: torch.Tensor | None = None,
                 soft_start: int = 0) -> list[list[int]]:
    """New token ids after each row of ids, from a Hugging Face causal LM with its KV cache.

    ``emb`` (k, d): vectors that replace the token embeddings of columns ``soft_start ..
    soft_start + k - 1`` (given to the model as ``inputs_embeds``, as ``hook_embed`` does in the
    bridge).  Greedy when ``temperature`` is 0, else sampled with ``generator``.  Rows of one
    length run together (no padding), shortest first."""
    embed = hf.get_input_embeddings()
    device = embed.weight.device
    gen = generator or torch.Generator().manual_seed(0)
    k = 0 if emb is None else emb.shape[-2]
    out: list[list[int] | None] = [None] * len(rows)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    for length in sorted(by_len):
        idx = by_len[length]
        x = embed(torch.tensor([list(rows[i]) for i in idx], device=device))
        if emb is not None:
            x = torch.cat([x[:, :soft_start], emb.to(device, x.dtype).expand(len(idx), -1, -1), x[:, soft_start + k:]], 1)
        res = hf(inputs_embeds=x, use_cache=True)
        new = []
        for t in range(max_new_tokens):
            nxt = _pick(res.logits[:, -1], temperature, gen)
            new.append(nxt)
            if t < max_new_tokens - 1:
                res = hf(input_ids=nxt[:, None].to(device), past_key_values=res.past_key_values, use_cache=True)
        for j, i in enumerate(idx):
            out[i] = [int(n[j]) for n in new]
    return out


@torch.no_grad()
def generate(model, prompt: SoftPrompt | torch.Tensor | None, prompts: Sequence[str], max_new_tokens: int = 20,
             temperature: float = 0.0, seed: int = 0, stop_at: str | None = None, prepend_bos: bool = True,
             batch_size: int = 64, use_cache: bool = True) -> list[str]:
    """Continue each prompt after [BOS] + soft prompt: greedy when ``temperature`` is 0, sampled
    otherwise (seeded).  Returns the generated text only, cut after the first ``stop_at``.

    ``use_cache`` (default): run the Hugging Face model under the bridge with a KV cache, the soft
    vectors given as input embeddings (greedy output identical to the bridge's, tested); hooks
    added to the bridge do not apply there.  ``use_cache=False`` reruns the bridge on the whole
    sequence for every new token (slow; with the bridge's hooks)."""
    emb = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    k = 0 if emb is None else emb.shape[-2]
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(seed)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    b = make_batch(model, list(prompts), None, k, prepend_bos)
    lengths = b.attention_mask.sum(1)
    width = int(lengths.max()) + max_new_tokens
    if n_ctx and width > n_ctx:
        raise ValueError(f"prompt + {max_new_tokens} new tokens = {width} > n_ctx={n_ctx}")
    cached = use_cache and hasattr(model, "original_model") and (emb is None or emb.dim() == 2)
    if cached:
        rows = [row[:n].tolist() for row, n in zip(b.tokens, lengths)]
        new_rows = generate_ids(model.original_model, rows, max_new_tokens, temperature, gen, emb, b.soft_start)
    else:
        new_rows = []
        for s in range(0, len(b), batch_size):
            part = b.rows(range(s, min(s + batch_size, len(b))))
            n = part.attention_mask.sum(1)
            tokens = torch.full((len(part), int(n.max()) + max_new_tokens), pad_id_of(tok), dtype=torch.long)
            tokens[:, :part.tokens.shape[1]] = part.tokens
            new = torch.zeros((len(part), max_new_tokens), dtype=torch.long)
            pos = n.clone()
            for t in range(max_new_tokens):
                cur = int(pos.max())
                mask = torch.arange(cur)[None, :] < pos[:, None]
                sb = SoftBatch(tokens[:, :cur], mask, torch.zeros_like(mask), part.soft_start, k)
                e = emb[s:s + len(part)] if emb is not None and emb.dim() == 3 else emb
                nxt = _pick(forward(model, e, sb)[torch.arange(len(part)), (pos - 1).to(_device(model))],
                            temperature, gen)
                new[:, t] = nxt
                tokens[torch.arange(len(part)), pos] = nxt
                pos = pos + 1
            new_rows += new.tolist()
    out = []
    for row in new_rows:
        text = tok.decode(row)
        if stop_at is not None and stop_at in text:
            text = text[:text.index(stop_at) + len(stop_at)]
        out.append(text)
    return out


def information_curve(model, behaviors: dict, ks: Sequence[int], seeds: Sequence[int], *, n_eval: int = 32,
                      **options) -> tuple[list[dict], dict]:
    """Train a soft prompt for every behavior x k x seed (one :func:`train_many` per k) and score it.

    ``behaviors``: name -> an object with ``train_prompts``, ``train_targets``, ``test_prompts``,
    ``test_targets``, ``success(generations) -> bool array`` and ``max_new_tokens(tokenizer)``
    (:class:`lib.world.behaviors.Behavior`).  Early stopping reads the first ``n_eval`` training
    rows; success and NLL are measured on the held-out rows.  Returns the rows (behavior, k, seed,
    success, nll, bits_removed, steps) and ``{(behavior, k, seed): SoftPrompt}``; k = 0 rows are
    the plain model.
    """
    rows, prompts, plain = [], {}, {}
    for name, b in behaviors.items():
        plain[name] = float(target_nll(model, None, b.test_prompts, b.test_targets).mean())
        said = generate(model, None, b.test_prompts, b.max_new_tokens(model.tokenizer))
        for seed in seeds:
            rows.append({"behavior": name, "k": 0, "seed": seed, "success": float(b.success(said).mean()),
                         "nll": plain[name], "bits_removed": 0.0, "steps": 0})
    for k in progress(list(ks), desc="k"):
        tasks = [Task(b.train_prompts, b.train_targets, b.train_prompts[:n_eval], b.train_targets[:n_eval],
                      seed=seed, name=name) for name, b in behaviors.items() for seed in seeds]
        for task, res in zip(tasks, train_many(model, tasks, k, **options)):
            b = behaviors[task.name]
            nll = float(target_nll(model, res.prompt, b.test_prompts, b.test_targets).mean())
            said = generate(model, res.prompt, b.test_prompts, b.max_new_tokens(model.tokenizer))
            rows.append({"behavior": task.name, "k": k, "seed": task.seed, "success": float(b.success(said).mean()),
                         "nll": nll, "bits_removed": bits_removed(plain[task.name], nll, k), "steps": res.steps_run})
            prompts[(task.name, k, task.seed)] = res.prompt
    return rows, prompts


def min_k(rows: Sequence[dict], level: float = 0.9) -> int | None:
    """The smallest k whose mean success over seeds reaches ``level`` (None: no k did)."""
    import pandas as pd

    mean = pd.DataFrame(list(rows)).groupby("k")["success"].mean()
    hit = mean[(mean >= level) & (mean.index > 0)]
    return int(hit.index.min()) if len(hit) else None


def fragility(model, prompt: SoftPrompt, prompts: Sequence[str], targets: Sequence[str],
              eps: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0), n_draws: int = 4, seed: int = 0,
              prepend_bos: bool = True) -> list[dict]:
    """How the mean target NLL moves when each soft vector is pushed by a random direction of
    norm ``eps * ||e_i||``: per eps, the mean and std over ``n_draws`` draws of the NLL increase,
    and the mean norm of the NLL's gradient with respect to the soft vectors at the moved points.
    All draws of one eps run as one batch (one prompt per row)."""
    gen = torch.Generator().manual_seed(seed)
    device = _device(model)
    e = prompt.embeddings.detach().float().to(device)
    base = make_batch(model, list(prompts), list(targets), prompt.k, prepend_bos)
    with torch.no_grad():
        clean = float(token_nll(forward(model, e, base), base).mean())
    rows = []
    n = len(base)
    batch = concat([base] * n_draws, pad_id_of(model.tokenizer))
    with frozen(model):
        for value in eps:
            moved = torch.nn.Parameter(e.unsqueeze(0) + random_moves(e, value, n_draws, gen))
            per_row = token_nll(forward(model, moved.repeat_interleave(n, dim=0), batch), batch)
            per_draw = per_row.reshape(n_draws, n).mean(1)
            per_draw.sum().backward()  # draw d's loss depends only on moved[d]
            delta = (per_draw.detach() - clean).cpu().numpy()
            rows.append({"eps": float(value), "clean_nll": clean, "delta_nll": float(delta.mean()),
                         "delta_nll_std": float(delta.std(ddof=1)) if n_draws > 1 else 0.0,
                         "grad_norm": float(moved.grad.flatten(1).norm(dim=1).mean())})
    return rows


def bits_removed(nll_plain: np.ndarray | float, nll_soft: np.ndarray | float, k: int) -> float:
    """Bits of target NLL a k-token soft prompt removes per soft token (mean over rows)."""
    if k < 1:
        raise ValueError("bits per soft token needs k >= 1")
    return float((np.mean(nll_plain) - np.mean(nll_soft)) / LN2 / k)
