"""SAE training throughput and peak memory: lib.sae vs SAELens, same architecture, same data, same run.

    python benchmarks/sae_train.py                      # CPU: d_in=768, d_sae=16x, batch 4096
    python benchmarks/sae_train.py --device cuda --steps 50 --warmup 10
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

Peak memory: CUDA ``max_memory_allocated``; on CPU the growth of peak RSS over the RSS just
before training (so imports and the cached batches are not counted).

FLOPs per step (ReLU SAE, batch B, d = d_in, m = d_sae; the input needs no gradient):
forward 2Bdm (encoder) + 2Bmd (decoder); backward 2Bdm (encoder weight) + 4Bmd (decoder weight
and input) = ``10 * B * d * m``.  Elementwise work and the optimizer are O(Bm + dm) and left out.
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

    if variant.startswith("ours"):
        from lib.sae import SAEConfig, Trainer, TrainConfig, make_sae

        tuned = variant == "ours_tuned"
        sae = make_sae(SAEConfig(d_in=args.d_in, d_sae=d_sae), seed=SEED).to(device)
        cfg = TrainConfig(total_tokens=total_steps * args.batch, batch_size=args.batch, lr=LR,
                          sparsity_coefficient=L1, sparsity_warmup_frac=0.0, lr_decay_frac=0.0, grad_clip=1.0,
                          init_b_dec="zeros", log_every=10**9,
                          autocast_dtype=args.tuned_dtype if tuned and args.tuned_dtype != "float32" else None,
                          compile=tuned)
        Trainer(sae, data, cfg).fit()
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
    flops = 10 * args.batch * args.d_in * d_sae
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, peak_rss_bytes() - base_rss)
    return {"variant": variant, "step_s": step_s, "tokens_per_s": args.batch / step_s,
            "tflops": flops / step_s / 1e12, "peak_mem_mb": peak / 2**20, "flops_per_step": flops}


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
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 50 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 10 on CUDA)")
    ap.add_argument("--n-batches", type=int, default=4, help="distinct cached batches, cycled")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; the fastest is reported")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--tuned-dtype", choices=["bfloat16", "float32"], default=None,
                    help="autocast dtype of the tuned variants (default: bf16 if the hardware has it)")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.tuned_dtype = args.tuned_dtype or default_tuned_dtype(args.device)

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
    print(f"\nSAE training step, ReLU SAE d_in={args.d_in} d_sae={d_sae} batch={args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, device: {device_name(args.device)}; "
          f"tuned variants: {'bf16 autocast' if args.tuned_dtype == 'bfloat16' else 'fp32 (no native bf16 here)'}, torch.compile, logging off")
    print(f"FLOPs/step = 10 * B * d_in * d_sae = {10 * args.batch * args.d_in * d_sae:.3e}")
    print(f"best of {args.repeats} interleaved runs per variant (all step times in the JSON lines above)")
    print(f"{'variant':<17}{'step (s)':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'peak MB':>10}")
    by = {r["variant"]: r for r in results}
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<17} failed: {r['error']}")
        else:
            print(f"{r['variant']:<17}{r['step_s']:>10.3f}{r['tokens_per_s']:>12.0f}{r['tflops']:>9.3f}{r['peak_mem_mb']:>10.0f}")
    for ours, theirs in (("ours", "saelens_shipped"), ("ours_tuned", "saelens_tuned"), ("ours", "saelens_tuned")):
        if ours in by and theirs in by and "error" not in by[ours] and "error" not in by[theirs]:
            print(f"throughput {ours} / {theirs}: {by[ours]['tokens_per_s'] / by[theirs]['tokens_per_s']:.2f}x   "
                  f"peak memory {ours} / {theirs}: {by[ours]['peak_mem_mb'] / max(by[theirs]['peak_mem_mb'], 1e-9):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "device": device_name(args.device)}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
