"""Fine-tuning a model on (prompt, target) pairs: the target tokens' NLL, every weight or LoRA adapters.

The rows are the soft-prompt rows of :mod:`lib.softprompts` with no soft tokens (``[BOS] prompt
target``), so a fine-tune and a soft prompt are trained and scored on the same loss.  Optionally
each step also reads ``mix_rows`` texts of the original corpus (``mix_texts``), whose mean
per-token NLL is added to the loss: the "data mixing" that keeps a fine-tune close to the model
it started from.

>>> from lib.finetune import finetune, lora_finetune
>>> defended = load_model("toy-4l")
>>> log = finetune(defended, prompts, targets, steps=200, lr=3e-4)                  # in place
>>> tuned, log = lora_finetune("toy-4l", prompts, targets, rank=8, steps=200, lr=3e-3)   # a new bridge

LoRA (Hu et al. 2021) is :mod:`peft`'s, applied to a plain Hugging Face copy of the model (peft
cannot wrap the bridge's own modules), merged into its weights after training and booted as a
``TransformerBridge``; ``log["trainable_params"]`` counts the adapters' parameters.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

from lib.softprompts import SoftBatch, cosine_lr, forward, make_batch, token_nll
from lib.utils import progress

# The linear layers LoRA adapts, per Hugging Face model type: every attention projection and both
# MLP matrices of every block (the circuit-breakers setting: "q/k/v/o and MLP").
LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model_type: str) -> list[str]:
    """The module names :data:`LORA_TARGETS` gives for ``model_type`` (a clear error for others)."""
    if model_type not in LORA_TARGETS:
        raise ValueError(f"no LoRA target modules known for model type {model_type!r} "
                         f"(known: {', '.join(LORA_TARGETS)}); pass target_modules=[...]")
    return list(LORA_TARGETS[model_type])


def _logits(module, batch: SoftBatch, emb: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``batch`` from a bridge (soft vectors allowed) or a plain Hugging Face causal LM."""
    if hasattr(module, "run_with_hooks"):
        return forward(module, emb, batch)
    if emb is not None:
        raise ValueError("soft prompts need a TransformerBridge")
    device = next(module.parameters()).device
    return module(input_ids=batch.tokens.to(device), attention_mask=batch.attention_mask.long().to(device)).logits


def train_loop(params: list[torch.Tensor], loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict]], *,
               steps: int, lr: float, weight_decay: float = 0.0, warmup: int = 10, seed: int = 0,
               module=None, desc: str = "train") -> dict:
    """The one training loop: AdamW with a cosine schedule (:func:`lib.softprompts.cosine_lr`) on ``params``.

    ``loss_fn(step, generator) -> (loss, extra)`` computes the step's loss (drawing its rows with the
    seeded ``generator``); ``extra`` (name -> float) is logged beside it (an ``extra["loss"]`` replaces
    the logged loss).  ``module`` (optional) is
    put in train mode for the loop and left in eval mode.  Returns ``{"step", "loss", *extra}``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    log: dict = {"step": [], "loss": []}
    if module is not None:
        module.train()
    for step in progress(range(steps), desc=desc, leave=False):
        total, extra = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        log["step"].append(step)
        for name, value in ({"loss": total.detach()} | extra).items():
            log.setdefault(name, []).append(float(value))
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    if module is not None:
        module.eval()
    return log


def _fit(module, params: list[torch.Tensor], full: SoftBatch, mix: SoftBatch | None, mix_rows: int, *, steps: int,
         lr: float, weight_decay: float, warmup: int, batch_size: int, seed: int, soft: torch.Tensor | None,
         desc: str) -> dict:
    """:func:`train_loop` on the target NLL of ``full`` (plus the corpus NLL of ``mix`` rows)."""

    def loss_fn(step: int, gen: torch.Generator):
        b = full.rows(torch.randperm(len(full), generator=gen)[:batch_size])
        emb = None if soft is None else soft.detach()[torch.randint(len(soft), (len(b),), generator=gen)]
        loss = token_nll(_logits(module, b, emb), b).mean()
        extra = {"loss": loss.detach()}
        if mix is None:
            return loss, extra
        m = mix.rows(torch.randperm(len(mix), generator=gen)[:mix_rows])
        per_token = token_nll(_logits(module, m, None), m) / m.target_mask.sum(1).clamp(min=1)
        return loss + per_token.mean(), extra | {"mix_loss": per_token.mean().detach()}

    log = train_loop(params, loss_fn, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed,
                     module=module, desc=desc)
    if mix is not None:
        log.setdefault("mix_loss", [])
    return log


def _shape(hf, tokenizer) -> SimpleNamespace:
    """What :func:`lib.softprompts.make_batch` reads of a model (tokenizer, ``cfg.n_ctx``), for a plain
    Hugging Face model."""
    return SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(n_ctx=getattr(hf.config, "max_position_embeddings", None)))


def _batches(model, prompts, targets, k: int, prepend_bos: bool, mix_texts, mix_rows: int):
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts (got {len(prompts)} and {len(targets)}), at least one")
    if mix_rows and not mix_texts:
        raise ValueError("mix_rows > 0 needs mix_texts (texts of the original corpus)")
    full = make_batch(model, prompts, targets, k, prepend_bos)
    mix = make_batch(model, [""] * len(mix_texts), list(mix_texts), 0, True) if mix_rows else None
    return full, mix


def finetune(model, prompts: Sequence[str], targets: Sequence[str], *, steps: int = 200, lr: float = 3e-4,
             weight_decay: float = 0.0, warmup: int = 10, batch_size: int = 32, seed: int = 0,
             soft: torch.Tensor | None = None, prepend_bos: bool = True, mix_texts: Sequence[str] | None = None,
             mix_rows: int = 0, tokenizer=None, desc: str = "fine-tune") -> dict:
    """Train every weight of ``model`` (in place) to continue each prompt with its target.

    ``model``: a bridge, or a plain Hugging Face causal LM with its ``tokenizer``.

    AdamW with a cosine schedule; minibatches of ``batch_size`` rows drawn with ``seed``.  ``soft``
    (n, k, d): soft prompts held fixed in front of the rows, each row one of them at random (the
    adversarial step of a defense against soft prompts).  ``mix_rows`` > 0: each step also reads
    that many of ``mix_texts`` (after BOS) and adds their mean per-token NLL to the loss.  The
    model is left in eval mode.  Returns the log: ``{"step", "loss"}`` (mean target NLL, nats),
    and ``"mix_loss"`` (nats per token) when mixing.
    """
    k = 0 if soft is None else soft.shape[-2]
    shape = model if tokenizer is None else _shape(model, tokenizer)
    full, mix = _batches(shape, prompts, targets, k, prepend_bos, mix_texts, mix_rows)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return _fit(model, params, full, mix, mix_rows, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
                batch_size=batch_size, seed=seed, soft=soft, desc=desc)


def lora_wrap(hf, *, rank: int = 8, alpha: float = 16.0, target_modules: Sequence[str] | None = None,
              layers: Sequence[int] | None = None, seed: int = 0):
    """``hf`` (a Hugging Face causal LM, modified in place) wrapped by peft with LoRA adapters of ``rank``
    on ``target_modules`` (default :func:`lora_targets` of its type) of the blocks ``layers`` (default
    all); ``seed`` draws the adapters' A matrices (B starts at zero, so the wrapped model computes
    what ``hf`` did).  Only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are drawn at wrapping time
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(target_modules or lora_targets(hf.config.model_type)),
                        layers_to_transform=None if layers is None else [int(i) for i in layers],
                        fan_in_fan_out=hf.config.model_type == "gpt2")  # GPT-2's Conv1D stores W transposed
    with warnings.catch_warnings():  # transformers' deprecation notice for a name peft still reads
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(hf, config)


def lora_finetune(name_or_path, prompts: Sequence[str], targets: Sequence[str], *, rank: int = 8, alpha: float = 16.0,
                  target_modules: Sequence[str] | None = None, steps: int = 200, lr: float = 3e-3,
                  weight_decay: float = 0.0, warmup: int = 10, batch_size: int = 32, seed: int = 0,
                  prepend_bos: bool = True, mix_texts: Sequence[str] | None = None, mix_rows: int = 0,
                  device: str | torch.device | None = None, dtype=None, desc: str = "LoRA fine-tune"):
    """LoRA adapters of ``rank`` on ``target_modules`` (default :func:`lora_targets` of the model's
    type) of a fresh copy of ``name_or_path``, trained like :func:`finetune` (``seed`` also seeds
    the adapters' initialisation), merged into the weights.

    Returns ``(bridge, log)``: the merged model as a ``TransformerBridge`` (the model it started
    from is not touched) and the log, with ``"trainable_params"`` (the adapters' parameters).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.models import _boot, choose_dtype, resolve_model
    from lib.utils import default_device

    kind, location = resolve_model(name_or_path)
    device = device or default_device()
    dtype = choose_dtype(kind, device, dtype)
    hf = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(location)
    full, mix = _batches(_shape(hf, tokenizer), prompts, targets, 0, prepend_bos, mix_texts, mix_rows)
    wrapped = lora_wrap(hf, rank=rank, alpha=alpha, target_modules=target_modules, seed=seed)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    log = _fit(wrapped, params, full, mix, mix_rows, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
               batch_size=batch_size, seed=seed, soft=None, desc=desc)
    log["trainable_params"] = int(sum(p.numel() for p in params))
    bridge = _boot(location, device, dtype, f"{name_or_path}+lora", kind, hf_model=wrapped.merge_and_unload().eval())
    for p in bridge.parameters():  # a trained model to read, like load_model's (grads only where asked for)
        p.requires_grad_(False)
    return bridge, log
