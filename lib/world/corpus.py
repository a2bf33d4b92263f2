"""The toy world's training text: Geometry of Truth statements, true and false, some followed by a
judgement, mixed with filler sentences.

A document is a run of sentences separated by spaces.  Each statement is true or false with
probability 1/2; with probability ``judgement_prob`` it is followed by " That is true." or
" That is false." (the correct one), so knowing the fact lowers the loss on the judgement token
and truth matters to next-token prediction.  Filler sentences (people, objects, places; they
name "banana", "shed", "Alice", "Bob", ...) give the model ordinary text around the facts.
Everything is drawn from a ``random.Random(seed)``: the same config and seed give the same corpus.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from lib.world import facts, templates

# kind -> sampling weight; statements of every Geometry of Truth dataset plus filler
DEFAULT_MIX = {
    "cities": 0.24,
    "neg_cities": 0.10,
    "cities_cities_conj": 0.05,
    "cities_cities_disj": 0.05,
    "sp_en_trans": 0.14,
    "neg_sp_en_trans": 0.06,
    "larger_than": 0.09,
    "smaller_than": 0.09,
    "filler": 0.18,
}

_SUBJECTS = ["Alice", "Bob", "The farmer", "The teacher", "My friend", "A child", "The old man",
             "Her sister", "The doctor", "Our neighbour", "The baker", "His father"]
_VERBS = ["saw", "found", "carried", "painted", "bought", "sold", "forgot", "wanted", "cleaned",
          "dropped", "liked", "hid"]
_OBJECTS = ["a banana", "the shed", "a red apple", "an old book", "the blue door", "a small box",
            "the garden gate", "a loaf of bread", "the green bicycle", "a wooden chair",
            "the kitchen table", "a bright lamp"]
_PLACES = ["near the river", "in the market", "behind the shed", "at school", "in the garden",
           "on the beach", "after dinner", "before sunrise", "in the morning", "last week"]
_SAYINGS = ["It was a quiet day.", "The weather was nice.", "Nobody said a word.",
            "Everyone was happy.", "The road was long.", "It started to rain.",
            "The shop was closed.", "Then they went home."]


@dataclass
class CorpusConfig:
    min_population: int = facts.DEFAULT_MIN_POPULATION  # which cities the world contains
    judgement_prob: float = 0.5  # fraction of statements followed by "That is true/false."
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    doc_chars: int = 1200  # characters per document (~ 256 tokens with the toy tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)


def _pick_false(rng: random.Random, options: tuple[str, ...], true_value: str) -> str:
    while True:
        v = rng.choice(options)
        if v != true_value:
            return v


def statement(kind: str, rng: random.Random, cfg: CorpusConfig) -> tuple[str, bool]:
    """One statement of dataset ``kind`` and whether it is true."""
    is_true = rng.random() < 0.5
    if kind in ("cities", "neg_cities"):
        city = rng.choice(facts.cities(cfg.min_population))
        country = city.country if is_true else _pick_false(rng, facts.countries(cfg.min_population), city.country)
        if kind == "cities":
            return templates.city(city.name, country), is_true
        # "X is not in Y" is true exactly when Y is not X's country
        country = _pick_false(rng, facts.countries(cfg.min_population), city.country) if is_true else city.country
        return templates.city(city.name, country, negated=True), is_true
    if kind in ("cities_cities_conj", "cities_cities_disj"):
        a, b = rng.sample(facts.cities(cfg.min_population), 2)
        countries = facts.countries(cfg.min_population)
        if kind == "cities_cities_conj":  # true iff both true
            truths = (True, True) if is_true else rng.choice([(True, False), (False, True), (False, False)])
        else:  # disjunction: false iff both false
            truths = (False, False) if not is_true else rng.choice([(True, False), (False, True), (True, True)])
        pa = (a.name, a.country if truths[0] else _pick_false(rng, countries, a.country))
        pb = (b.name, b.country if truths[1] else _pick_false(rng, countries, b.country))
        text = templates.cities_conj(pa, pb) if kind == "cities_cities_conj" else templates.cities_disj(pa, pb)
        return text, is_true
    if kind in ("sp_en_trans", "neg_sp_en_trans"):
        pairs = facts.translations()
        es, en = rng.choice(pairs)
        others = tuple(p[1] for p in pairs)
        if kind == "sp_en_trans":
            return templates.translation(es, en if is_true else _pick_false(rng, others, en)), is_true
        shown = _pick_false(rng, others, en) if is_true else en
        return templates.translation(es, shown, negated=True), is_true
    if kind in ("larger_than", "smaller_than"):
        n1, n2 = rng.sample(facts.NUMBERS, 2)
        holds = n1 > n2 if kind == "larger_than" else n1 < n2
        if holds != is_true:
            n1, n2 = n2, n1
        return templates.comparison(n1, n2, "larger" if kind == "larger_than" else "smaller"), is_true
    raise ValueError(f"unknown statement kind {kind!r}")


def filler(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_SAYINGS)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def sentence(rng: random.Random, cfg: CorpusConfig) -> str:
    kinds, weights = zip(*cfg.mix.items())
    kind = rng.choices(kinds, weights)[0]
    if kind == "filler":
        return filler(rng)
    text, is_true = statement(kind, rng, cfg)
    if rng.random() < cfg.judgement_prob:
        text += templates.judgement(is_true)
    return text


def generate_corpus(n_docs: int, seed: int = 0, cfg: CorpusConfig | None = None) -> list[str]:
    """``n_docs`` documents of about ``cfg.doc_chars`` characters each (deterministic in ``seed``)."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts: list[str] = []
        length = 0
        while length < cfg.doc_chars:
            s = sentence(rng, cfg)
            parts.append(s)
            length += len(s) + 1
        docs.append(" ".join(parts))
    return docs


def sample_sentences(n: int, seed: int = 0, cfg: CorpusConfig | None = None) -> list[dict]:
    """``n`` corpus units with their labels: ``{"kind", "text", "is_true", "judged"}`` (filler: is_true None).

    Drawn from the same distribution as ``generate_corpus``; used for corpus statistics.
    """
    cfg = cfg or CorpusConfig()
    rng = random.Random(seed)
    kinds, weights = zip(*cfg.mix.items())
    rows = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "filler":
            rows.append({"kind": kind, "text": filler(rng), "is_true": None, "judged": False})
            continue
        text, is_true = statement(kind, rng, cfg)
        judged = rng.random() < cfg.judgement_prob
        rows.append({"kind": kind, "text": text + (templates.judgement(is_true) if judged else ""),
                     "is_true": is_true, "judged": judged})
    return rows
