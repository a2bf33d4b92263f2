"""A prompt retrodictor for the toy world: a causal LM that reads text backwards (notebook 16).

Seed 004 ("What does a prompt retrodictor look like?"): "Feed the model a chunk of the string.
Train on the prediction of tokens before the chunk."  The simplest such model is an ordinary
causal LM trained on reversed text.  ``toy-2l-rev`` (:data:`lib.world.registry.RETRO_MODELS`) has
toy-2l's spec and seed and reads toy-2l's training rows in toy-2l's order, each row's tokens after
BOS reversed (:func:`reverse_rows`): the two models see the same tokens, so their losses on the
same held-out rows compare the two directions of prediction and nothing else.

    python -m lib.world.retro                 # build data/models/toy-2l-rev (what `make retro-model` runs)

Asked of a retrodictor here:

* :func:`row_nll` - the per-position NLL of held-out rows read forward (toy-2l) and backward;
* :func:`city_retrodiction` - given " is in France.", which city came before?  Only the country
  is in the context, so no reader can beat the Bayes ceiling of guessing among that country's
  cities; the retrodictor's share of probability on the right country's cities says how much
  of the fact it learned;
* :func:`sample_prefixes` - candidate texts that precede an observed chunk, drawn from the
  retrodictor (ranked by the activations they induce in notebook 16).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lib import paths
from lib.world import facts
from lib.world.recall import _encode

CITY_SUFFIX = " is in {country}."  # the tail of "The city of X is in Y." (templates: the cities dataset)
CITY_HEAD = " of {city}"  # what the retrodictor must produce before it, " of" marking where the name starts


def reverse_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row's tokens after column 0 (BOS) in reverse order: an involution."""
    return torch.cat([rows[:, :1], rows[:, 1:].flip(1)], dim=1)


def _hf(model):
    """The Hugging Face model under a bridge (or the model itself)."""
    return getattr(model, "original_model", model)


@torch.no_grad()
def row_nll(model, rows: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(n, T - 1) NLL in nats of each token of ``rows`` given the tokens before it."""
    hf = _hf(model)
    device = next(hf.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        x = rows[i: i + batch_size].long().to(device)
        logp = torch.log_softmax(hf(x).logits[:, :-1].float(), -1)
        out.append(-logp.gather(-1, x[:, 1:, None])[..., 0].cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def continuation_logprobs(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          batch_size: int = 512) -> np.ndarray:
    """log P(continuation | BOS + context) summed over the continuation's tokens, one per pair.

    On token ids (reversed text is no string to tokenize, unlike ``lib.activations.sequence_logprobs``)
    and on the Hugging Face model itself, so that it also serves the probe during training.  Rows
    are batched by length (little padding) and only the continuation's positions are unembedded
    (the base model's final hidden states through the output embedding: the HF convention)."""
    hf = _hf(model)
    device = next(hf.parameters()).device
    bos = hf.config.bos_token_id
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    head = hf.get_output_embeddings()
    seqs = [[bos, *c, *x] for c, x in zip(contexts, continuations)]
    starts = [1 + len(c) for c in contexts]  # first continuation token's column
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs))
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        width = max(len(seqs[j]) for j in idx)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.bool)  # positions whose next token is scored
        for r, j in enumerate(idx):
            x[r, : len(seqs[j])] = torch.tensor(seqs[j])
            mask[r, starts[j] - 1: len(seqs[j]) - 1] = True
        hidden = hf.base_model(input_ids=x.to(device)).last_hidden_state
        rows, cols = mask.nonzero(as_tuple=True)
        logp = torch.log_softmax(head(hidden[rows.to(device), cols.to(device)]).float(), -1).cpu()
        lp = logp.gather(-1, x[rows, cols + 1][:, None])[:, 0].double()
        out[np.asarray(idx)] = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows, lp).numpy()
    return out


def city_score_matrix(model, tokenizer, countries: Sequence[str], names: Sequence[str],
                      batch_size: int = 512) -> np.ndarray:
    """(len(countries), len(names)) log P(reversed " of <name>" | BOS + reversed " is in <country>.")
    under a retrodictor."""
    heads = [_encode(tokenizer, CITY_HEAD.format(city=n))[::-1] for n in names]
    ctxs, conts = [], []
    for country in countries:
        ctx = _encode(tokenizer, CITY_SUFFIX.format(country=country))[::-1]
        ctxs += [ctx] * len(heads)
        conts += heads
    return continuation_logprobs(model, ctxs, conts, batch_size).reshape(len(countries), len(names))


def city_retrodiction(model, tokenizer, min_population: int = facts.DEFAULT_MIN_POPULATION,
                      max_cities: int | None = None, seed: int = 0) -> dict:
    """Given " is in <country>.", which known city came before?  Every known city is a candidate.

    Returns ``accuracy`` (the top-scored city is the right one), ``ceiling`` (the Bayes ceiling of
    a reader that knows every fact but sees only the country: the mean over facts of
    1 / number of known cities in its country), ``in_country`` (the top city lies in the named
    country), ``mass_in_country`` (the probability, renormalised over the candidates, of the named
    country's cities), its chance level ``mass_chance`` (their share of candidates), the same mass
    when the context names another country (``mass_wrong_country``, a derangement of countries,
    ``seed``), and the mean NLL of the right city beside the ceiling's log(number of cities).
    ``max_cities`` keeps the largest cities (quick logs during training)."""
    cs = facts.cities(min_population)[:max_cities]
    names = [c.name for c in cs]
    countries = sorted({c.country for c in cs})
    cidx = {c: i for i, c in enumerate(countries)}
    members = np.zeros((len(countries), len(cs)), dtype=bool)
    for j, c in enumerate(cs):
        members[cidx[c.country], j] = True
    scores = city_score_matrix(model, tokenizer, countries, names)
    logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)  # over the candidates
    rows = np.array([cidx[c.country] for c in cs])
    top = scores.argmax(1)
    n_in = members.sum(1)
    mass = np.exp(logp)
    mass_in = (mass * members).sum(1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(countries))
    while len(countries) > 1 and (perm == np.arange(len(countries))).any():
        perm = rng.permutation(len(countries))
    mass_wrong = (mass[perm] * members).sum(1)  # context: country perm[i]; mass on country i's cities
    nll = -logp[rows, np.arange(len(cs))]
    return {
        "n_cities": len(cs), "n_countries": len(countries),
        "accuracy": float(np.mean(top[rows] == np.arange(len(cs)))),
        "ceiling": float(np.mean(1.0 / n_in[rows])),
        "in_country": float(np.mean(members[rows, top[rows]])),
        "mass_in_country": float(np.mean(mass_in[rows])),
        "mass_chance": float(np.mean(n_in[rows] / len(cs))),
        "mass_wrong_country": float(np.mean(mass_wrong[rows])),
        "nll_true_city": float(nll.mean()),
        "nll_ceiling": float(np.mean(np.log(n_in[rows]))),
        "per_city": [(c.name, c.country, int(n_in[r]), float(nll[j]), names[top[r]])
                     for j, (c, r) in enumerate(zip(cs, rows))],
    }


def retro_probe(tokenizer, max_cities: int = 300):
    """What ``lib.world.build.train_one`` logs while a retrodictor trains: its city retrodiction."""
    def probe(model) -> dict:
        r = city_retrodiction(model, tokenizer, max_cities=max_cities)
        return {k: round(r[k], 4) for k in ("accuracy", "ceiling", "in_country", "mass_in_country")}

    return probe


@torch.no_grad()
def sample_prefixes(retro, tokenizer, text: str | Sequence[int], n: int, n_tokens: int, temperature: float = 1.0,
                    seed: int = 0) -> list[list[int]]:
    """``n`` token-id prefixes of ``n_tokens`` tokens, in reading order, that the retrodictor
    samples as the text before ``text`` (a string or its token ids)."""
    from lib.softprompts import generate_ids

    ids = _encode(tokenizer, text) if isinstance(text, str) else list(text)
    hf = _hf(retro)
    row = [hf.config.bos_token_id, *ids[::-1]]
    gen = torch.Generator().manual_seed(seed)
    new = generate_ids(hf, [row] * n, n_tokens, temperature=temperature, generator=gen)
    return [r[::-1] for r in new]


# --------------------------------------------------------------------------------------------
# retrodicting an intervention: which discrete prefix reproduces the activations a steering
# vector induced?  (seed 004: "retrodict a prompt that minimizes MSE((activations | sourcePrompt),
# (activations | retrodictedPrompt))")
# --------------------------------------------------------------------------------------------
def country_direction(model, country: str, hook: str, min_population: int = facts.DEFAULT_MIN_POPULATION) -> torch.Tensor:
    """Mean activation at ``hook`` on the last token of "The city of X is in" over the cities in
    ``country`` minus the mean over every other city: adding it moves a prompt toward ``country``."""
    from lib.activations import harvest

    cs = facts.cities(min_population)
    inside = np.array([c.country == country for c in cs])
    if not inside.any():
        raise ValueError(f"no known city in {country!r}")
    acts = harvest(model, [f"The city of {c.name} is in" for c in cs], hook, cache=False)[hook].float()
    return acts[torch.as_tensor(inside)].mean(0) - acts[torch.as_tensor(~inside)].mean(0)


def _steer_hooks(hook: str | None, direction: torch.Tensor | None, alpha: float, column: int | None = None):
    """``alpha * direction`` added at ``hook`` on column ``column`` of every row (None: every
    column after BOS)."""
    from lib.interventions import add_direction_hook

    if hook is None or direction is None or alpha == 0:
        return []
    if column is not None:
        def at_column(act, hook):
            x = act[0] if isinstance(act, tuple) else act
            cols = torch.full((x.shape[0],), column, dtype=torch.long)
            return add_direction_hook(direction, alpha, cols)(act, hook)

        return [(hook, at_column)]
    inner = add_direction_hook(direction, alpha)

    def after_bos(act, hook):
        x = act[0] if isinstance(act, tuple) else act
        y = torch.cat([x[:, :1], inner(x, hook)[:, 1:]], 1)
        return (y, *act[1:]) if isinstance(act, tuple) else y

    return [(hook, after_bos)]


@torch.no_grad()
def steered_greedy(model, ids: Sequence[int], n_new: int, hook: str | None = None,
                   direction: torch.Tensor | None = None, alpha: float = 0.0, column: int | None = None) -> list[int]:
    """Greedy continuation of BOS + ``ids`` with ``alpha * direction`` added at ``hook`` on
    ``column`` of the row (None: every position after BOS, the generated ones too), via the bridge."""
    device = next(model.parameters()).device
    row = [model.tokenizer.bos_token_id, *ids]
    out = []
    for _ in range(n_new):
        logits = model.run_with_hooks(torch.tensor([row], device=device),
                                      fwd_hooks=_steer_hooks(hook, direction, alpha, column))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        row.append(nxt)
    return out


def _read_hooks(read) -> list[str]:
    return [read] if isinstance(read, str) else list(read)


def read_activation(acts: dict, read) -> torch.Tensor:
    """The activation an intervention is judged by: ``acts[read]`` for a hook name, or for a pair
    ``(hook, minus)`` the difference ``acts[hook] - acts[minus]`` (e.g. a block's resid_post minus
    its resid_pre: what the block writes, without a vector added upstream that merely passes through)."""
    hooks = _read_hooks(read)
    out = acts[hooks[0]].float()
    return out - acts[hooks[1]].float() if len(hooks) > 1 else out


@torch.no_grad()
def prefix_activation_mse(model, text_ids: Sequence[int], prefixes: Sequence[Sequence[int]], read_hook,
                          target: torch.Tensor, start: int = 0, batch_size: int = 128) -> np.ndarray:
    """For each prefix P: mean squared error, over the positions ``start ..`` of ``text_ids`` and
    the model's width, between the activation ``read_hook`` (:func:`read_activation`) on
    BOS + P + text (no intervention) and ``target`` ((len(text_ids), d): the same positions under
    the source condition, :func:`source_activations`)."""
    from lib.activations import batch_activations

    device = next(model.parameters()).device
    bos = model.tokenizer.bos_token_id
    target = target[start:].to(device).float()
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        by_len.setdefault(len(p), []).append(i)
    out = np.zeros(len(prefixes))
    for k, idx in by_len.items():
        for j in range(0, len(idx), batch_size):
            rows = idx[j: j + batch_size]
            x = torch.tensor([[bos, *prefixes[i], *text_ids] for i in rows], device=device)
            acts = read_activation(batch_activations(model, x, _read_hooks(read_hook)), read_hook)[:, 1 + k + start:]
            out[rows] = ((acts - target) ** 2).mean((1, 2)).double().cpu().numpy()
    return out


@torch.no_grad()
def source_activations(model, text_ids: Sequence[int], read_hook: str, hook: str | None = None,
                       direction: torch.Tensor | None = None, alpha: float = 0.0,
                       column: int | None = None) -> torch.Tensor:
    """(len(text_ids), d): ``read_hook`` on the positions of BOS + text under the source condition
    (``alpha * direction`` added at ``hook`` on ``column``, or after BOS; none when alpha is 0)."""
    device = next(model.parameters()).device
    x = torch.tensor([[model.tokenizer.bos_token_id, *text_ids]], device=device)
    acts = {}

    def keeper(name):
        def keep(act, hook):
            acts[name] = act[0] if isinstance(act, tuple) else act
        return keep

    model.run_with_hooks(x, fwd_hooks=_steer_hooks(hook, direction, alpha, column)
                         + [(h, keeper(h)) for h in _read_hooks(read_hook)])
    return read_activation(acts, read_hook)[0, 1:]


def random_prefixes(vocab_size: int, n: int, n_tokens: int, seed: int = 0, n_special: int = 3) -> list[list[int]]:
    """``n`` uniformly random token strings (the special tokens, ids below ``n_special``, excluded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_special, vocab_size, (n, n_tokens), generator=gen).tolist()


@torch.no_grad()
def forward_prefixes(model, n: int, n_tokens: int, temperature: float = 1.0, seed: int = 0) -> list[list[int]]:
    """``n`` texts of ``n_tokens`` tokens sampled from a forward model after BOS (it cannot read
    what follows them: the baseline a retrodictor must beat)."""
    from lib.softprompts import generate_ids

    hf = _hf(model)
    return generate_ids(hf, [[hf.config.bos_token_id]] * n, n_tokens, temperature=temperature,
                        generator=torch.Generator().manual_seed(seed))


def rank_candidates(model, tokenizer, text_ids: Sequence[int], candidates: dict[str, Sequence[Sequence[int]]],
                    read, target: torch.Tensor, start: int = 0):
    """One row per candidate prefix: its source (the dict's key), text, number of tokens and
    :func:`prefix_activation_mse`, with ``ratio`` = MSE / MSE of the empty prefix (below 1: the
    prefix reproduces part of the source condition's activations), best first."""
    import pandas as pd

    rows = []
    empty = float(prefix_activation_mse(model, text_ids, [[]], read, target, start)[0])
    for name, prefixes in candidates.items():
        mse = prefix_activation_mse(model, text_ids, prefixes, read, target, start)
        rows += [{"source": name, "prefix": tokenizer.decode(list(p)), "n_tokens": len(p), "mse": float(m),
                  "ratio": float(m) / empty if empty > 0 else float("nan")} for p, m in zip(prefixes, mse)]
    return pd.DataFrame(rows).sort_values("mse", kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    from transformers import PreTrainedTokenizerFast

    from lib.world import build
    from lib.world.registry import RETRO_FORWARD, RETRO_MODELS, TOY_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="override the step count")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--n-docs", type=int, default=None, help="training documents (default: as make models)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/models)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--probe-every", type=int, default=1000, help="steps between retrodiction logs")
    ap.add_argument("--probe-cities", type=int, default=300, help="largest cities scored in the logs during training")
    ap.add_argument("--record-cities", type=int, default=None,
                    help="largest cities scored for provenance.json (default all)")
    args = ap.parse_args(argv)
    (name, spec), = RETRO_MODELS.items()
    out_root = args.out or paths.models_dir()
    # the corpus exactly as `python -m lib.world.build` makes it for every toy model
    n_docs, n_first, n_ctx = build.corpus_sizes(list(TOY_MODELS.values()), args.steps, args.n_docs)
    t0 = time.perf_counter()
    cfg, train_docs, eval_docs, tokenizer = build.corpus_and_tokenizer(args.seed, n_train=n_docs)
    twin = paths.models_dir() / RETRO_FORWARD[name]
    if args.out is None and (twin / "tokenizer.json").exists():
        fwd_vocab = PreTrainedTokenizerFast.from_pretrained(twin).get_vocab()
        if fwd_vocab != tokenizer.get_vocab():
            raise RuntimeError(f"the rebuilt tokenizer differs from {twin.name}'s: rebuild both with `make models`")
    phase1 = build.first_phase_docs(cfg, args.seed, n_first)
    work = paths.cache_dir() / "build"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / f"tokenizer-retro-seed{args.seed}"
    tokenizer.save_pretrained(tok_dir)
    data_path = work / f"tokens-{name}-seed{args.seed}-{n_docs}.pt"
    rows = reverse_rows(build.tokenize_docs(tokenizer, phase1 + train_docs, n_ctx))
    torch.save({"train": rows, "first_phase_rows": len(phase1),
                "eval": reverse_rows(build.tokenize_docs(tokenizer, eval_docs, n_ctx)),
                "tokenizer_dir": str(tok_dir)}, data_path)
    print(f"corpus: {len(train_docs)} + {len(phase1)} first-phase documents x {n_ctx} tokens, reversed "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    command = "python -m lib.world.retro " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    provenance = {"command": command.strip(), "corpus_seed": args.seed,
                  "corpus": {"n_train_docs": len(train_docs), "n_eval_docs": len(eval_docs), "n_first_phase_docs": n_first,
                             **cfg.to_dict(), "reversed": True},  # in the resume key
                  "tokenizer_vocab": len(tokenizer), "reversed": True, "forward_twin": RETRO_FORWARD[name]}
    del train_docs, eval_docs, phase1, rows
    checkpoint_dir = paths.cache_dir() / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    build.train_one(spec, str(data_path), str(out_root), args.steps, args.threads or os.cpu_count() or 1,
                    provenance, str(checkpoint_dir), args.probe_every,
                    probe_factory=partial(retro_probe, max_cities=args.probe_cities),
                    forward_records=False, extra_record=partial(_retro_record, max_cities=args.record_cities))
    data_path.unlink(missing_ok=True)
    print(f"built {name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


def _retro_record(model, tokenizer, data, max_cities: int | None = None) -> dict:
    r = city_retrodiction(model, tokenizer, max_cities=max_cities)
    return {"city_retrodiction": {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}}


if __name__ == "__main__":
    raise SystemExit(main())
