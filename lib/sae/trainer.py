"""Train an SAE: a loop you can read top to bottom (nanoGPT style), config as a dataclass.

>>> trainer = Trainer(sae, data, TrainConfig(total_tokens=2_000_000, sparsity_coefficient=5.0))
>>> history = trainer.fit()

``data`` is any iterator of ``[batch, d_in]`` activation batches (a :class:`~lib.sae.buffer.TensorSource`
over harvested activations, or an :class:`~lib.sae.buffer.ActivationBuffer` streaming them).  Each step:

1. sparsity coefficient (linear warm-up) and learning rate (linear warm-up, linear decay over
   the last ``lr_decay_frac`` of training) for this step;
2. ``sae.loss(x, coefficient, recon, dead_mask)``, backward, project the decoder gradient onto
   the tangent of the unit sphere, clip, Adam step, renormalise the decoder;
3. dead-latent bookkeeping: tokens since each latent last fired; a latent is dead after
   ``dead_after_tokens`` tokens without firing;
4. every ``resample_every`` steps, dead latents are resampled (Bricken et al. 2023): pointed at
   inputs the SAE reconstructs badly (drawn with probability proportional to their squared
   error), with their Adam state reset;
5. every ``checkpoint_every`` steps, an atomic checkpoint (SAE, optimizer, step, bookkeeping,
   data position, RNG) from which ``Trainer(..., resume=True)`` continues exactly.

A progress bar shows live L0, MSE and fraction alive; ``history`` holds them every ``log_every`` steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from lib.results import atomic_output
from lib.sae.base import SAE, SAEConfig, make_sae
from lib.utils import progress


@dataclass
class TrainConfig:
    total_tokens: int  # activations to train on
    batch_size: int = 4096  # only to count steps: the data source sets the real batch size
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    sparsity_coefficient: float = 1.0  # L1 (ReLU) or L0 (JumpReLU) weight; ignored by TopK
    sparsity_warmup_frac: float = 0.05  # coefficient rises linearly from 0 over this fraction of steps
    lr_warmup_steps: int = 0
    lr_decay_frac: float = 0.2  # lr falls linearly to 0 over this final fraction of steps
    recon: str = "mse"  # "mse" | "mse_batch_var" | "l2"  (see SAE.loss)
    grad_clip: float | None = 1.0
    bias_lr_scale: float = 1.0  # parameters measured in activation units (b_*, threshold) learn at lr * this
    dead_after_tokens: int = 200_000  # a latent that has not fired for this many tokens is dead
    resample_every: int | None = None  # steps between resamplings of dead latents (None: never)
    resample_until_frac: float = 0.5  # no resampling after this fraction of training
    init_b_dec: str = "mean"  # "mean" (of the first batch) | "zeros"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500  # steps
    log_every: int = 50  # steps between history records (and progress-bar updates)
    seed: int = 0
    autocast_dtype: str | None = None  # e.g. "bfloat16": run forward/backward under torch.autocast
    compile: bool = False  # torch.compile the loss

    @property
    def n_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)


CHECKPOINT_NAME = "checkpoint.pt"


def param_groups(sae: SAE, bias_lr_scale: float = 1.0) -> list[dict]:
    """Two Adam groups: weights, and parameters measured in activation units (``b_*``, ``threshold``).

    Adam moves every parameter by about ``lr`` per step whatever its gradient's size, so
    activations scaled by ``c`` need ``c`` times larger biases and, to be learned along the same
    trajectory, a ``c`` times larger bias learning rate: ``bias_lr_scale = c`` makes training
    exactly equivariant to the activation scale (with ``grad_clip=None``).
    """
    scaled = [p for n, p in sae.named_parameters() if n.startswith("b_") or n == "threshold"]
    ids = {id(p) for p in scaled}
    weights = [p for p in sae.parameters() if id(p) not in ids]
    return [{"params": weights, "lr_scale": 1.0}, {"params": scaled, "lr_scale": bias_lr_scale}]


class Trainer:
    """Holds the SAE, the optimizer and the bookkeeping; ``fit()`` runs (or resumes) training."""

    def __init__(self, sae: SAE, data: Iterator[torch.Tensor], cfg: TrainConfig, resume: bool = True):
        self.sae, self.data, self.cfg = sae, data, cfg
        self.device = next(sae.parameters()).device
        self.opt = torch.optim.Adam(param_groups(sae, cfg.bias_lr_scale), lr=cfg.lr, betas=cfg.adam_betas)
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.history: list[dict] = []
        self.n_resampled = 0
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._loss_fn = torch.compile(sae.loss) if cfg.compile else sae.loss
        ckpt = self.checkpoint_path
        if resume and ckpt is not None and ckpt.exists():
            self.load_checkpoint(ckpt)

    # --- schedules -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        cfg, n = self.cfg, self.cfg.n_steps
        if step < cfg.lr_warmup_steps:
            return cfg.lr * (step + 1) / cfg.lr_warmup_steps
        decay_start = int(n * (1 - cfg.lr_decay_frac))
        if step >= decay_start and cfg.lr_decay_frac > 0:
            return cfg.lr * (n - step) / (n - decay_start)
        return cfg.lr

    def coefficient_at(self, step: int) -> float:
        warm = int(self.cfg.n_steps * self.cfg.sparsity_warmup_frac)
        return self.cfg.sparsity_coefficient * min(1.0, (step + 1) / warm) if warm > 0 else self.cfg.sparsity_coefficient

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg, sae = self.cfg, self.sae
        autocast = (torch.autocast(self.device.type, dtype=getattr(torch, cfg.autocast_dtype))
                    if cfg.autocast_dtype else contextlib.nullcontext())
        bar = progress(range(self.step, cfg.n_steps), desc=f"SAE {sae.cfg.hook_name}", initial=self.step,
                       total=cfg.n_steps)
        sae.train()
        for step in bar:
            x = next(self.data).to(self.device, non_blocking=True)
            if step == 0 and cfg.init_b_dec == "mean":
                with torch.no_grad():
                    sae.b_dec.copy_(x.float().mean(0))
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step) * group["lr_scale"]
            coefficient = self.coefficient_at(step)
            if cfg.compile:  # a tensor, so that a changing value does not trigger a recompilation
                coefficient = torch.tensor(coefficient, device=self.device)
            with autocast:
                out = self._loss_fn(x, coefficient, cfg.recon, self.dead_mask)
            out["loss"].backward()
            sae.project_grads_()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            sae.apply_constraints_()

            f = out["features"]
            fired = f.sum(0) > 0 if sae.nonnegative_latents else (f != 0).any(0)  # the sum is one cheap pass
            self.tokens_since_fired += len(x)
            self.tokens_since_fired[fired] = 0
            self.step = step + 1

            if cfg.resample_every and self.step % cfg.resample_every == 0 \
                    and self.step < cfg.resample_until_frac * cfg.n_steps:
                self.resample_dead(x)
            if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
                rec = {"step": self.step, "loss": out["loss"].item(), "mse": out["mse"].item(),
                       "l0": (f != 0).sum(-1).float().mean().item(), "frac_alive": 1.0 - float(self.dead_mask.float().mean()),
                       "lr": self.lr_at(step), "coefficient": self.coefficient_at(step)}
                self.history.append(rec)
                bar.set_postfix(l0=f"{rec['l0']:.1f}", mse=f"{rec['mse']:.3g}", alive=f"{rec['frac_alive']:.2f}")
            if self.checkpoint_path is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.n_steps):
                self.save_checkpoint()
        sae.eval()
        return self.history

    # --- resampling dead latents -------------------------------------------------------------
    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> int:
        """Re-initialise dead latents towards badly reconstructed inputs of batch ``x``; returns how many."""
        sae = self.sae
        dead = self.dead_mask.nonzero().squeeze(-1)
        if len(dead) == 0:
            return 0
        err = (sae(x.float()) - x.float()).pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return 0
        picks = torch.multinomial(err.cpu().double(), len(dead), replacement=True, generator=self._gen)
        v = x[picks.to(x.device)].float() - sae.b_dec
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~self.dead_mask
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        sae.W_dec[dead] = v.to(sae.W_dec.dtype)
        sae.W_enc[:, dead] = (0.2 * enc_norm * v.T).to(sae.W_enc.dtype)
        sae.b_enc[dead] = 0.0
        # per-latent parameters of other architectures go back to their initial values too
        # (the gated SAE's magnitude path: r_mag = 0, i.e. the gate's own scale, and b_mag = 0)
        extra = [getattr(sae, n) for n in ("r_mag", "b_mag") if isinstance(getattr(sae, n, None), torch.nn.Parameter)]
        for p in extra:
            p[dead] = 0.0
        for p in (sae.W_dec, sae.W_enc, sae.b_enc, *extra):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    if p is sae.W_enc:
                        st[key][:, dead] = 0.0
                    else:
                        st[key][dead] = 0.0
        self.tokens_since_fired[dead] = 0
        self.n_resampled += len(dead)
        return len(dead)

    # --- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME if self.cfg.checkpoint_dir else None

    def save_checkpoint(self) -> Path:
        state = {
            "sae_cfg": self.sae.cfg.to_dict(),
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "tokens_since_fired": self.tokens_since_fired,
            "history": self.history,
            "n_resampled": self.n_resampled,
            "gen": self._gen.get_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "train_cfg": asdict(self.cfg),
        }
        with atomic_output(self.checkpoint_path) as tmp:  # never a half-written checkpoint
            torch.save(state, tmp)
        return self.checkpoint_path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["sae_cfg"] != self.sae.cfg.to_dict():
            raise ValueError(f"The checkpoint at {path} is for a different SAE config; delete it or pick another checkpoint_dir")
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.history = state["history"]
        self.n_resampled = state["n_resampled"]
        self._gen.set_state(state["gen"])
        if state["data"] is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise TypeError("The checkpoint recorded a data position but this data source cannot restore one")
            self.data.load_state_dict(state["data"])


def train_sae(sae_cfg: SAEConfig, data: Iterator[torch.Tensor], cfg: TrainConfig,
              device: str | torch.device = "cpu") -> tuple[SAE, list[dict]]:
    """Build an SAE from ``sae_cfg`` (seeded by ``cfg.seed``), train it on ``data``, return it and its history."""
    sae = make_sae(sae_cfg, seed=cfg.seed).to(device)
    trainer = Trainer(sae, data, cfg)
    history = trainer.fit()
    return sae, history
