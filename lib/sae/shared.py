"""One SAE shared by every block's residual stream, trained with the language model (notebook 11).

Seed 004 ("Share weights across autoencoder instances across all blocks"): put an SAE on the
residual stream after each block, share its weights across the blocks, train it during
pretraining and let its loss flow into the model.  Three ways of training a toy-world LM
(:data:`MODES`), same corpus, spec, steps and seed:

* ``plain``: the language-model loss only (the baseline; its post-hoc SAEs are notebook 11's);
* ``aux``: the model runs clean; ``coefficient x`` the mean over blocks of the shared SAE's
  fraction of variance unexplained (FVU) is added to the LM loss (gradients reach the model
  through the residuals it reconstructs);
* ``spliced``: the SAE's reconstruction *replaces* the residual after every block (every position
  but BOS), so the model reads its own reconstructions, plus the same FVU term.

The SAE sees each residual vector scaled to norm ``sqrt(d_model)`` (:func:`normalize`): the
stream's norm grows with depth, and one dictionary serving every block should not have to spend
latents on the scale; a spliced reconstruction is scaled back.  Post-hoc SAEs read the same
normalised vectors, so every FVU of notebook 11 is measured in one space.  Its denominator is the
batch's variance of the normalised vectors, computed with gradients, so the model cannot lower the
loss by shrinking what the SAE has to reconstruct.  The SAE is TopK (Gao et al. 2024: the sparsity
is fixed, nothing to retune as the model moves) with AuxK on latents that have not fired lately.

    python -m lib.sae.shared                       # the six models (3 modes x 2 seeds): `make shared-sae-models`
    python -m lib.sae.shared --steps 20 --n-docs 64 --out /tmp/shared   # a smoke run elsewhere
    python -m lib.sae.shared sweep                 # notebook 11's post-hoc SAE sweep (data/sweeps/): `make shared-sae-sweep`

The models are Hugging Face GPT-NeoX folders with the jointly trained SAE under ``sae/`` (SAELens
format, ``lib.sae.io``); loaded without it, a model runs clean.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lib import paths
from lib.hooks import hook_name
from lib.sae.base import SAEConfig, TopKSAE, make_sae

MODES = ("plain", "aux", "spliced")
SAE_FOLDER = "sae"


@dataclass(frozen=True)
class JointConfig:
    """How the shared SAE trains with the model."""

    mode: str  # one of MODES
    d_sae: int = 512
    k: int = 16
    coefficient: float = 1.0  # weight of the mean per-block FVU in the loss
    dead_after_steps: int = 200  # a latent that fired at no block for this many steps gets the AuxK term

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"JointConfig.mode must be one of {MODES}, got {self.mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / s, s)`` with ``s = ||x|| / sqrt(d)`` per vector: every vector at norm ``sqrt(d)``."""
    scale = x.norm(dim=-1, keepdim=True).clamp_min(1e-6) / math.sqrt(x.shape[-1])
    return x / scale, scale


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of ``x_hat`` for ``x`` [n, d]: ``sum ||x - x_hat||^2 / sum ||x - mean x||^2``."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def make_shared_sae(d_model: int, cfg: JointConfig, model_name: str = "", seed: int = 0) -> TopKSAE:
    """The shared TopK SAE (``hook_name`` names block 0's residual; it serves every block)."""
    sae_cfg = SAEConfig(d_in=d_model, d_sae=cfg.d_sae, architecture="topk", k=cfg.k, hook_name=hook_name(0),
                        model_name=model_name, objective="joint_" + cfg.mode, sparse_decode=False)
    return make_sae(sae_cfg, seed=seed)


def _layers(model) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a Hugging Face GPT-NeoX or GPT-2 model."""
    for path in ("gpt_neox.layers", "transformer.h", "model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"cannot find the blocks of a {type(model).__name__}")


class JointObjective(torch.nn.Module):
    """The loss of one training step: LM cross-entropy (+ ``coefficient x`` mean block FVU).

    Holds the shared SAE (its parameters train with the model's: ``lib.world.train.train``'s
    ``extra``).  :meth:`forward` runs the Hugging Face model with a forward hook on every block that
    records the block's output (``aux``) or replaces it by the SAE's reconstruction (``spliced``),
    BOS (position 0) left alone and out of the loss."""

    def __init__(self, cfg: JointConfig, d_model: int, model_name: str = "", seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.sae = make_shared_sae(d_model, cfg, model_name, seed)
        self.register_buffer("last_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reconstruct(self, resid: torch.Tensor):
        """``(x_hat, x_norm, x_hat_norm, f, pre)`` for residuals ``resid`` [n, d] (raw scale in and out)."""
        x, scale = normalize(resid)
        f, pre = self.sae.training_features(x)
        x_hat = self.sae.decode(f)
        return x_hat * scale, x, x_hat, f, pre

    def forward(self, model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.cfg.mode == "plain":
            from lib.world.train import lm_loss

            loss = lm_loss(model, tokens)
            return loss, {}
        terms: list[tuple] = []

        def block_hook(module, args, output):  # noqa: ARG001
            hidden = output[0] if isinstance(output, tuple) else output
            body = hidden[:, 1:]
            x_hat, x, x_hat_n, f, pre = self.reconstruct(body.reshape(-1, body.shape[-1]))
            terms.append((x, x_hat_n, f, pre))
            if self.cfg.mode != "spliced":
                return None
            new = torch.cat([hidden[:, :1], x_hat.reshape(body.shape)], dim=1)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handles = [layer.register_forward_hook(block_hook) for layer in _layers(model)]
        try:
            logits = model(tokens).logits
        finally:
            for h in handles:
                h.remove()
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        fvus = torch.stack([fvu(x, x_hat) for x, x_hat, _, _ in terms])
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=tokens.device)
        for _, _, f, _ in terms:
            fired |= (f.detach() > 0).any(0)
        self.step += 1
        self.last_fired[fired] = self.step
        dead = (self.step - self.last_fired) > self.cfg.dead_after_steps
        aux = sum(self.sae.aux_loss(x, x_hat, pre, dead) for x, x_hat, _, pre in terms) / len(terms)
        loss = lm + self.cfg.coefficient * fvus.mean() + aux
        return loss, {"lm": round(lm.item(), 4), "fvu": round(fvus.mean().item(), 4),
                      "dead": round(dead.float().mean().item(), 4)}

    def before_step(self) -> None:
        self.sae.project_grads_()

    def after_step(self) -> None:
        self.sae.apply_constraints_()


def save_joint_sae(objective: JointObjective, folder: Path) -> Path:
    """Write the jointly trained SAE into a model folder's ``sae/`` (SAELens format, ``lib.sae.io``)."""
    from lib.sae.io import save_sae

    return save_sae(objective.sae, Path(folder) / SAE_FOLDER)


def joint_sae_path(model_name: str) -> Path:
    """Where a jointly trained model keeps its SAE (a toy name under ``data/models``, else a folder)."""
    folder = paths.models_dir() / model_name if not Path(model_name).is_dir() else Path(model_name)
    return folder / SAE_FOLDER


def load_joint_sae(model_name: str):
    """The SAE trained with ``model_name`` (a clear error for a model trained without one)."""
    from lib.sae.io import load_sae

    path = joint_sae_path(model_name)
    if not path.exists():
        raise FileNotFoundError(f"{model_name!r} has no jointly trained SAE at {path}: only the aux and spliced "
                                f"models of `make shared-sae-models` (lib.sae.shared) have one")
    return load_sae(path)



# --------------------------------------------------------------------------------------------
# measuring: splicing at every block, post-hoc SAEs, reconstruction, where latents fire
# --------------------------------------------------------------------------------------------
def shared_replacement(sae):
    """``a -> s * sae(a / s)`` with ``a / s`` the normalised vector (:func:`normalize`): how a shared SAE
    (joint or post-hoc, all read normalised residuals) is spliced into a model."""
    p = next(sae.parameters())

    def fn(a: torch.Tensor) -> torch.Tensor:
        x, scale = normalize(a.to(p.device, p.dtype))
        return (sae(x) * scale).to(a.device, a.dtype)

    return fn


def block_hooks(model) -> list[str]:
    """The residual stream after every block: where the shared SAE reads and splices."""
    from lib.hooks import resid_hooks

    return resid_hooks(model)


def block_replacements(model, saes) -> dict:
    """``{hook: a -> a'}`` at every block from one shared SAE, or from a dict ``{hook: SAE or function}``
    (per-block SAEs; a function, e.g. a mean ablation, is used as it is)."""
    if not isinstance(saes, dict):
        saes = {h: saes for h in block_hooks(model)}
    return {h: shared_replacement(s) if hasattr(s, "decode") else s for h, s in saes.items()}


@contextmanager
def spliced(model, saes):
    """Inside the block, ``model`` (a ``TransformerBridge``) runs with ``saes`` (as
    :func:`block_replacements` takes them) spliced in at every position but the first (BOS), as
    in joint training: for functions that call the model themselves (``lib.world.recall``)."""
    def skip_bos(fn):
        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:  # noqa: ARG001
            return torch.cat([act[:, :1], fn(act[:, 1:])], dim=1)

        return hook

    with model.hooks(fwd_hooks=[(h, skip_bos(fn)) for h, fn in block_replacements(model, saes).items()]):
        yield model


@torch.no_grad()
def eval_loss(model, batch, saes=None, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over the real targets of ``batch`` (a ``TokenBatch``), clean
    (``saes`` None) or with ``saes`` spliced in (see :func:`block_replacements`), each applied to the
    normalised residual at every position but BOS and pads."""
    from lib.sae.metrics import token_ce
    from lib.sae.splice import run_spliced

    replacement = None if saes is None else block_replacements(model, saes)
    total, count = 0.0, 0
    for i in range(0, len(batch), batch_size):
        part = batch[i: i + batch_size]
        logits = run_spliced(model, part.tokens, replacement, positions=part.counted_mask())
        targets = part.attention_mask[:, 1:].to(logits.device)
        ce = token_ce(logits, part.tokens)
        total += float(ce[targets].sum())
        count += int(targets.sum())
    return total / count


def normalized_acts(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each hook's residuals [n, d] scaled to norm sqrt(d) (what every SAE of notebook 11 reads)."""
    return {h: normalize(a.float())[0] for h, a in acts.items()}


def train_posthoc(acts: dict[str, torch.Tensor], d_sae: int, k: int, *, shared: bool, epochs: float,
                  batch_size: int = 1024, seed: int = 0, model_name: str = ""):
    """Post-hoc TopK SAEs on normalised residuals ``acts`` (hook -> [n, d]): one per hook
    (``shared=False``, returns ``{hook: SAE}``), or one on every hook's rows stacked (``shared=True``:
    the multi-layer SAE of Lawson et al. 2024).  Each sees its data ``epochs`` times, so a shared SAE
    takes as many steps as all the per-block ones together."""
    from lib.sae.recipe import train_on

    hooks = list(acts)
    common = dict(total_tokens=None, batch_size=batch_size, architecture="topk", sae_kwargs={"k": k}, seed=seed,
                  model_name=model_name, lr_warmup_steps=20)
    if shared:
        stacked = torch.cat([acts[h] for h in hooks])
        common["total_tokens"] = int(epochs * len(stacked))
        return train_on(stacked, hooks[0], d_sae, 0.0, **common)
    out = {}
    for h in hooks:
        common["total_tokens"] = int(epochs * len(acts[h]))
        out[h] = train_on(acts[h], h, d_sae, 0.0, **common)
    return out


@torch.no_grad()
def reconstruction(saes, acts: dict[str, torch.Tensor]) -> dict:
    """FVU of the SAE(s) on normalised residuals ``acts`` (hook -> [n, d]): per hook and their mean
    (the training objective's), L0 (mean active latents per token) and the latents that never fire."""
    saes = saes if isinstance(saes, dict) else {h: saes for h in acts}
    per_block, l0, fired = {}, [], {}
    for h, x in acts.items():
        sae = saes[h]
        x_hat, f = sae(x, output_features=True)
        per_block[h] = float(fvu(x, x_hat))
        l0.append(float((f > 0).sum(-1).float().mean()))
        fired[id(sae)] = fired.get(id(sae), torch.zeros(f.shape[1], dtype=torch.bool)) | (f > 0).any(0)
    total_latents = sum(len(v) for v in fired.values())
    return {"fvu": sum(per_block.values()) / len(per_block), "fvu_by_block": per_block,
            "l0": sum(l0) / len(l0), "latents": total_latents,
            "dead_frac": 1 - sum(int(v.sum()) for v in fired.values()) / total_latents}


def latents_for_fvu(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """Latents needed for FVU ``target`` on a curve of ``(latents, fvu)`` points, interpolating
    linearly in log(latents); None when the curve does not reach it (or starts below it)."""
    pts = sorted(curve)
    for (n0, f0), (n1, f1) in zip(pts, pts[1:]):
        if f0 >= target >= f1 and f0 != f1:
            t = (f0 - target) / (f0 - f1)
            return float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))
    return None


@torch.no_grad()
def layer_activity(sae, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n_tokens, n_blocks, d_sae]: each latent's activation at each block, token by token (rows of
    ``acts`` aligned across hooks, as ``lib.activations.harvest`` returns them)."""
    return torch.stack([sae.encode(x) for x in acts.values()], dim=1)


def layer_distribution(activity: torch.Tensor) -> torch.Tensor:
    """[d_sae, n_blocks]: the share of each latent's total activation at each block (rows sum to 1;
    NaN for a latent that never fires)."""
    mass = activity.sum(0).T
    return mass / mass.sum(1, keepdim=True)


def layer_variance(activity: torch.Tensor, min_tokens: int = 20) -> dict:
    """Lawson et al. 2024's check: per latent, the variance of the block index under its activations
    aggregated over all tokens (``var_aggregate``) against the mean, over the tokens where it fires,
    of the variance within one token (``var_within``, weighted by the token's activation).  The
    paper finds the aggregate about two orders of magnitude the larger.  Latents active on fewer
    than ``min_tokens`` tokens are left out.  Returns both variances averaged over the latents,
    their ratio, the per-latent ratio's median, the share of (token, latent) firings at exactly one
    block, and how many latents counted."""
    n_blocks = activity.shape[1]
    layer = torch.arange(n_blocks, dtype=activity.dtype)
    a = activity.permute(2, 0, 1)  # [d_sae, n_tokens, n_blocks]
    tok_mass = a.sum(-1)  # [d_sae, n_tokens]
    keep = (tok_mass > 0).sum(-1) >= min_tokens
    a, tok_mass = a[keep], tok_mass[keep]
    total = tok_mass.sum(-1)
    mean_all = (a * layer).sum((-1, -2)) / total
    var_agg = (a * (layer - mean_all[:, None, None]) ** 2).sum((-1, -2)) / total
    safe = tok_mass.clamp_min(1e-12)
    mean_tok = (a * layer).sum(-1) / safe
    var_tok = (a * (layer - mean_tok[..., None]) ** 2).sum(-1) / safe
    var_within = (var_tok * tok_mass).sum(-1) / total
    ratio = var_agg / var_within.clamp_min(1e-12)
    return {"var_aggregate": float(var_agg.mean()) if len(var_agg) else float("nan"),
            "var_within": float(var_within.mean()) if len(var_within) else float("nan"),
            "ratio_of_means": float(var_agg.mean() / var_within.mean()) if len(var_agg) else float("nan"),
            "median_ratio": float(ratio.median()) if len(ratio) else float("nan"),
            "one_block_share": float(((a > 0).sum(-1) == 1)[tok_mass > 0].float().mean()) if len(a) else float("nan"),
            "n_latents": int(keep.sum())}



SWEEP_FILE = "data/sweeps/11_shared_sae_sweep.json"  # relative to the repository (python -m lib.sae.shared sweep)
CORPUS_SEED = 30_000  # the held-out documents every measurement of notebook 11 reads (training used 0, 10k, 20k)


@dataclass
class SweepConfig:
    """The post-hoc SAEs of notebook 11's dictionary-size comparison."""

    sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)  # latents per SAE (a per-block set has n_blocks x that)
    k: int = 16  # TopK latents per token, every SAE (the jointly trained ones too)
    n_train_docs: int = 192  # x 255 tokens per block
    n_eval_docs: int = 32
    epochs: float = 4.0  # passes over each SAE's own data
    batch_size: int = 256
    seed: int = 0
    check_size: int = 512  # on the plain models, SAEs of this size are also trained twice as long (convergence)

    def to_dict(self) -> dict:
        return asdict(self)


def model_data(model, n_train_docs: int, n_eval_docs: int, name: str = ""):
    """``lib.sae.recipe.prepare`` at every block's residual stream, on the held-out documents of
    :data:`CORPUS_SEED`, 256-token rows: what every measurement of notebook 11 reads."""
    from lib.models import load_model
    from lib.sae.recipe import prepare

    lm = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    data = prepare(lm, block_hooks(lm), n_train_docs, n_eval_docs, context_size=256, corpus_seed=CORPUS_SEED)
    data.model_name = name or (str(model) if isinstance(model, (str, os.PathLike)) else "")
    return data


def sweep_model(data, mode: str, cfg: SweepConfig, joint_sae=None, sizes: Sequence[int] | None = None) -> list[dict]:
    """FVU against dictionary size on one model (``data`` from :func:`model_data`): post-hoc shared
    SAEs at every size, per-block SAEs too on a ``plain`` model (and both at ``cfg.check_size``
    trained twice as long), and the jointly trained SAE when given.  One record per SAE (set):
    ``way, d_sae, epochs, latents, fvu, fvu_by_block, l0, dead_frac``."""
    train, held = normalized_acts(data.acts), normalized_acts(data.eval_acts)
    n_blocks = len(train)
    common = dict(k=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed, model_name=data.model_name)
    runs = [(d_sae, cfg.epochs) for d_sae in sizes or cfg.sizes]
    if mode == "plain" and cfg.check_size:
        runs.append((cfg.check_size, 2 * cfg.epochs))
    rows = []
    for d_sae, epochs in runs:
        ways = {"post-hoc shared": True} | ({"per-block": False} if mode == "plain" else {})
        for way, shared in ways.items():
            saes = train_posthoc(train, d_sae, shared=shared, epochs=epochs, **common)
            rows.append({"model": data.model_name, "mode": mode, "way": way, "d_sae": d_sae, "epochs": epochs,
                         **reconstruction(saes, held)})
    if joint_sae is not None:
        rows.append({"model": data.model_name, "mode": mode, "way": "joint", "d_sae": joint_sae.cfg.d_sae, "epochs": None,
                     **reconstruction(joint_sae, held)})
    for r in rows:
        assert r["latents"] == r["d_sae"] * (n_blocks if r["way"] == "per-block" else 1)
    return rows


def _sweep_one(name: str, mode: str, where: str, cfg: dict, threads: int | None = None) -> list[dict]:
    """:func:`sweep_model` on one model (a module-level function: it runs in a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    data = model_data(where, cfg["n_train_docs"], cfg["n_eval_docs"], name=name)
    joint = load_joint_sae(where) if mode != "plain" else None
    return sweep_model(data, mode, SweepConfig(**cfg), joint)


def sweep(models: dict[str, str], cfg: SweepConfig, out: Path | None = None, folders: dict[str, str] | None = None,
          jobs: int = 1) -> dict:
    """:func:`sweep_model` over ``models`` (name -> mode; ``folders`` name -> model folder when they
    are not under ``data/models``) in ``jobs`` processes of one thread each, written to ``out``
    (default :data:`SWEEP_FILE`): ``{"config", "rows"}``; the rows do not depend on ``jobs``."""
    from lib.results import write_json
    from lib.utils import progress

    args = [(name, mode, (folders or {}).get(name, name), cfg.to_dict()) for name, mode in models.items()]
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_sweep_one, *zip(*args), [1] * len(args)))
    else:
        parts = [_sweep_one(*a) for a in progress(args, desc="models", total=len(args))]
    rows = [r for part in parts for r in part]
    result = {"config": cfg.to_dict(), "corpus_seed": CORPUS_SEED, "models": models, "rows": rows,
              "command": "python -m lib.sae.shared sweep", "torch": torch.__version__}
    write_json(out or paths.REPO_ROOT / SWEEP_FILE, result, indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from lib.world.registry import SHARED_SAE_JOINT

        sp = argparse.ArgumentParser(prog="python -m lib.sae.shared sweep", description="notebook 11's post-hoc SAE sweep")
        sp.add_argument("--jobs", type=int, default=2, help="models measured at once, one single-threaded process each")
        sp.add_argument("--out", type=Path, default=None, help=f"output file (default {SWEEP_FILE})")
        sargs = sp.parse_args(argv[1:])
        torch.set_num_threads(1)
        sweep({name: joint.mode for name, joint in SHARED_SAE_JOINT.items()}, SweepConfig(), out=sargs.out, jobs=sargs.jobs)
        return 0
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from lib.world import build
    from lib.world.registry import SHARED_SAE_JOINT, SHARED_SAE_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all six)")
    ap.add_argument("--steps", type=int, default=None, help="override every model's step count")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (the models' own seeds are in their specs)")
    ap.add_argument("--n-docs", type=int, default=None, help="training documents (default batch x steps)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/models)")
    ap.add_argument("--jobs", type=int, default=2, help="models trained at once, one process each")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / jobs)")
    ap.add_argument("--probe-every", type=int, default=1000, help="steps between judgement-AUROC logs")
    args = ap.parse_args(argv)
    names = args.only or list(SHARED_SAE_MODELS)
    unknown = [n for n in names if n not in SHARED_SAE_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(SHARED_SAE_MODELS)}")
    specs = [SHARED_SAE_MODELS[n] for n in names]
    out_root = args.out or paths.models_dir()
    n_docs, n_first, n_ctx = build.corpus_sizes(specs, args.steps, args.n_docs)
    t0 = time.perf_counter()
    cfg, train_docs, eval_docs, tokenizer = build.corpus_and_tokenizer(args.seed, n_train=n_docs)
    phase1 = build.first_phase_docs(cfg, args.seed, n_first)
    work = paths.cache_dir() / "build"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / f"tokenizer-shared-seed{args.seed}"
    tokenizer.save_pretrained(tok_dir)
    data_path = work / f"tokens-shared-seed{args.seed}-{n_docs}.pt"
    torch.save({"train": build.tokenize_docs(tokenizer, phase1 + train_docs, n_ctx), "first_phase_rows": len(phase1),
                "eval": build.tokenize_docs(tokenizer, eval_docs, n_ctx), "tokenizer_dir": str(tok_dir)}, data_path)
    command = "python -m lib.sae.shared " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    corpus = {"n_train_docs": len(train_docs), "n_eval_docs": len(eval_docs), "n_first_phase_docs": n_first,
              **cfg.to_dict()}
    del train_docs, eval_docs, phase1
    print(f"corpus: {corpus['n_train_docs']} + {n_first} first-phase documents x {n_ctx} tokens "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    checkpoint_dir = paths.cache_dir() / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for spec in specs:
        joint = SHARED_SAE_JOINT[spec.name].to_dict()
        provenance = {"command": command.strip(), "corpus_seed": args.seed,
                      "corpus": {**corpus, "joint": joint},  # in the resume key: the modes differ
                      "tokenizer_vocab": len(tokenizer), "joint": joint}
        jobs.append((spec, provenance, joint))
    common = dict(data_path=str(data_path), out_root=str(out_root), steps=args.steps, threads=threads,
                  checkpoint_dir=str(checkpoint_dir), probe_every=args.probe_every)
    if args.jobs == 1:
        for spec, provenance, joint in jobs:
            build.train_one(spec, provenance=provenance, joint=joint, **common)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(build.train_one, spec, provenance=provenance, joint=joint, worker=True, **common)
                       for spec, provenance, joint in jobs]
            for f in as_completed(futures):
                f.result()
    data_path.unlink(missing_ok=True)
    print(f"built {len(jobs)} model(s) in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
