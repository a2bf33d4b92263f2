"""Full fine-tuning of a model on (prompt, target) pairs: the target tokens' NLL, every weight trained.

The rows are the soft-prompt rows of :mod:`lib.softprompts` with no soft tokens (``[BOS] prompt
target``), so a fine-tune and a soft prompt are trained and scored on the same loss.

>>> from lib.finetune import finetune
>>> defended = load_model("toy-4l")
>>> log = finetune(defended, prompts, targets, steps=200, lr=3e-4)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lib.softprompts import cosine_lr, forward, make_batch, token_nll
from lib.utils import progress


def finetune(model, prompts: Sequence[str], targets: Sequence[str], *, steps: int = 200, lr: float = 3e-4,
             weight_decay: float = 0.0, warmup: int = 10, batch_size: int = 32, seed: int = 0,
             soft: torch.Tensor | None = None, prepend_bos: bool = True, desc: str = "fine-tune") -> dict:
    """Train every weight of ``model`` (in place) to continue each prompt with its target.

    AdamW with a cosine schedule; minibatches of ``batch_size`` rows drawn with ``seed``.  ``soft``
    (n, k, d): soft prompts held fixed in front of the rows, each row one of them at random (the
    adversarial step of a defense against soft prompts).  The model is left in eval mode.
    Returns the log: ``{"step": [...], "loss": [...]}`` (mean target NLL, nats).
    """
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts (got {len(prompts)} and {len(targets)}), at least one")
    k = 0 if soft is None else soft.shape[-2]
    full = make_batch(model, prompts, targets, k, prepend_bos)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    log: dict = {"step": [], "loss": []}
    for step in progress(range(steps), desc=desc, leave=False):
        b = full.rows(torch.randperm(len(full), generator=gen)[:batch_size])
        emb = None if soft is None else soft.detach()[torch.randint(len(soft), (len(b),), generator=gen)]
        loss = token_nll(forward(model, emb, b), b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["step"].append(step)
        log["loss"].append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    model.eval()
    return log

