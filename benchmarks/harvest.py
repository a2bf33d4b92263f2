"""Activation-harvesting throughput and memory: ``lib.activations.harvest`` against TransformerLens's
plain ``run_with_cache`` (no ``names_filter``, no ``stop_at_layer``), measured in the same run.

    python benchmarks/harvest.py                 # toy model + a GPT-2-size random model, CPU
    python benchmarks/harvest.py --n-texts 128 --reps 2   # quicker
    python benchmarks/harvest.py --threads 1     # steadier on a busy shared machine

For each model both methods harvest the same statements (the truth datasets' sentences) at the
same hook(s), with the same sorted batches and attention masks, and must return the same numbers
(checked).  Timing: the methods alternate, ``--reps`` times each, and the median counts (tokens/s
= real tokens / seconds).  Memory: each method runs once more in a fresh subprocess that samples
its resident memory every millisecond; "peak" is the highest RSS above the level just before the
pass, and "held" is the activation bytes a method keeps per batch (the baseline's whole cache;
harvest's selected rows only).

Scenarios: the probe's read (one middle layer, last token), and every layer's residual stream.
The target (issue 01): harvest at least 2x the baseline's tokens/s on the GPT-2-size model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib import activations as A  # noqa: E402
from lib.hooks import hook_name, resid_hooks  # noqa: E402
from lib.datasets import make_truth_dataset  # noqa: E402
from lib.models import load_model, toy_model_names  # noqa: E402


# --------------------------------------------------------------------------------------------
# models and texts
# --------------------------------------------------------------------------------------------
def _tokenizer():
    """The toy tokenizer when a toy model exists, else a small BPE trained on the statements."""
    from transformers import AutoTokenizer

    names = toy_model_names()
    if names:
        from lib import paths

        return AutoTokenizer.from_pretrained(paths.models_dir() / names[0])
    from lib.world.tokenizer import train_tokenizer

    texts = list(make_truth_dataset("cities")["statement"]) + list(make_truth_dataset("larger_than")["statement"])
    return train_tokenizer(texts, vocab_size=1024)


def build_random_model(kind: str, directory: Path) -> Path:
    """Write a random model to ``directory``: "gpt2-size" (GPT-2 small: 12 x 768, vocab 50257)
    or "toy-size" (GPT-NeoX 2 x 128, the toy-2l shape)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "gpt2-size":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, **ids))
    elif kind == "toy-size":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), max_position_embeddings=256, hidden_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                                 use_parallel_residual=False, **ids))
    else:
        raise ValueError(kind)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def statements(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    pool = []
    for name in ("cities", "sp_en_trans", "larger_than", "cities_cities_conj"):
        pool += list(make_truth_dataset(name)["statement"])
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def scenario_hooks(model, scenario: str) -> list[str]:
    if scenario == "probe":
        return [hook_name((model.cfg.n_layers - 1) // 2)]
    return resid_hooks(model)


# --------------------------------------------------------------------------------------------
# the two methods
# --------------------------------------------------------------------------------------------
def baseline(model, texts: list[str], hooks: list[str], batch_size: int) -> tuple[dict, int]:
    """TransformerLens's plain run_with_cache on each batch, then the last-token rows picked out."""
    tokens = A.tokenize(model, texts, prepend_bos=True)
    out = {h: torch.empty(len(texts), model.cfg.d_model) for h in hooks}
    held = 0
    with torch.no_grad():
        for batch in A.iter_batches(tokens, batch_size, pad_id=A._pad_id(model.tokenizer)):
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask.long())
            held = max(held, sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor)))
            rows = torch.arange(len(batch.index))
            for h in hooks:
                out[h][batch.index] = cache[h][rows, batch.last()]
            del cache
    return out, held


def ours(model, texts: list[str], hooks: list[str], batch_size: int) -> tuple[dict, int]:
    acts = A.harvest(model, texts, hooks, "last", batch_size=batch_size, cache=False)
    held = sum(t.numel() * t.element_size() for t in acts.acts.values())
    return acts.acts, held


METHODS = {"run_with_cache": baseline, "harvest": ours}


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One pass of one method in this fresh process; prints {"peak_bytes", "held_bytes"}."""
    model = load_model(args.model_dir, device="cpu")
    texts = statements(args.n_texts)
    hooks = scenario_hooks(model, args.scenario)
    with torch.no_grad():  # one tiny forward first: one-time setup is not the method's memory
        model(model.to_tokens(texts[:1], prepend_bos=True))
    start = _rss()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, held = METHODS[args.worker](model, texts, hooks, args.batch_size)
    done.set()
    thread.join()
    peak[0] = max(peak[0], _rss())
    print(json.dumps({"peak_bytes": peak[0] - start, "held_bytes": held}))


def time_methods(model, texts, hooks, batch_size, reps) -> dict:
    n_tokens = A.tokenize(model, texts, prepend_bos=True).n_real
    results = {m: [] for m in METHODS}
    outputs = {}
    METHODS["harvest"](model, texts[:batch_size], hooks, batch_size)  # warm-up (allocator, kernels)
    METHODS["run_with_cache"](model, texts[:batch_size], hooks, batch_size)
    for _ in range(reps):
        for name, fn in METHODS.items():  # alternate, so load drift hits both alike
            t0 = time.perf_counter()
            outputs[name], _ = fn(model, texts, hooks, batch_size)
            results[name].append(time.perf_counter() - t0)
    for h in hooks:
        if not torch.allclose(outputs["harvest"][h], outputs["run_with_cache"][h], atol=1e-4):
            raise AssertionError(f"harvest and run_with_cache disagree at {h}")
    return {name: {"seconds": statistics.median(ts), "tokens_per_s": n_tokens / statistics.median(ts)}
            for name, ts in results.items()} | {"n_tokens": n_tokens}


def memory(model_dir: Path, scenario: str, n_texts: int, batch_size: int, threads: int | None) -> dict:
    out = {}
    for name in METHODS:
        cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir), "--scenario", scenario,
               "--n-texts", str(n_texts), "--batch-size", str(batch_size)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COMPENDIUM_QUIET": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 gives steadier numbers on a shared machine)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", default="probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("COMPENDIUM_QUIET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if "toy-2l" in toy_model_names():
            from lib import paths

            models["toy-2l"] = paths.models_dir() / "toy-2l"
        else:
            models["toy-size (random)"] = build_random_model("toy-size", Path(tmp) / "toy")
        models["gpt2-size (random)"] = build_random_model("gpt2-size", Path(tmp) / "gpt2")
        texts = statements(args.n_texts)
        print(f"{args.n_texts} statements, batch {args.batch_size}, {args.reps} reps, torch threads {torch.get_num_threads()}")
        header = f"{'model':<20} {'scenario':<10} {'hooks':>5} {'baseline tok/s':>15} {'harvest tok/s':>14} {'speed-up':>9} " \
                 f"{'peak MB base':>13} {'peak MB ours':>13} {'held MB base':>13} {'held MB ours':>13}"
        print(header)
        for label, directory in models.items():
            model = load_model(directory, device="cpu")
            for scenario in ("probe", "all"):
                hooks = scenario_hooks(model, scenario)
                t = time_methods(model, texts, hooks, args.batch_size, args.reps)
                m = {} if args.skip_memory else memory(directory, scenario, args.n_texts, args.batch_size, args.threads)
                ratio = t["harvest"]["tokens_per_s"] / t["run_with_cache"]["tokens_per_s"]
                report[f"{label}/{scenario}"] = {"hooks": hooks, "timing": t, "memory": m, "speedup": ratio}
                mb = lambda name, key: f"{m[name][key] / 2**20:13.1f}" if m else f"{'-':>13}"  # noqa: E731
                print(f"{label:<20} {scenario:<10} {len(hooks):>5} {t['run_with_cache']['tokens_per_s']:15.0f} "
                      f"{t['harvest']['tokens_per_s']:14.0f} {ratio:8.2f}x {mb('run_with_cache', 'peak_bytes')} "
                      f"{mb('harvest', 'peak_bytes')} {mb('run_with_cache', 'held_bytes')} {mb('harvest', 'held_bytes')}",
                      flush=True)
    target = report["gpt2-size (random)/probe"]["speedup"]
    print(f"target: harvest >= 2x run_with_cache on the GPT-2-size model (probe read): "
          f"{target:.2f}x {'MET' if target >= 2 else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
