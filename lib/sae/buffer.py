"""Shuffled activations for SAE training: from a harvested tensor, or streamed from a model.

- :class:`TensorSource`: ``[batch_size, d]`` batches drawn without replacement from an
  in-memory tensor (what :func:`lib.activations.harvest` returns), epoch after epoch: cheap when
  several SAEs train on the same hook.
- :class:`ActivationBuffer`: streams activations at one hook from a model over a list of texts,
  reading them with :func:`lib.activations.harvest` (``position="all"``, BOS excluded, padding
  never read) and refilling a shuffled buffer as it drains (dictionary_learning's buffer, in
  TransformerLens hook names).

Both are deterministic in their seed and resume exactly from ``state_dict``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lib.activations import harvest
from lib.utils import require_texts


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
    exclude: tuple[str, ...] = ("bos",)  # the BOS position's activation is a large-norm outlier
    loop: bool = True  # start over at the first text when the texts run out
    seed: int = 0


class ActivationBuffer:
    """Stream shuffled activations at ``cfg.hook_name`` from ``model`` run over ``texts`` (via :func:`harvest`).

    Holds up to ``cfg.buffer_tokens`` activations; when fewer than half remain it harvests the
    next ``prompts_per_forward`` texts until full, and reshuffles, so each batch mixes tokens from
    many contexts.  Deterministic in ``cfg.seed``.  ``state_dict`` records how many batches were
    served; ``load_state_dict`` replays that many (re-running the model) to resume exactly.
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
        got = harvest(self.model, chunk, cfg.hook_name, "all", exclude=cfg.exclude, prepend_bos=cfg.prepend_bos,
                      context_size=cfg.context_size, batch_size=len(chunk), cache=False)[cfg.hook_name]
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


class TokenSource:
    """Shuffled batches of ``n_seqs`` whole sequences of a :class:`~lib.activations.TokenBatch`, epoch
    after epoch: what the end-to-end objectives train on (they run the model, so they need tokens,
    not activations).  Deterministic in ``seed``; resumes exactly from ``state_dict``."""

    def __init__(self, batch, n_seqs: int, seed: int = 0):
        if len(batch) < n_seqs:
            raise ValueError(f"{len(batch)} sequences is fewer than one batch of {n_seqs}")
        self.batch, self.n_seqs, self.seed = batch, n_seqs, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    @property
    def tokens_per_batch(self) -> int:
        """Spliced (counted) tokens in an average batch: real tokens but BOS."""
        return int(self.batch.counted_mask().sum()) * self.n_seqs // len(self.batch)

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.batch), generator=g)

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.n_seqs > len(self.batch):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        rows = self._perm[self.pos: self.pos + self.n_seqs]
        self.pos += self.n_seqs
        return self.batch[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()

    def fingerprint(self) -> str:
        """A hash of the token ids, the mask, the batch size and the seed."""
        h = hashlib.sha256(f"{tuple(self.batch.tokens.shape)}|{self.n_seqs}|{self.seed}|{self.batch.has_bos}".encode())
        h.update(self.batch.tokens.contiguous().cpu().numpy().tobytes())
        h.update(self.batch.attention_mask.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()
