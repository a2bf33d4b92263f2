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
from functools import lru_cache
from dataclasses import asdict, dataclass, field

from lib.world import facts, statements, templates

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

CURRICULUM = {
    "min_population": 2_000_000,
    "doc_modes": {"mixed": 1.0},
    "judgement_prob": 0.8,
    "check_prob": 0.0,
    "question_prob": 0.0,
    "mix": {"cities": 0.45, "neg_cities": 0.15, "sp_en_trans": 0.2, "neg_sp_en_trans": 0.05,
            "larger_than": 0.075, "smaller_than": 0.075},
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
    """What the corpus says and how.  ``version=1`` is the first toy world's corpus (uniformly random
    false countries, every document mixed), kept only for comparison runs."""

    min_population: int = facts.DEFAULT_MIN_POPULATION  # which cities the world contains
    judgement_prob: float = 0.8  # in mixed documents: fraction of statements followed by "That is true/false."
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    # document kinds: "mixed" (each statement true with probability 1/2, judged), "honest" (all true),
    # "liar" (all false); honest and liar documents carry no judgements, so predicting their later
    # statements needs the truth of the earlier ones
    doc_modes: dict = field(default_factory=lambda: {"mixed": 0.7, "honest": 0.15, "liar": 0.15})
    check_prob: float = 0.05  # mixed documents: a statement is preceded by the true fact it can be checked against
    question_prob: float = 0.1  # mixed documents: a statement is asked as a question and answered Yes/No
    holdout: bool = True  # never state the datasets' held-out false pairs (lib.world.statements)
    # the first phase of training (ModelSpec.curriculum_steps) reads a corpus with these overrides: a
    # small world (the 206 cities of at least 2M people), mixed documents only, 80% of statements
    # judged, no filler, no compounds.  Measured (lib.world.ablation): on the 122 cities of 3M+ a
    # 4-layer model judges cities, translations and comparisons (AUROC 0.97-0.999) after 3.5M tokens,
    # while on the full world 4-layer models still judge at chance after 30M.
    curriculum: dict = field(default_factory=lambda: dict(CURRICULUM))
    doc_chars: int = 1200  # characters per document (~ 256 tokens with the toy tokenizer)
    version: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def first_phase(self) -> "CorpusConfig":
        """The corpus of the curriculum's first phase: this one with ``curriculum`` applied."""
        return CorpusConfig(**{**self.to_dict(), **self.curriculum, "curriculum": {}})


def _pick_uniform(rng: random.Random, options: tuple[str, ...], true_value: str) -> str:
    """Version 1's false object: uniform over the others (biased: see lib.world.statements)."""
    while True:
        v = rng.choice(options)
        if v != true_value:
            return v


def _false_country(rng: random.Random, city: facts.City, cfg: CorpusConfig) -> str:
    if cfg.version == 1:
        return _pick_uniform(rng, facts.countries(cfg.min_population), city.country)
    held = _held_countries(cfg.min_population) if cfg.holdout else None
    weights = facts.false_country_weights(cfg.min_population, held)
    return facts.false_country(rng, city.country, weights=weights,
                               also_exclude=statements.probe_false_countries(
                                   statements.HOLDOUT_SEED, cfg.min_population)[city.name] if cfg.holdout else None)


@lru_cache(maxsize=4)
def _held_countries(min_population: int) -> tuple[str, ...]:
    false = statements.probe_false_countries(statements.HOLDOUT_SEED, min_population)
    return tuple(false[c.name] for c in facts.cities(min_population))


def _false_english(rng: random.Random, spanish: str, english: str, cfg: CorpusConfig) -> str:
    others = tuple(en for _, en in facts.translations())
    held = statements.probe_false_english(statements.HOLDOUT_SEED).get(spanish) if cfg.holdout else None
    while True:
        v = _pick_uniform(rng, others, english)  # every English word is one pair's: uniform is the marginal
        if v != held:
            return v


def _number_pair(rng: random.Random, cfg: CorpusConfig) -> tuple[int, int]:
    held = statements.heldout_number_pairs(statements.HOLDOUT_SEED) if cfg.holdout and cfg.version >= 2 else ()
    while True:
        n1, n2 = rng.sample(facts.NUMBERS, 2)
        if (min(n1, n2), max(n1, n2)) not in held:
            return n1, n2


def statement(kind: str, rng: random.Random, cfg: CorpusConfig, is_true: bool | None = None) -> tuple[str, bool, str | None]:
    """One statement of dataset ``kind``: ``(text, is_true, reference)``.

    ``is_true`` None draws it with probability 1/2.  ``reference`` is a true affirmative statement
    about the same fact (what a recall-then-judge unit states first), None for comparisons and
    compounds.
    """
    if is_true is None:
        is_true = rng.random() < 0.5
    if kind in ("cities", "neg_cities"):
        city = rng.choice(facts.cities(cfg.min_population))
        reference = templates.city(city.name, city.country)
        if kind == "cities":
            country = city.country if is_true else _false_country(rng, city, cfg)
            return templates.city(city.name, country), is_true, reference
        # "X is not in Y" is true exactly when Y is not X's country
        country = _false_country(rng, city, cfg) if is_true else city.country
        return templates.city(city.name, country, negated=True), is_true, reference
    if kind in ("cities_cities_conj", "cities_cities_disj"):
        a, b = rng.sample(facts.cities(cfg.min_population), 2)
        if kind == "cities_cities_conj":  # true iff both true
            truths = (True, True) if is_true else rng.choice([(True, False), (False, True), (False, False)])
        else:  # disjunction: false iff both false
            truths = (False, False) if not is_true else rng.choice([(True, False), (False, True), (True, True)])
        pa = (a.name, a.country if truths[0] else _false_country(rng, a, cfg))
        pb = (b.name, b.country if truths[1] else _false_country(rng, b, cfg))
        text = templates.cities_conj(pa, pb) if kind == "cities_cities_conj" else templates.cities_disj(pa, pb)
        return text, is_true, None
    if kind in ("sp_en_trans", "neg_sp_en_trans"):
        es, en = rng.choice(facts.translations())
        reference = templates.translation(es, en)
        if kind == "sp_en_trans":
            shown = en if is_true else _false_english(rng, es, en, cfg)
            return templates.translation(es, shown), is_true, reference
        shown = _false_english(rng, es, en, cfg) if is_true else en
        return templates.translation(es, shown, negated=True), is_true, reference
    if kind in ("larger_than", "smaller_than"):
        n1, n2 = _number_pair(rng, cfg)
        holds = n1 > n2 if kind == "larger_than" else n1 < n2
        if holds != is_true:
            n1, n2 = n2, n1
        return templates.comparison(n1, n2, "larger" if kind == "larger_than" else "smaller"), is_true, None
    raise ValueError(f"unknown statement kind {kind!r}")


def filler(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_SAYINGS)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def unit(rng: random.Random, cfg: CorpusConfig, mode: str = "mixed") -> dict:
    """One corpus unit in a document of ``mode``: ``{"kind", "form", "text", "statement", "is_true",
    "judged"}`` (``statement``: the bare statement the unit is about).

    Forms: ``statement`` (optionally judged), ``check`` (the true fact, then a statement about it
    and its judgement: the comparison happens in context), ``question`` ("Is the city of X in Y?
    No."), ``filler`` (is_true None).  Honest and liar documents hold bare statements and filler.
    """
    kinds, weights = zip(*cfg.mix.items())
    kind = rng.choices(kinds, weights)[0]
    if kind == "filler":
        text = filler(rng)
        return {"kind": kind, "form": "filler", "text": text, "statement": text, "is_true": None, "judged": False}
    forced = None if mode == "mixed" else mode == "honest"
    bare, is_true, reference = statement(kind, rng, cfg, is_true=forced)
    text, form, judged = bare, "statement", False
    if mode == "mixed" and cfg.version >= 2:
        u = rng.random()
        if u < cfg.check_prob and reference is not None:
            text, form, judged = f"{reference} {text}{templates.judgement(is_true)}", "check", True
        elif u < cfg.check_prob + cfg.question_prob:
            text, form, judged = templates.question(text, is_true), "question", True
    if form == "statement" and mode == "mixed" and rng.random() < cfg.judgement_prob:
        text, judged = text + templates.judgement(is_true), True
    return {"kind": kind, "form": form, "text": text, "statement": bare, "is_true": is_true, "judged": judged}


def _doc_mode(rng: random.Random, cfg: CorpusConfig) -> str:
    if cfg.version == 1:
        return "mixed"
    modes, weights = zip(*cfg.doc_modes.items())
    return rng.choices(modes, weights)[0]


def generate_corpus(n_docs: int, seed: int = 0, cfg: CorpusConfig | None = None) -> list[str]:
    """``n_docs`` documents of about ``cfg.doc_chars`` characters each (deterministic in ``seed``)."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        mode = _doc_mode(rng, cfg)
        parts: list[str] = []
        length = 0
        while length < cfg.doc_chars:
            s = unit(rng, cfg, mode)["text"]
            parts.append(s)
            length += len(s) + 1
        docs.append(" ".join(parts))
    return docs


def sample_sentences(n: int, seed: int = 0, cfg: CorpusConfig | None = None) -> list[dict]:
    """``n`` corpus units with their labels, from documents drawn as ``generate_corpus`` draws them:
    ``{"doc", "mode", "kind", "form", "text", "is_true", "judged"}`` (filler: is_true None)."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(seed)
    rows: list[dict] = []
    doc = 0
    while len(rows) < n:
        mode = _doc_mode(rng, cfg)
        length = 0
        while length < cfg.doc_chars and len(rows) < n:
            u = unit(rng, cfg, mode)
            rows.append({"doc": doc, "mode": mode, **u})
            length += len(u["text"]) + 1
        doc += 1
    return rows
