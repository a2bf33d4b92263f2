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

from lib.activations import _device, _pad_id
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
        noise = torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        noise = noise / noise.norm(dim=-1, keepdim=True) * e.norm(dim=-1, keepdim=True) * eps
        return SoftPrompt(e + noise, {**self.meta, "perturbed_eps": eps})


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
    fill = _pad_id(tok) if placeholder is None else int(placeholder)
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
    tokens = torch.full((len(rows), width), _pad_id(tok), dtype=torch.long)
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


def forward(model, prompt: SoftPrompt | torch.Tensor | None, batch: SoftBatch) -> torch.Tensor:
    """Logits (B, T, vocab) of ``batch`` with the soft vectors in place (``prompt`` None: k = 0;
    a (B, k, d) tensor: one prompt per row)."""
    emb = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    k = 0 if emb is None else emb.shape[-2]
    if k != batch.k:
        raise ValueError(f"the batch was made for k={batch.k} soft tokens, the prompt has {k}")
    if emb is not None and emb.dim() == 3 and emb.shape[0] != len(batch):
        raise ValueError(f"{emb.shape[0]} per-row prompts for a batch of {len(batch)} rows")
    device = _device(model)
    hooks = [] if emb is None else [(EMBED_HOOK, soft_hook(emb, batch.soft_start))]
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
    log: dict  # "step", "loss" (train, mean nats per row), "eval_loss" (when eval rows are given)
    steps_run: int
    stopped_early: bool


LossFn = Callable[[torch.Tensor, SoftBatch], torch.Tensor]


def train(model, prompts: Sequence[str], targets: Sequence[str], k: int, *, init: str = "vocab",
          init_text: str | None = None, steps: int = 300, lr: float = 0.05, weight_decay: float = 0.0,
          warmup: int = 10, batch_size: int = 32, eval_prompts: Sequence[str] | None = None,
          eval_targets: Sequence[str] | None = None, eval_every: int = 25, patience: int = 4,
          target_loss: float | None = None, loss_fn: LossFn | None = None, seed: int = 0,
          prepend_bos: bool = True, desc: str | None = None) -> TrainResult:
    """Train a k-token soft prompt so that the frozen ``model`` continues each prompt with its target.

    The loss is the mean over rows of the summed target NLL (nats), or ``loss_fn(logits, batch)``.
    AdamW on the soft vectors only, cosine schedule with ``warmup``; minibatches of ``batch_size``
    rows drawn with ``seed``.  Early stopping: every ``eval_every`` steps the loss on the eval rows
    (the training rows when none are given) is measured; training stops after ``patience`` checks
    without improvement, or once it is below ``target_loss``, and the best prompt is returned.
    """
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts (got {len(prompts)} and {len(targets)}), at least one")
    if (eval_prompts is None) != (eval_targets is None):
        raise ValueError("give eval_prompts and eval_targets together")
    ev_p, ev_t = (prompts, targets) if eval_prompts is None else (list(eval_prompts), list(eval_targets))
    device = _device(model)
    start = init_embeddings(model, k, init, text=init_text, seed=seed).float().to(device)
    emb = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    full = make_batch(model, prompts, targets, k, prepend_bos)  # tokenized once; steps take rows of it
    ev = make_batch(model, ev_p, ev_t, k, prepend_bos)

    def evaluate() -> float:
        with torch.no_grad():
            losses = [(loss_fn or _mean_nll)(forward(model, emb.detach(), b), b) * len(b) for b in ev.chunks(128)]
            return float(sum(losses)) / len(ev)

    log: dict = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    best, best_emb, bad, stopped = math.inf, emb.detach().clone(), 0, False
    step = 0
    with frozen(model):
        for step in progress(range(steps), desc=desc or f"soft prompt k={k}", leave=False):
            b = full.rows(torch.randperm(len(full), generator=gen)[:batch_size])
            loss = (loss_fn or _mean_nll)(forward(model, emb, b), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            log["step"].append(step)
            log["loss"].append(float(loss.detach()))
            if (step + 1) % eval_every == 0 or step == steps - 1:
                value = evaluate()
                log["eval_step"].append(step + 1)
                log["eval_loss"].append(value)
                if value < best - 1e-4:
                    best, best_emb, bad = value, emb.detach().clone(), 0
                else:
                    bad += 1
                if (target_loss is not None and value <= target_loss) or bad >= patience:
                    stopped = step < steps - 1
                    break
    meta = {"k": k, "init": init, "seed": seed, "lr": lr, "steps_run": step + 1, "best_eval_loss": best,
            "model": getattr(model, "compendium_name", None)}
    return TrainResult(SoftPrompt(best_emb, meta), log, step + 1, stopped)


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
@torch.no_grad()
def generate(model, prompt: SoftPrompt | torch.Tensor | None, prompts: Sequence[str], max_new_tokens: int = 20,
             temperature: float = 0.0, seed: int = 0, stop_at: str | None = None, prepend_bos: bool = True,
             batch_size: int = 64) -> list[str]:
    """Continue each prompt after [BOS] + soft prompt: greedy when ``temperature`` is 0, sampled
    otherwise (seeded).  Returns the generated text only, cut after the first ``stop_at``."""
    emb = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    k = 0 if emb is None else emb.shape[0]
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(seed)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        b = make_batch(model, list(prompts[s:s + batch_size]), None, k, prepend_bos)
        lengths = b.attention_mask.sum(1)
        width = int(lengths.max()) + max_new_tokens
        if n_ctx and width > n_ctx:
            raise ValueError(f"prompt + {max_new_tokens} new tokens = {width} > n_ctx={n_ctx}")
        tokens = torch.full((len(b), width), _pad_id(tok), dtype=torch.long)
        tokens[:, :b.tokens.shape[1]] = b.tokens
        new = torch.zeros((len(b), max_new_tokens), dtype=torch.long)
        pos = lengths.clone()
        for t in range(max_new_tokens):
            cur = int(pos.max())
            mask = torch.arange(cur)[None, :] < pos[:, None]
            sb = SoftBatch(tokens[:, :cur], mask, torch.zeros_like(mask), b.soft_start, k)
            logits = forward(model, emb, sb)[torch.arange(len(b)), (pos - 1).to(_device(model))].float().cpu()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            new[:, t] = nxt
            tokens[torch.arange(len(b)), pos] = nxt
            pos = pos + 1
        for row in new.tolist():
            text = tok.decode(row)
            if stop_at is not None and stop_at in text:
                text = text[:text.index(stop_at) + len(stop_at)]
            out.append(text)
    return out


def bits_removed(nll_plain: np.ndarray | float, nll_soft: np.ndarray | float, k: int) -> float:
    """Bits of target NLL a k-token soft prompt removes per soft token (mean over rows)."""
    if k < 1:
        raise ValueError("bits per soft token needs k >= 1")
    return float((np.mean(nll_plain) - np.mean(nll_soft)) / LN2 / k)
