"""The setup notebooks 03-06 share: a model, toy-corpus documents, activations, SAEs trained on them.

>>> data = prepare("toy-2l", [hook_name(0)], n_train_docs=60, n_eval_docs=12, context_size=64, seed=0)
>>> sae = data.train(d_sae=256, coefficient=1.0, total_tokens=120 * 256, batch_size=256, seed=0)
>>> evaluate(sae, data.model, data.eval_batch())          # at sae.cfg.hook_name

The documents are freshly generated toy-world corpus documents (``generate_corpus``; pass
``corpus_seed`` to draw ones the LMs were not trained on), split into training and held-out
ones.  Activations are read by :func:`lib.activations.harvest` at every real token but BOS, each
document cut to ``context_size`` tokens (BOS included): what the SAEs train and are scored on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib.activations import TokenBatch, harvest, tokenize
from lib.sae.base import SAE, SAEConfig
from lib.sae.buffer import TensorSource
from lib.sae.trainer import TrainConfig, train_sae


def activation_scale(acts: torch.Tensor) -> float:
    """``sqrt(sum_d var(x_d))``: the typical distance of an activation [n, d] from the mean, the
    unit in which an L1 coefficient carries over between hooks and models."""
    return float(acts.std(0).pow(2).sum().sqrt())


def train_on(acts: torch.Tensor, hook: str, d_sae: int, coefficient: float, *, total_tokens: int,
             batch_size: int, lr: float = 3e-3, seed: int = 0, architecture: str = "relu", model_name: str = "",
             context_size: int | None = None, sae_kwargs: dict | None = None,
             device: str | torch.device = "cpu", processes: int = 1, return_history: bool = False, **train_kwargs):
    """Train one SAE of ``architecture`` on ``acts`` [n, d] (shuffled by a :class:`TensorSource`
    seeded with ``seed``) for ``total_tokens`` activations; ``train_kwargs`` go to :class:`TrainConfig`
    and ``sae_kwargs`` to :class:`SAEConfig` (``k`` for TopK, ...).  ``processes > 1`` trains the
    same SAE data-parallel under ``torchrun`` (:func:`lib.sae.train.train_in_processes`).
    ``return_history``: return ``(sae, history)``, the trainer's records every ``log_every`` steps
    (one process only)."""
    cfg = SAEConfig(d_in=acts.shape[1], d_sae=d_sae, architecture=architecture, hook_name=hook,
                    model_name=model_name, context_size=context_size, **(sae_kwargs or {}))
    tc = TrainConfig(total_tokens=total_tokens, batch_size=batch_size, lr=lr, seed=seed,
                     sparsity_coefficient=coefficient, **train_kwargs)
    if processes > 1:
        if return_history:
            raise ValueError("return_history needs processes=1")
        from lib.sae.train import train_in_processes

        return train_in_processes(cfg, tc, acts, processes, device=str(device))[0]
    sae, history = train_sae(cfg, TensorSource(acts, batch_size, seed=seed, device=device), tc, device=device)
    return (sae, history) if return_history else sae


@dataclass
class SAEData:
    """A model, its training and held-out documents, and activations at ``hooks``.

    acts / eval_acts: hook -> [n_tokens, d_model] (every real token but BOS, in document order), on
    the model's device.
    """

    model: object
    model_name: str
    hooks: list[str]
    train_docs: list[str]
    eval_docs: list[str]
    context_size: int
    acts: dict[str, torch.Tensor]
    eval_acts: dict[str, torch.Tensor]

    @property
    def hook(self) -> str:
        """The first (often the only) hook."""
        return self.hooks[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def eval_batch(self, context_size: int | None = None, **kwargs) -> TokenBatch:
        """The held-out documents as one :class:`TokenBatch` (``tokenize`` keyword arguments pass through)."""
        return tokenize(self.model, self.eval_docs, context_size or self.context_size, **kwargs)

    def train(self, d_sae: int, coefficient: float, *, hook: str | None = None, acts: torch.Tensor | None = None,
              **kwargs) -> SAE:
        """:func:`train_on` the activations at ``hook`` (default :attr:`hook`), or on ``acts``, with this
        data's model name, context size and device filled in."""
        hook = hook or self.hook
        acts = self.acts[hook] if acts is None else acts
        kwargs = {"model_name": self.model_name, "context_size": self.context_size, "device": self.device, **kwargs}
        return train_on(acts, hook, d_sae, coefficient, **kwargs)


def prepare(model, hooks: Sequence[str] | str, n_train_docs: int, n_eval_docs: int = 0, context_size: int = 128,
            seed: int = 0, corpus_seed: int | None = None, device: str | torch.device | None = None,
            batch_size: int = 32, cache: bool = False, docs: Sequence[str] | None = None) -> SAEData:
    """Load ``model`` (a name, or an already loaded model), generate ``n_train_docs + n_eval_docs``
    corpus documents (seed ``corpus_seed``, default ``seed``), or take them from ``docs`` (training
    ones first), and harvest their activations at ``hooks``."""
    from lib.models import load_model

    name = model if isinstance(model, str) else getattr(model, "compendium_name", "")
    lm = load_model(model, device=device) if isinstance(model, str) else model
    device = next(lm.parameters()).device
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if docs is None:
        from lib.world.corpus import generate_corpus

        docs = generate_corpus(n_train_docs + n_eval_docs, seed=seed if corpus_seed is None else corpus_seed)
    elif len(docs) < n_train_docs + n_eval_docs:
        raise ValueError(f"{len(docs)} documents given, {n_train_docs} + {n_eval_docs} asked for")
    docs = list(docs)[: n_train_docs + n_eval_docs]
    train_docs, eval_docs = docs[:n_train_docs], docs[n_train_docs:]

    def read(texts: list[str], part: str) -> dict[str, torch.Tensor]:
        if not texts:
            return {}
        got = harvest(lm, texts, hooks, "all", exclude={"bos"}, context_size=context_size, batch_size=batch_size,
                      cache=cache, dataset=f"corpus-{part}")
        return {h: got[h].to(device) for h in hooks}  # beside the model, where the SAEs will train

    return SAEData(lm, name, hooks, train_docs, eval_docs, context_size, read(train_docs, "train"),
                   read(eval_docs, "eval"))
