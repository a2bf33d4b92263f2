"""SAE training throughput and peak memory: lib.sae vs SAELens, same architecture, same data, same run.

    python benchmarks/sae_train.py                      # CPU: ReLU, d_in=768, d_sae=16x, batch 4096
    python benchmarks/sae_train.py --arch topk          # TopK k=32: our sparse kernels vs SAELens's two settings
    python benchmarks/sae_train.py --arch topk --expansion 64   # d_sae 49,152
    python benchmarks/sae_train.py --device cuda        # ours only (SAELens is not needed there): bf16, compiled
    python benchmarks/sae_train.py --d-in 128 --steps 5  # a quick smoke run

What is timed: whole training loops (``Trainer.fit`` here, ``SAETrainer.fit`` there) on the same
cached random activations (``--n-batches`` distinct [batch, d_in] Gaussian batches, cycled), ReLU
SAE with decoder-bias centring, Adam (lr 3e-4, betas 0.9/0.999), L1 coefficient 5, gradient
clipping at 1.0, no warm-ups.  The clock starts when the loop asks for batch ``--warmup`` (so
compilation and first-touch costs are excluded) and stops when ``fit`` returns.

Variants (each in its own subprocess, so peak memory is its own):

- ``ours``: fp32, eager.
- ``ours_tuned``: bf16 autocast + ``torch.compile`` of the loss.  On a CPU without native bf16
  matmuls (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False, e.g. AVX2-only) bf16 is
  emulated and many times slower, so both tuned variants then run in fp32 (compile and logging
  off only); ``--tuned-dtype`` overrides.
- ``saelens_shipped``: SAELens ``StandardTrainingSAE`` + ``SAETrainer`` as shipped: fp32, eager,
  W&B logging on (``log_to_wandb=True`` with ``WANDB_MODE=disabled``: the per-log-step metric
  computation runs, nothing is uploaded).
- ``saelens_tuned``: bf16 autocast (same rule as above), ``torch.compile`` of
  ``training_forward_pass`` (what SAELens's runner does with ``compile_sae=True``), logging off.

TopK (``--arch topk``, ``--k``; AuxK on, as both libraries train it):

- ``ours``: the sparse path of :mod:`lib.sae.sparse` (one dense encoder matmul, the rest over the
  ``B * k`` active entries), fp32, eager.  ``ours_tuned``: the same with the encoder matmul under
  bf16 autocast where the hardware has bf16 (the sparse kernels stay fp32; no compile: the
  kernels are already fused by hand).  ``ours_dense``: our dense reference path (the test oracle).
- ``saelens_shipped``: ``TopKTrainingSAE`` as shipped (dense decode, fp32, eager, W&B logging
  computed and not uploaded); ``saelens_tuned``: bf16 autocast + ``torch.compile`` of
  ``training_forward_pass``, logging off; ``saelens_sparse`` / ``saelens_sparse_tuned``: the same
  two with ``use_sparse_activations=True`` (a COO tensor and ``torch.sparse.mm`` in the decoder).

Peak memory: CUDA ``max_memory_allocated``; on CPU the growth of peak RSS over the RSS just
before training (so imports and the cached batches are not counted).

FLOPs per step (ReLU SAE, batch B, d = d_in, m = d_sae; the input needs no gradient):
forward 2Bdm (encoder) + 2Bmd (decoder); backward 2Bdm (encoder weight) + 4Bmd (decoder weight
and input) = ``10 * B * d * m``.  Elementwise work and the optimizer are O(Bm + dm) and left out.
A dense TopK step counts the same; our sparse TopK step ``2 * B * d * m + 8 * B * k * d``
(:func:`lib.sae.sparse.step_flops`).  The table prints each variant's own FLOPs, the TFLOP/s that
makes, and the fraction of this device's dense matmul rate, measured in the same run (an
``[B, d] @ [d, m]`` product of the step's own shape, in the variant's dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours", "ours_tuned", "saelens_shipped", "saelens_tuned")
TOPK_VARIANTS = ("ours", "ours_tuned", "ours_dense", "ours_dense_tuned", "saelens_shipped", "saelens_tuned",
                 "saelens_sparse", "saelens_sparse_tuned")
ALL_VARIANTS = tuple(dict.fromkeys(VARIANTS + TOPK_VARIANTS))
LR, L1, SEED = 3e-4, 5.0, 0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TimedBatches:
    """Cycle through cached batches; note the time when batch ``start_at`` is requested."""

    def __init__(self, batches, start_at: int, device):
        self.batches, self.start_at, self.device = batches, start_at, device
        self.i, self.t_start = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.start_at:
            sync(self.device)
            self.t_start = time.perf_counter()
        x = self.batches[self.i % len(self.batches)]
        self.i += 1
        return x


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def default_tuned_dtype(device: str) -> str:
    """bf16 where the hardware does bf16 matmuls natively, else fp32."""
    import torch

    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def run_variant(variant: str, args) -> dict:
    import torch

    torch.manual_seed(SEED)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    d_sae = args.d_in * args.expansion
    g = torch.Generator().manual_seed(SEED)
    batches = [torch.randn(args.batch, args.d_in, generator=g).to(device) for _ in range(args.n_batches)]
    total_steps = args.warmup + args.steps
    data = TimedBatches(batches, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_bytes()

    topk = args.arch == "topk"
    if variant.startswith("ours"):
        from lib.sae import SAEConfig, Trainer, TrainConfig, make_sae

        tuned = variant.endswith("tuned")
        dense = variant.startswith("ours_dense")
        sae = make_sae(SAEConfig(d_in=args.d_in, d_sae=d_sae, architecture=args.arch, k=args.k,
                                 sparse_decode=not dense), seed=SEED).to(device)
        cfg = TrainConfig(total_tokens=total_steps * args.batch, batch_size=args.batch, lr=LR,
                          sparsity_coefficient=L1, sparsity_warmup_frac=0.0, lr_decay_frac=0.0, grad_clip=1.0,
                          init_b_dec="zeros", log_every=10**9,
                          autocast_dtype=args.tuned_dtype if tuned and args.tuned_dtype != "float32" else None,
                          compile=tuned and not (topk and not dense))  # our sparse kernels are not compiled
        Trainer(sae, data, cfg).fit()
    elif topk:
        os.environ.setdefault("WANDB_MODE", "disabled")
        import wandb
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        shipped = not variant.endswith("tuned")
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, k=args.k, device=str(device),
                                                    use_sparse_activations="sparse" in variant))
        if not shipped:
            sae.training_forward_pass = torch.compile(sae.training_forward_pass)
        if shipped:
            wandb.init(mode="disabled")
        tcfg = SAETrainerConfig(total_training_samples=total_steps * args.batch, train_batch_size_samples=args.batch,
                                lr=LR, lr_end=LR, device=str(device),
                                autocast=not shipped and args.tuned_dtype == "bfloat16",
                                logger=LoggingConfig(log_to_wandb=shipped))
        SAETrainer(cfg=tcfg, sae=sae, data_provider=data).fit()
    else:
        os.environ.setdefault("WANDB_MODE", "disabled")
        import wandb
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        shipped = variant == "saelens_shipped"
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, l1_coefficient=L1,
                                                            device=str(device)))
        if not shipped:
            sae.training_forward_pass = torch.compile(sae.training_forward_pass)
        if shipped:
            wandb.init(mode="disabled")
        tcfg = SAETrainerConfig(total_training_samples=total_steps * args.batch, train_batch_size_samples=args.batch,
                                lr=LR, lr_end=LR, device=str(device),
                                autocast=not shipped and args.tuned_dtype == "bfloat16",
                                logger=LoggingConfig(log_to_wandb=shipped))
        SAETrainer(cfg=tcfg, sae=sae, data_provider=data).fit()
    sync(device)
    elapsed = time.perf_counter() - data.t_start
    step_s = elapsed / args.steps
    from lib.sae.sparse import step_flops

    sparse_path = topk and variant in ("ours", "ours_tuned")
    flops = step_flops(args.batch, args.d_in, d_sae, args.k if sparse_path else None)
    dtype = "bfloat16" if (variant.endswith("tuned") and args.tuned_dtype == "bfloat16") else "float32"
    rate = matmul_rate(args.batch, args.d_in, d_sae, dtype, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, peak_rss_bytes() - base_rss)
    return {"variant": variant, "step_s": step_s, "tokens_per_s": args.batch / step_s,
            "tflops": flops / step_s / 1e12, "peak_mem_mb": peak / 2**20, "flops_per_step": flops,
            "matmul_tflops": rate / 1e12, "frac_of_matmul": flops / step_s / rate, "dtype": dtype}


def cuda_or_cpu(device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def matmul_rate(batch: int, d_in: int, d_sae: int, dtype: str, device) -> float:
    """FLOP/s of this device on the step's own encoder product ``[B, d_in] @ [d_in, d_sae]`` in ``dtype``."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(batch, d_in, device=device, dtype=dt)
    b = torch.randn(d_in, d_sae, device=device, dtype=dt)
    reps = 20 if cuda_or_cpu(device) == "cuda" else 3
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * batch * d_in * d_sae * reps / (time.perf_counter() - t0)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"
    except OSError:
        pass
    return "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=["relu", "topk"], default="relu")
    ap.add_argument("--k", type=int, default=32, help="TopK: latents per token")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 matmul peak to report fractions of (CUDA default: measured here on "
                         "an 8192^3 bf16 product)")
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 50 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 10 on CUDA)")
    ap.add_argument("--n-batches", type=int, default=4, help="distinct cached batches, cycled")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; the fastest is reported")
    ap.add_argument("--variants", nargs="*", default=None, choices=ALL_VARIANTS,
                    help="default: all of the architecture's variants on CPU, ours only on CUDA")
    ap.add_argument("--tuned-dtype", choices=["bfloat16", "float32"], default=None,
                    help="autocast dtype of the tuned variants (default: bf16 if the hardware has it)")
    ap.add_argument("--worker", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.tuned_dtype = args.tuned_dtype or default_tuned_dtype(args.device)
    if args.variants is None:
        names = TOPK_VARIANTS if args.arch == "topk" else VARIANTS
        args.variants = [v for v in names if v.startswith("ours") or not cuda]

    if args.worker:
        try:
            print("RESULT " + json.dumps(run_variant(args.worker, args)), flush=True)
        except Exception as err:  # report, do not crash the comparison
            print("RESULT " + json.dumps({"variant": args.worker, "error": f"{type(err).__name__}: {err}"[:300]}))
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rep in range(args.repeats):  # interleaved, rotating order: drifts in machine load hit every variant
        order = args.variants[rep % len(args.variants):] + args.variants[: rep % len(args.variants)]
        for variant in order:
            cmd = [sys.executable, __file__, *passthrough, "--worker", variant, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--tuned-dtype", args.tuned_dtype]
            env = {**os.environ, "COMPENDIUM_QUIET": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
                   "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"variant": variant, "error": proc.stderr.strip()[-300:]}
            runs[variant].append(res)
            print(json.dumps(res), flush=True)
    results = []
    for variant, rs in runs.items():  # the best of the repeats: the least disturbed measurement
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results.append(rs[-1])
            continue
        best = dict(min(ok, key=lambda r: r["step_s"]))
        best["peak_mem_mb"] = max(r["peak_mem_mb"] for r in ok)
        best["step_s_all"] = [round(r["step_s"], 3) for r in ok]
        results.append(best)

    d_sae = args.d_in * args.expansion
    what = f"TopK SAE k={args.k}" if args.arch == "topk" else "ReLU SAE"
    print(f"\nSAE training step, {what} d_in={args.d_in} d_sae={d_sae} batch={args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, device: {device_name(args.device)}; "
          f"tuned variants: {'bf16 autocast' if args.tuned_dtype == 'bfloat16' else 'fp32 (no native bf16 here)'}, "
          "torch.compile (not of our sparse CPU path), logging off")
    print(f"best of {args.repeats} interleaved runs per variant (all step times in the JSON lines above); "
          "'matmul' = this device's rate on the step's [B, d_in] @ [d_in, d_sae] product in the variant's dtype")
    print(f"{'variant':<21}{'step (s)':>10}{'tokens/s':>11}{'GFLOP/step':>11}{'TFLOP/s':>9}{'matmul':>8}"
          f"{'of matmul':>10}{'peak MB':>9}")
    by = {r["variant"]: r for r in results}
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<21} failed: {r['error']}")
        else:
            print(f"{r['variant']:<21}{r['step_s']:>10.4f}{r['tokens_per_s']:>11.0f}{r['flops_per_step'] / 1e9:>11.1f}"
                  f"{r['tflops']:>9.3f}{r['matmul_tflops']:>8.2f}{r['frac_of_matmul']:>10.0%}{r['peak_mem_mb']:>9.0f}")
    ok = {v: r for v, r in by.items() if "error" not in r}
    if args.device.startswith("cuda") and ok:
        import torch

        peak = args.peak_tflops or matmul_rate(8192, 8192, 8192, "bfloat16", args.device) / 1e12
        print(f"device bf16 matmul peak: {peak:.0f} TFLOP/s ({'given' if args.peak_tflops else 'measured now, 8192^3'})")
        dense_flops = 10 * args.batch * args.d_in * d_sae
        for v, r in ok.items():
            print(f"  {v:<19} {r['step_s'] * 1e3:7.3f} ms/step  {r['tflops']:7.1f} TFLOP/s = {r['tflops'] / peak:5.1%} of peak"
                  f"   (dense-equivalent {dense_flops / r['step_s'] / 1e12:7.1f} TFLOP/s = "
                  f"{dense_flops / r['step_s'] / 1e12 / peak:5.1%})")
    pairs = [("ours", "saelens_shipped"), ("ours_tuned", "saelens_tuned"), ("ours", "saelens_tuned")]
    if args.arch == "topk":
        pairs = [("ours", "ours_dense"), ("ours", "saelens_shipped"), ("ours", "saelens_sparse"),
                 ("ours_tuned", "saelens_tuned"), ("ours_tuned", "saelens_sparse_tuned")]
    for ours, theirs in pairs:
        if ours in ok and theirs in ok:
            print(f"throughput {ours} / {theirs}: {ok[ours]['tokens_per_s'] / ok[theirs]['tokens_per_s']:.2f}x   "
                  f"peak memory {ours} / {theirs}: {ok[ours]['peak_mem_mb'] / max(ok[theirs]['peak_mem_mb'], 1e-9):.2f}x")
    theirs_all = {v: r for v, r in ok.items() if v.startswith("saelens")}
    ours_all = {v: r for v, r in ok.items() if v in ("ours", "ours_tuned")}
    if theirs_all and ours_all:
        fo = min(ours_all, key=lambda v: ours_all[v]["step_s"])
        ft = min(theirs_all, key=lambda v: theirs_all[v]["step_s"])
        print(f"HEADLINE: our fastest ({fo}) / SAELens's fastest ({ft}): "
              f"{theirs_all[ft]['step_s'] / ours_all[fo]['step_s']:.2f}x throughput at "
              f"{ours_all[fo]['peak_mem_mb'] / max(theirs_all[ft]['peak_mem_mb'], 1e-9):.2f}x its peak memory")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "device": device_name(args.device)}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
