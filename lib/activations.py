"""Activations at named hook points and chosen token positions, batched, padding-aware, cached.

>>> from lib.activations import harvest
>>> acts = harvest(model, statements, ["blocks.1.hook_resid_post"], position="last", dataset="cities")
>>> acts["blocks.1.hook_resid_post"].shape        # (n_statements, d_model), float32 on the CPU

How it works, and why it is fast:

* Texts are tokenized once (``prepend_bos`` passed explicitly), sorted by length and batched, so a
  batch carries little padding; every batch carries its real lengths and an attention mask, so
  right and left padding give the same activations (the mask also fixes positions under left
  padding).
* Each requested hook point gets a hook that copies out only the requested positions (the last
  real token of each text, every real token, or one position per text) into a preallocated
  tensor; nothing else is kept.  As soon as the last requested hook of a batch has fired the
  forward pass is stopped, so later blocks and the unembedding are never computed.  At most one
  batch's worth of intermediate activations is alive at any time.
* Results are cached on disk (``data/cache/activations/``), one file per hook, under a key made
  of the model's name, a fingerprint of its weights, the dataset name, the hook, the position
  rule and a hash of the token ids: a changed dataset, tokenizer or model never returns stale
  activations.  Files are written through a temporary file and a rename.

``iter_batches`` (the batching) and ``sequence_logprobs`` / ``next_token_logits`` (what the model
predicts on the same texts) are reused by :mod:`lib.interventions` and the notebooks.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib import paths
from lib.utils import progress

Position = str | Sequence[int]  # "last" | "all" | one int per text (negative counts from the end)


# --------------------------------------------------------------------------------------------
# tokenization and batching
# --------------------------------------------------------------------------------------------
def tokenize(model, texts: Sequence[str], prepend_bos: bool, chunk: int = 512) -> list[np.ndarray]:
    """Token ids of each text (1-D int64 arrays, no padding), via ``model.to_tokens``.

    Texts are tokenized in chunks with right padding; each row's length is where its trailing
    pad tokens start (BOS is kept even when it has the pad token's id, as in GPT-2).
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of texts, got a single string")
    pad_id = model.tokenizer.pad_token_id
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        ids = model.to_tokens(part, prepend_bos=prepend_bos, padding_side="right", move_to_device=False)
        ids = ids.numpy()
        for row in ids:
            n = len(row)
            if pad_id is not None:
                while n > int(prepend_bos) and row[n - 1] == pad_id:
                    n -= 1
            out.append(row[:n].astype(np.int64))
    return out


@dataclass
class Batch:
    """A padded batch of texts.

    tokens: (B, T) int64; attention_mask: (B, T) int64, 1 on real tokens; lengths: (B,) real
    tokens per row; index: (B,) where each row sits in the caller's list of texts.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor
    padding_side: str

    def column(self, position: torch.Tensor) -> torch.Tensor:
        """Column in ``tokens`` of real-token ``position`` (B,) of each row (0 = first real token)."""
        if self.padding_side == "right":
            return position
        return self.tokens.shape[1] - self.lengths + position

    def last(self) -> torch.Tensor:
        """(B,) column of each row's last real token."""
        return self.column(self.lengths - 1)


def pad(seqs: Sequence[np.ndarray], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id arrays to (B, T) ``tokens`` and the matching ``attention_mask``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        tokens[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return tokens, mask


def iter_batches(token_lists: Sequence[np.ndarray], batch_size: int, pad_id: int,
                 padding_side: str = "right", sort: bool = True) -> Iterator[Batch]:
    """Batches of ``batch_size`` texts, longest first when ``sort`` (little padding per batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.array([len(t) for t in token_lists])
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(token_lists))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tokens, mask = pad([token_lists[i] for i in idx], pad_id, padding_side)
        yield Batch(tokens, mask, torch.as_tensor(lengths[idx]), torch.as_tensor(idx), padding_side)


def _pad_id(model) -> int:
    tok = model.tokenizer
    for value in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if value is not None:
            return int(value)
    return 0  # pragma: no cover


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------
def _positions(position: Position, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows to read: ``(text_index, token_position)``, both (n_rows,), grouped by text."""
    n = len(lengths)
    if isinstance(position, str):
        if position == "last":
            return np.arange(n), lengths - 1
        if position == "all":
            text = np.repeat(np.arange(n), lengths)
            starts = np.cumsum(lengths) - lengths
            return text, np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        raise ValueError(f"position must be 'last', 'all' or one int per text, got {position!r}")
    pos = np.asarray(position, dtype=np.int64)
    if pos.shape != (n,):
        raise ValueError(f"position needs one int per text: got shape {pos.shape} for {n} texts")
    pos = np.where(pos < 0, lengths + pos, pos)
    bad = np.flatnonzero((pos < 0) | (pos >= lengths))
    if len(bad):
        i = int(bad[0])
        raise IndexError(f"position {position[i]} is outside text {i}, which has {lengths[i]} tokens")
    return np.arange(n), pos


def _position_tag(position: Position) -> str:
    if isinstance(position, str):
        return position
    return "pos" + hashlib.sha256(np.asarray(position, dtype=np.int64).tobytes()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# hook names and stopping early
# --------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the harvesting hooks once every requested hook of the batch has fired."""


def check_hooks(model, hooks: Sequence[str]) -> None:
    """Raise ``KeyError`` naming the unknown hook points (and some valid ones)."""
    known = getattr(model, "hook_dict", {})
    unknown = [h for h in hooks if h not in known]
    if unknown:
        examples = [n for n in known if re.fullmatch(r"blocks\.0\.hook_\w+", n)][:8]
        raise KeyError(f"unknown hook point(s) {unknown}; valid names look like {examples} "
                       f"(see lib.models.hook_names(model))")


def resid_hooks(model, layers: Sequence[int] | None = None, kind: str = "resid_post") -> list[str]:
    """``blocks.{l}.hook_{kind}`` for each layer (all layers when ``layers`` is None)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [f"blocks.{int(l)}.hook_{kind}" for l in layers]


# --------------------------------------------------------------------------------------------
# the on-disk cache
# --------------------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """A hash of everything that decides a model's activations: every parameter and every buffer,
    byte for byte (name, shape, dtype and values), and the config's sizes.

    Hooks change activations without changing a weight, so a model with hooks attached (a
    TransformerLens ``add_hook``, a torch hook on one of its modules) is refused: its activations
    cannot be cached under its weights.  Hashing all the bytes costs less than one forward pass over a dataset.
    """
    # The bridge wires its own capture hooks into the wrapped Hugging Face modules
    # (``..._original_component...``) on the first forward pass; those are machinery, not changes.
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if "_original_component" not in name
              and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None))]
    from torch.nn.modules import module as _torch_module

    if hooked or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        raise RuntimeError(
            f"The model has hooks attached ({', '.join(hooked[:5]) or 'global module hooks'}"
            f"{', ...' if len(hooked) > 5 else ''}): its activations depend on them, so they cannot be cached "
            "under its weights. Remove them first (model.reset_hooks()), or pass cache=False.")
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "cfg", None)
    for field in ("n_layers", "d_model", "d_vocab", "n_ctx", "n_heads"):
        h.update(f"{field}={getattr(cfg, field, None)};".encode())
    with torch.no_grad():
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                h.update(f"{kind}:{name}{tuple(t.shape)}{t.dtype};".encode())
                if t.numel() and t.device.type != "meta":
                    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def tokens_fingerprint(token_lists: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for t in token_lists:
        h.update(np.int64(len(t)).tobytes())
        h.update(np.asarray(t, dtype=np.int64).tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


@dataclass
class ActivationCache:
    """Activation files under ``root`` (default ``data/cache/activations``), one per hook.

    Path: ``root/{model}/{dataset}/{hook}-{position}-{key}.pt`` where ``key`` hashes the model
    fingerprint, the token ids, the hook, the position rule and the stored dtype.
    """

    root: Path | None = None

    def directory(self) -> Path:
        return Path(self.root) if self.root is not None else paths.cache_dir() / "activations"

    def path(self, model_name: str, dataset: str, hook: str, position: Position, key: str) -> Path:
        return self.directory() / _slug(model_name) / _slug(dataset) / f"{_slug(hook)}-{_position_tag(position)}-{key[:20]}.pt"

    @staticmethod
    def key(model_fp: str, tokens_fp: str, hook: str, position: Position, dtype: torch.dtype) -> str:
        text = f"{model_fp}|{tokens_fp}|{hook}|{_position_tag(position)}|{dtype}"
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, path: Path) -> torch.Tensor | None:
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute rather than fail
            return None

    def save(self, path: Path, tensor: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(tensor.contiguous(), tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


# --------------------------------------------------------------------------------------------
# harvesting
# --------------------------------------------------------------------------------------------
@dataclass
class Activations:
    """Harvested activations.

    acts: hook name -> (n_rows, d) tensor; text_index: (n_rows,) which text each row comes from;
    token_position: (n_rows,) its position among the text's real tokens (0 = first, BOS if any).
    With ``position="last"`` row ``i`` is text ``i``.
    """

    acts: dict[str, torch.Tensor]
    text_index: torch.Tensor
    token_position: torch.Tensor

    def __getitem__(self, hook: str) -> torch.Tensor:
        return self.acts[hook]

    def __contains__(self, hook: str) -> bool:
        return hook in self.acts

    def numpy(self, hook: str) -> np.ndarray:
        return self.acts[hook].float().numpy()


@torch.no_grad()
def _harvest_uncached(model, token_lists, hooks, rows_text, rows_pos, batch_size, padding_side,
                      dtype, desc) -> dict[str, torch.Tensor]:
    n_rows = len(rows_text)
    # rows of each text, in order: rows_text is grouped by text (see _positions)
    first_row = np.searchsorted(rows_text, np.arange(len(token_lists)))
    n_per_text = np.bincount(rows_text, minlength=len(token_lists))
    out: dict[str, torch.Tensor] = {}
    device = _device(model)
    batches = list(iter_batches(token_lists, batch_size, _pad_id(model), padding_side))
    for batch in progress(batches, desc=desc, total=len(batches)):
        idx = batch.index.numpy()
        # gather coordinates (b, column) and destination rows for every row of the batch's texts
        b_list, pos_list, dest_list = [], [], []
        for b, t in enumerate(idx):
            rows = np.arange(first_row[t], first_row[t] + n_per_text[t])
            b_list.append(np.full(len(rows), b))
            pos_list.append(rows_pos[rows])
            dest_list.append(rows)
        b_idx = torch.as_tensor(np.concatenate(b_list))
        pos_t = torch.as_tensor(np.concatenate(pos_list))
        cols = pos_t if padding_side == "right" else batch.tokens.shape[1] - batch.lengths[b_idx] + pos_t
        dest = torch.as_tensor(np.concatenate(dest_list))
        b_dev, c_dev = b_idx.to(device), cols.to(device)
        pending = set(hooks)

        def make_hook(name: str):
            def hook_fn(act, hook):
                x = act[0] if isinstance(act, tuple) else act
                picked = x[b_dev, c_dev].detach().to("cpu", dtype)
                if name not in out:
                    out[name] = torch.empty((n_rows, *picked.shape[1:]), dtype=dtype)
                out[name][dest] = picked
                pending.discard(name)
                if not pending:
                    raise _StopForward
                return None
            return hook_fn

        try:
            model.run_with_hooks(batch.tokens.to(device), fwd_hooks=[(h, make_hook(h)) for h in hooks],
                                 attention_mask=batch.attention_mask.to(device))
        except _StopForward:
            pass
        if pending:
            raise RuntimeError(f"hook point(s) {sorted(pending)} never fired during the forward pass")
    return out


def harvest(model, texts: Sequence[str], hooks: Sequence[str] | str, position: Position = "last",
            *, prepend_bos: bool = True, batch_size: int = 32, padding_side: str = "right",
            dtype: torch.dtype = torch.float32, dataset: str | None = None,
            cache: ActivationCache | bool = True, model_name: str | None = None) -> Activations:
    """Activations of ``texts`` at ``hooks`` and ``position``.

    Args:
        model: a TransformerLens ``TransformerBridge`` (``lib.models.load_model``).
        texts: the texts (statements), any length.
        hooks: hook point names, e.g. ``["blocks.3.hook_resid_post"]`` (see ``resid_hooks``); any
            hook whose activation is (batch, position, ...) works (``hook_z`` gives (n_rows, heads, d_head)).
        position: ``"last"`` (the last real token of each text), ``"all"`` (every real token,
            BOS included when prepended), or one int per text (negative counts from the end).
        prepend_bos: whether a BOS token starts each text (passed explicitly to ``to_tokens``).
        batch_size: texts per forward pass.
        padding_side: ``"right"`` or ``"left"``; the results agree (attention mask carried).
        dtype: stored dtype (float32 default; float16 halves the cache for big models).
        dataset: a name for the cache folder (the content hash does the real keying).
        cache: True (default folder), False (no cache) or an ``ActivationCache``.
        model_name: the cache folder of the model (default ``model.compendium_name``).
    Returns:
        ``Activations`` with ``acts[hook]`` of shape (n_rows, d) on the CPU.
    """
    hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("no hooks requested")
    if len(texts) == 0:
        raise ValueError("no texts to harvest")
    check_hooks(model, hooks)
    token_lists = tokenize(model, texts, prepend_bos=prepend_bos)
    lengths = np.array([len(t) for t in token_lists])
    if (lengths == 0).any():
        raise ValueError(f"text {int(np.flatnonzero(lengths == 0)[0])} has no tokens; pass prepend_bos=True or drop it")
    rows_text, rows_pos = _positions(position, lengths)
    meta_text, meta_pos = torch.as_tensor(rows_text), torch.as_tensor(rows_pos)

    store = ActivationCache() if cache is True else (cache or None)
    acts: dict[str, torch.Tensor] = {}
    todo = hooks
    files: dict[str, Path] = {}
    if store is not None:
        name = model_name or getattr(model, "compendium_name", None) or type(model).__name__
        model_fp, tokens_fp = model_fingerprint(model), tokens_fingerprint(token_lists)
        for h in hooks:
            files[h] = store.path(name, dataset or "texts", h, position,
                                  store.key(model_fp, tokens_fp, h, position, dtype))
            found = store.load(files[h])
            if found is not None and found.shape[0] == len(rows_text):
                acts[h] = found
        todo = [h for h in hooks if h not in acts]
    if todo:
        fresh = _harvest_uncached(model, token_lists, todo, rows_text, rows_pos, batch_size, padding_side,
                                  dtype, desc=f"harvest {dataset or ''}".strip())
        for h in todo:
            acts[h] = fresh[h]
            if store is not None:
                store.save(files[h], fresh[h])
    return Activations({h: acts[h] for h in hooks}, meta_text, meta_pos)


# --------------------------------------------------------------------------------------------
# what the model predicts on the same texts
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_logprobs(model, texts: Sequence[str], *, prepend_bos: bool = True, batch_size: int = 32,
                      padding_side: str = "right", reduction: str = "sum") -> np.ndarray:
    """Log-probability of each text under the model: (n,) float64.

    ``reduction="sum"`` adds log p(token_t | tokens_<t) over every real token after the first
    (so with BOS prepended, every token of the text is scored); ``"mean"`` divides by their number.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    token_lists = tokenize(model, texts, prepend_bos=prepend_bos)
    out = np.zeros(len(texts))
    device = _device(model)
    for batch in progress(list(iter_batches(token_lists, batch_size, _pad_id(model), padding_side)), desc="logprobs"):
        logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = batch.tokens.to(device)[:, 1:]
        token_lp = logp[:, :-1].gather(-1, target[..., None])[..., 0]
        valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(device).bool()
        total = (token_lp * valid).sum(-1)
        if reduction == "mean":
            total = total / valid.sum(-1).clamp(min=1)
        out[batch.index.numpy()] = total.double().cpu().numpy()
    return out


@torch.no_grad()
def next_token_logits(model, texts: Sequence[str], token_ids: Sequence[int], *, prepend_bos: bool = True,
                      batch_size: int = 32, padding_side: str = "right", fwd_hooks_for=None) -> np.ndarray:
    """Logits of ``token_ids`` at each text's last real token: (n_texts, len(token_ids)).

    ``fwd_hooks_for(batch) -> list[(hook_name, fn)]`` adds hooks per batch (used by interventions).
    """
    token_lists = tokenize(model, texts, prepend_bos=prepend_bos)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = np.zeros((len(texts), len(ids)))
    device = _device(model)
    for batch in iter_batches(token_lists, batch_size, _pad_id(model), padding_side):
        hooks = fwd_hooks_for(batch) if fwd_hooks_for is not None else []
        logits = model.run_with_hooks(batch.tokens.to(device), fwd_hooks=hooks,
                                      attention_mask=batch.attention_mask.to(device))
        last = batch.last().to(device)
        picked = logits[torch.arange(len(last), device=device), last][:, ids.to(device)]
        out[batch.index.numpy()] = picked.double().cpu().numpy()
    return out
