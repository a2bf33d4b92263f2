"""Truth datasets in the Geometry of Truth CSV format: generated from the toy world, or read from
any directory of such files (the original Marks & Tegmark CSVs included).

A truth dataset is a CSV with at least the columns ``statement`` (one sentence ending in a period)
and ``label`` (1 true, 0 false), plus whatever columns the dataset keeps about itself (``city``,
``country``, ``correct_country``; ``n1``, ``n2``; ...).

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
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib import paths
from lib.results import atomic_write_text
from lib.world import facts, statements, templates
from lib.world.statements import TRUTH_DATASETS, city_rows

REQUIRED_COLUMNS: tuple[str, ...] = ("statement", "label")

# affirmative dataset -> (its negated partner, the rewrite that negates one statement)
NEGATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "cities": ("neg_cities", lambda s: s.replace(" is in ", " is not in ", 1)),
    "sp_en_trans": ("neg_sp_en_trans", lambda s: s.replace(" means ", " does not mean ", 1)),
    "larger_than": ("smaller_than", lambda s: s.replace(" is larger than ", " is smaller than ", 1)),
}
NEGATED: frozenset[str] = frozenset(partner for partner, _ in NEGATIONS.values())


class DatasetFormatError(ValueError):
    """A truth-dataset CSV that cannot be used: missing columns, bad labels, no rows."""


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
    for name in names:
        text = make_truth_dataset(name, seed=seed, **kwargs).to_csv(index=False, lineterminator="\n")
        path = out / f"{name}.csv"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    return out


# --------------------------------------------------------------------------------------------
# reading and validation
# --------------------------------------------------------------------------------------------
_LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}


def validate_truth_frame(frame: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """Check a truth dataset and return it with ``label`` as int 0/1 and ``statement`` as str.

    Raises ``DatasetFormatError`` naming the file, the problem and the fix when a required column
    is missing, there are no rows, a statement is empty, or a label is not binary.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFormatError(
            f"{source} is missing column(s) {missing}; found {list(frame.columns)}. A truth dataset "
            f"needs a header with 'statement' (the sentence) and 'label' (1 true, 0 false)."
        )
    if len(frame) == 0:
        raise DatasetFormatError(f"{source} has a header but no rows; a truth dataset needs statements.")
    frame = frame.copy()
    statements = frame["statement"]
    empty = statements.isna() | (statements.astype(str).str.strip() == "")
    if empty.any():
        rows = [int(i) + 2 for i in np.flatnonzero(empty.to_numpy())[:5]]
        raise DatasetFormatError(f"{source} has empty statements at line(s) {rows} (counting the header as 1).")
    frame["statement"] = statements.astype(str)
    words = frame["label"].astype(str).str.strip().str.lower()
    bad = ~words.isin(list(_LABEL_WORDS))
    if bad.any():
        idx = np.flatnonzero(bad.to_numpy())
        values = sorted({str(v) for v in frame["label"].iloc[idx[:20]]})
        raise DatasetFormatError(
            f"{source} has non-binary labels {values} at line(s) {[int(i) + 2 for i in idx[:5]]} "
            f"({len(idx)} rows in all); labels must be 1 (true) or 0 (false)."
        )
    frame["label"] = words.map(_LABEL_WORDS).astype(np.int64)
    return frame


def read_truth_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate one truth-dataset CSV (see :func:`validate_truth_frame`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No truth dataset at {path}.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetFormatError(
            f"{path} is empty; a truth dataset is a CSV with a header 'statement,label,...' and one row per statement."
        )
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])
    return validate_truth_frame(frame, source=str(path))


def available_truth_datasets(directory: str | os.PathLike) -> list[str]:
    """The dataset names (file stems) of the CSVs in ``directory``, sorted."""
    return sorted(p.stem for p in Path(directory).glob("*.csv"))


def load_truth_datasets(directory: str | os.PathLike | None = None,
                        names: Iterable[str] = TRUTH_DATASETS, seed: int = 0) -> dict[str, pd.DataFrame]:
    """``{name: validated DataFrame}`` read from ``directory``.

    ``directory=None`` generates the toy-world datasets first (into ``data/datasets/``, see
    :func:`generate_truth_datasets`).  A missing file is an error that lists what the folder holds.
    """
    names = list(names)
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
# the probing protocol: per-dataset centring, pair-consistent held-out splits, combined sets
# --------------------------------------------------------------------------------------------
@dataclass
class TruthProbeData:
    """Activations of several truth datasets, arranged for training and testing probes.

    X: name -> (n, d) activations, centred on the dataset's own mean when ``centred``; y: name ->
    (n,) labels; train / test: name -> row indices.  Splits are stratified and consistent across
    a dataset and its negation (a statement and its negation fall on the same side), so a probe
    trained on ``cities`` never saw the facts of the ``neg_cities`` rows it is tested on.
    """

    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    pairs: dict[str, tuple[np.ndarray, np.ndarray, str]]
    centred: bool = True

    def train_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of the training rows of ``name``, or of several joined by ``+`` ("cities+neg_cities")."""
        parts = name.split("+")
        return (np.concatenate([self.X[p][self.train[p]] for p in parts]),
                np.concatenate([self.y[p][self.train[p]] for p in parts]))

    def test_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of the held-out rows of ``name``."""
        return self.X[name][self.test[name]], self.y[name][self.test[name]]

    def ccs_train_set(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(x_pos, x_neg, y)`` for CCS: training rows of ``name`` (all ``+`` parts) and their negations.

        None when no part of ``name`` has a negated partner among the loaded datasets.
        """
        pos, neg, ys = [], [], []
        for part in name.split("+"):
            if part not in self.pairs:
                continue
            rows, partner_rows, partner = self.pairs[part]
            keep = np.isin(rows, self.train[part])
            pos.append(self.X[part][rows[keep]])
            neg.append(self.X[partner][partner_rows[keep]])
            ys.append(self.y[part][rows[keep]])
        if not pos:
            return None
        return np.concatenate(pos), np.concatenate(neg), np.concatenate(ys)

    def train_sets(self, names: Iterable[str], probe: str = "dim") -> dict[str, tuple | None]:
        """Arguments of ``probe.fit`` for each training set: ``(X, y)``, or CCS's pairs when ``probe == "ccs"``."""
        return {n: self.ccs_train_set(n) if probe == "ccs" else self.train_set(n) for n in names}

    def test_sets(self, names: Iterable[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: self.test_set(n) for n in (self.X if names is None else names)}


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


def truth_probe_data(frames: dict[str, pd.DataFrame], acts: dict[str, np.ndarray], test_fraction: float = 0.2,
                     seed: int = 0, centred: bool = True) -> TruthProbeData:
    """Build ``TruthProbeData`` from validated frames and their activations (``acts[name]``: (n, d)).

    The held-out rows are whole facts (:func:`fact_keys`): a random ``test_fraction`` of the
    cities (Spanish words, number pairs) with every statement about them, chosen once for a
    dataset and its negation together, so a probe is always tested on facts it never saw, in
    either polarity.  Sets whose statements fit no template (conjunctions, disjunctions) are
    split row by row, stratified.
    """
    from lib.probes import center, train_test_indices

    names = [n for n in frames if n in acts]
    X = {n: (center(acts[n]) if centred else np.asarray(acts[n], dtype=np.float64)) for n in names}
    y = {n: frames[n]["label"].to_numpy(np.int64) for n in names}
    for n in names:
        if len(X[n]) != len(y[n]):
            raise ValueError(f"{n}: {len(X[n])} activation rows for {len(y[n])} statements")
    pairs: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for n in names:
        if negation_partner(n) in names:
            try:
                pairs[n] = contrast_pairs(frames, n)
            except KeyError:
                pass
    train, test = {}, {}
    for k, n in enumerate(names):
        if n in test:
            continue
        keys = fact_keys(frames[n])
        partner = negation_partner(n)
        family = [n] + ([partner] if partner in names else [])
        if all(key.startswith("row:") for key in keys):
            train[n], test[n] = train_test_indices(y[n], test_fraction, seed=seed + k)
            family = [n]
            held = None
        else:
            family_keys = np.concatenate([fact_keys(frames[m]) for m in family])
            family_y = np.concatenate([y[m] for m in family])
            _, test_rows = train_test_indices(family_y, test_fraction, seed=seed + k, groups=family_keys)
            held = set(family_keys[test_rows].tolist())
        for m in family:
            if held is None:
                continue
            in_test = np.array([key in held for key in fact_keys(frames[m])])
            train[m], test[m] = np.flatnonzero(~in_test), np.flatnonzero(in_test)
    return TruthProbeData(X, y, train, test, pairs, centred)


# --------------------------------------------------------------------------------------------
# XOR datasets (notebook 02): independent binary features and their pairwise XORs
# --------------------------------------------------------------------------------------------
XOR_SEP = "^"  # a XOR column is named "a^b" (order as given), e.g. "has_true^has_banana"


def xor_name(*features: str) -> str:
    return XOR_SEP.join(features)


def add_xor_columns(frame: pd.DataFrame, features: Sequence[str], order: int = 2) -> pd.DataFrame:
    """Return ``frame`` with a 0/1 column ``"a^b"`` for each pair of ``features`` (and each triple
    when ``order=3``): the parity of the features' sum."""
    from itertools import combinations

    frame = frame.copy()
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise DatasetFormatError(f"no column(s) {missing} to XOR; columns are {list(frame.columns)}")
    for k in range(2, order + 1):
        for combo in combinations(features, k):
            frame[xor_name(*combo)] = (frame[list(combo)].astype(int).sum(axis=1) % 2).astype(np.int64)
    return frame


def _balanced_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) 0/1 with exactly ``n // 2`` ones (plus one more when n is odd), in random order."""
    bits = np.zeros(n, dtype=np.int64)
    bits[: (n + 1) // 2] = 1
    return rng.permutation(bits)


def _cities_with_bit(seed: int, min_population: int, negated: bool, bit: str, stream: int) -> pd.DataFrame:
    """The cities rows with ``label`` and a 0/1 column ``bit`` balanced within each label, drawn
    from its own random stream ``(seed, stream, negated)``."""
    rng = np.random.default_rng([seed, stream, int(negated)])
    frame = pd.DataFrame(city_rows(seed, min_population))
    frame["label"] = ((frame["country"] == frame["correct_country"]).astype(int) != int(negated)).astype(np.int64)
    frame[bit] = 0
    for lab in (0, 1):
        idx = np.flatnonzero(frame["label"].to_numpy() == lab)
        frame.loc[idx, bit] = _balanced_bits(rng, len(idx))
    return frame


def make_cities_alice(seed: int = 0, min_population: int = facts.DEFAULT_MIN_POPULATION,
                      negated: bool = False) -> pd.DataFrame:
    """City statements spoken by Alice or Bob: ``"Alice: The city of Lodz is in Poland."``.

    Columns ``statement, label, city, country, correct_country, has_alice, has_not`` and the XORs
    of ``has_alice, has_not, label``.  ``has_alice`` is balanced within each label, drawn
    independently of everything else.  ``has_alice^label`` is 1 for a true statement by Bob or a
    false one by Alice: "true according to the speaker" if Alice believes the opposite of every
    fact, the seed's example of a useful (not crazy) XOR.  ``negated=True`` gives the
    ``neg_cities_alice`` rows ("is not in"), with their own speaker draws.
    """
    frame = _cities_with_bit(seed, min_population, negated, "has_alice", stream=101)
    frame["has_not"] = int(negated)
    frame["statement"] = [
        f"{'Alice' if a else 'Bob'}: " + templates.city(c, k, negated=negated)
        for a, c, k in zip(frame["has_alice"], frame["city"], frame["country"])
    ]
    frame = add_xor_columns(frame, ["has_alice", "has_not", "label"])
    first = ["statement", "label"]
    return frame[first + [c for c in frame.columns if c not in first]]


def make_cities_distractor(seed: int = 0, min_population: int = facts.DEFAULT_MIN_POPULATION,
                           negated: bool = False) -> pd.DataFrame:
    """City statements followed by an irrelevant word: ``"The city of Lodz is in Poland. banana"``.

    ``has_banana`` (" banana" vs " shed") is balanced within each label; the last token, where
    probes read, is the distractor word.  Columns as the cities dataset plus ``has_banana`` and
    ``label^has_banana``.
    """
    frame = _cities_with_bit(seed, min_population, negated, "has_banana", stream=102)
    frame["statement"] = [
        templates.city(c, k, negated=negated) + (" banana" if b else " shed")
        for b, c, k in zip(frame["has_banana"], frame["city"], frame["country"])
    ]
    frame = add_xor_columns(frame, ["label", "has_banana"])
    first = ["statement", "label"]
    return frame[first + [c for c in frame.columns if c not in first]]


CITY_XOR_DATASETS: tuple[str, ...] = ("cities_alice", "neg_cities_alice", "cities_distractor", "neg_cities_distractor")


def make_city_xor_dataset(name: str, seed: int = 0, min_population: int = facts.DEFAULT_MIN_POPULATION) -> pd.DataFrame:
    """One of ``CITY_XOR_DATASETS`` by name (the file names of the public XOR-probing datasets)."""
    makers = {"cities_alice": make_cities_alice, "cities_distractor": make_cities_distractor}
    base = name.removeprefix("neg_")
    if name not in CITY_XOR_DATASETS:
        raise KeyError(f"unknown city XOR dataset {name!r}; known: {', '.join(CITY_XOR_DATASETS)}")
    return makers[base](seed=seed, min_population=min_population, negated=name.startswith("neg_"))


def generate_city_xor_datasets(directory: str | os.PathLike | None = None, seed: int = 0,
                               names: Iterable[str] = CITY_XOR_DATASETS) -> Path:
    """Write ``{name}.csv`` for each city XOR dataset (default folder ``data/datasets/``), atomically
    and only when the content changed; returns the folder.  (The ``xor`` dataset depends on a
    model, so it is generated in memory by :func:`make_xor_dataset`.)"""
    out = Path(directory) if directory is not None else paths.datasets_dir()
    for name in names:
        text = make_city_xor_dataset(name, seed=seed).to_csv(index=False, lineterminator="\n")
        path = out / f"{name}.csv"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    return out


XOR_WORDS = {"has_true": (" true", " false"), "has_banana": (" banana", " shed")}


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise DatasetFormatError(
            f"{word!r} is {len(ids)} tokens under this tokenizer ({ids}); the xor dataset needs each of "
            f"{[w for pair in XOR_WORDS.values() for w in pair]} to be one token"
        )
    return ids[0]


def _sample_fillers(model, b, n_steps, lengths, bos, special, temperature, gen, device):
    """Sample ``n_steps`` tokens after BOS for ``b`` rows; also return, for row ``r``, the logits
    of the next token after its first ``lengths[r]`` sampled tokens.  Uses the Hugging Face
    model under the bridge with a KV cache when there is one (a dozen times fewer FLOPs than
    re-running the prefix), else the bridge itself."""
    import torch

    hf = getattr(model, "original_model", None)
    seq = torch.full((b, 1), bos, dtype=torch.long, device=device)
    lengths_t = torch.as_tensor(lengths)
    next_logits = None
    past = None
    with torch.no_grad():
        for step in range(n_steps + 1):
            if hf is not None:
                out = hf(input_ids=seq if past is None else seq[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].cpu()
            else:
                logits = model(seq, return_type="logits")[:, -1, :].cpu()
            if next_logits is None:
                next_logits = torch.empty(b, logits.shape[-1], dtype=logits.dtype)
            here = lengths_t == step
            next_logits[here] = logits[here]
            if step == n_steps:
                break
            logits = logits.double()
            logits[:, special] = -float("inf")
            new = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
            seq = torch.cat([seq, new.to(device)], dim=1)
    return seq, next_logits


def make_xor_dataset(model, n_rows: int = 10_000, seed: int = 0, temperature: float = 0.8,
                     unlikely_rank: int = 100, filler_tokens: tuple[int, int] = (6, 24),
                     batch_size: int = 250, progress: bool = True) -> pd.DataFrame:
    """The seed's ``xor`` dataset, generated with ``model`` (the model it will be probed on).

    Each row is ``[filler][token][" true" | " false"][" banana" | " shed"]``:

    - filler: ``filler_tokens`` (a uniform length in the range) tokens sampled from the model at
      ``temperature``, starting after BOS (special tokens never sampled);
    - token: the model's most likely next token after the filler (``label=1``) or its
      ``unlikely_rank``-th most likely (``label=0``, rank counted from 1);
    - ``has_true``: " true" (1) or " false" (0); ``has_banana``: " banana" (1) or " shed" (0).

    The eight cells of ``(label, has_true, has_banana)`` have ``n_rows / 8`` rows each (so every
    feature and every XOR is balanced and independent of the others).  A row is kept only if its
    text re-tokenizes to exactly the tokens it was built from (byte-level BPE can merge a sampled
    token with its neighbour); rejected rows are redrawn.  Columns: ``statement`` (the text, no
    BOS), ``label``, ``has_true``, ``has_banana``, the pairwise and three-way XORs, ``filler``,
    ``token``, ``token_rank``, ``n_filler_tokens``.

    The rows are a deterministic function of ``seed`` and the model's logits.  float32 logits
    differ in their last bits between CPUs, which now and then changes a sampled token; a model
    loaded with ``dtype=torch.float64`` (cheap for the toy models) makes the dataset the same on
    every machine.
    """
    import torch

    from lib.utils import progress as progress_bar

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with lib.models.load_model")
    ids = {w: _single_token(tok, w) for pair in XOR_WORDS.values() for w in pair}
    special = sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the filler from")
    d_vocab = int(model.cfg.d_vocab)
    if unlikely_rank < 2 or unlikely_rank > d_vocab - len(special):
        raise ValueError(f"unlikely_rank must be in [2, {d_vocab - len(special)}], got {unlikely_rank}")
    lo, hi = filler_tokens
    if not 1 <= lo <= hi:
        raise ValueError(f"filler_tokens must be (min, max) with 1 <= min <= max, got {filler_tokens}")
    device = next(model.parameters()).device
    rng = np.random.default_rng([seed, 103])
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))

    cells = [(lab, t, b) for lab in (1, 0) for t in (1, 0) for b in (1, 0)]
    wanted = np.array([cells[i % 8] for i in range(n_rows)])
    wanted = wanted[rng.permutation(n_rows)]
    rows: list[dict] = []
    bar = progress_bar(total=n_rows, desc="xor dataset", **({} if progress else {"disable": True}))
    attempts = 0
    while len(rows) < n_rows:
        b = min(batch_size, 2 * (n_rows - len(rows)) + 8)
        lengths = rng.integers(lo, hi + 1, size=b)
        seq, next_logits = _sample_fillers(model, b, hi, lengths, bos, special, temperature, gen, device)
        order = torch.argsort(next_logits, dim=-1, descending=True)
        seq_cpu = seq.cpu()
        for r in range(b):
            if len(rows) >= n_rows:
                break
            attempts += 1
            L = int(lengths[r])
            filler = seq_cpu[r, 1: L + 1].tolist()
            ranked = [t for t in order[r].tolist() if t not in special]
            lab, has_true, has_banana = (int(v) for v in wanted[len(rows)])
            rank = 1 if lab else unlikely_rank
            token = ranked[rank - 1]
            words = [ids[XOR_WORDS["has_true"][1 - has_true]], ids[XOR_WORDS["has_banana"][1 - has_banana]]]
            full = filler + [token] + words
            text = tok.decode(full)
            if tok.encode(text, add_special_tokens=False) != full:
                continue
            rows.append({"statement": text, "label": lab, "has_true": has_true, "has_banana": has_banana,
                         "filler": tok.decode(filler), "token": tok.decode([token]), "token_rank": rank,
                         "n_filler_tokens": L})
            bar.update(1)
    bar.close()
    frame = pd.DataFrame(rows)
    frame = add_xor_columns(frame, ["has_true", "has_banana", "label"], order=3)
    frame.attrs["rejected"] = attempts - n_rows
    first = ["statement", "label", "has_true", "has_banana"]
    return frame[first + [c for c in frame.columns if c not in first]]
