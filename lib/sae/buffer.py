"""Activations for SAE training: tokenise texts, run the model, keep the tokens that count, shuffle.

Three pieces, each usable alone:

- :func:`tokenize`: texts -> a right-padded :class:`TokenBatch` (tokens + attention mask), BOS
  prepended explicitly (never left to ``to_tokens``' per-model default).
- :class:`ActivationBuffer`: streams shuffled ``[batch_size, d_in]`` activations at one hook from
  a model over a list of texts, refilling a buffer of ``buffer_tokens`` activations as it drains
  (dictionary_learning's buffer, in TransformerLens hook names).
- :func:`harvest_activations` + :func:`save_activations` / :func:`load_activations` +
  :class:`TensorSource`: the same activations for several hooks in one pass, cached on disk as
  safetensors, served shuffled from memory (cheap when several SAEs train on the same hook).

Which positions count is decided once, by :meth:`TokenBatch.counted_mask`: padding never, the BOS
position only with ``exclude_bos=False``.  Pads are found from the attention mask, not from token
ids, so a tokenizer whose pad token is its BOS token (GPT-2) is handled too.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from lib.utils import as_names, progress, require_texts


@dataclass
class TokenBatch:
    """Right-padded token ids with their attention mask.

    tokens: [n, pos] int64; attention_mask: [n, pos] bool (True on real tokens, BOS included);
    has_bos: whether position 0 of every row is a prepended BOS.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    has_bos: bool

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "TokenBatch":
        return TokenBatch(self.tokens[idx], self.attention_mask[idx], self.has_bos)

    def counted_mask(self, exclude_bos: bool = True, exclude_pad: bool = True) -> torch.Tensor:
        """[n, pos] bool: the positions whose activations are used (training, metrics)."""
        mask = self.attention_mask.clone() if exclude_pad else torch.ones_like(self.attention_mask)
        if exclude_bos and self.has_bos:
            mask[:, 0] = False
        return mask

    @property
    def n_real(self) -> int:
        return int(self.attention_mask.sum())


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def tokenize(model_or_tokenizer, texts: Sequence[str], context_size: int, prepend_bos: bool = True,
             pad_to: int | None = None) -> TokenBatch:
    """Tokenise ``texts`` into one right-padded batch of at most ``context_size`` tokens per row.

    Each row is ``[BOS] + first tokens of the text`` (BOS only with ``prepend_bos``), truncated to
    ``context_size`` and padded with the tokenizer's pad token up to the longest row (or ``pad_to``).
    """
    tok = _tokenizer(model_or_tokenizer)
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of texts, got a single string; wrap it in a list")
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    prefix: list[int] = []
    if prepend_bos:
        if tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
        prefix = [tok.bos_token_id]
    rows = [(prefix + list(x))[:context_size] for x in ids]
    if any(len(r) == 0 for r in rows):
        raise ValueError("an empty text with prepend_bos=False gives an empty row; drop empty texts")
    width = max(pad_to or 0, max(len(r) for r in rows))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return TokenBatch(tokens, mask, has_bos=prepend_bos)


def hook_layer(hook_name: str) -> int | None:
    """The block index in ``blocks.{l}.…`` (None for hooks outside the blocks)."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


@torch.no_grad()
def run_hooks(model, batch: TokenBatch, hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Activations [n, pos, d] at ``hooks`` for one token batch (stops after the last block needed)."""
    hooks = as_names(hooks, "hooks")
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise KeyError(f"hook(s) {missing} not in the model; see lib.models.hook_names(model)")
    layers = [hook_layer(h) for h in hooks]
    stop = None if any(l is None for l in layers) else max(layers) + 1
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(batch.tokens.to(device), names_filter=list(hooks), stop_at_layer=stop)
    return {h: cache[h].float() for h in hooks}


@torch.no_grad()
def harvest_activations(model, texts: Sequence[str], hooks: Sequence[str] | str, context_size: int = 128,
                        prompts_per_forward: int = 32, prepend_bos: bool = True, exclude_bos: bool = True,
                        exclude_pad: bool = True, desc: str = "activations") -> dict[str, torch.Tensor]:
    """``{hook: [n_tokens, d]}`` for every counted token of ``texts`` (in text order, CPU float32)."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for i in progress(range(0, len(texts), prompts_per_forward), desc=desc):
        batch = tokenize(model, texts[i: i + prompts_per_forward], context_size, prepend_bos)
        keep = batch.counted_mask(exclude_bos, exclude_pad)
        acts = run_hooks(model, batch, hooks)
        for h in hooks:
            out[h].append(acts[h][keep.to(acts[h].device)].cpu())
    return {h: torch.cat(v) for h, v in out.items()}


def save_activations(path: str | os.PathLike, acts: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``{hook: [n, d]}`` to a safetensors file through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in acts.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_activations(path: str | os.PathLike, hooks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_activations` (all hooks, or only ``hooks``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No activation cache at {path}; build it with harvest_activations + save_activations")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; load_activations reads one .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys()) if hooks is None else as_names(hooks, "hooks")
            missing = [h for h in names if h not in f.keys()]
            if missing:
                raise KeyError(f"{path} has no activations for {missing}; it has {list(f.keys())}")
            return {h: f.get_tensor(h) for h in names}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or of another "
                         "format. Delete it and harvest again (harvest_activations + save_activations).") from err


class TensorSource:
    """Shuffled ``[batch_size, d]`` batches from an in-memory activation tensor, epoch after epoch.

    Deterministic in ``seed``; ``state_dict`` / ``load_state_dict`` make a resumed run see exactly
    the batches the interrupted one would have seen.
    """

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
                 scale: float = 1.0):
        if acts.ndim != 2:
            raise ValueError(f"activations must be [n_tokens, d], got shape {tuple(acts.shape)}")
        if len(acts) < batch_size:
            raise ValueError(f"{len(acts)} activations is fewer than one batch of {batch_size}")
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.device, self.scale = torch.device(device), scale
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.acts), generator=g)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.acts):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        x = self.acts[idx].to(self.device, torch.float32)
        return x * self.scale if self.scale != 1.0 else x

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def fingerprint(self) -> str:
        """What this source serves: a hash of the activations, the batch size, seed and scale
        (the SAE trainer refuses to resume a checkpoint trained on other data)."""
        h = hashlib.sha256(f"{tuple(self.acts.shape)}|{self.acts.dtype}|{self.batch_size}|{self.seed}|{self.scale!r}".encode())
        h.update(self.acts.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


@dataclass
class BufferConfig:
    """How :class:`ActivationBuffer` reads a model."""

    hook_name: str
    context_size: int = 128  # tokens per context (BOS included)
    batch_size: int = 4096  # activations per batch served
    buffer_tokens: int = 65_536  # activations held and shuffled together
    prompts_per_forward: int = 32  # texts per model forward pass
    prepend_bos: bool = True
    exclude_bos: bool = True  # drop the BOS position's activation (a large-norm outlier)
    exclude_pad: bool = True  # drop padding positions' activations
    loop: bool = True  # start over at the first text when the texts run out
    seed: int = 0


class ActivationBuffer:
    """Stream shuffled activations at ``cfg.hook_name`` from ``model`` run over ``texts``.

    Holds up to ``cfg.buffer_tokens`` activations; when fewer than half remain it runs the model
    on more texts, appends, and reshuffles, so each batch mixes tokens from many contexts.
    Deterministic in ``cfg.seed``.  ``state_dict`` records how many batches were served;
    ``load_state_dict`` replays that many (re-running the model) to resume exactly.
    """

    def __init__(self, model, texts: Sequence[str], cfg: BufferConfig):
        if cfg.buffer_tokens < 2 * cfg.batch_size:
            raise ValueError(f"buffer_tokens ({cfg.buffer_tokens}) should be at least 2 x batch_size ({cfg.batch_size})")
        self.model, self.texts, self.cfg = model, require_texts(texts), cfg
        if not self.texts:
            raise ValueError("ActivationBuffer needs at least one text")
        self._reset()

    def _reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self._acts: torch.Tensor | None = None
        self._next_text = 0
        self._epoch = 0
        self.n_served = 0
        self.n_tokens_read = 0

    @property
    def d_in(self) -> int:
        return int(self.model.cfg.d_model) if self._acts is None else self._acts.shape[-1]

    def _read_texts(self) -> torch.Tensor | None:
        cfg = self.cfg
        if self._next_text >= len(self.texts):
            if not cfg.loop:
                return None
            self._next_text, self._epoch = 0, self._epoch + 1
        chunk = self.texts[self._next_text: self._next_text + cfg.prompts_per_forward]
        self._next_text += len(chunk)
        batch = tokenize(self.model, chunk, cfg.context_size, cfg.prepend_bos)
        keep = batch.counted_mask(cfg.exclude_bos, cfg.exclude_pad)
        acts = run_hooks(self.model, batch, [cfg.hook_name])[cfg.hook_name]
        got = acts[keep.to(acts.device)].cpu()
        self.n_tokens_read += len(got)
        return got

    def _refill(self) -> None:
        parts = [] if self._acts is None else [self._acts]
        have = 0 if self._acts is None else len(self._acts)
        while have < self.cfg.buffer_tokens:
            got = self._read_texts()
            if got is None:
                break
            parts.append(got)
            have += len(got)
        acts = torch.cat(parts) if parts else torch.empty(0, self.d_in)
        self._acts = acts[torch.randperm(len(acts), generator=self._gen)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._acts is None or len(self._acts) < self.cfg.buffer_tokens // 2:
            self._refill()
        if len(self._acts) < self.cfg.batch_size:
            raise StopIteration
        x, self._acts = self._acts[: self.cfg.batch_size], self._acts[self.cfg.batch_size:]
        self.n_served += 1
        return x

    def state_dict(self) -> dict:
        return {"n_served": self.n_served}

    def fingerprint(self) -> str:
        """What this buffer serves: a hash of the texts, the config and the model's weights and buffers."""
        h = hashlib.sha256(repr(sorted(vars(self.cfg).items())).encode())
        for t in self.texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        with torch.no_grad():
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        for _ in range(state["n_served"]):
            next(self)
