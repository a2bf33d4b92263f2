"""True and false statements about the world, unbiased by construction: the rows of the truth
datasets that probes read, and the held-out set that the training corpus never states.

Every false statement names an object drawn from the marginal of true objects:

* in the datasets, each city's false country is the true country of another city (a random
  derangement, :func:`lib.world.facts.derangement`), so every country is named exactly as
  often by false statements as by true ones; the same for the English word of a translation;
* in the corpus, false countries are drawn with :func:`lib.world.facts.false_country`, which
  matches the marginal in expectation.

So the object token alone (the country, the English word) says nothing about the label. Number
comparisons are the exception by nature: the label is a function of the two numbers; there each
unordered pair appears in both orders, once true and once false.

**Held out from training.** The false pairs the datasets use (city -> its dataset false
country, Spanish word -> its dataset false English word) are never stated by the corpus, and a
fixed fifth of the unordered number pairs never appears in it (:func:`heldout_number_pairs`),
so judging a dataset's false statement is judging a statement the model has not seen.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from lib.world import facts, templates

TRUTH_DATASETS: tuple[str, ...] = (
    "cities",
    "neg_cities",
    "sp_en_trans",
    "neg_sp_en_trans",
    "larger_than",
    "smaller_than",
    "cities_cities_conj",
    "cities_cities_disj",
)
HOLDOUT_SEED = 0  # the datasets' default seed: its false pairs are the ones the corpus never states


def _rng(seed: int, name: str) -> np.random.Generator:
    """One independent stream per dataset: ``(seed, index of the dataset)``."""
    return np.random.default_rng([seed, TRUTH_DATASETS.index(name)])


@lru_cache(maxsize=8)
def probe_false_countries(seed: int = HOLDOUT_SEED,
                          min_population: int = facts.DEFAULT_MIN_POPULATION) -> dict[str, str]:
    """``{city: false country}``: each city's false country in the datasets of ``seed``, the true
    country of another city (a derangement of the cities' countries)."""
    cs = facts.cities(min_population)
    perm = facts.derangement(np.random.default_rng([seed, 1000]), [c.country for c in cs])
    return {c.name: cs[perm[i]].country for i, c in enumerate(cs)}


@lru_cache(maxsize=8)
def probe_false_english(seed: int = HOLDOUT_SEED) -> dict[str, str]:
    """``{spanish: false English word}``: the English word of another pair (a derangement)."""
    pairs = facts.translations()
    perm = facts.derangement(np.random.default_rng([seed, 1001]), [en for _, en in pairs])
    return {es: pairs[perm[i]][1] for i, (es, _) in enumerate(pairs)}


@lru_cache(maxsize=8)
def heldout_number_pairs(seed: int = HOLDOUT_SEED, fraction: float = 0.2) -> frozenset[tuple[int, int]]:
    """A fixed ``fraction`` of the unordered number pairs ``(low, high)`` that the corpus never uses."""
    nums = facts.NUMBERS
    pairs = [(a, b) for i, a in enumerate(nums) for b in nums[i + 1:]]
    rng = np.random.default_rng([seed, 1002])
    chosen = rng.choice(len(pairs), size=int(round(fraction * len(pairs))), replace=False)
    return frozenset(pairs[int(k)] for k in chosen)


def city_rows(seed: int, min_population: int) -> list[dict]:
    """One true and one false statement per city, in a seeded order."""
    false = probe_false_countries(seed, min_population)
    rows = []
    for city in facts.cities(min_population):
        for country in (city.country, false[city.name]):
            rows.append({"city": city.name, "country": country, "correct_country": city.country})
    order = _rng(seed, "cities").permutation(len(rows))
    return [rows[i] for i in order]


def _translation_rows(seed: int) -> list[dict]:
    false = probe_false_english(seed)
    rows = []
    for spanish, correct in facts.translations():
        for shown in (correct, false[spanish]):
            rows.append({"spanish": spanish, "english": shown, "correct_english": correct})
    order = _rng(seed, "sp_en_trans").permutation(len(rows))
    return [rows[i] for i in order]


def _number_rows(seed: int, n_pairs: int) -> list[dict]:
    """``n_pairs`` unordered pairs of distinct numbers, each in both orders (balanced labels)."""
    rng = _rng(seed, "larger_than")
    nums = facts.NUMBERS
    all_pairs = [(a, b) for i, a in enumerate(nums) for b in nums[i + 1:]]
    n_pairs = min(n_pairs, len(all_pairs))
    chosen = rng.choice(len(all_pairs), size=n_pairs, replace=False)
    held = heldout_number_pairs(seed)
    rows = []
    for k in chosen:
        a, b = all_pairs[int(k)]
        seen = (a, b) not in held
        rows += [{"n1": a, "n2": b, "in_corpus": seen}, {"n1": b, "n2": a, "in_corpus": seen}]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _compound_rows(name: str, seed: int, n_rows: int, min_population: int) -> list[dict]:
    """Conjunctions (true iff both clauses true) or disjunctions (false iff both false), half true.

    The other label's half splits evenly over the three remaining truth patterns of the clauses;
    a false clause names the city's dataset false country (held out from the corpus, unbiased).
    """
    rng = _rng(seed, name)
    cities = facts.cities(min_population)
    false = probe_false_countries(seed, min_population)
    if name == "cities_cities_conj":
        true_patterns, false_patterns = [(1, 1)], [(1, 0), (0, 1), (0, 0)]
    else:
        true_patterns, false_patterns = [(1, 0), (0, 1), (1, 1)], [(0, 0)]
    rows = []
    for k in range(n_rows):
        label = k % 2 == 0
        patterns = true_patterns if label else false_patterns
        pattern = patterns[(k // 2) % len(patterns)]
        i, j = rng.choice(len(cities), size=2, replace=False)
        row = {}
        for slot, city, truth in ((1, cities[int(i)], pattern[0]), (2, cities[int(j)], pattern[1])):
            country = city.country if truth else false[city.name]
            row.update({f"city{slot}": city.name, f"country{slot}": country,
                        f"correct_country{slot}": city.country, f"label{slot}": int(truth)})
        row["label"] = int(label)
        rows.append(row)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def dataset_rows(name: str, seed: int = HOLDOUT_SEED, min_population: int = facts.DEFAULT_MIN_POPULATION,
                 n_number_pairs: int = 990, n_compound: int = 1496) -> list[dict]:
    """The rows of truth dataset ``name``: dicts with ``statement``, ``label`` (1 true, 0 false),
    ``pair`` (a key shared by a statement and its false twin: the city, the Spanish word, the
    unordered number pair; absent for conjunctions and disjunctions) and the dataset's own columns.

    Sizes: cities and neg_cities 2 x (number of cities), sp_en_trans and its negation
    2 x (number of word pairs), larger_than / smaller_than 2 x ``n_number_pairs`` (1980, as in the
    original), conj / disj ``n_compound`` (1496).  Negated datasets are row-aligned with their
    affirmative partner.
    """
    if name in ("cities", "neg_cities"):
        rows = city_rows(seed, min_population)
        negated = name == "neg_cities"
        for r in rows:
            r["statement"] = templates.city(r["city"], r["country"], negated=negated)
            r["label"] = int((r["country"] == r["correct_country"]) != negated)
            r["pair"] = r["city"]
    elif name in ("sp_en_trans", "neg_sp_en_trans"):
        rows = _translation_rows(seed)
        negated = name == "neg_sp_en_trans"
        for r in rows:
            r["statement"] = templates.translation(r["spanish"], r["english"], negated=negated)
            r["label"] = int((r["english"] == r["correct_english"]) != negated)
            r["pair"] = r["spanish"]
    elif name in ("larger_than", "smaller_than"):
        rows = _number_rows(seed, n_number_pairs)
        relation = "larger" if name == "larger_than" else "smaller"
        for r in rows:
            r["statement"] = templates.comparison(r["n1"], r["n2"], relation)
            r["label"] = int(r["n1"] > r["n2"] if relation == "larger" else r["n1"] < r["n2"])
            r["diff"] = r["n1"] - r["n2"]
            r["abs_diff"] = abs(r["diff"])
            r["pair"] = f"{min(r['n1'], r['n2'])}|{max(r['n1'], r['n2'])}"
    elif name in ("cities_cities_conj", "cities_cities_disj"):
        rows = _compound_rows(name, seed, n_compound, min_population)
        make = templates.cities_conj if name == "cities_cities_conj" else templates.cities_disj
        for r in rows:
            r["statement"] = make((r["city1"], r["country1"]), (r["city2"], r["country2"]))
    else:
        raise KeyError(f"unknown truth dataset {name!r}; known: {', '.join(TRUTH_DATASETS)}")
    return rows
