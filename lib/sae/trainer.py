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

Resuming checks that it continues the same run: the SAE config and the training config must
match the checkpoint's (only ``RESUMABLE_CHANGES`` may differ), and so must the data, when the
source can say what it serves (``fingerprint()``, as :class:`~lib.sae.buffer.TensorSource` and
:class:`~lib.sae.buffer.ActivationBuffer` do).  A mismatch is refused with a message.  A source
that cannot save its position (no ``state_dict``) restarts from its beginning, with a
:class:`ResumeWarning` saying so.

A progress bar shows live L0, MSE and fraction alive; ``history`` holds them every ``log_every`` steps.

Objectives (``TrainConfig.objective``, Braun et al. 2024): ``"local"`` trains on activation batches
with ``sae.loss`` (step 2 above).  ``"e2e"`` and ``"e2e_ds"`` train on token batches
(:class:`~lib.sae.buffer.TokenSource`) with the model passed as ``Trainer(..., model=model)`` and
frozen: each step runs it clean (:func:`~lib.sae.splice.clean_pass`), then again with the SAE's
reconstruction spliced in at its hook, and the loss is :func:`~lib.sae.splice.e2e_loss`,
``kl_coefficient * KL(p_orig || p_spliced) + coefficient * L1 (+ downstream_coefficient * mean
downstream residual MSE)``; its gradient reaches the SAE through the later layers.  The objective
is recorded in ``sae.cfg.objective`` and so in the saved SAE's metadata.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from lib.activations import TokenBatch
from lib.hooks import downstream_resid_hooks
from lib.results import atomic_output
from lib.sae import distributed as dd
from lib.sae.base import RECON_LOSSES, SAE, SAEConfig, make_sae, positive_int
from lib.sae.splice import clean_pass, e2e_loss
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
    recon: str = "mse"  # "mse" | "mse_mean" | "mse_batch_var" | "l2"  (see SAE.loss)
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
    # what the SAE is trained to preserve (Braun et al. 2024): "local" (its input: recon + sparsity),
    # "e2e" (the model's output distribution: KL + sparsity) or "e2e_ds" (e2e + downstream residuals)
    objective: str = "local"
    kl_coefficient: float = 1.0  # e2e objectives: weight of KL(p_orig || p_spliced)
    downstream_coefficient: float = 0.0  # e2e_ds: weight of the mean downstream residual MSE

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {what}")

        for name in ("total_tokens", "batch_size", "checkpoint_every", "log_every", "dead_after_tokens"):
            setattr(self, name, positive_int(getattr(self, name), f"TrainConfig.{name}"))
        need(self.total_tokens >= self.batch_size,
             f"total_tokens ({self.total_tokens}) is less than one batch ({self.batch_size})")
        need(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(self.sparsity_coefficient >= 0, f"sparsity_coefficient must be >= 0, got {self.sparsity_coefficient!r}")
        need(0 <= self.sparsity_warmup_frac <= 1 and 0 <= self.lr_decay_frac <= 1 and 0 <= self.resample_until_frac <= 1,
             "sparsity_warmup_frac, lr_decay_frac and resample_until_frac are fractions in [0, 1]")
        need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps!r}")
        need(self.recon in RECON_LOSSES, f"recon must be one of {RECON_LOSSES}, got {self.recon!r}")
        need(self.init_b_dec in ("mean", "zeros"), f"init_b_dec must be 'mean' or 'zeros', got {self.init_b_dec!r}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.resample_every is not None:
            self.resample_every = positive_int(self.resample_every, "TrainConfig.resample_every (steps, or None)")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective != "local":
            need(self.resample_every is None, "resampling dead latents needs the local reconstruction error: "
                 f"set resample_every=None for objective {self.objective!r}")
            need(self.kl_coefficient > 0, f"kl_coefficient must be > 0, got {self.kl_coefficient!r}")
        need((self.downstream_coefficient > 0) == (self.objective == "e2e_ds"),
             f"downstream_coefficient ({self.downstream_coefficient!r}) must be > 0 for objective 'e2e_ds' "
             f"and 0 otherwise (objective {self.objective!r})")
        need(self.autocast_dtype is None or isinstance(getattr(torch, str(self.autocast_dtype), None), torch.dtype),
             f"autocast_dtype {self.autocast_dtype!r} is not a torch dtype (e.g. 'bfloat16') or None")

    @property
    def n_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)


OBJECTIVES = ("local", "e2e", "e2e_ds")
CHECKPOINT_NAME = "checkpoint.pt"
# TrainConfig fields that may change between a run and its resumption: they do not touch the math
RESUMABLE_CHANGES = frozenset({"checkpoint_dir", "checkpoint_every", "log_every", "compile"})


class ResumeWarning(UserWarning):
    """A resumed run that cannot be exactly the uninterrupted one (e.g. the data order restarts)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or from a different SAE, config or data."""


def data_fingerprint(data) -> str | None:
    """What a data source serves, as a string (``data.fingerprint()``), or None when it cannot say."""
    fp = getattr(data, "fingerprint", None)
    return fp() if callable(fp) else None


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

    def __init__(self, sae: SAE, data: Iterator, cfg: TrainConfig, resume: bool = True, model=None):
        if cfg.objective != "local" and model is None:
            raise ValueError(f"objective {cfg.objective!r} runs the model with the SAE spliced in: pass model=")
        if cfg.objective != "local" and not sae.cfg.hook_name:
            raise ValueError(f"objective {cfg.objective!r} splices the SAE at its hook: set SAEConfig.hook_name")
        self.sae, self.data, self.cfg, self.model = sae, data, cfg, model
        sae.cfg.objective = cfg.objective  # recorded with the SAE (saved in its metadata by lib.sae.io)
        self.downstream = (downstream_resid_hooks(model, sae.cfg.hook_name) if cfg.objective == "e2e_ds" else [])
        if cfg.objective == "e2e_ds" and not self.downstream:
            raise ValueError(f"objective 'e2e_ds' needs blocks after {sae.cfg.hook_name}; there are none")
        self.device = next(sae.parameters()).device
        self.opt = torch.optim.Adam(param_groups(sae, cfg.bias_lr_scale), lr=cfg.lr, betas=cfg.adam_betas,
                                    fused=self.device.type == "cuda")  # one kernel for all parameters on a GPU
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.history: list[dict] = []
        self.n_resampled = 0
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.world = dd.current()  # several processes under torchrun: see lib.sae.distributed
        if cfg.objective != "local" and self.world.size > 1:
            raise ValueError(f"objective {cfg.objective!r} trains in one process; run it without torchrun")
        self._loss_fn = dd.wrap(sae, torch.compile(sae.loss) if cfg.compile else None, self.world)
        ckpt = self.checkpoint_path
        self._data_fp = data_fingerprint(data) if ckpt is not None else None
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
    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Train to ``cfg.n_steps`` (or stop after step ``stop_at``, checkpointed, to resume later)."""
        cfg, sae, world = self.cfg, self.sae, self.world
        autocast = (torch.autocast(self.device.type, dtype=getattr(torch, cfg.autocast_dtype))
                    if cfg.autocast_dtype else contextlib.nullcontext())
        end = cfg.n_steps if stop_at is None else min(cfg.n_steps, stop_at)
        bar = progress(range(self.step, end), desc=f"SAE {sae.cfg.hook_name}", initial=self.step,
                       total=cfg.n_steps, **({} if world.is_main else {"disable": True}))
        sae.train()
        frozen = self._freeze_model()
        try:
            for step in bar:
                self._step(step, autocast, end)
                if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
                    bar.set_postfix(l0=f"{self.history[-1]['l0']:.1f}", mse=f"{self.history[-1]['mse']:.3g}",
                                    alive=f"{self.history[-1]['frac_alive']:.2f}")
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        sae.eval()
        return self.history

    def _freeze_model(self) -> list:
        """The model's parameters stop requiring gradients while the SAE trains (restored after)."""
        if self.model is None:
            return []
        params = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in params:
            p.requires_grad_(False)
        return params

    def _next_batch(self, step: int):
        """``(x [n, d_in], clean)``: the activations the SAE reads this step, and for e2e objectives
        the :class:`~lib.sae.splice.CleanPass` of the token batch they come from (else None)."""
        cfg, sae = self.cfg, self.sae
        try:
            got = next(self.data)
        except StopIteration:
            raise RuntimeError(
                f"The data source ran out at step {step} of {cfg.n_steps} ({step * cfg.batch_size} of "
                f"{cfg.total_tokens} tokens): give it more data, let it loop (BufferConfig.loop=True), or lower "
                "total_tokens.") from None
        if cfg.objective != "local":
            if not isinstance(got, TokenBatch):
                raise ValueError(f"objective {cfg.objective!r} trains on token batches (lib.sae.buffer.TokenSource), "
                                 f"the data source served {type(got).__name__}")
            with torch.no_grad():
                clean = clean_pass(self.model, got, sae.cfg.hook_name, self.downstream)
            return clean.x.to(self.device), clean
        x = got
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"The data source served {tuple(getattr(x, 'shape', ())) or type(x).__name__}; the SAE "
                             f"needs [batch, {sae.cfg.d_in}] activations (its hook: {sae.cfg.hook_name or '?'})")
        return x.to(self.device, non_blocking=True), None

    def _step(self, step: int, autocast, end: int) -> None:
        cfg, sae, world = self.cfg, self.sae, self.world
        x, clean = self._next_batch(step)
        if step == 0 and cfg.init_b_dec == "mean":
            with torch.no_grad():
                sae.b_dec.copy_(dd.mean(x.float().mean(0), world))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step) * group["lr_scale"]
        coefficient = self.coefficient_at(step)
        if cfg.compile:  # a tensor, so that a changing value does not trigger a recompilation
            coefficient = torch.tensor(coefficient, device=self.device)
        with autocast:
            if clean is None:
                out = self._loss_fn(x, coefficient, cfg.recon, self.dead_mask)
            else:
                out = e2e_loss(sae, self.model, clean, coefficient, kl_coefficient=cfg.kl_coefficient,
                               downstream_coefficient=cfg.downstream_coefficient)
        out["loss"].backward()
        sae.project_grads_()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sae.apply_constraints_()

        f = out["features"]
        if "fired" in out:  # the sparse path knows its active latents
            fired = out["fired"]
        else:
            fired = f.sum(0) > 0 if sae.nonnegative_latents else (f != 0).any(0)  # the sum is one cheap pass
        fired = dd.any_fired(fired, world)
        # (torch.where, not a boolean index: no host-device synchronisation on a GPU)
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + len(x) * world.size)
        self.step = step + 1

        if cfg.resample_every and self.step % cfg.resample_every == 0 \
                and self.step < cfg.resample_until_frac * cfg.n_steps:
            self.resample_dead(x)
        if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
            rec = {"step": self.step, "loss": float(dd.mean(out["loss"].detach(), world)),
                   "mse": float(dd.mean(out["mse"], world)),
                   "l0": float(out["l0"]) if "l0" in out else (f != 0).sum(-1).float().mean().item(),
                   "frac_alive": 1.0 - float(self.dead_mask.float().mean()),
                   "lr": self.lr_at(step), "coefficient": self.coefficient_at(step)}
            if clean is not None:
                rec.update(kl=out["kl"].item(), downstream=out["downstream"].item())
            self.history.append(rec)
        if self.checkpoint_path is not None and (self.step % cfg.checkpoint_every == 0 or self.step in (end, cfg.n_steps)):
            self.save_checkpoint()

    # --- resampling dead latents -------------------------------------------------------------
    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> int:
        """Re-initialise dead latents towards badly reconstructed inputs of batch ``x``; returns how many."""
        sae = self.sae
        dead = self.dead_mask.nonzero().squeeze(-1)
        if len(dead) == 0:
            return 0
        x = dd.gather_rows(x, self.world)  # every rank resamples towards the same (global) batch
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
        """Rank 0 writes (atomically); the others wait for it, so a resumed run finds the file whole."""
        if not self.world.is_main:
            dd.barrier(self.world)
            return self.checkpoint_path
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
            "data_fingerprint": self._data_fp,
            "train_cfg": asdict(self.cfg),
        }
        with atomic_output(self.checkpoint_path) as tmp:  # never a half-written checkpoint
            torch.save(state, tmp)
        dd.barrier(self.world)
        return self.checkpoint_path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``, after checking it belongs to this very run."""
        state = _read_checkpoint(path, self.device)
        if state["sae_cfg"] != self.sae.cfg.to_dict():
            changed = _differences(state["sae_cfg"], self.sae.cfg.to_dict())
            raise CheckpointError(f"The checkpoint at {path} is for a different SAE config ({changed}); delete it or "
                                  "pick another checkpoint_dir")
        saved_cfg = state.get("train_cfg") or {}
        changed = _differences(saved_cfg, asdict(self.cfg), ignore=RESUMABLE_CHANGES)
        if changed:
            raise CheckpointError(
                f"The checkpoint at {path} was trained with another configuration ({changed}). Resuming would "
                f"mix two runs. Use the checkpoint's settings, or start afresh: delete {path} or pick another "
                "checkpoint_dir.")
        saved_fp = state.get("data_fingerprint")
        if saved_fp is not None and self._data_fp is not None and saved_fp != self._data_fp:
            finished = " (it has finished: nothing would be trained)" if state["step"] >= self.cfg.n_steps else ""
            raise CheckpointError(
                f"The checkpoint at {path} was trained on different data than this data source serves{finished}. "
                "Delete it or pick another checkpoint_dir to train on the new data.")
        if saved_fp is not None and self._data_fp is None and state["step"] > 0:
            warnings.warn(f"Resuming {path} at step {state['step']}: this data source cannot say what it serves "
                          "(no fingerprint()), so it cannot be checked to be the data the checkpoint was trained on.",
                          ResumeWarning, stacklevel=3)
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.history = state["history"]
        self.n_resampled = state["n_resampled"]
        self._gen.set_state(state["gen"])
        if state["data"] is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise CheckpointError(f"The checkpoint at {path} recorded a data position but this data source "
                                      "cannot restore one (no load_state_dict); use the source it was trained with.")
            self.data.load_state_dict(state["data"])
        elif self.step > 0 and self.step < self.cfg.n_steps:
            warnings.warn(
                f"Resuming {path} at step {self.step}: the data order cannot be restored (the source has no "
                "state_dict), so the data starts again from its beginning and the run differs from an "
                "uninterrupted one. TensorSource and ActivationBuffer save their position.",
                ResumeWarning, stacklevel=3)


def _differences(saved: dict, now: dict, ignore=frozenset()) -> str:
    """``"lr 0.001 -> 0.003, total_tokens ..."`` for the fields that differ."""
    def same(a, b):
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
    keys = [k for k in dict.fromkeys([*saved, *now]) if k not in ignore]
    diffs = [f"{k} {saved.get(k, '(absent)')!r} in the checkpoint, {now.get(k, '(absent)')!r} now"
             for k in keys if not same(saved.get(k), now.get(k))]
    return "; ".join(diffs)


def _read_checkpoint(path: Path, device) -> dict:
    """``torch.load`` of a checkpoint, with an error naming the file when it is empty, truncated or foreign."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"The checkpoint {path} is empty (0 bytes). Checkpoints are written whole through "
                                  "a rename, so it was cut elsewhere (a full disk, a copy): delete it to start over.")
        state = torch.load(path, map_location=device, weights_only=False)
    except CheckpointError:
        raise
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"The checkpoint {path} cannot be read ({type(err).__name__}: {err}): it is truncated or not a "
            "checkpoint. Delete it to start over, or point checkpoint_dir elsewhere.") from err
    required = {"sae_cfg", "sae", "opt", "step", "tokens_since_fired", "history", "n_resampled", "gen", "data"}
    if not isinstance(state, dict) or not required <= set(state):
        raise CheckpointError(f"{path} is not an SAE training checkpoint (missing "
                              f"{sorted(required - set(state)) if isinstance(state, dict) else 'everything'}); "
                              "delete it or point checkpoint_dir elsewhere.")
    return state


def train_sae(sae_cfg: SAEConfig, data: Iterator, cfg: TrainConfig,
              device: str | torch.device = "cpu", model=None) -> tuple[SAE, list[dict]]:
    """Build an SAE from ``sae_cfg`` (seeded by ``cfg.seed``), train it on ``data``, return it and its history
    (``model``: the frozen model an e2e objective splices the SAE into)."""
    sae = make_sae(sae_cfg, seed=cfg.seed).to(device)
    trainer = Trainer(sae, data, cfg, model=model)
    history = trainer.fit()
    return sae, history
