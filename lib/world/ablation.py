"""Which corpus teaches verification? Train one toy model on a named corpus variant and log its
judgement AUROC and fact recall during training (the curves notebook 00 shows).

    python -m lib.world.ablation --variant v1-debiased --layers 4 --steps 15000
    python -m lib.world.ablation --variant v2 --layers 2 --steps 6000 --out data/world/ablation

Variants (everything else as :class:`lib.world.corpus.CorpusConfig`):

* ``v1-debiased``: the first toy world's corpus with the bias removed: every document mixed
  (each statement true with probability 1/2), half the statements judged, no checks, no questions;
* ``v2``: honest and liar documents (a quarter each), checks, questions, 60% of mixed statements judged;
* ``v3``: the default corpus (70% mixed documents, 80% of their statements judged, fewer checks),
  trained in the builds with the curriculum (:data:`lib.world.corpus.CURRICULUM`);
* ``v2-mixed-only``: v2 without honest and liar documents;
* ``v2-no-forms``: v2 without the recall-then-judge checks and the questions;
* ``v2-dense``: more verdicts: 70% mixed documents, 90% of their statements judged, questions but
  no checks (a check can be solved by spotting a repeated country token, which teaches nothing
  about recall), less filler.

The log (``{variant}-{layers}l.json``: steps, losses, ``probe`` rows with judgement AUROC per
dataset and recall) is written atomically; no model is saved.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lib import paths
from lib.results import atomic_write_text
from lib.world.build import corpus_and_tokenizer, judgement_probe, tokenize_docs
from lib.world.corpus import DEFAULT_MIX, CorpusConfig
from lib.world.registry import ModelSpec

VARIANTS: dict[str, dict] = {
    "v1-debiased": dict(doc_modes={"mixed": 1.0}, check_prob=0.0, question_prob=0.0, judgement_prob=0.5),
    "v2": dict(doc_modes={"mixed": 0.5, "honest": 0.25, "liar": 0.25}, judgement_prob=0.6, check_prob=0.1),
    "v3": {},
    "v2-mixed-only": dict(doc_modes={"mixed": 1.0}),
    "v2-no-forms": dict(check_prob=0.0, question_prob=0.0),
    "v2-dense": dict(doc_modes={"mixed": 0.7, "honest": 0.15, "liar": 0.15}, judgement_prob=0.9, check_prob=0.0,
                     question_prob=0.1, mix={**DEFAULT_MIX, "filler": 0.08}),
}


def run(variant: str, layers: int, steps: int, d_model: int = 128, seed: int = 0, threads: int = 1,
        probe_every: int = 1000, out: Path | None = None, corpus: dict | None = None, spec: dict | None = None,
        tag: str = "") -> Path:
    """Train a ``layers``-layer GPT-NeoX toy model on corpus ``variant`` (with ``corpus`` overrides
    of :class:`CorpusConfig` fields and ``spec`` overrides of :class:`ModelSpec` fields, e.g. a
    small world ``{"min_population": 3_000_000}``); return the log's path."""
    from lib.world.train import train

    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(threads)
    cfg = CorpusConfig(**{**VARIANTS[variant], **(corpus or {})})
    name = f"{variant}-{layers}l" + (f"-{tag}" if tag else "")
    spec_ = ModelSpec(**{**ModelSpec(name, "neox", layers, d_model, max(1, d_model // 32), steps, seed=seed).to_dict(),
                         **(spec or {})})
    _, train_docs, eval_docs, tokenizer = corpus_and_tokenizer(seed, n_train=steps * spec_.batch_size, cfg=cfg)
    names = None if "cities" in cfg.mix and len([k for k, v in cfg.mix.items() if v > 0]) > 3 else \
        [k for k, v in cfg.mix.items() if v > 0 and k != "filler"]
    ckpt = paths.cache_dir() / "checkpoints" / f"ablation-{name}-seed{seed}-steps{steps}.pt"
    result = train(spec_, tokenize_docs(tokenizer, train_docs, spec_.n_ctx), tokenize_docs(tokenizer, eval_docs, spec_.n_ctx),
                   len(tokenizer), eval_every=250, probe=judgement_probe(tokenizer, names=names,
                                                                         min_population=cfg.min_population),
                   probe_every=probe_every, checkpoint=ckpt)
    log = {"variant": variant, "corpus": cfg.to_dict(), "spec": spec_.to_dict(),
           **{k: result.log[k] for k in ("tokens_per_step", "eval_step", "eval_loss", "probe")}}
    path = Path(out or paths.data_dir() / "world" / "ablation") / f"{name}.json"
    atomic_write_text(path, json.dumps(log) + "\n")
    ckpt.unlink(missing_ok=True)
    return path


def _overrides(items: list[str]) -> dict:
    import ast

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, choices=list(VARIANTS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe-every", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--corpus", nargs="*", default=[], help="CorpusConfig overrides, key=value")
    ap.add_argument("--spec", nargs="*", default=[], help="ModelSpec overrides, key=value")
    ap.add_argument("--tag", default="", help="suffix of the log's name")
    args = ap.parse_args(argv)
    path = run(args.variant, args.layers, args.steps, args.d_model, args.seed, args.threads, args.probe_every, args.out,
               corpus=_overrides(args.corpus), spec=_overrides(args.spec), tag=args.tag)
    print(f"log -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
