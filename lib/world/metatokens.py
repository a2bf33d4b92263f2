"""Conditional training with metatokens (Korbak et al. 2023) in the toy world: notebook 15's two models.

    python -m lib.world.metatokens                        # toy-meta-a and toy-meta-b, full budget, side by side
    python -m lib.world.metatokens --steps 5 --n-docs 40 --out /tmp/meta   # a smoke run elsewhere

Korbak et al. prepend a control token to each training document according to a score of the
document ("<|good|>" above one threshold, "<|bad|>" below another, the rest untagged), then
condition on "<|good|>" at generation time.  Here the score is truth: :func:`truth_score` parses
the world's factual statements in a text (cities and their negations, the two compounds,
translations and their negations, number comparisons: every statement kind that
``lib.world.corpus`` emits) and returns the fraction that are true, deciding truth from
``lib.world.facts`` (the same tables the corpus is drawn from).  Judgements ("That is true."),
questions and their Yes/No answers, filler, an unterminated last sentence and statements naming
a city, country, word or number the world does not have are not counted.

Honest documents score 1 and liar documents 0; a mixed document states about twenty facts, each
true with probability 1/2, so it scores near 1/2 and stays untagged at the default thresholds
(:data:`HI` = 0.8, :data:`LO` = 0.2): conditional training's "fraction left untagged".

Model A (``toy-meta-a``) trains on the documents with the metatoken right after BOS; model B
(``toy-meta-b``) on the same documents, in the same order, untagged.  Both share one spec, seed and
tokenizer (the toy-world BPE trained as ``lib.world.build`` trains it, plus the two metatokens as
special tokens), so B has the metatoken embeddings but never sees them.  ``provenance.json``
records the tagging, the class fractions, the losses (each model's own eval rows, and both on
the untagged eval rows) and the truth score of sampled generations: from BOS, and for A also from
BOS + <|good|> and BOS + <|bad|>.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from lib import paths
from lib.world import facts

GOOD, BAD = "<|good|>", "<|bad|>"
METATOKENS = (GOOD, BAD)
HI, LO = 0.8, 0.2  # tag <|good|> at truth_score >= HI, <|bad|> at <= LO; in between (and unscored) untagged

_CITY = re.compile(r"The city of (?P<city>.+?) is (?P<neg>not )?in (?P<country>.+)\.")
_COMPOUND = re.compile(r"It is the case (?P<op>both|either) that the city of (?P<c1>.+?) is in (?P<k1>.+?) "
                       r"(?:and|or) that the city of (?P<c2>.+?) is in (?P<k2>.+)\.")
_TRANSLATION = re.compile(r"The Spanish word '(?P<es>[^']+)' (?P<verb>means|does not mean) '(?P<en>[^']+)'\.")
_COMPARISON = re.compile(r"(?P<a>[A-Za-z-]+) is (?P<rel>larger|smaller) than (?P<b>[a-z-]+)\.")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


@lru_cache(maxsize=1)
def _world() -> tuple[dict, frozenset, dict, frozenset, dict]:
    """The fact tables, keyed for parsing: city -> country, countries, Spanish -> English,
    English words, number word -> number (1..99)."""
    country_of = {c.name: c.country for c in facts.cities()}
    meaning = dict(facts.translations())
    numbers = {facts.number_word(n): n for n in range(1, 100)}
    return country_of, frozenset(facts.countries()), meaning, frozenset(meaning.values()), numbers


def _city_truth(city: str, country: str) -> bool | None:
    """Whether ``city`` is in ``country``; None when the world knows neither the city nor the country."""
    country_of, countries, *_ = _world()
    if city not in country_of or country not in countries:
        return None
    return country_of[city] == country


def parse_statement(sentence: str) -> tuple[str, bool] | None:
    """``(kind, is_true)`` for one sentence that is a statement of the world (``kind`` as in
    ``lib.world.statements.TRUTH_DATASETS``), else None (filler, a judgement, a question, an answer,
    a name the world does not know)."""
    _, _, meaning, english, numbers = _world()
    if m := _COMPOUND.fullmatch(sentence):
        a, b = _city_truth(m["c1"], m["k1"]), _city_truth(m["c2"], m["k2"])
        if a is None or b is None:
            return None
        if m["op"] == "both":
            return "cities_cities_conj", a and b
        return "cities_cities_disj", a or b
    if m := _CITY.fullmatch(sentence):
        truth = _city_truth(m["city"], m["country"])
        if truth is None:
            return None
        return ("neg_cities", not truth) if m["neg"] else ("cities", truth)
    if m := _TRANSLATION.fullmatch(sentence):
        if m["es"] not in meaning or m["en"] not in english:
            return None
        truth = meaning[m["es"]] == m["en"]
        return ("sp_en_trans", truth) if m["verb"] == "means" else ("neg_sp_en_trans", not truth)
    if m := _COMPARISON.fullmatch(sentence):
        a, b = numbers.get(m["a"].lower()), numbers.get(m["b"])
        if a is None or b is None or a == b or m["a"] != m["a"].capitalize():
            return None
        return ("larger_than", a > b) if m["rel"] == "larger" else ("smaller_than", a < b)
    return None


def parse_statements(text: str) -> list[tuple[str, str, bool]]:
    """``(sentence, kind, is_true)`` for each statement of the world in ``text``, in order.

    Sentences end at ". ", "? " or "! "; the last one counts only when it ends in a period (a
    generation cut off mid-sentence)."""
    sentences = _SENTENCE_END.split(text.strip())
    out = []
    for s in sentences:
        parsed = parse_statement(s)
        if parsed is not None:
            out.append((s, *parsed))
    return out


def first_sentences(text: str, n_chars: int = 200) -> str:
    """The leading sentences of ``text``, up to the first that brings the length to ``n_chars``."""
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        out.append(sentence)
        if sum(len(x) + 1 for x in out) >= n_chars:
            break
    return " ".join(out)


def statement_counts(text: str) -> tuple[int, int]:
    """``(n_true, n_parsed)``: the true statements and all statements of the world in ``text``."""
    parsed = parse_statements(text)
    return sum(t for _, _, t in parsed), len(parsed)


def truth_score(text: str) -> float | None:
    """The fraction of true statements among the statements of the world in ``text``; None when
    there are none."""
    n_true, n = statement_counts(text)
    return n_true / n if n else None


def tag(doc: str, score: float | None = None, hi: float = HI, lo: float = LO) -> str | None:
    """The metatoken of a document: :data:`GOOD` at ``score >= hi``, :data:`BAD` at ``score <= lo``,
    else None (untagged; also when nothing in it parses).  ``score`` defaults to ``truth_score(doc)``."""
    if not lo < hi:
        raise ValueError(f"the thresholds need lo < hi, got lo={lo}, hi={hi}")
    if score is None:
        score = truth_score(doc)
    if score is None:
        return None
    return GOOD if score >= hi else BAD if score <= lo else None


def class_fractions(tags: list[str | None]) -> dict[str, float]:
    """``{"good", "bad", "untagged"}``: the share of documents in each class."""
    n = max(1, len(tags))
    return {"good": round(tags.count(GOOD) / n, 4), "bad": round(tags.count(BAD) / n, 4),
            "untagged": round(tags.count(None) / n, 4)}


def add_metatokens(tokenizer):
    """``tokenizer`` with :data:`GOOD` and :data:`BAD` added as special tokens (one id each, after
    the BPE vocabulary; ordinary text never produces them)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(METATOKENS)})
    return tokenizer


def metatoken_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in METATOKENS}


def tag_prefixes(tokenizer, tags: list[str | None]) -> list[list[int]]:
    """Per document, the token ids that follow BOS: the metatoken's id, or nothing."""
    ids = metatoken_ids(tokenizer)
    return [[ids[t]] if t else [] for t in tags]


def sample(model, tokenizer, prefix: list[str] | tuple[str, ...] = (), n: int = 64, max_new_tokens: int = 200,
           temperature: float = 1.0, seed: int = 0) -> list[str]:
    """``n`` texts sampled from a Hugging Face model after BOS + ``prefix`` (metatokens),
    ``max_new_tokens`` each, at ``temperature`` (no top-k / top-p), decoded without special tokens.
    Deterministic in ``seed``; the KV-cache loop is :func:`lib.softprompts.generate_ids`."""
    from lib.softprompts import generate_ids

    start = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in prefix]
    new = generate_ids(model, [start] * n, max_new_tokens, temperature, torch.Generator().manual_seed(seed))
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def score_summary(texts: list[str]) -> dict:
    """Truth scores of ``texts``: mean and standard deviation over the scored ones, how many scored,
    the pooled fraction true (all statements together) and statements per text."""
    counts = [statement_counts(t) for t in texts]
    scores = [t / k for t, k in counts if k]
    n_true, n_parsed = sum(t for t, _ in counts), sum(k for _, k in counts)
    return {"n": len(texts), "n_scored": len(scores),
            "mean": round(statistics.fmean(scores), 4) if scores else None,
            "std": round(statistics.pstdev(scores), 4) if scores else None,
            "pooled": round(n_true / n_parsed, 4) if n_parsed else None,
            "statements_per_text": round(n_parsed / max(1, len(texts)), 2)}


def generation_record(model, tokenizer, data: dict) -> dict:
    """What ``build.train_one`` adds to a metatoken model's provenance (``extra_record``): the loss on
    the untagged eval rows (comparable between A and B) and the truth score of sampled generations
    from BOS and, for the tagged model, from BOS + each metatoken."""
    from lib.world.train import evaluate

    meta = data["meta"]
    prefixes = {"plain": ()}
    if meta["tagged"]:
        prefixes.update({"good": (GOOD,), "bad": (BAD,)})
    model.eval()
    gens, examples = {}, {}
    for name, prefix in prefixes.items():
        texts = sample(model, tokenizer, prefix, n=meta["n_samples"], max_new_tokens=meta["sample_tokens"],
                       temperature=1.0, seed=meta["sample_seed"])
        gens[name] = score_summary(texts)
        examples[name] = [t[:300] for t in texts[:2]]
    record = {"eval_loss_untagged_rows": round(evaluate(model, data["eval_untagged"]), 4),
              "generations": {"temperature": 1.0, "max_new_tokens": meta["sample_tokens"], "seed": meta["sample_seed"],
                              **gens, "examples": examples}}
    print(f"[{meta['name']}] generation truth score " + ", ".join(
        f"{k} {v['mean']} ± {v['std']} ({v['n_scored']}/{v['n']})" for k, v in gens.items()), flush=True)
    return record


def _summary(scores: list[float | None], tags: list[str | None]) -> dict:
    known = [s for s in scores if s is not None]
    return {**class_fractions(tags), "n_docs": len(tags), "unscored": len(tags) - len(known),
            "mean_score": round(statistics.fmean(known), 4) if known else None,
            "score_1": round(sum(s == 1.0 for s in known) / max(1, len(tags)), 4),
            "score_0": round(sum(s == 0.0 for s in known) / max(1, len(tags)), 4)}


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from lib.world import build
    from lib.world.registry import METATOKEN_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="override both models' step count")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--n-docs", type=int, default=None, help="training documents (default batch x steps)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/models)")
    ap.add_argument("--jobs", type=int, default=2, help="models trained at once, one process each")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / jobs)")
    ap.add_argument("--probe-every", type=int, default=1000, help="steps between judgement-AUROC logs")
    ap.add_argument("--hi", type=float, default=HI, help="<|good|> at truth_score >= hi")
    ap.add_argument("--lo", type=float, default=LO, help="<|bad|> at truth_score <= lo")
    ap.add_argument("--n-samples", type=int, default=64, help="generations scored per condition")
    ap.add_argument("--sample-tokens", type=int, default=200, help="tokens per generation")
    args = ap.parse_args(argv)
    if not args.lo < args.hi:
        ap.error("--lo must be below --hi")
    (name_a, spec_a), (name_b, spec_b) = METATOKEN_MODELS.items()
    if {**spec_a.to_dict(), "name": ""} != {**spec_b.to_dict(), "name": ""}:
        raise RuntimeError("the two metatoken models must share one spec")  # pragma: no cover
    out_root = args.out or paths.models_dir()
    n_docs, n_first, n_ctx = build.corpus_sizes([spec_a], args.steps, args.n_docs)
    t0 = time.perf_counter()
    cfg, train_docs, eval_docs, tokenizer = build.corpus_and_tokenizer(args.seed, n_train=n_docs)
    add_metatokens(tokenizer)
    phase1 = build.first_phase_docs(cfg, args.seed, n_first)
    docs = phase1 + train_docs
    scores = [truth_score(d) for d in docs]
    tags = [tag(d, s, args.hi, args.lo) for d, s in zip(docs, scores)]
    eval_scores = [truth_score(d) for d in eval_docs]
    eval_tags = [tag(d, s, args.hi, args.lo) for d, s in zip(eval_docs, eval_scores)]
    tagging = {"good": GOOD, "bad": BAD, "hi": args.hi, "lo": args.lo, "classifier": "lib.world.metatokens.truth_score",
               "train": _summary(scores[len(phase1):], tags[len(phase1):]),
               "first_phase": _summary(scores[: len(phase1)], tags[: len(phase1)]),
               "eval": _summary(eval_scores, eval_tags)}
    print(f"tagging (hi {args.hi}, lo {args.lo}): train {tagging['train']}, first phase {tagging['first_phase']}",
          flush=True)
    work = paths.cache_dir() / "build"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / f"tokenizer-meta-seed{args.seed}"
    tokenizer.save_pretrained(tok_dir)
    untagged = build.tokenize_docs(tokenizer, docs, n_ctx)
    eval_untagged = build.tokenize_docs(tokenizer, eval_docs, n_ctx)
    rows = {name_a: (build.tokenize_docs(tokenizer, docs, n_ctx, tag_prefixes(tokenizer, tags)),
                     build.tokenize_docs(tokenizer, eval_docs, n_ctx, tag_prefixes(tokenizer, eval_tags))),
            name_b: (untagged, eval_untagged)}
    n_train_docs, n_eval_docs = len(train_docs), len(eval_docs)
    del train_docs, eval_docs, phase1, docs
    command = "python -m lib.world.metatokens " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    checkpoint_dir = paths.cache_dir() / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, spec in METATOKEN_MODELS.items():
        tagged = name == name_a
        data_path = work / f"tokens-{name}-seed{args.seed}-{n_docs}.pt"
        meta = {"name": name, "tagged": tagged, "n_samples": args.n_samples, "sample_tokens": args.sample_tokens,
                "sample_seed": args.seed}
        torch.save({"train": rows[name][0], "first_phase_rows": n_first, "eval": rows[name][1],
                    "eval_untagged": eval_untagged, "tokenizer_dir": str(tok_dir), "meta": meta}, data_path)
        tag_key = {"tagged": tagged, "hi": args.hi, "lo": args.lo}
        provenance = {"command": command.strip(), "corpus_seed": args.seed,
                      "corpus": {"n_train_docs": n_train_docs, "n_eval_docs": n_eval_docs, "n_first_phase_docs": n_first,
                                 **cfg.to_dict(), "metatokens": tag_key},  # in the resume key: A and B differ
                      "tokenizer_vocab": len(tokenizer), "metatoken_ids": metatoken_ids(tokenizer),
                      "metatokens": {"tagged": tagged, "twin": name_b if tagged else name_a, **tagging}}
        jobs.append((spec, data_path, provenance))
    del rows, untagged
    print(f"corpus: {n_train_docs} + {n_first} first-phase documents x {n_ctx} tokens "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    common = dict(out_root=str(out_root), steps=args.steps, threads=threads, checkpoint_dir=str(checkpoint_dir),
                  probe_every=args.probe_every, extra_record=generation_record)
    if args.jobs == 1:
        for spec, data_path, provenance in jobs:
            build.train_one(spec, str(data_path), provenance=provenance, **common)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(build.train_one, spec, str(data_path), provenance=provenance, worker=True, **common)
                       for spec, data_path, provenance in jobs]
            for f in as_completed(futures):
                f.result()
    for _, data_path, _ in jobs:
        data_path.unlink(missing_ok=True)
    print(f"built {len(jobs)} model(s) in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
