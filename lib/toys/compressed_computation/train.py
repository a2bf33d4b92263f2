"""Training many compressed-computation models at once, and the plain loop it implements.

:func:`train_reference` is the definition: one model, dense batches, the full residual MLP and
APD's loss, AdamW with a cosine schedule, in twenty-odd lines.  :func:`train_models` computes the
same thing fast: models that share p train together on one data stream (common random numbers),
stacked on a model axis, in the effective form ``A = W_E W_in``, ``B = W_out W_E^T``, with the
loss's products taken from the present entries only (:mod:`.sparse`) and jobs spread over
worker processes.  The tests hold the engine to the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lib.toys.compressed_computation.model import (ModelSpec, TrainConfig, _gen, model_matrices, naive_weights,
                                                   num_threads, per_feature_loss, sample_active_rows, sample_sparse)
from lib.toys.compressed_computation.sparse import _Batch, _objective, _per_feature_sse, _Sample
from lib.utils import progress


@dataclass
class TrainedModels:
    """Many trained models in effective form (stacked on a leading model axis M).

    A: ``(M, n, h)``; B: ``(M, h, n)``; mix: ``(M, n, n)``; loss_curves: ``(M, steps // log_every)``
    training loss per feature (batch estimates) at steps ``curve_steps``.  With ``eval_rows``
    given to ``train_models``: ``losses`` ``(M, n)``, each model's loss per feature (``evaluate``),
    and ``naive_losses`` ``(M, n)``, the naive network's in the same setting on the same samples.
    """

    specs: list[ModelSpec]
    A: torch.Tensor
    B: torch.Tensor
    mix: torch.Tensor
    loss_curves: torch.Tensor
    curve_steps: list[int]
    config: TrainConfig
    losses: torch.Tensor | None = None
    naive_losses: torch.Tensor | None = None

    def index(self, **match: object) -> list[int]:
        """Indices of the models whose spec fields equal ``match`` (floats compared with isclose)."""
        out = []
        for i, s in enumerate(self.specs):
            ok = True
            for k, v in match.items():
                sv = getattr(s, k)
                ok &= math.isclose(sv, v, rel_tol=1e-9, abs_tol=1e-12) if isinstance(v, float) else sv == v
            if ok:
                out.append(i)
        return out

    def model(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, mix)`` of model i."""
        return self.A[i], self.B[i], self.mix[i]


def _stored_width(spec: ModelSpec, cfg: TrainConfig) -> int:
    """Rows of W_in actually trained: d_resid, or n when the model is trained in effective form.

    ``parametrization="effective"`` trains ``A = W_E W_in`` and ``B = W_out W_E^T`` directly
    (``(n, h)``, ``(h, n)``), initialised to the full model's initial A and B: the same function
    class and initial function, only AdamW's coordinates differ.  A one-hot clean embedding is
    always trained this way: its other ``d - n`` rows of W_in never touch the output (zero
    gradient, AdamW only decays them), so it *is* the full model, without the dead weight.
    """
    if (spec.parametrization or cfg.parametrization) == "effective" or spec.embedding == "none":
        return cfg.n_features
    if spec.embedding == "clean" and cfg.clean_kind == "onehot":
        return cfg.n_features
    return cfg.d_resid


def _init_weights(spec: ModelSpec, cfg: TrainConfig, width: int):
    """``(W_E, mix, W_in, W_out)`` of one model at initialisation, stored at ``width`` (see
    :func:`_stored_width`; in effective form W_E is the identity and W_in, W_out are A, B)."""
    n, h = cfg.n_features, cfg.d_mlp
    w_e, mix = model_matrices(spec, cfg)
    d_e = w_e.shape[1]  # n for "none", d_resid otherwise
    g = _gen("init", spec.seed, spec.embedding)  # same init for a seed at every p and sigma
    wi = (torch.rand(d_e, h, generator=g) * 2 - 1) / math.sqrt(d_e)  # nn.Linear(d_e, h) init
    wo = (torch.rand(h, d_e, generator=g) * 2 - 1) / math.sqrt(h)  # nn.Linear(h, d_e) init
    if width == n and d_e != n:  # effective form: A = W_E W_in, B = W_out W_E^T
        wi, wo, w_e = w_e @ wi, wo @ w_e.T, torch.eye(n)
    return w_e, mix, wi, wo


def train_reference(spec: ModelSpec, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One model trained the plain way: the definition :func:`train_models` implements, and its test oracle.

    Dense batches, the full residual MLP read off through ``W_E^T`` (plus the explicit mixing),
    APD's loss and optimiser; the same initialisation and data stream as the engine.  Returns the
    trained model in effective form, ``(A, B, mix)``.
    """
    w_e, mix, w_in, w_out = _init_weights(spec, cfg, _stored_width(spec, cfg))
    w_in, w_out = w_in.clone().requires_grad_(True), w_out.clone().requires_grad_(True)
    opt = torch.optim.AdamW([w_in, w_out], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = _gen("data", float(spec.p))  # the engine's data stream for this p
    n = cfg.n_features
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.steps, cfg.lr)
        rows, cols, vals = sample_sparse(cfg.batch_size, n, spec.p, gen)
        x = torch.zeros(cfg.batch_size, n)
        x[rows, cols] = vals
        resid = x @ w_e  # embed
        resid = resid + torch.relu(resid @ w_in) @ w_out  # the residual MLP
        out = resid @ w_e.T + x @ (mix - (w_e @ w_e.T - torch.eye(n)))  # read off, plus the explicit mixing
        loss = (out - (x + torch.relu(x))).pow(2).mean()  # label x + ReLU(x), mean over samples and features
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return w_e @ w_in, w_out @ w_e.T, mix


class _Group(torch.nn.Module):
    """Models sharing p and stored width: trainable W_in ``(M, width, h)``, W_out ``(M, h, width)``."""

    def __init__(self, specs: list[ModelSpec], cfg: TrainConfig, width: int):
        super().__init__()
        embeds, mixes, w_in, w_out = zip(*(_init_weights(s, cfg, width) for s in specs))
        self.identity = width == cfg.n_features
        self.register_buffer("w_e", torch.stack(embeds))  # (M, n, width)
        self.register_buffer("mix", torch.stack(mixes))  # (M, n, n)
        self.has_mix = torch.tensor([bool(m.abs().max() > 0) for m in mixes])
        self.W_in = torch.nn.Parameter(torch.stack(w_in))
        self.W_out = torch.nn.Parameter(torch.stack(w_out))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = W_E W_in`` ``(M, n, h)`` and ``B = W_out W_E^T`` ``(M, h, n)``."""
        if self.identity:
            return self.W_in, self.W_out
        return self.w_e @ self.W_in, self.W_out @ self.w_e.transpose(1, 2)


def _cosine_lr(step: int, steps: int, lr: float) -> float:
    """APD's half-period cosine from lr (step 0) to 0 (last step)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))


def _train_same_p(specs: list[ModelSpec], cfg: TrainConfig, bar) -> tuple[torch.Tensor, ...]:
    """Train models that share p on one data stream (common random numbers across models).

    The loss per model is APD's: the mean over the *full* batch and the features of the squared
    error.  All-zero samples have zero output and label (no biases), so they are dropped before
    the products and only counted in the ``batch * n`` denominator: the same loss and gradient.
    """
    n, h = cfg.n_features, cfg.d_mlp
    p = specs[0].p
    width_of = [_stored_width(s, cfg) for s in specs]
    groups, members = [], []
    for w in sorted(set(width_of)):
        idx = [i for i, wi in enumerate(width_of) if wi == w]
        groups.append(_Group([specs[i] for i in idx], cfg, w))
        members.append(idx)
    opt = torch.optim.AdamW(
        [q for g in groups for q in g.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    gen = _gen("data", float(p))  # one data stream per p, shared by all its models
    n_log = cfg.steps // cfg.log_every
    curves = torch.zeros(len(specs), n_log)
    norm = cfg.batch_size * n
    for step in range(cfg.steps):
        for grp in opt.param_groups:
            grp["lr"] = _cosine_lr(step, cfg.steps, cfg.lr)
        sb = _Batch(_Sample(cfg.batch_size, n, p, gen), p)
        log = (step + 1) % cfg.log_every == 0 and (step + 1) // cfg.log_every <= n_log
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for g, idx in zip(groups, members):
            A, B = g.effective()
            obj = _objective(sb, A, B, g.mix)
            total = total + obj.sum() / norm
            if log:
                curves[idx, (step + 1) // cfg.log_every - 1] = (obj.detach() + sb.target_sq(g.mix).sum(1)) / norm
        total.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    A = torch.zeros(len(specs), n, h)
    B = torch.zeros(len(specs), h, n)
    mix = torch.zeros(len(specs), n, n)
    with torch.no_grad():
        for g, idx in zip(groups, members):
            a, b = g.effective()
            A[idx], B[idx], mix[idx] = a, b, g.mix
    return A, B, mix, curves


def _jobs(specs: list[ModelSpec], cfg: TrainConfig) -> list[list[int]]:
    """Spec indices per job: same p, at most ``job_size`` models, nearly equal chunks in spec order."""
    jobs = []
    for p in sorted({s.p for s in specs}):
        idx = [i for i, s in enumerate(specs) if s.p == p]
        k = math.ceil(len(idx) / cfg.job_size)
        bounds = [round(j * len(idx) / k) for j in range(k + 1)]
        jobs += [idx[bounds[j] : bounds[j + 1]] for j in range(k)]
    return jobs


def _job_cost(specs: list[ModelSpec], cfg: TrainConfig) -> float:
    """Rough relative cost of a job, for scheduling only: active rows per model, plus W_E products."""
    p = specs[0].p
    rows = 1.0 - (1.0 - p) ** cfg.n_features
    return sum(0.2 + rows + (0.3 if _stored_width(s, cfg) > cfg.n_features else 0.0) for s in specs)


def _run_job(specs: list[ModelSpec], cfg: TrainConfig, eval_rows: int | None) -> tuple:
    """Train one job's models (all with the same p) in this process, and evaluate them if asked."""
    with num_threads(cfg.num_threads):
        A, B, mix, curves = _train_same_p(specs, cfg, None)
        if not eval_rows:
            return A, B, mix, curves, None, None
        tm = TrainedModels(specs, A, B, mix, curves, [], cfg)
        return A, B, mix, curves, evaluate(tm, eval_rows), evaluate(naive_models(tm), eval_rows)


def _init_worker() -> None:
    import os

    os.environ["COMPENDIUM_QUIET"] = "1"
    torch.set_num_threads(1)


def train_models(
    specs: Sequence[ModelSpec], cfg: TrainConfig | None = None, eval_rows: int | None = None
) -> TrainedModels:
    """Train every spec (AdamW, cosine lr, MSE on the read-off features), batched on a model axis.

    Models with the same p train together on one data stream (common random numbers: settings
    and seeds see the same batches, seeds differ in embedding and initialisation), in jobs of at
    most ``job_size`` models run by ``workers`` processes.  With ``eval_rows``, each job also
    evaluates its models and the naive network (``evaluate``, same samples for all models at a
    p).  Deterministic given the specs and config; the number of workers changes the speed only.
    """
    cfg = cfg or TrainConfig()
    specs = list(specs)
    if not specs:
        raise ValueError("train_models needs at least one ModelSpec")
    n, h, M = cfg.n_features, cfg.d_mlp, len(specs)
    A, B, mix = torch.zeros(M, n, h), torch.zeros(M, h, n), torch.zeros(M, n, n)
    curves = torch.zeros(M, cfg.steps // cfg.log_every)
    losses = torch.zeros(M, n) if eval_rows else None
    naive = torch.zeros(M, n) if eval_rows else None
    jobs = sorted(_jobs(specs, cfg), key=lambda j: -_job_cost([specs[i] for i in j], cfg))  # longest first
    bar = progress(total=len(jobs), desc="training jobs")

    def store(j, out):
        A[j], B[j], mix[j], curves[j] = out[:4]
        if eval_rows:
            losses[j], naive[j] = out[4], out[5]
        bar.update(1)

    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork (Linux): no re-import of torch per worker, as DataLoader workers do; spawn elsewhere
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            max_workers=min(cfg.workers, len(jobs)), mp_context=mp.get_context(method), initializer=_init_worker
        ) as pool:
            futures = [(j, pool.submit(_run_job, [specs[i] for i in j], cfg, eval_rows)) for j in jobs]
            for j, fut in futures:
                store(j, fut.result())
    else:
        for j in jobs:
            store(j, _run_job([specs[i] for i in j], cfg, eval_rows))
    bar.close()
    steps = [(k + 1) * cfg.log_every for k in range(cfg.steps // cfg.log_every)]
    return TrainedModels(specs, A, B, mix, curves, steps, cfg, losses, naive)


@torch.no_grad()
def evaluate(trained: TrainedModels, active_rows: int = 200_000, key: object = "eval") -> torch.Tensor:
    """Population loss per feature of every model, ``(M, n)`` (each feature's MSE).

    Fresh samples per p, shared by all models with that p (common random numbers), enough of
    them for about ``active_rows`` samples with a feature present (the rest cost nothing and are
    only counted).
    """
    cfg = trained.config
    n = cfg.n_features
    out = torch.zeros(len(trained.specs), n)
    per_chunk = 8192  # rows with a feature present per evaluation chunk
    with num_threads(cfg.num_threads):
        for p in sorted({s.p for s in trained.specs}):
            idx = [i for i, s in enumerate(trained.specs) if s.p == p]
            gen = _gen(key, float(p))
            p_active = 1.0 - (1.0 - p) ** n
            chunk = math.ceil(per_chunk / p_active)
            n_chunks = max(1, math.ceil(active_rows / per_chunk))
            sse = torch.zeros(len(idx), n)
            A, B, mix = trained.A[idx], trained.B[idx], trained.mix[idx]
            for _ in range(n_chunks):
                sse += _per_feature_sse(_Batch(_Sample(chunk, n, p, gen), p), A, B, mix)
            out[idx] = sse / (n_chunks * chunk)
    return out


@torch.no_grad()
def evaluate_weights(
    A: torch.Tensor, B: torch.Tensor, mix: torch.Tensor | None, p: float, n_rows: int = 20_000, seed: int = 0,
    key: object = "eval",
) -> torch.Tensor:
    """Population loss per feature ``(n,)`` of one model given in effective form (e.g. the naive one)."""
    x, pa = sample_active_rows(n_rows, A.shape[0], p, _gen(key, seed, float(p)))
    return per_feature_loss(x, A, B, mix, pa)


def naive_models(trained: TrainedModels) -> TrainedModels:
    """The hand-built naive network (``naive_weights``) in each trained model's setting (its mix)."""
    A, B = naive_weights(trained.config.n_features, trained.config.d_mlp)
    M = len(trained.specs)
    return TrainedModels(
        list(trained.specs), A.expand(M, -1, -1).clone(), B.expand(M, -1, -1).clone(), trained.mix.clone(),
        torch.zeros(M, 0), [], trained.config,
    )
