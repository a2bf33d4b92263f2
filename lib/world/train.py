"""Train a toy-world causal LM and save it in Hugging Face format (nanoGPT-style, top to bottom).

    python -m lib.world.train --model toy-2l            # one model
    python -m lib.world.build                           # all of them (what `make models` runs)

The loop: AdamW, linear warm-up then cosine decay, gradient clipping at 1.0, a held-out eval every
``eval_every`` steps, an atomic checkpoint (model, optimizer, step, log) every ``ckpt_every`` steps
from which an interrupted run resumes, and a progress bar with the live loss.  The saved
directory holds the HF weights and tokenizer plus ``provenance.json`` (command, seed, corpus,
steps, tokens, final losses) and ``training_log.json`` (the curves that 00_toy_world plots).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lib import paths
from lib.results import atomic_output, atomic_write_text
from lib.utils import progress, set_seed
from lib.world.registry import ModelSpec


def build_hf_model(spec: ModelSpec, vocab_size: int, bos: int = 0, eos: int = 1, pad: int = 2):
    """A freshly initialised Hugging Face causal LM for ``spec``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab_size)
    if spec.arch == "neox":
        cfg = GPTNeoXConfig(hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
                            num_attention_heads=spec.n_heads, intermediate_size=spec.d_mlp,
                            max_position_embeddings=spec.n_ctx, rotary_pct=0.25,
                            use_parallel_residual=False, tie_word_embeddings=False,
                            hidden_dropout=0.0, attention_dropout=0.0, **ids)
        return GPTNeoXForCausalLM(cfg)
    if spec.arch == "gpt2":
        cfg = GPT2Config(n_embd=spec.d_model, n_layer=spec.n_layers, n_head=spec.n_heads,
                         n_inner=spec.d_mlp, n_positions=spec.n_ctx, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **ids)
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown arch {spec.arch!r}: 'neox' or 'gpt2'")


def lr_at(step: int, spec: ModelSpec) -> float:
    """Linear warm-up to ``spec.lr``, then cosine decay to 10% of it at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` [batch, seq] (every sequence starts with BOS)."""
    logits = model(tokens).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@dataclass
class TrainResult:
    model: torch.nn.Module
    log: dict
    seconds: float


def _save_checkpoint(path: Path, model, opt, step: int, log: dict, data_rng: torch.Generator, key: dict,
                     objective: torch.nn.Module | None = None) -> None:
    with atomic_output(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                    "rng": torch.get_rng_state(), "data_rng": data_rng.get_state(), "key": key,
                    "objective": None if objective is None else objective.state_dict()}, tmp)


def train(spec: ModelSpec, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int,
          steps: int | None = None, eval_every: int = 100, ckpt_every: int = 250,
          checkpoint: Path | None = None, stop_at: int | None = None,
          probe: Callable[[torch.nn.Module], dict] | None = None, probe_every: int = 500,
          first_phase_rows: int = 0, run_key: dict | None = None,
          init: torch.nn.Module | None = None, objective: torch.nn.Module | None = None) -> TrainResult:
    """Train ``spec`` on ``train_tokens`` [n_docs, n_ctx] (BOS-first rows), cycling through them.

    ``steps`` overrides ``spec.steps`` (quick runs).  With ``checkpoint``, resumes from it if it
    exists and writes it every ``ckpt_every`` steps.  ``stop_at`` ends the run early at that step
    (same schedule as the full run), leaving the checkpoint to resume from.  ``probe(model)``, when
    given, is called every ``probe_every`` steps and at the end; its dict is logged under
    ``log["probe"]`` with the step (the skill to watch beside the loss, e.g. judgement AUROC).
    A curriculum: with ``spec.curriculum_steps`` and ``first_phase_rows``, the first steps draw
    documents from the first ``first_phase_rows`` rows of ``train_tokens`` (the first-phase corpus)
    and later steps from the rest.  ``run_key`` (e.g. the corpus configuration) is saved in the
    checkpoint with the spec; resuming from a checkpoint of another run is refused.  ``init`` (a Hugging
    Face causal LM of ``spec``'s shape) is trained in place instead of a fresh model: a fine-tune or
    continued training with the same loop (the backdoors of ``lib.backdoor``).  ``objective`` (a module
    whose ``forward(model, tokens)`` returns ``(loss, {name: number})``) replaces the LM loss; its own
    parameters train with the model's (no weight decay), its state is checkpointed with it, its
    numbers are logged per step under their names, and its ``before_step()`` / ``after_step()`` run
    around each optimizer step when it has them (the jointly trained SAE of ``lib.sae.shared``).
    """
    steps = steps or spec.steps
    spec = ModelSpec(**{**spec.to_dict(), "steps": steps})
    set_seed(spec.seed)
    model = build_hf_model(spec, vocab_size) if init is None else init
    groups = [{"params": list(model.parameters())}]
    if objective is not None and any(True for _ in objective.parameters()):
        groups.append({"params": list(objective.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    params = [p for g in groups for p in g["params"]]
    log: dict = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "tokens_per_step":
                 spec.batch_size * (train_tokens.shape[1] - 1), "probe": []}
    start = 0
    g = torch.Generator().manual_seed(spec.seed)  # which documents each step sees
    key = {"spec": spec.to_dict(), "run": run_key or {}, "rows": [int(x) for x in train_tokens.shape],
           "first_phase_rows": first_phase_rows}
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            state = torch.load(checkpoint, weights_only=False)
        except Exception as e:  # truncated or empty file
            raise RuntimeError(f"cannot read the training checkpoint {checkpoint} ({type(e).__name__}: {e}); "
                               f"delete it to start the run again") from e
        if state.get("key", key) != key:
            raise RuntimeError(f"the checkpoint {checkpoint} belongs to another run (spec, corpus or data differ); "
                               f"delete it to start this run from scratch")
        model.load_state_dict(state["model"])
        if objective is not None:
            objective.load_state_dict(state["objective"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        g.set_state(state["data_rng"])
        start, log = state["step"], state["log"]
    t0 = time.perf_counter()
    bar = progress(range(start, min(steps, stop_at or steps)), desc=spec.name, initial=start, total=steps)
    for step in bar:
        model.train()
        if step < spec.curriculum_steps and first_phase_rows:
            idx = torch.randint(first_phase_rows, (spec.batch_size,), generator=g)
        else:
            idx = torch.randint(first_phase_rows, len(train_tokens), (spec.batch_size,), generator=g)
        if objective is None:
            loss, terms = lm_loss(model, train_tokens[idx].long()), {}
        else:
            objective.train()
            loss, terms = objective(model, train_tokens[idx].long())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(objective, "before_step"):
            objective.before_step()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if hasattr(objective, "after_step"):
            objective.after_step()
        log["step"].append(step + 1)
        log["train_loss"].append(round(loss.item(), 4))
        for name, value in terms.items():
            log.setdefault(name, []).append(value)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            log["eval_step"].append(step + 1)
            log["eval_loss"].append(round(evaluate(model, eval_tokens), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{log['eval_loss'][-1]:.3f}")
        if probe is not None and ((step + 1) % probe_every == 0 or step + 1 == steps):
            model.eval()
            with torch.no_grad():
                log["probe"].append({"step": step + 1, **probe(model)})
        if checkpoint is not None and ((step + 1) % ckpt_every == 0 or step + 1 == steps):
            _save_checkpoint(Path(checkpoint), model, opt, step + 1, log, g, key, objective)
    model.eval()
    return TrainResult(model, log, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over ``tokens`` [n, n_ctx]."""
    model.eval()
    losses = [lm_loss(model, tokens[i:i + batch_size].long()).item() * len(tokens[i:i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    return sum(losses) / len(tokens)


def save_model(result: TrainResult, spec: ModelSpec, tokenizer, out_dir: Path, provenance: dict,
               extras: Callable[[Path], None] | None = None) -> Path:
    """Write the HF model + tokenizer + ``provenance.json`` + ``training_log.json`` to ``out_dir``.

    Written to a sibling temporary directory and renamed, so a crash never leaves half a model;
    ``extras(folder)``, when given, writes more into that folder before the rename (the jointly
    trained SAE of ``lib.sae.shared``).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    result.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in result.model.parameters())
    record = {
        "name": spec.name,
        "spec": spec.to_dict(),
        "n_params": n_params,
        "train_tokens": result.log["tokens_per_step"] * len(result.log["step"]),
        "final_train_loss": float(sum(result.log["train_loss"][-50:]) / len(result.log["train_loss"][-50:])),
        "final_eval_loss": result.log["eval_loss"][-1],
        "train_seconds": round(result.seconds, 1),
        "torch": torch.__version__,
        **provenance,
    }
    atomic_write_text(tmp / "provenance.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(tmp / "training_log.json", json.dumps(result.log) + "\n")
    if extras is not None:
        extras(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
