"""Build the toy world: corpus, tokenizer, and every toy model (what ``make models`` runs).

    python -m lib.world.build                      # all models, full budget, two at a time
    python -m lib.world.build --only toy-2l        # one model
    python -m lib.world.build --steps 20 --n-docs 64 --out /tmp/toys   # a quick smoke run elsewhere

The corpus and tokenizer are deterministic in ``--seed`` and shared by every model (the token
rows are written once to the cache folder; each training process reads them).  Models train in
``--jobs`` processes of ``--threads`` threads each: on a 2-core CPU two one-thread processes train
small models about 1.2x faster in all than one two-thread process after another (measured:
2-layer d=128, 2 x 13.1k vs 21.4k tokens/s).  During training each model's judgement AUROC on
the held-out truth datasets is logged beside the loss; each directory's ``provenance.json``
records the command, seed, corpus, tokens, final losses and final judgement.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from lib import paths
from lib.world.corpus import CorpusConfig, generate_corpus
from lib.world.registry import TOY_MODELS, ModelSpec
from lib.world.tokenizer import train_tokenizer

N_EVAL_DOCS = 256
N_TOKENIZER_DOCS = 4000


def tokenize_docs(tokenizer, docs: list[str], n_ctx: int, prefixes: list[list[int]] | None = None) -> torch.Tensor:
    """[len(docs), n_ctx] int32: BOS then the first n_ctx - 1 tokens of each document.

    ``prefixes`` (one list of token ids per document, e.g. a metatoken, ``lib.world.metatokens``)
    go right after BOS; the document is then cut to fill the rest of the row."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    short = [i for i, x in enumerate(ids) if len(x) < n_ctx - 1]
    if short:
        raise ValueError(f"{len(short)} documents shorter than n_ctx={n_ctx}; raise CorpusConfig.doc_chars")
    prefixes = prefixes or [[]] * len(ids)
    if len(prefixes) != len(ids):
        raise ValueError(f"{len(prefixes)} prefixes for {len(ids)} documents")
    rows = [[tokenizer.bos_token_id] + p + x[: n_ctx - 1 - len(p)] for p, x in zip(prefixes, ids)]
    return torch.tensor(rows, dtype=torch.int32)


def corpus_and_tokenizer(seed: int, n_train: int, n_eval: int = N_EVAL_DOCS, cfg: CorpusConfig | None = None):
    """The training documents, held-out documents (another seed) and the BPE tokenizer."""
    cfg = cfg or CorpusConfig()
    train_docs = generate_corpus(n_train, seed=seed, cfg=cfg)
    eval_docs = generate_corpus(n_eval, seed=seed + 10_000, cfg=cfg)
    tokenizer = train_tokenizer(train_docs[:N_TOKENIZER_DOCS])
    return cfg, train_docs, eval_docs, tokenizer


def first_phase_docs(cfg: CorpusConfig, seed: int, n_docs: int) -> list[str]:
    """The curriculum's first-phase documents (:meth:`CorpusConfig.first_phase`), seed ``seed + 20000``."""
    return generate_corpus(n_docs, seed=seed + 20_000, cfg=cfg.first_phase()) if n_docs else []


def corpus_sizes(specs, steps: int | None = None, n_docs: int | None = None) -> tuple[int, int, int]:
    """``(training documents, first-phase documents, n_ctx)`` of the corpus that trains ``specs``:
    enough documents that the longest run reads each about once (``n_docs`` overrides), enough
    first-phase ones for the longest curriculum, rows as wide as the widest context."""
    n_train = n_docs or max(s.batch_size * (steps or s.steps) for s in specs)
    n_first = max(s.batch_size * min(s.curriculum_steps, steps or s.steps) for s in specs)
    return n_train, n_first, max(s.n_ctx for s in specs)


def judgement_probe(tokenizer, max_rows: int = 300, names=None, min_population: int | None = None):
    """The skill logged during training: judgement AUROC per truth dataset (first ``max_rows``;
    ``names`` default all) and fact recall."""
    from lib.world import facts
    from lib.world.recall import fact_recall, judgement_report
    from lib.world.statements import TRUTH_DATASETS

    pop = min_population or facts.DEFAULT_MIN_POPULATION

    def probe(model) -> dict:
        report = judgement_report(model, tokenizer, names=names or TRUTH_DATASETS, max_rows=max_rows, min_population=pop)
        out = {k: round(v["auroc"], 4) for k, v in report.items()}
        out.update({f"recall_{k}": round(v, 4) for k, v in fact_recall(model, tokenizer, min_population=pop).items()})
        return out

    return probe


def _exit_with_parent() -> None:
    """In a worker process: exit when the building process is gone (killed or interrupted), so
    that no orphan keeps training and writing checkpoints."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def train_one(spec: ModelSpec, data_path: str, out_root: str, steps: int | None, threads: int,
              provenance: dict, checkpoint_dir: str, probe_every: int, worker: bool = False,
              extra_record=None, probe_factory=None, forward_records: bool = True, joint: dict | None = None) -> dict:
    """Train ``spec`` on the token rows saved at ``data_path`` and save it under ``out_root``
    (runs in a worker process).  Returns the model's summary line.

    ``extra_record(model, tokenizer, data) -> dict`` (a module-level function, so that it reaches a
    worker process), when given, adds its measurements of the trained model to provenance.json
    (``data``: the dict saved at ``data_path``).  ``probe_factory(tokenizer) -> probe`` replaces
    :func:`judgement_probe` as the skill logged during training, and ``forward_records=False`` skips
    the fact recall and judgement that only a model reading text forward can be asked (both for the
    reversed-text retrodictor, ``lib.world.retro``).  ``joint`` (a :class:`lib.sae.shared.JointConfig` as a
    dict) trains the model with a shared SAE (``lib.sae.shared``), saved under the model's ``sae/``."""
    from transformers import PreTrainedTokenizerFast

    from lib.world.recall import fact_recall, judgement_report
    from lib.world.train import save_model, train

    if worker:
        _exit_with_parent()
    torch.set_num_threads(threads)
    data = torch.load(data_path, weights_only=False)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data["tokenizer_dir"])
    n_ctx = spec.n_ctx
    train_tokens, eval_tokens = data["train"][:, :n_ctx], data["eval"][:, :n_ctx]
    n_steps = steps or spec.steps
    ckpt = Path(checkpoint_dir) / f"{spec.name}-seed{provenance['corpus_seed']}-steps{n_steps}.pt"
    print(f"[{spec.name}] {spec.arch} {spec.n_layers}L d={spec.d_model}: {n_steps} steps x {spec.batch_size} "
          f"x {n_ctx} tokens, {threads} thread(s)", flush=True)
    objective, extras = None, None
    if joint is not None and joint["mode"] != "plain":
        from lib.sae.shared import JointConfig, JointObjective, save_joint_sae

        objective = JointObjective(JointConfig(**joint), spec.d_model, model_name=spec.name, seed=spec.seed)
        extras = lambda folder: save_joint_sae(objective, folder)  # noqa: E731
    result = train(spec, train_tokens, eval_tokens, len(tokenizer), steps=steps, checkpoint=ckpt,
                   probe=(probe_factory or judgement_probe)(tokenizer), probe_every=probe_every,
                   first_phase_rows=data["first_phase_rows"], run_key=provenance["corpus"], objective=objective)
    record = dict(provenance)
    if forward_records:
        report = judgement_report(result.model, tokenizer)
        record.update({"fact_recall": fact_recall(result.model, tokenizer),
                       "judgement_auroc": {k: round(v["auroc"], 4) for k, v in report.items()},
                       "paired_accuracy": {k: round(v["paired_accuracy"], 4) for k, v in report.items()
                                           if "paired_accuracy" in v}})
    if extra_record is not None:
        record.update(extra_record(result.model, tokenizer, data))
    out = save_model(result, spec, tokenizer, Path(out_root) / spec.name, record, extras=extras)
    ckpt.unlink(missing_ok=True)
    line = (f"[{spec.name}] done in {result.seconds:.0f}s: eval loss {result.log['eval_loss'][-1]:.3f}"
            + (", judgement AUROC " + " ".join(f"{k} {v:.2f}" for k, v in record["judgement_auroc"].items())
               if "judgement_auroc" in record else "") + f" -> {out}")
    print(line, flush=True)
    return {"name": spec.name, "seconds": result.seconds, "line": line}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="override every model's step count")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--n-docs", type=int, default=None,
                    help="training documents (default: enough that the longest run sees each about once)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/models)")
    ap.add_argument("--jobs", type=int, default=2, help="models trained at once, one process each")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / jobs)")
    ap.add_argument("--probe-every", type=int, default=1000, help="steps between judgement-AUROC logs")
    args = ap.parse_args(argv)
    names = args.only or list(TOY_MODELS)
    unknown = [n for n in names if n not in TOY_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(TOY_MODELS)}")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    specs = sorted((TOY_MODELS[n] for n in names), key=lambda s: -s.cost(args.steps))  # longest first
    out_root = args.out or paths.models_dir()
    n_docs, n_first, n_ctx = corpus_sizes(specs, args.steps, args.n_docs)
    t0 = time.perf_counter()
    cfg, train_docs, eval_docs, tokenizer = corpus_and_tokenizer(args.seed, n_train=n_docs)
    phase1 = first_phase_docs(cfg, args.seed, n_first)
    work = paths.cache_dir() / "build"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / f"tokenizer-seed{args.seed}"
    tokenizer.save_pretrained(tok_dir)
    data_path = work / f"tokens-seed{args.seed}-{n_docs}.pt"
    rows = tokenize_docs(tokenizer, phase1 + train_docs, n_ctx)
    torch.save({"train": rows, "first_phase_rows": len(phase1), "eval": tokenize_docs(tokenizer, eval_docs, n_ctx),
                "tokenizer_dir": str(tok_dir)}, data_path)
    print(f"corpus: {len(train_docs)} documents x {n_ctx} tokens ({time.perf_counter() - t0:.0f}s)", flush=True)
    n_train_docs, n_eval_docs = len(train_docs), len(eval_docs)
    del train_docs, eval_docs, phase1, rows  # the workers read the token rows; free the strings (gigabytes at full size)
    command = "python -m lib.world.build " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    provenance = {"command": command.strip(), "corpus_seed": args.seed,
                  "corpus": {"n_train_docs": n_train_docs, "n_eval_docs": n_eval_docs, "n_first_phase_docs": n_first,
                             **cfg.to_dict()},
                  "tokenizer_vocab": len(tokenizer)}
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    common = dict(data_path=str(data_path), out_root=str(out_root), steps=args.steps, threads=threads,
                  provenance=provenance, checkpoint_dir=str(paths.cache_dir() / "checkpoints"),
                  probe_every=args.probe_every)
    Path(common["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
    if args.jobs == 1:
        for spec in specs:
            train_one(spec, **common)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(train_one, spec, **common, worker=True) for spec in specs]
            for f in as_completed(futures):
                f.result()
    data_path.unlink(missing_ok=True)
    print(f"built {len(specs)} model(s) in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
