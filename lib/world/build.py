"""Build the toy world: corpus, tokenizer, and every toy model (what ``make models`` runs).

    python -m lib.world.build                      # all models, full budget
    python -m lib.world.build --only toy-2l        # one model
    python -m lib.world.build --steps 20 --out /tmp/toys   # a quick smoke run elsewhere

The corpus and tokenizer are deterministic in ``--seed``; each model's directory records the
command that built it.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from lib import paths
from lib.world.corpus import CorpusConfig, generate_corpus
from lib.world.registry import TOY_MODELS
from lib.world.tokenizer import train_tokenizer
from lib.world.train import save_model, train

N_TRAIN_DOCS = 8_000
N_EVAL_DOCS = 256


def tokenize_docs(tokenizer, docs: list[str], n_ctx: int) -> torch.Tensor:
    """[len(docs), n_ctx] int64: BOS then the first n_ctx - 1 tokens of each document."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    short = [i for i, x in enumerate(ids) if len(x) < n_ctx - 1]
    if short:
        raise ValueError(f"{len(short)} documents shorter than n_ctx={n_ctx}; raise CorpusConfig.doc_chars")
    rows = [[tokenizer.bos_token_id] + x[: n_ctx - 1] for x in ids]
    return torch.tensor(rows, dtype=torch.long)


def corpus_and_tokenizer(seed: int, n_train: int = N_TRAIN_DOCS, n_eval: int = N_EVAL_DOCS):
    cfg = CorpusConfig()
    train_docs = generate_corpus(n_train, seed=seed, cfg=cfg)
    eval_docs = generate_corpus(n_eval, seed=seed + 10_000, cfg=cfg)
    tokenizer = train_tokenizer(train_docs[:4000])
    return cfg, train_docs, eval_docs, tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="override every model's step count")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--n-docs", type=int, default=N_TRAIN_DOCS)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/models)")
    args = ap.parse_args(argv)
    names = args.only or list(TOY_MODELS)
    unknown = [n for n in names if n not in TOY_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(TOY_MODELS)}")
    out_root = args.out or paths.models_dir()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, train_docs, eval_docs, tokenizer = corpus_and_tokenizer(args.seed, n_train=args.n_docs)
    command = "python -m lib.world.build " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    for name in names:
        spec = TOY_MODELS[name]
        train_tokens = tokenize_docs(tokenizer, train_docs, spec.n_ctx)
        eval_tokens = tokenize_docs(tokenizer, eval_docs, spec.n_ctx)
        ckpt = paths.cache_dir() / "checkpoints" / f"{name}-seed{args.seed}-steps{args.steps or spec.steps}.pt"
        print(f"[{name}] {spec.arch} {spec.n_layers}L d={spec.d_model}: {args.steps or spec.steps} steps "
              f"x {spec.batch_size} x {spec.n_ctx} tokens", flush=True)
        result = train(spec, train_tokens, eval_tokens, len(tokenizer), steps=args.steps, checkpoint=ckpt)
        provenance = {
            "command": command.strip(),
            "corpus_seed": args.seed,
            "corpus": {"n_train_docs": len(train_docs), "n_eval_docs": len(eval_docs), **cfg.to_dict()},
            "tokenizer_vocab": len(tokenizer),
        }
        out = save_model(result, spec, tokenizer, out_root / name, provenance)
        print(f"[{name}] done in {result.seconds:.0f}s: train {result.log['train_loss'][-1]:.3f} "
              f"eval {result.log['eval_loss'][-1]:.3f} -> {out}", flush=True)
        ckpt.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
