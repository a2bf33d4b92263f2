"""Activations: the one code path that runs a model to read them out.

>>> from lib.activations import harvest
>>> acts = harvest(model, statements, ["blocks.1.hook_resid_post"], position="last", dataset="cities")
>>> acts["blocks.1.hook_resid_post"].shape        # (n_statements, d_model), float32 on the CPU
>>> acts = harvest(model, docs, hook, position="all", exclude={"bos"}, context_size=128)  # SAE data

* :func:`tokenize`: texts -> a right-padded :class:`TokenBatch` (ids, attention mask, whether BOS
  was prepended: ``prepend_bos`` is always explicit, never ``to_tokens``' per-model default).
  :func:`iter_batches` cuts it into forward passes, longest texts first (little padding), right-
  or left-padded: every batch carries its mask, so both give the same activations.
* :func:`harvest`: activations at named hooks and positions (``"last"`` real token, ``"all"`` real
  tokens, or one per text) minus an ``exclude`` set (``"bos"``; padding is never read).  Hooks copy
  out only those positions and the forward pass stops after the last requested hook.  Results are
  cached on disk, keyed by the model's weights, the token ids, the hook and the rows
  (:class:`ActivationCache`); the SAE training sources of :mod:`lib.sae.buffer` read through it.
* :func:`batch_activations`: every position of one :class:`TokenBatch` (and the logits, if asked),
  for code that needs whole sequences (SAE metrics, patching).
* :func:`sequence_logprobs` / :func:`next_token_logits`: what the model predicts on the same texts.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib import paths
from lib.hooks import check_hooks
from lib.results import atomic_output
from lib.utils import progress

Position = str | Sequence[int]  # "last" | "all" | one int per text (negative counts from the end)
EXCLUDABLE = ("bos", "pad")  # what an ``exclude`` set may name


# --------------------------------------------------------------------------------------------
# tokens and batches
# --------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """Padded token ids of several texts.

    tokens: (B, T) int64; attention_mask: (B, T) bool, True on real tokens (BOS included);
    has_bos: whether position 0 of every row is a prepended BOS; padding_side: "right" | "left";
    index: (B,) where each row sits in the caller's list of texts.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    has_bos: bool
    padding_side: str = "right"
    index: torch.Tensor | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(len(self.tokens))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> "TokenBatch":
        return TokenBatch(self.tokens[rows], self.attention_mask[rows], self.has_bos, self.padding_side,
                          self.index[rows])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens per row."""
        return self.attention_mask.sum(1)

    @property
    def n_real(self) -> int:
        return int(self.attention_mask.sum())

    def sequences(self) -> list[np.ndarray]:
        """Each row's real token ids (1-D int64 arrays, no padding)."""
        return [row[mask].numpy() for row, mask in zip(self.tokens, self.attention_mask)]

    def column(self, position: torch.Tensor) -> torch.Tensor:
        """Column in ``tokens`` of real-token ``position`` (B,) of each row (0 = first real token)."""
        if self.padding_side == "right":
            return position
        return self.tokens.shape[1] - self.lengths + position

    def last(self) -> torch.Tensor:
        """(B,) column of each row's last real token."""
        return self.column(self.lengths - 1)

    def counted_mask(self, exclude: Collection[str] = EXCLUDABLE) -> torch.Tensor:
        """(B, T) bool: the positions that count once ``exclude`` is dropped ("bos": the prepended
        BOS; "pad": the padding).  The default, both, is what SAE training and metrics read."""
        exclude = _check_exclude(exclude)
        mask = self.attention_mask.clone() if "pad" in exclude else torch.ones_like(self.attention_mask)
        if "bos" in exclude and self.has_bos:
            mask[torch.arange(len(self)), self.column(torch.zeros(len(self), dtype=torch.long))] = False
        return mask


def _check_exclude(exclude: Collection[str]) -> set[str]:
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    if not exclude <= set(EXCLUDABLE):
        raise ValueError(f"exclude may name {EXCLUDABLE}, got {sorted(exclude)}")
    return exclude


def single_token(tokenizer, text: str, need: str = "") -> int:
    """The id of ``text`` when the tokenizer makes it one token (no special tokens added), else a
    ``ValueError`` that says what it became and, with ``need``, what needed it to be one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens under this tokenizer ({ids}); "
                         f"{need or 'one is needed'}")
    return int(ids[0])


def pad_id_of(tokenizer) -> int:
    """The id to fill padding with: the pad token, else EOS, else BOS (GPT-2, Pythia and Llama
    tokenizers ship without a pad token); padded positions are masked, so only its being an id matters."""
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    return int(next((i for i in ids if i is not None), 0))


def pad(seqs: Sequence[np.ndarray], pad_id: int, padding_side: str = "right", has_bos: bool = True,
        width: int | None = None, index: torch.Tensor | None = None) -> TokenBatch:
    """A :class:`TokenBatch` of 1-D id arrays, padded to the longest (or to ``width``)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max([width or 0] + [len(s) for s in seqs])
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        tokens[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return TokenBatch(tokens, mask, has_bos, padding_side, index)


def tokenize(model, texts: Sequence[str], context_size: int | None = None, *, prepend_bos: bool = True,
             pad_to: int | None = None) -> TokenBatch:
    """Tokenize ``texts`` into one right-padded :class:`TokenBatch`.

    Each row is ``[BOS] + the text's tokens`` (BOS only with ``prepend_bos``; the tokenizer adds no
    special tokens of its own), cut to ``context_size`` tokens (default: the model's ``n_ctx``)
    and padded with the pad token to the longest row (or to ``pad_to``).
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of texts, got a single string; wrap it in a list")
    tok = getattr(model, "tokenizer", None) or model  # a model or a bare tokenizer
    prefix: list[int] = []
    if prepend_bos:
        if tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
        prefix = [tok.bos_token_id]
    limit = context_size or getattr(getattr(model, "cfg", None), "n_ctx", None)
    ids = tok(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    rows = [(prefix + list(x))[:limit] for x in ids]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"text {empty[0]} has no tokens; pass prepend_bos=True or drop it")
    if not rows:
        raise ValueError("no texts to tokenize")
    return pad(rows, pad_id_of(tok), "right", has_bos=prepend_bos, width=pad_to)


def iter_batches(batch: TokenBatch, batch_size: int, padding_side: str = "right", sort: bool = True,
                 pad_id: int = 0) -> Iterator[TokenBatch]:
    """Batches of ``batch_size`` rows of ``batch``, longest first when ``sort`` (little padding
    per batch), each padded to its own longest row on ``padding_side``; ``index`` says where
    each row sits in the caller's list."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = batch.sequences()
    lengths = np.array([len(s) for s in seqs])
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield pad([seqs[i] for i in idx], pad_id, padding_side, batch.has_bos, index=batch.index[idx])


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class _StopForward(Exception):
    """Raised by a reading hook once every requested hook of the batch has fired."""


def _forward(model, batch: TokenBatch | torch.Tensor, fwd_hooks, return_type="logits"):
    """One forward pass; a bare (B, T) token tensor is a batch without padding."""
    device = _device(model)
    if isinstance(batch, torch.Tensor):
        return model.run_with_hooks(batch.to(device), fwd_hooks=fwd_hooks, return_type=return_type)
    return model.run_with_hooks(batch.tokens.to(device), fwd_hooks=fwd_hooks, return_type=return_type,
                                attention_mask=batch.attention_mask.long().to(device))


# --------------------------------------------------------------------------------------------
# which rows to read
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


def _rows_tag(position: Position, exclude: set[str]) -> str:
    """The position rule and exclusions as one cache tag (unchanged from the position's alone
    when nothing is excluded but padding, so existing caches stay valid)."""
    return _position_tag(position) + ("-nobos" if "bos" in exclude else "")


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
        with atomic_output(path) as tmp:
            torch.save(tensor.contiguous(), tmp)


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
def _harvest_uncached(model, batch: TokenBatch, hooks, rows_text, rows_pos, batch_size, padding_side,
                      dtype, desc) -> dict[str, torch.Tensor]:
    n_rows = len(rows_text)
    # rows of each text, in order: rows_text is grouped by text (see _positions)
    first_row = np.searchsorted(rows_text, np.arange(len(batch)))
    n_per_text = np.bincount(rows_text, minlength=len(batch))
    out: dict[str, torch.Tensor] = {}
    device = _device(model)
    batches = list(iter_batches(batch, batch_size, padding_side, pad_id=pad_id_of(model.tokenizer)))
    for b in progress(batches, desc=desc, total=len(batches)):
        idx = b.index.numpy()
        # gather coordinates (b, column) and destination rows for every row of the batch's texts
        rows = [np.arange(first_row[t], first_row[t] + n_per_text[t]) for t in idx]
        b_idx = torch.as_tensor(np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)]), dtype=torch.long)
        dest = torch.as_tensor(np.concatenate(rows), dtype=torch.long)
        pos = torch.as_tensor(rows_pos[dest.numpy()])
        cols = pos if padding_side == "right" else b.tokens.shape[1] - b.lengths[b_idx] + pos
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
            _forward(model, b, [(h, make_hook(h)) for h in hooks])
        except _StopForward:
            pass
        if pending:
            raise RuntimeError(f"hook point(s) {sorted(pending)} never fired during the forward pass")
    return out


def harvest(model, texts: Sequence[str] | TokenBatch, hooks: Sequence[str] | str, position: Position = "last",
            *, exclude: Collection[str] = (), prepend_bos: bool = True, context_size: int | None = None,
            batch_size: int = 32, padding_side: str = "right", dtype: torch.dtype = torch.float32,
            dataset: str | None = None, cache: ActivationCache | bool = True,
            model_name: str | None = None) -> Activations:
    """Activations of ``texts`` at ``hooks`` and ``position``.

    Args:
        model: a TransformerLens ``TransformerBridge`` (``lib.models.load_model``).
        texts: the texts (any length; cut to ``context_size`` tokens), or a :class:`TokenBatch`.
        hooks: hook point names (``lib.hooks.hook_name``); any hook whose activation is
            (batch, position, ...) works (``hook_z`` gives (n_rows, heads, d_head)).
        position: ``"last"`` (the last real token of each text), ``"all"`` (every real token,
            BOS included when prepended), or one int per text (negative counts from the end).
        exclude: positions to drop: ``{"bos"}`` drops the prepended BOS (a large-norm outlier
            that SAEs are not trained on); padding is never read, with or without ``"pad"``.
        prepend_bos: whether a BOS token starts each text (passed explicitly, see :func:`tokenize`).
        context_size: at most this many tokens per text, BOS included (default: the model's n_ctx).
        batch_size: texts per forward pass.
        padding_side: ``"right"`` or ``"left"``; the results agree (attention mask carried).
        dtype: stored dtype (float32 default; float16 halves the cache for big models).
        dataset: a name for the cache folder (the content hash does the real keying).
        cache: True (default folder), False (no cache) or an ``ActivationCache``.
        model_name: the cache folder of the model (default ``model.compendium_name``).
    Returns:
        ``Activations`` with ``acts[hook]`` of shape (n_rows, d) on the CPU, rows grouped by text
        in text order, positions ascending.
    """
    hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("no hooks requested")
    if len(texts) == 0:
        raise ValueError("no texts to harvest")
    exclude = _check_exclude(exclude)
    check_hooks(model, hooks)
    batch = texts if isinstance(texts, TokenBatch) else tokenize(model, texts, context_size, prepend_bos=prepend_bos)
    lengths = batch.lengths.numpy()
    rows_text, rows_pos = _positions(position, lengths)
    if "bos" in exclude and batch.has_bos:
        keep = rows_pos > 0
        rows_text, rows_pos = rows_text[keep], rows_pos[keep]
    tag = _rows_tag(position, exclude)

    store = ActivationCache() if cache is True else (cache or None)
    acts: dict[str, torch.Tensor] = {}
    todo = hooks
    files: dict[str, Path] = {}
    if store is not None:
        name = model_name or getattr(model, "compendium_name", None) or type(model).__name__
        model_fp, tokens_fp = model_fingerprint(model), tokens_fingerprint(batch.sequences())
        for h in hooks:
            files[h] = store.path(name, dataset or "texts", h, tag, store.key(model_fp, tokens_fp, h, tag, dtype))
            found = store.load(files[h])
            if found is not None and found.shape[0] == len(rows_text):
                acts[h] = found
        todo = [h for h in hooks if h not in acts]
    if todo:
        fresh = _harvest_uncached(model, batch, todo, rows_text, rows_pos, batch_size, padding_side,
                                  dtype, desc=f"harvest {dataset or ''}".strip())
        for h in todo:
            acts[h] = fresh[h]
            if store is not None:
                store.save(files[h], fresh[h])
    return Activations({h: acts[h] for h in hooks}, torch.as_tensor(rows_text), torch.as_tensor(rows_pos))


@torch.no_grad()
def batch_activations(model, batch: TokenBatch | torch.Tensor, hooks: Sequence[str] | str, logits: bool = False):
    """``{hook: [B, T, ...]}`` for every position of ``batch`` (a :class:`TokenBatch`, or a (B, T)
    token tensor without padding), in one forward pass stopped after the last hook unless
    ``logits``; with ``logits=True`` returns ``(logits [B, T, vocab], acts)``."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    check_hooks(model, hooks)
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(act, hook):
            acts[name] = act[0] if isinstance(act, tuple) else act
            if not logits and len(acts) == len(hooks):
                raise _StopForward
        return keep

    try:
        out = _forward(model, batch, [(h, keeper(h)) for h in hooks])
    except _StopForward:
        out = None
    return (out, acts) if logits else acts


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
    batch = tokenize(model, texts, prepend_bos=prepend_bos)
    out = np.zeros(len(texts))
    device = _device(model)
    batches = list(iter_batches(batch, batch_size, padding_side, pad_id=pad_id_of(model.tokenizer)))
    for b in progress(batches, desc="logprobs"):
        logp = torch.log_softmax(_forward(model, b, []).float(), dim=-1)
        target = b.tokens.to(device)[:, 1:]
        token_lp = logp[:, :-1].gather(-1, target[..., None])[..., 0]
        valid = (b.attention_mask[:, 1:] & b.attention_mask[:, :-1]).to(device)
        total = (token_lp * valid).sum(-1)
        if reduction == "mean":
            total = total / valid.sum(-1).clamp(min=1)
        out[b.index.numpy()] = total.double().cpu().numpy()
    return out


@torch.no_grad()
def next_token_logits(model, texts: Sequence[str], token_ids: Sequence[int], *, prepend_bos: bool = True,
                      batch_size: int = 32, padding_side: str = "right", fwd_hooks_for=None) -> np.ndarray:
    """Logits of ``token_ids`` at each text's last real token: (n_texts, len(token_ids)).

    ``fwd_hooks_for(batch) -> list[(hook_name, fn)]`` adds hooks per batch (used by interventions).
    """
    batch = tokenize(model, texts, prepend_bos=prepend_bos)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = np.zeros((len(texts), len(ids)))
    device = _device(model)
    for b in iter_batches(batch, batch_size, padding_side, pad_id=pad_id_of(model.tokenizer)):
        logits = _forward(model, b, fwd_hooks_for(b) if fwd_hooks_for is not None else [])
        last = b.last().to(device)
        picked = logits[torch.arange(len(last), device=device), last][:, ids.to(device)]
        out[b.index.numpy()] = picked.double().cpu().numpy()
    return out
