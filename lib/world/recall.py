"""How well a toy model knows the world's facts.

* ``cities``: after "The city of X is in", greedy decoding gives exactly " <X's country>."
  (teacher-forced: every completion token is the argmax given the tokens before it, which is
  what greedy decoding would produce).  Chance is well below 1/100 (105+ countries).
* ``sp_en_trans``: after "The Spanish word 'w' means '", greedy decoding gives "<english>'.".
* judgement (:func:`judgement_report`): after BOS + statement + " That is", the score
  logit(" true") - logit(" false") on each truth dataset (debiased, false statements held out from
  the corpus), as AUROC and as paired accuracy (a true statement scores above its false twin).

Works with a ``TransformerBridge`` (``lib.models.load_model``) or a Hugging Face causal LM.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from lib.activations import pad, pad_id_of, single_token
from lib.world import facts, statements, templates


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def completion_exact_match(model, tokenizer, prompts: list[str], completions: list[str],
                           batch_size: int = 128) -> np.ndarray:
    """For each (prompt, completion), whether greedy decoding after BOS + prompt yields completion."""
    device = next(model.parameters()).device
    seqs, starts = [], []
    for p, c in zip(prompts, completions):
        full, head = _encode(tokenizer, p + c), _encode(tokenizer, p)
        if full[: len(head)] != head:  # a BPE merge across the boundary: compare on the joint split
            head = head[:-1]
        seqs.append([tokenizer.bos_token_id] + full)
        starts.append(1 + len(head))
    hits = np.zeros(len(seqs), dtype=bool)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        batch = pad(chunk, pad_id_of(tokenizer)).tokens  # right padding: a causal model's real tokens never see pads
        pred = _logits(model, batch.to(device)).argmax(-1).cpu()
        for j, s in enumerate(chunk):
            start = starts[i + j]
            hits[i + j] = bool((pred[j, start - 1: len(s) - 1] == batch[j, start: len(s)]).all())
    return hits


@torch.no_grad()
def judgement_scores(model, tokenizer, statements: list[str], batch_size: int = 128) -> np.ndarray:
    """logit(" true") - logit(" false") after "<statement> That is", one per statement."""
    device = next(model.parameters()).device
    need = "the judgement score reads the logits of ' true' and ' false'"
    t_id = single_token(tokenizer, templates.JUDGEMENT_TRUE, need)
    f_id = single_token(tokenizer, templates.JUDGEMENT_FALSE, need)
    seqs = [[tokenizer.bos_token_id] + _encode(tokenizer, s + templates.JUDGEMENT_PREFIX) for s in statements]
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        batch = pad(chunk, pad_id_of(tokenizer)).tokens
        logits = _logits(model, batch.to(device)).float().cpu()
        last = torch.tensor([len(s) - 1 for s in chunk])
        final = logits[torch.arange(len(chunk)), last]
        out[i: i + len(chunk)] = (final[:, t_id] - final[:, f_id]).numpy()
    return out


def fact_recall(model, tokenizer, min_population: int = facts.DEFAULT_MIN_POPULATION) -> dict:
    """Recall per fact type as fractions in [0, 1]: ``cities`` (greedy completion of
    "The city of X is in" is exactly " <country>.") and ``sp_en_trans`` (of "The Spanish word 'w'
    means '" is exactly "<english>'.")."""
    cs = facts.cities(min_population)
    city_hits = completion_exact_match(model, tokenizer, [f"The city of {c.name} is in" for c in cs],
                                       [f" {c.country}." for c in cs])
    pairs = facts.translations()
    trans_hits = completion_exact_match(model, tokenizer, [f"The Spanish word '{es}' means '" for es, _ in pairs],
                                        [f"{en}'." for _, en in pairs])
    return {"cities": float(city_hits.mean()), "sp_en_trans": float(trans_hits.mean())}


def paired_accuracy(scores: np.ndarray, labels: np.ndarray, pairs: np.ndarray) -> float:
    """Fraction of twins (a true statement and its false twin, sharing a ``pairs`` key) in which
    the true one scores higher (ties count half).  NaN when no key has exactly one of each."""
    by_key: dict = {}
    for s, y, k in zip(scores, labels, pairs):
        by_key.setdefault(k, {}).setdefault(int(y), []).append(float(s))
    wins = [(t[0] > f[0]) + 0.5 * (t[0] == f[0]) for v in by_key.values()
            if len(t := v.get(1, [])) == 1 and len(f := v.get(0, [])) == 1]
    return float(np.mean(wins)) if wins else float("nan")


def judgement_report(model, tokenizer, names=statements.TRUTH_DATASETS, max_rows: int | None = None,
                     seed: int = statements.HOLDOUT_SEED, min_population: int = facts.DEFAULT_MIN_POPULATION) -> dict:
    """How well the model judges truth: for each truth dataset (debiased, its false statements held
    out from the corpus), the score logit(" true") - logit(" false") after BOS + statement + " That is"
    gives ``{name: {"auroc", "paired_accuracy", "n"}}``.

    ``max_rows`` keeps the first rows of each dataset (whole twin pairs where rows come in pairs;
    for quick logging during training).  Comparison datasets also report ``auroc_heldout_pairs``:
    the number pairs the corpus never used.
    """
    from sklearn.metrics import roc_auc_score

    out = {}
    for name in names:
        rows = statements.dataset_rows(name, seed=seed, min_population=min_population)
        if max_rows is not None:
            keys = [r.get("pair") for r in rows]
            if keys[0] is not None:  # keep whole pairs
                keep = set(list(dict.fromkeys(keys))[: max_rows // 2])
                rows = [r for r in rows if r["pair"] in keep]
            else:
                rows = rows[:max_rows]
        labels = np.array([r["label"] for r in rows])
        scores = judgement_scores(model, tokenizer, [r["statement"] for r in rows])
        entry = {"auroc": float(roc_auc_score(labels, scores)), "n": len(rows)}
        if "pair" in rows[0]:
            entry["paired_accuracy"] = paired_accuracy(scores, labels, np.array([r["pair"] for r in rows], dtype=object))
        if "in_corpus" in rows[0]:
            held = np.array([not r["in_corpus"] for r in rows])
            if held.any() and len(set(labels[held])) == 2:
                entry["auroc_heldout_pairs"] = float(roc_auc_score(labels[held], scores[held]))
        out[name] = entry
    return out


def recall_by_city(model, tokenizer, min_population: int = facts.DEFAULT_MIN_POPULATION):
    """Per-city recall as a list of (city, country, population, recalled) rows."""
    cs = facts.cities(min_population)
    hits = completion_exact_match(model, tokenizer, [f"The city of {c.name} is in" for c in cs],
                                  [f" {c.country}." for c in cs])
    return [(c.name, c.country, c.population, bool(h)) for c, h in zip(cs, hits)]


# The bar a default model must clear (issue "toy world v2"): judgement AUROC and paired accuracy per
# dataset (debiased, held out), and recall of facts.
JUDGEMENT_TARGETS: dict[str, float] = {
    "cities": 0.95, "neg_cities": 0.95, "sp_en_trans": 0.95, "neg_sp_en_trans": 0.95,
    "cities_cities_conj": 0.85, "cities_cities_disj": 0.85, "larger_than": 0.90, "smaller_than": 0.90,
}
RECALL_TARGET = 0.98


def target_check(judgement: dict, recall: dict) -> dict[str, bool]:
    """``{check: passed}`` for one model: each dataset's AUROC and paired accuracy (where it has
    twins) against :data:`JUDGEMENT_TARGETS`, and each recall against :data:`RECALL_TARGET`."""
    out = {}
    for name, bar in JUDGEMENT_TARGETS.items():
        entry = judgement[name]
        out[f"{name} auroc"] = entry["auroc"] >= bar
        if "paired_accuracy" in entry:
            out[f"{name} paired"] = entry["paired_accuracy"] >= bar
    for name, value in recall.items():
        out[f"recall {name}"] = value >= RECALL_TARGET
    return out


def smallest_passing(checks: dict[str, dict[str, bool]], n_params: dict[str, int]) -> str | None:
    """The model with the fewest parameters whose checks all pass, or None."""
    if not checks:
        return None
    name, missed = choose_default(checks, n_params)
    return None if missed else name


def choose_default(checks: dict[str, dict[str, bool]], n_params: dict[str, int]) -> tuple[str, list[str]]:
    """The notebooks' default model and the targets it misses: the smallest model meeting every
    target; when none does, the model missing the fewest (the smaller one among ties)."""
    if not checks:
        raise ValueError("no models to choose from")
    name = min(checks, key=lambda n: (sum(not ok for ok in checks[n].values()), n_params[n]))
    return name, [c for c, ok in checks[name].items() if not ok]
