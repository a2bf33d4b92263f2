"""XOR datasets (notebook 02): independent binary features and their XORs, as truth-dataset CSVs.

- ``cities_alice`` / ``neg_cities_alice``: city statements spoken by Alice or Bob;
  ``cities_distractor`` / ``neg_cities_distractor``: city statements followed by an irrelevant
  word.  Both are built from the toy world's city rows (:func:`make_city_xor_dataset`).
- ``xor``: filler text sampled from a model, then a likely or unlikely token, " true"/" false" and
  " banana"/" shed" (:func:`make_xor_dataset`); it depends on the model it is sampled from.

:func:`generate_xor_datasets` writes them to ``data/datasets/`` beside the truth datasets (the
model-sampled one as ``xor_{model}.csv``), atomically and only when their content changed.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib import paths
from lib.utils import as_names
from lib.datasets.files import DatasetFormatError, write_dataset_csv
from lib.world import facts, templates
from lib.world.statements import city_rows

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


XOR_WORDS = {"has_true": (" true", " false"), "has_banana": (" banana", " shed")}


def _single_token(tokenizer, word: str) -> int:
    from lib.activations import single_token

    need = f"the xor dataset needs each of {[w for pair in XOR_WORDS.values() for w in pair]} to be one token"
    try:
        return single_token(tokenizer, word, need)
    except ValueError as err:
        raise DatasetFormatError(str(err)) from None


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


def generate_xor_datasets(directory: str | os.PathLike | None = None, seed: int = 0,
                          names: Iterable[str] = CITY_XOR_DATASETS,
                          xor_frame: pd.DataFrame | None = None, model_name: str | None = None) -> dict[str, pd.DataFrame]:
    """Write ``{name}.csv`` for each city XOR dataset and, given a sampled ``xor_frame`` (from
    :func:`make_xor_dataset`), ``xor_{model_name}.csv``, to ``directory`` (default ``data/datasets/``);
    return the frames by dataset name (``"xor"`` for the sampled one)."""
    out = Path(directory) if directory is not None else paths.datasets_dir()
    frames = {name: make_city_xor_dataset(name, seed=seed) for name in as_names(names, "names")}
    for name, frame in frames.items():
        write_dataset_csv(frame, name, out)
    if xor_frame is not None:
        if not model_name:
            raise ValueError("the xor dataset depends on the model it was sampled from: pass model_name")
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)
        write_dataset_csv(xor_frame, f"xor_{tag}", out)
        frames["xor"] = xor_frame
    return frames
