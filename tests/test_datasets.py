"""Truth datasets: generation (sizes, balance, correct labels, determinism), the CSV reader's
validation, contrast pairs, what statements are about, and the object-only baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib import datasets as ds
from lib.world import facts, templates


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {n: ds.make_truth_dataset(n, seed=0) for n in ds.TRUTH_DATASETS}


def test_sizes_balance_and_columns(frames):
    n_cities, n_words = len(facts.cities()), len(facts.translations())
    expected = {"cities": 2 * n_cities, "neg_cities": 2 * n_cities, "sp_en_trans": 2 * n_words,
                "neg_sp_en_trans": 2 * n_words, "larger_than": 1980, "smaller_than": 1980,
                "cities_cities_conj": 1496, "cities_cities_disj": 1496}
    for name, frame in frames.items():
        assert len(frame) == expected[name], name
        assert list(frame.columns[:2]) == ["statement", "label"]
        assert frame["label"].mean() == 0.5, name
        assert frame["statement"].is_unique or name in ("cities_cities_conj", "cities_cities_disj"), name
        assert frame["statement"].str.endswith(".").all()


def test_labels_are_the_facts(frames):
    truth = {c.name: c.country for c in facts.cities()}
    c = frames["cities"]
    assert (c["correct_country"] == c["city"].map(truth)).all()
    assert ((c["country"] == c["correct_country"]).astype(int) == c["label"]).all()
    assert (c["statement"] == [templates.city(a, b) for a, b in zip(c["city"], c["country"])]).all()
    n = frames["neg_cities"]
    assert ((n["country"] != n["correct_country"]).astype(int) == n["label"]).all()
    assert n["statement"].str.contains(" is not in ").all()
    words = dict(facts.translations())
    t = frames["sp_en_trans"]
    assert ((t["spanish"].map(words) == t["english"]).astype(int) == t["label"]).all()
    for name, rel in (("larger_than", np.greater), ("smaller_than", np.less)):
        f = frames[name]
        assert (rel(f["n1"], f["n2"]).astype(int) == f["label"]).all()
        assert f["n1"].between(51, 99).all() and (f["n1"] != f["n2"]).all()
    conj, disj = frames["cities_cities_conj"], frames["cities_cities_disj"]
    assert ((conj["label1"] & conj["label2"]) == conj["label"]).all()
    assert ((disj["label1"] | disj["label2"]) == disj["label"]).all()
    for f in (conj, disj):
        for slot in (1, 2):
            assert (f[f"city{slot}"].map(truth) == f[f"correct_country{slot}"]).all()
            assert ((f[f"country{slot}"] == f[f"correct_country{slot}"]).astype(int) == f[f"label{slot}"]).all()


def test_negations_are_row_aligned_and_flip_labels(frames):
    for affirmative, (negated, negate) in ds.NEGATIONS.items():
        a, n = frames[affirmative], frames[negated]
        assert (a["statement"].map(negate) == n["statement"]).all()
        assert (a["label"] + n["label"] == 1).all()


def test_generation_is_deterministic_and_seeded():
    a = ds.make_truth_dataset("cities", seed=0)
    b = ds.make_truth_dataset("cities", seed=0)
    c = ds.make_truth_dataset("cities", seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not a["statement"].equals(c["statement"])
    # each dataset has its own stream: sp_en_trans does not depend on which others were made
    assert ds.make_truth_dataset("sp_en_trans", seed=0).equals(ds.make_truth_dataset("sp_en_trans", seed=0))


def test_write_then_read_round_trip(tmp_path, frames):
    folder = ds.generate_truth_datasets(tmp_path, seed=0)
    assert sorted(p.name for p in folder.glob("*.csv")) == sorted(f"{n}.csv" for n in ds.TRUTH_DATASETS)
    mtime = (folder / "cities.csv").stat().st_mtime_ns
    ds.generate_truth_datasets(tmp_path, seed=0)  # unchanged content: file left alone
    assert (folder / "cities.csv").stat().st_mtime_ns == mtime
    loaded = ds.load_truth_datasets(folder)
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(loaded[name], frame, check_dtype=False)
    assert not list(folder.glob(".*.tmp"))


def test_default_directory_is_data_datasets(isolated_root):
    loaded = ds.load_truth_datasets(names=["sp_en_trans"])
    assert (isolated_root / "data" / "datasets" / "sp_en_trans.csv").exists()
    assert len(loaded["sp_en_trans"]) == 2 * len(facts.translations())


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reader_accepts_original_format_and_word_labels(tmp_path):
    p = _write(tmp_path / "mine.csv", "statement,label,city\nThe city of A is in B.,True,A\nThe city of A is in C.,false,A\n")
    frame = ds.read_truth_csv(p)
    assert frame["label"].tolist() == [1, 0] and frame["label"].dtype == np.int64
    p = _write(tmp_path / "orig.csv", "statement,label\n\"Commas, quoted.\",1\nPlain.,0\n")
    assert ds.read_truth_csv(p)["statement"].tolist() == ["Commas, quoted.", "Plain."]


@pytest.mark.parametrize(
    "text, match",
    [
        ("sentence,label\nA.,1\n", r"missing column\(s\) \['statement'\].*found \['sentence', 'label'\]"),
        ("statement\nA.\n", r"missing column\(s\) \['label'\]"),
        ("", "is empty"),
        ("statement,label\n", "no rows"),
        ("statement,label\nA.,1\nB.,2\nC.,yes\n", r"non-binary labels \['2', 'yes'\] at line\(s\) \[3, 4\]"),
        ("statement,label\nA.,1\n,0\n", r"empty statements at line\(s\) \[3\]"),
    ],
)
def test_reader_errors_say_what_is_wrong(tmp_path, text, match):
    p = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ds.DatasetFormatError, match=match):
        ds.read_truth_csv(p)


def test_missing_dataset_lists_what_the_folder_has(tmp_path):
    _write(tmp_path / "cities.csv", "statement,label\nA.,1\nB.,0\n")
    with pytest.raises(FileNotFoundError, match=r"no neg_cities\.csv.*It holds: cities"):
        ds.load_truth_datasets(tmp_path, names=["cities", "neg_cities"])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ds.load_truth_datasets(tmp_path / "nope")


def test_contrast_pairs_match_by_text_in_unaligned_files(frames):
    shuffled = dict(frames)
    shuffled["neg_cities"] = frames["neg_cities"].sample(frac=1.0, random_state=3).reset_index(drop=True).iloc[:-5]
    rows, partner_rows, partner = ds.contrast_pairs(shuffled, "cities")
    assert partner == "neg_cities" and len(rows) == len(frames["cities"]) - 5
    negate = ds.NEGATIONS["cities"][1]
    assert all(negate(shuffled["cities"]["statement"][i]) == shuffled["neg_cities"]["statement"][j]
               for i, j in zip(rows, partner_rows))
    back_rows, back_partner_rows, back = ds.contrast_pairs(shuffled, "neg_cities")
    assert back == "cities" and set(zip(back_partner_rows, back_rows)) == set(zip(rows, partner_rows))
    with pytest.raises(KeyError, match="no negated partner"):
        ds.contrast_pairs(frames, "cities_cities_conj")


def test_fact_keys_read_the_templates():
    frame = pd.DataFrame({"statement": [
        "The city of Paris is in France.", "The city of Paris is not in Chile.",
        "The Spanish word 'gato' does not mean 'dog'.", "Fifty-one is larger than sixty.",
        "Sixty is smaller than fifty-one.", "Something else.",
    ], "label": [1, 1, 1, 0, 0, 1]})
    assert ds.fact_keys(frame).tolist() == ["Paris", "Paris", "gato", "fifty-one|sixty", "fifty-one|sixty", "row:5"]


# --------------------------------------------------------------------------------------------
# unbiased by construction: the object a statement names says nothing about its label
# --------------------------------------------------------------------------------------------
def _object_only(frame: pd.DataFrame) -> tuple[float, float]:
    from lib.truth import object_only_baseline

    out = object_only_baseline(frame)
    return out["accuracy"], out["auroc"]


@pytest.mark.parametrize("name", [n for n in ds.TRUTH_DATASETS if n not in ("larger_than", "smaller_than")]
                         + list(ds.CITY_XOR_DATASETS))
def test_object_only_classifier_is_at_chance(name):
    frame = ds.make_truth_dataset(name) if name in ds.TRUTH_DATASETS else ds.make_city_xor_dataset(name)
    objects = ds.object_tokens(frame)
    assert all(len(o) == (2 if "cities_cities" in name else 1) for o in objects)
    acc, auc = _object_only(frame)
    assert acc <= 0.55 and auc <= 0.58, (name, acc, auc)
    if name in ("cities", "neg_cities", "sp_en_trans", "neg_sp_en_trans") or name in ds.CITY_XOR_DATASETS:
        # a derangement: every object is named exactly as often by true as by false statements
        counts = pd.crosstab(pd.Series([o[0] for o in objects]), frame["label"].to_numpy())
        assert (counts[0] == counts[1]).all(), name


def test_a_biased_dataset_fails_the_object_only_check():
    """The check can fail: the first toy world's datasets (a uniformly random false country)."""
    import random

    rng = random.Random(0)
    rows = []
    for c in facts.cities():
        wrong = rng.choice([k for k in facts.countries() if k != c.country])
        rows += [{"statement": templates.city(c.name, c.country), "label": 1},
                 {"statement": templates.city(c.name, wrong), "label": 0}]
    acc, auc = _object_only(pd.DataFrame(rows))
    assert acc > 0.65 and auc > 0.7, (acc, auc)


@pytest.mark.parametrize("name", ["larger_than", "smaller_than"])
def test_number_comparisons_are_a_function_of_the_objects(name):
    """The label of a comparison is a function of its two numbers, so an object-only classifier
    is not at chance there (its appropriate baseline is the comparison itself); what must hold is
    that the unordered pair says nothing: each pair appears once true and once false."""
    frame = ds.make_truth_dataset(name)
    by_pair = frame.groupby(ds.fact_keys(frame))["label"].agg(["sum", "count"])
    assert (by_pair["count"] == 2).all() and (by_pair["sum"] == 1).all()
    acc, _ = _object_only(frame)
    assert acc > 0.6  # the numbers do carry the label, as they must


def test_one_name_as_a_string_is_one_dataset(tmp_path):
    ds.generate_truth_datasets(tmp_path, names="cities")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cities.csv"]
    assert list(ds.load_truth_datasets(tmp_path, names="cities")) == ["cities"]


def test_truth_csv_errors_name_the_file_and_line(tmp_path):
    extra = tmp_path / "extra.csv"
    extra.write_text("statement,label\nThe city of Paris is in France.,1,oops\n", encoding="utf-8")
    with pytest.raises(ds.DatasetFormatError, match=r"extra\.csv.*line 2"):
        ds.read_truth_csv(extra)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("statement,label\nThe city of Bogotá is in Colombia.,1\n".encode("latin-1"))
    with pytest.raises(ds.DatasetFormatError, match=r"latin\.csv is not UTF-8"):
        ds.read_truth_csv(latin)


def test_a_dataset_of_one_class_is_refused_for_probing():
    from lib.truth import truth_probe_data

    frame = ds.make_truth_dataset("cities")
    only_true = frame[frame.label == 1].reset_index(drop=True)
    with pytest.raises(ValueError, match="dataset 'cities' has only label 1"):
        truth_probe_data({"cities": only_true}, {"cities": np.zeros((len(only_true), 4))})
