"""Train an SAE from a config file, in one process or several (``torchrun``).

    python -m lib.sae.train --config run.json                       # one process
    torchrun --standalone --nproc_per_node 4 -m lib.sae.train --config run.json   # 4 ranks, one machine

``run.json`` (paths relative to the file)::

    {"sae":   {"d_in": 128, "d_sae": 4096, "architecture": "topk", "k": 32, "hook_name": "blocks.1.hook_resid_post"},
     "train": {"total_tokens": 20000000, "batch_size": 4096, "lr": 3e-4, "checkpoint_dir": "ckpt"},
     "data":  {"activations": "acts.pt"},          # a saved [n_tokens, d_in] tensor, or:
     # "data": {"model": "toy-4l", "texts": "corpus.txt", "context_size": 128},  # harvested on the fly
     "device": "cpu",                                # "cuda": one GPU per rank (nccl)
     "out": "sae"}                                   # written by rank 0 in SAELens's format

``train.batch_size`` is the *global* batch: with N ranks each takes ``batch_size / N`` rows of it.
From saved activations every rank draws the same shuffled global batches and keeps its own rows
(a run on N ranks follows the one-process run: ``tests/test_sae_distributed.py``); from a model,
rank ``r`` reads texts ``r, r + N, ...``.  With ``checkpoint_dir`` set, a run that was stopped
(``--stop-at STEP``, a pre-emption, a crash) resumes where its last checkpoint left off when
started again with the same command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from lib.sae import distributed as dd
from lib.sae.base import SAEConfig, make_sae
from lib.sae.buffer import ActivationBuffer, BufferConfig, TensorSource
from lib.sae.io import save_sae
from lib.sae.trainer import Trainer, TrainConfig


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"No SAE training config at {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    missing = [k for k in ("sae", "train", "data") if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks {missing}: a config has 'sae', 'train' and 'data' sections (see lib/sae/train.py)")
    cfg["_base"] = str(path.resolve().parent)
    return cfg


def _path(cfg: dict, p: str | None) -> Path | None:
    if p is None:
        return None
    p = Path(p)
    return p if p.is_absolute() else Path(cfg["_base"]) / p


def make_data(cfg: dict, world: dd.World, device: torch.device):
    """This rank's batches: its rows of the shared global batches, or its texts through a model."""
    data, batch = cfg["data"], int(cfg["train"].get("batch_size", 4096))
    if batch % world.size:
        raise ValueError(f"train.batch_size {batch} does not divide over {world.size} processes")
    seed = int(cfg["train"].get("seed", 0))
    if "activations" in data:
        acts = torch.load(_path(cfg, data["activations"]), map_location="cpu", weights_only=True)
        source = TensorSource(acts, batch, seed=seed, device=device, scale=float(data.get("scale", 1.0)))
        return dd.ShardedBatches(source, world) if world.distributed else source
    if "model" in data:
        from lib.models import load_model

        texts = [t for t in _path(cfg, data["texts"]).read_text().splitlines() if t.strip()][world.rank::world.size]
        model = load_model(data["model"], device=str(device))
        bcfg = BufferConfig(hook_name=cfg["sae"]["hook_name"], context_size=int(data.get("context_size", 128)),
                            batch_size=batch // world.size, seed=seed + world.rank)
        return ActivationBuffer(model, texts, bcfg)
    raise ValueError("data needs 'activations' (a saved [n, d_in] tensor) or 'model' and 'texts'")


def run(cfg: dict, stop_at: int | None = None, device: str | None = None) -> list[dict]:
    world, dev = dd.init_from_env(device or cfg.get("device", "cpu"))
    try:
        train = dict(cfg["train"])
        if train.get("checkpoint_dir"):
            train["checkpoint_dir"] = str(_path(cfg, train["checkpoint_dir"]))
        tcfg = TrainConfig(**train)
        sae = make_sae(SAEConfig(**cfg["sae"]), seed=tcfg.seed).to(dev)
        trainer = Trainer(sae, make_data(cfg, world, dev), tcfg)
        history = trainer.fit(stop_at=stop_at)
        if world.is_main and cfg.get("out") and trainer.step >= tcfg.n_steps:
            out = _path(cfg, cfg["out"])
            save_sae(sae.to("cpu"), out)
            (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        dd.barrier(world)
        return history
    finally:
        dd.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's JSON config")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; run again to resume)")
    ap.add_argument("--device", default=None, help="override the config's device")
    args = ap.parse_args(argv)
    run(load_config(args.config), stop_at=args.stop_at, device=args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group destroyed. Leave without C++ teardown: at
        # interpreter exit a gloo rank sometimes aborts ("terminate called without an active
        # exception", seen in make test under load) after its work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def launch(config: str | Path, nproc: int = 1, stop_at: int | None = None, extra: list[str] | None = None):
    """Run ``lib.sae.train`` on ``config`` in ``nproc`` processes (``torchrun --standalone``) and wait.

    For notebooks: ``launch("run.json", nproc=2)``.  When a process fails, the error names every
    rank's exit and ends with the last lines each rank wrote (from torchrun's per-rank logs), with
    Python's stack for a rank that died in C++ (``PYTHONFAULTHANDLER``: a SIGABRT in gloo says where).
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sae_launch_") as logs:
        cmd = [sys.executable, "-m", "lib.sae.train", "--config", str(config)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "--log-dir", logs, "--tee", "3", "-m", "lib.sae.train", "--config", str(config)]
        if stop_at is not None:
            cmd += ["--stop-at", str(stop_at)]
        cmd += extra or []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            per_rank = _rank_tails(Path(logs)) if nproc > 1 else ""
            raise RuntimeError(f"SAE training ({nproc} process{'es' if nproc > 1 else ''}) failed with exit code "
                               f"{proc.returncode}:\n{proc.stderr[-2500:]}{per_rank}")
    return proc


def _rank_tails(logs: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of each rank's stderr under torchrun's ``--log-dir`` (warnings left out)."""
    out = []
    for f in sorted(logs.glob("**/stderr.log")):
        text = [ln for ln in f.read_text(errors="replace").splitlines()
                if ln.strip() and "Warning" not in ln and not ln.startswith("  warnings.warn")]
        out.append(f"\n--- rank {f.parent.name} ({f.parent.parent.name}), last lines of stderr:\n" + "\n".join(text[-lines:]))
    return "".join(out)


def train_in_processes(sae_cfg: SAEConfig, train_cfg: TrainConfig, acts: torch.Tensor, nproc: int,
                       device: str = "cpu", workdir: str | Path | None = None):
    """Train on ``acts`` [n, d_in] in ``nproc`` data-parallel processes; return ``(sae, history)``.

    What a notebook calls for its ``sae_processes`` parameter: the activations and a config go to
    ``workdir`` (a temporary folder by default), ``torchrun`` trains, rank 0's SAE is loaded back.
    The same seed and global batch give the SAE a one-process run gives (within float rounding).
    """
    import dataclasses
    import tempfile

    from lib.sae.io import load_sae

    with tempfile.TemporaryDirectory(prefix="sae_ddp_") as tmp:
        folder = Path(workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(acts.detach().cpu(), folder / "acts.pt")
        cfg = {"sae": sae_cfg.to_dict(), "train": dataclasses.asdict(train_cfg), "data": {"activations": "acts.pt"},
               "device": str(device), "out": "sae"}
        (folder / "run.json").write_text(json.dumps(cfg, indent=1))
        launch(folder / "run.json", nproc=nproc)
        sae = load_sae(folder / "sae", device=device)
        history = json.loads((folder / "sae" / "history.json").read_text())
    return sae, history


if __name__ == "__main__":
    raise SystemExit(main())
