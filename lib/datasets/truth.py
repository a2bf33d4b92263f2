"""Truth datasets in the Geometry of Truth CSV format: generated from the toy world, or read from
any directory of such files (the original Marks & Tegmark CSVs included).

A truth dataset is a CSV (:mod:`lib.datasets.files`) with at least the columns ``statement`` and
``label`` plus whatever columns the dataset keeps about itself (``city``, ``country``,
``correct_country``; ``n1``, ``n2``; ...).

>>> from lib import datasets
>>> folder = datasets.generate_truth_datasets()           # writes data/datasets/*.csv
>>> frames = datasets.load_truth_datasets(folder)          # {"cities": DataFrame, ...}, validated
>>> frames = datasets.load_truth_datasets("/data/geometry-of-truth/datasets")  # the originals

Generation is deterministic in ``seed`` (the rows come from :mod:`lib.world.statements`).  Labels
are balanced and the object token is unbiased by construction: each city gets one true and one
false statement whose false country is the true country of another city (so every country is
named equally often by true and false statements), each translation one true and one false (the
English word of another pair), each pair of numbers both orders.  With the default seed the false
statements are held out from the toy models' training corpus.  Negated datasets are
row-aligned with their affirmative partner (row ``i`` of ``neg_cities`` negates row ``i`` of
``cities``), and :func:`contrast_pairs` finds the pairs by text in any pair of files.
:func:`fact_keys` and :func:`object_tokens` read what each statement is about from its text.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lib import paths
from lib.utils import as_names
from lib.datasets.files import REQUIRED_COLUMNS, available_truth_datasets, read_truth_csv, write_dataset_csv
from lib.world import facts, statements
from lib.world.statements import TRUTH_DATASETS

# affirmative dataset -> (its negated partner, the rewrite that negates one statement)
NEGATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "cities": ("neg_cities", lambda s: s.replace(" is in ", " is not in ", 1)),
    "sp_en_trans": ("neg_sp_en_trans", lambda s: s.replace(" means ", " does not mean ", 1)),
    "larger_than": ("smaller_than", lambda s: s.replace(" is larger than ", " is smaller than ", 1)),
}
NEGATED: frozenset[str] = frozenset(partner for partner, _ in NEGATIONS.values())


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def make_truth_dataset(name: str, seed: int = 0, min_population: int = facts.DEFAULT_MIN_POPULATION,
                       n_number_pairs: int = 990, n_compound: int = 1496) -> pd.DataFrame:
    """One dataset of ``TRUTH_DATASETS`` as a DataFrame (``statement``, ``label`` first).

    Sizes: cities and neg_cities 2 x (number of cities), sp_en_trans and its negation
    2 x (number of word pairs), larger_than / smaller_than 2 x ``n_number_pairs`` (1980, as in the
    original), conj / disj ``n_compound`` (1496).
    """
    rows = statements.dataset_rows(name, seed=seed, min_population=min_population,
                                   n_number_pairs=n_number_pairs, n_compound=n_compound)
    frame = pd.DataFrame(rows)
    first = list(REQUIRED_COLUMNS)
    return frame[first + [c for c in frame.columns if c not in first]]


def generate_truth_datasets(directory: str | os.PathLike | None = None, seed: int = 0,
                            names: Iterable[str] = TRUTH_DATASETS, **kwargs) -> Path:
    """Write ``{name}.csv`` for each dataset to ``directory`` (default ``data/datasets/``).

    Each file is written atomically, and only when its content changed (a rerun leaves the
    committed files untouched).  Returns the directory.
    """
    out = Path(directory) if directory is not None else paths.datasets_dir()
    for name in as_names(names, "names"):
        write_dataset_csv(make_truth_dataset(name, seed=seed, **kwargs), name, out)
    return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def load_truth_datasets(directory: str | os.PathLike | None = None,
                        names: Iterable[str] = TRUTH_DATASETS, seed: int = 0) -> dict[str, pd.DataFrame]:
    """``{name: validated DataFrame}`` read from ``directory``.

    ``directory=None`` generates the toy-world datasets first (into ``data/datasets/``, see
    :func:`generate_truth_datasets`).  A missing file is an error that lists what the folder holds.
    """
    names = as_names(names, "names")
    if directory is None:
        directory = generate_truth_datasets(seed=seed, names=names)
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"datasets_dir {directory} is not a directory; point it at a folder of Geometry of Truth "
            f"CSVs (e.g. the 'datasets' folder of the geometry-of-truth repository) or pass None to generate them."
        )
    missing = [n for n in names if not (directory / f"{n}.csv").exists()]
    if missing:
        raise FileNotFoundError(
            f"{directory} has no {', '.join(m + '.csv' for m in missing)}. It holds: "
            f"{', '.join(available_truth_datasets(directory)) or '(no CSV files)'}. Pass the names "
            f"that exist, or datasets_dir=None to generate the toy-world datasets."
        )
    return {n: read_truth_csv(directory / f"{n}.csv") for n in names}


# --------------------------------------------------------------------------------------------
# contrast pairs (for CCS)
# --------------------------------------------------------------------------------------------
def negation_partner(name: str) -> str | None:
    """The dataset that negates ``name`` (in either direction), or None."""
    if name in NEGATIONS:
        return NEGATIONS[name][0]
    for affirmative, (partner, _) in NEGATIONS.items():
        if partner == name:
            return affirmative
    return None


def contrast_pairs(frames: dict[str, pd.DataFrame], name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows of ``name`` and of its negation that say opposite things about the same fact.

    Returns ``(rows_in_name, rows_in_partner, partner_name)``: row ``rows_in_name[k]`` of
    ``frames[name]`` and row ``rows_in_partner[k]`` of ``frames[partner]`` are a statement and its
    negation (matched by text, so the original files, which are not row-aligned, pair too).
    Raises ``KeyError`` when ``name`` has no negated partner among ``frames``.
    """
    if name in NEGATIONS:
        partner, negate = NEGATIONS[name]
        forward = True
    else:
        partner = negation_partner(name)
        if partner is None:
            raise KeyError(f"{name!r} has no negated partner dataset; pairs exist for {sorted(NEGATIONS)} and their negations")
        negate = NEGATIONS[partner][1]
        forward = False
    if partner not in frames:
        raise KeyError(f"contrast pairs for {name!r} need {partner!r}, which was not loaded")
    affirmative = frames[name] if forward else frames[partner]
    negated = frames[partner] if forward else frames[name]
    where = {s: i for i, s in enumerate(negated["statement"])}
    a_rows, n_rows = [], []
    for i, s in enumerate(affirmative["statement"]):
        j = where.get(negate(s))
        if j is not None:
            a_rows.append(i)
            n_rows.append(j)
    if not a_rows:
        raise KeyError(f"no statement of {name!r} has its negation in {partner!r}")
    a, n = np.asarray(a_rows), np.asarray(n_rows)
    return (a, n, partner) if forward else (n, a, partner)


# --------------------------------------------------------------------------------------------
# what a statement is about
# --------------------------------------------------------------------------------------------
_FACT_PATTERNS = (
    re.compile(r"^The city of (.+?) is (?:not )?in "),  # cities, neg_cities: the city
    re.compile(r"^The Spanish word '(.+?)' (?:does not mean|means) "),  # translations: the Spanish word
    re.compile(r"^(\S+) is (?:larger|smaller) than (\S+?)\.$"),  # comparisons: the pair of numbers
)


def fact_keys(frame: pd.DataFrame) -> np.ndarray:
    """(n,) the fact each statement is about, read from its text with the Geometry of Truth templates.

    "The city of Paris is (not) in X." -> "Paris"; "The Spanish word 'gato' (does not) mean(s) ..."
    -> "gato"; "Fifty-one is larger/smaller than sixty." -> the unordered pair of numbers.  A
    statement that fits no template is its own fact (``"row:{i}"``).  A statement and its negation,
    and the true and false statements about one city, share a key.
    """
    keys = []
    for i, text in enumerate(frame["statement"]):
        key = f"row:{i}"
        for pattern in _FACT_PATTERNS:
            m = pattern.match(text)
            if m:
                key = "|".join(sorted(g.lower() for g in m.groups())) if len(m.groups()) > 1 else m.group(1)
                break
        keys.append(key)
    return np.array(keys, dtype=object)


_OBJECT_PATTERNS = (
    re.compile(r"the city of .+? is (?:not )?in (.+?)(?= and that| or that|\.(?: \S+)?$)", re.IGNORECASE),  # countries
    re.compile(r"(?:does not mean|means) '(.+?)'\.$"),  # the English word
    re.compile(r"^(\S+) is (?:larger|smaller) than (\S+?)\.$"),  # the two numbers, in order
)


def object_tokens(frame: pd.DataFrame) -> list[tuple[str, ...]]:
    """The objects each statement names, read from its text: the country (each clause's, for
    conjunctions and disjunctions), the English word, or the two numbers in order.  A statement
    that fits no template names no object (``()``).  Works on the original CSVs too."""
    out = []
    for text in frame["statement"]:
        found: tuple[str, ...] = ()
        for pattern in _OBJECT_PATTERNS:
            hits = pattern.findall(text)
            if hits:
                found = tuple(w for h in hits for w in ((h,) if isinstance(h, str) else h))
                break
        out.append(found)
    return out


def object_features(frame: pd.DataFrame) -> np.ndarray:
    """(n, k) one-hot features of :func:`object_tokens`, one block per slot (first country, second
    country; first number, second number): what an "object-only" baseline classifier sees."""
    objects = object_tokens(frame)
    vocab: dict[tuple[int, str], int] = {}
    for objs in objects:
        for slot, o in enumerate(objs):
            vocab.setdefault((slot, o.lower()), len(vocab))
    X = np.zeros((len(objects), max(1, len(vocab))))
    for i, objs in enumerate(objects):
        for slot, o in enumerate(objs):
            X[i, vocab[(slot, o.lower())]] = 1.0
    return X
