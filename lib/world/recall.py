"""How well a toy model knows the world's facts.

* ``cities``: after "The city of X is in", greedy decoding gives exactly " <X's country>."
  (teacher-forced: every completion token is the argmax given the tokens before it, which is
  what greedy decoding would produce).  Chance is well below 1/100 (105+ countries).
* ``sp_en_trans``: after "The Spanish word 'w' means '", greedy decoding gives "<english>'.".
* ``numbers``: after "<N1> is larger/smaller than <n2>. That is", " true" outscores " false"
  exactly when the comparison holds (chance 0.5).
* ``cities_judgement``: the same true/false judgement for city statements, true and false.

Works with a ``TransformerBridge`` (``lib.models.load_model``) or a Hugging Face causal LM.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from lib.world import facts, templates


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
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, s in enumerate(chunk):  # right padding: a causal model's real tokens never see pads
            batch[j, : len(s)] = torch.tensor(s)
        pred = _logits(model, batch.to(device)).argmax(-1).cpu()
        for j, s in enumerate(chunk):
            start = starts[i + j]
            hits[i + j] = bool((pred[j, start - 1: len(s) - 1] == batch[j, start: len(s)]).all())
    return hits


@torch.no_grad()
def judgement_scores(model, tokenizer, statements: list[str], batch_size: int = 128) -> np.ndarray:
    """logit(" true") - logit(" false") after "<statement> That is", one per statement."""
    device = next(model.parameters()).device
    t_id = _encode(tokenizer, templates.JUDGEMENT_TRUE)
    f_id = _encode(tokenizer, templates.JUDGEMENT_FALSE)
    if len(t_id) != 1 or len(f_id) != 1:
        raise ValueError("the tokenizer must encode ' true' and ' false' as single tokens")
    seqs = [[tokenizer.bos_token_id] + _encode(tokenizer, s + templates.JUDGEMENT_PREFIX) for s in statements]
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, s in enumerate(chunk):
            batch[j, : len(s)] = torch.tensor(s)
        logits = _logits(model, batch.to(device)).float().cpu()
        last = torch.tensor([len(s) - 1 for s in chunk])
        final = logits[torch.arange(len(chunk)), last]
        out[i: i + len(chunk)] = (final[:, t_id[0]] - final[:, f_id[0]]).numpy()
    return out


def fact_recall(model, tokenizer, n_numbers: int = 600, seed: int = 0,
                min_population: int = facts.DEFAULT_MIN_POPULATION) -> dict:
    """Recall per fact type as fractions in [0, 1] (see the module docstring for definitions)."""
    rng = random.Random(seed)
    cs = facts.cities(min_population)
    city_hits = completion_exact_match(model, tokenizer, [f"The city of {c.name} is in" for c in cs],
                                       [f" {c.country}." for c in cs])
    pairs = facts.translations()
    trans_hits = completion_exact_match(model, tokenizer, [f"The Spanish word '{es}' means '" for es, _ in pairs],
                                        [f"{en}'." for _, en in pairs])
    statements, truth = [], []
    for _ in range(n_numbers):
        n1, n2 = rng.sample(facts.NUMBERS, 2)
        rel = rng.choice(["larger", "smaller"])
        statements.append(templates.comparison(n1, n2, rel))
        truth.append(n1 > n2 if rel == "larger" else n1 < n2)
    num_acc = float(np.mean((judgement_scores(model, tokenizer, statements) > 0) == np.array(truth)))
    countries = facts.countries(min_population)
    city_statements, city_truth = [], []
    for c in cs:
        is_true = rng.random() < 0.5
        country = c.country if is_true else rng.choice([k for k in countries if k != c.country])
        city_statements.append(templates.city(c.name, country))
        city_truth.append(is_true)
    judge_acc = float(np.mean((judgement_scores(model, tokenizer, city_statements) > 0) == np.array(city_truth)))
    return {
        "cities": float(city_hits.mean()),
        "sp_en_trans": float(trans_hits.mean()),
        "numbers": num_acc,
        "cities_judgement": judge_acc,
    }


def recall_by_city(model, tokenizer, min_population: int = facts.DEFAULT_MIN_POPULATION):
    """Per-city recall as a list of (city, country, population, recalled) rows."""
    cs = facts.cities(min_population)
    hits = completion_exact_match(model, tokenizer, [f"The city of {c.name} is in" for c in cs],
                                  [f" {c.country}." for c in cs])
    return [(c.name, c.country, c.population, bool(h)) for c, h in zip(cs, hits)]
