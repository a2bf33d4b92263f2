"""Data-parallel SAE training over several processes (``torchrun``, ``torch.distributed``).

Each process (rank) trains the same SAE on its own shard of every global batch; the SAE is
wrapped in ``DistributedDataParallel``, which averages the gradients, so with shards of equal
size a step is the single-process step on the whole global batch (the losses are means over
tokens).  What else must agree across ranks, the trainer synchronises (:class:`~lib.sae.trainer.Trainer`):
which latents fired (the dead-latent bookkeeping), the decoder-bias initialisation (mean of the
global batch), the inputs a dead latent is resampled towards (gathered), and the logged loss.
Rank 0 alone writes checkpoints (atomically); every rank resumes from the same file.

Launch (one machine, N processes; gloo on CPU, nccl on GPUs, chosen from the device):

    torchrun --nproc_per_node N -m lib.sae.train --config run.json

Several machines: the same command on each, with ``--nnodes M --node_rank I
--rdzv_backend c10d --rdzv_endpoint HOST:PORT`` (README, "Training an SAE on several GPUs").

BatchTopK chooses its ``B * k`` latents within each rank's shard (as a per-device batch does in
every data-parallel implementation), so it is not the single-process run on the global batch;
TopK, ReLU, JumpReLU and gated SAEs are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """Where this process is: ``rank`` of ``size`` (1 and 0 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def init_from_env(device: str = "cpu") -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it).

    Returns the world and this rank's device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = str(device).startswith("cuda")
    if size > 1 and not dist.is_initialized():
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but this process sees no GPU; use device 'cpu' (gloo)")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    world = current()
    if cuda:
        torch.cuda.set_device(world.local_rank)
        return world, torch.device("cuda", world.local_rank)
    return world, torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatches:
    """This rank's rows of every global batch a source serves: rows ``[rank * b, (rank + 1) * b)``.

    ``source`` serves ``[global_batch, d]`` batches (every rank builds it identically, e.g. a
    :class:`~lib.sae.buffer.TensorSource` with the same seed); the global batch must divide by
    the world size.  ``state_dict`` / ``fingerprint`` pass through (identical on every rank).
    """

    def __init__(self, source, world: World):
        self.source, self.world = source, world

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        x = next(self.source)
        n, size = len(x), self.world.size
        if n % size:
            raise ValueError(f"a global batch of {n} does not split evenly over {size} ranks: pick a batch size "
                             f"divisible by the number of processes")
        b = n // size
        return x[self.world.rank * b: (self.world.rank + 1) * b]

    def __getattr__(self, name):  # state_dict, load_state_dict, fingerprint, ...
        return getattr(self.source, name)


class LossModule(nn.Module):
    """``forward(x, ...) = sae.loss(x, ...)``: the shape ``DistributedDataParallel`` wraps."""

    def __init__(self, sae: nn.Module, loss_fn=None):
        super().__init__()
        self.sae = sae
        self._loss_fn = loss_fn or sae.loss

    def forward(self, x, sparsity_coefficient, recon, dead_mask):
        return self._loss_fn(x, sparsity_coefficient, recon, dead_mask)


def wrap(sae: nn.Module, loss_fn=None, world: World | None = None):
    """The loss callable for the trainer: ``sae.loss`` alone, or through DDP when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts from
    the same SAE whatever its own seed did.
    """
    world = world or current()
    if not world.distributed:
        return loss_fn or sae.loss
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(sae.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DDP(LossModule(sae, loss_fn), device_ids=ids, forward_sync_buffers=True)


def any_fired(fired: torch.Tensor, world: World) -> torch.Tensor:
    """Latents that fired on any rank."""
    if not world.distributed:
        return fired
    flag = fired.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.bool()


def mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``t`` over ranks (equal shard sizes: the global-batch mean of per-rank means)."""
    if not world.distributed:
        return t.detach()
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world.size


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``x`` stacked in rank order (the global batch)."""
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
