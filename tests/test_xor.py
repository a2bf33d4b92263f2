"""lib.xor (probing features and XORs), lib.toys.xor_clusters (the synthetic picture) and the XOR datasets."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lib import datasets, xor
from lib.probes import best_threshold, train_test_indices
from lib.toys import xor_clusters as xc


# --- splits and probes -------------------------------------------------------------------------
def test_grouped_split_never_straddles_a_group():
    frame = pd.DataFrame({"g": np.repeat(np.arange(100), 3)})
    sp = train_test_indices(len(frame), 0.2, seed=1, groups=frame["g"])
    assert len(sp.train) + len(sp.test) == len(frame)
    assert set(frame["g"].iloc[sp.train]).isdisjoint(frame["g"].iloc[sp.test])
    assert len(set(frame["g"].iloc[sp.test])) == 20
    plain = train_test_indices(len(frame), 0.25, seed=0)
    assert len(plain.test) == 75 and len(np.intersect1d(plain.train, plain.test)) == 0


def test_probe_reads_a_linear_feature_and_not_noise():
    rng = np.random.default_rng(0)
    n, d = 4000, 20
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d))
    X[:, 3] += 3.0 * y  # readable along one axis
    frame = pd.DataFrame({"y": y, "noise": rng.integers(0, 2, n)})
    sp = train_test_indices(len(frame), seed=0)
    assert xor.probe_accuracy(X, frame["y"], sp) > 0.9
    lo, hi = xor.chance_band(len(sp.test), z=4)
    assert lo < xor.probe_accuracy(X, frame["noise"], sp) < hi
    table = xor.probe_table({"L0": X, "L1": X[:, ::-1]}, frame, ["y", "noise"], sp, progress=False)
    assert list(table.index) == ["L0", "L1"] and list(table.columns) == ["y", "noise"]
    assert table["y"].min() > 0.9


def test_probe_refuses_one_class_training_rows():
    X = np.zeros((10, 2))
    with pytest.raises(ValueError, match="only label 1"):
        xor.xor_probe().fit(X, np.ones(10, dtype=int))
    with pytest.raises(ValueError, match="0/1"):
        xor.probe_accuracy(X, np.arange(10), train_test_indices(10))


def test_chance_band_and_majority_baseline():
    lo, hi = xor.chance_band(2500, z=3)
    assert (lo, hi) == pytest.approx((0.47, 0.53))
    frame = pd.DataFrame({"f": [0, 1] * 50})
    sp = train_test_indices(len(frame), seed=0)
    base = xor.majority_baseline(frame, ["f"], sp)
    y = frame["f"].to_numpy()
    majority = int(y[sp.train].mean() >= 0.5)
    assert base["f"] == pytest.approx((y[sp.test] == majority).mean())


def test_feature_order_puts_basic_features_first():
    assert xor.feature_order(["a^b", "a", "a^b^c", "b", "b^c"]) == ["a", "b", "a^b", "b^c", "a^b^c"]


def test_constant_b_generalization_fails_when_the_xor_is_salient():
    """With an XOR direction as strong as a's (c = 2 > 1) a probe trained on b = 1 inverts on b = 0;
    one trained with b varied does not; with no XOR direction both generalize."""
    for c, failing in ((0.0, False), (2.0, True)):
        data = xc.gaussian_clusters(6000, sigma=0.3, xor_strength=c, seed=3)
        frame = pd.DataFrame({"a": data.a, "b": data.b})
        r = xor.constant_b_generalization(data.X, frame["a"], frame["b"], train_test_indices(len(frame), seed=0))
        assert r["b_varied_train"] > 0.9 and r["b_constant_train_same_b"] > 0.9
        assert (r["b_constant_train"] < 0.2) if failing else (r["b_constant_train"] > 0.9)
        assert r["n_train"] == pytest.approx(0.4 * len(frame), rel=0.05)


def test_figures_one_panel_per_scenario_and_one_bar_group_per_row():
    scenarios = {"plain": xc.gaussian_clusters(400, seed=0), "XOR dir": xc.gaussian_clusters(400, xor_strength=1.0, seed=0)}
    fig = xor.synthetic_scatter(scenarios)
    assert len(fig.data) == 4 and fig.layout.xaxis2.title.text == "x1 - x2"  # two classes in each of two panels
    rows = pd.DataFrame({"dataset": ["xor", "cities"], "a": ["t", "label"], "b": ["b", "alice"],
                         "b_constant_train_same_b": [0.9, 0.8], "b_constant_train": [0.2, 0.7], "b_varied_train": [0.9, 0.8]})
    bars = xor.generalization_bars(rows, "title")
    assert [t.name for t in bars.data] == list(xor.GENERALIZATION_BARS.values()) and len(bars.data[0].x) == 2


def test_heatmaps_one_panel_per_table():
    t = pd.DataFrame({"a": [0.5, 0.9], "a^b": [0.4, 0.6]}, index=["embed", "0"])
    fig = xor.heatmaps({"x": t, "y": t}, "title")
    assert len(fig.data) == 2 and list(fig.data[0].x) == ["a", "a ^ b"]


# --- the synthetic clusters ----------------------------------------------------------------------
def test_best_threshold_accuracy_known_answers():
    assert xc.best_threshold_accuracy(np.array([0.0, 1, 2, 3]), np.array([0, 0, 1, 1])) == 1.0
    assert xc.best_threshold_accuracy(np.array([0.0, 1, 2, 3]), np.array([1, 1, 0, 0])) == 1.0
    # XOR on four collinear points 00, 01/10, 11: at most 3 of 4
    assert xc.best_threshold_accuracy(np.array([0.0, 1, 1, 2]), np.array([0, 1, 1, 0])) == 0.75


def test_additive_gaussian_cells_cap_xor_at_three_quarters():
    data = xc.gaussian_clusters(8000, sigma=0.1, seed=0)
    assert np.bincount(2 * data.a + data.b).tolist() == [2000] * 4
    assert xc.best_linear_accuracy(data, "a^b") == pytest.approx(0.75, abs=0.01)
    assert xc.best_linear_accuracy(data, "a&b") > 0.99
    with_xor = xc.gaussian_clusters(8000, sigma=0.1, xor_strength=1.0, seed=0)
    assert xc.linear_accuracy(with_xor, "a^b") > 0.99


def test_uniform_square_breaks_and_but_keeps_a_and_b():
    data = xc.uniform_square(40_000, seed=0)
    assert xc.linear_accuracy(data, "a") > 0.99 and xc.linear_accuracy(data, "b") > 0.99
    # the best line is x1 + x2 = 4/3: errors (1/3)^2 + (2/3)^2 / 2 - 1/4 = 1/12
    assert xc.best_linear_accuracy(data, "a&b") == pytest.approx(11 / 12, abs=0.01)
    # the line through the midpoint of the cell means, x1 + x2 = 3/2, gets 7/8
    assert ((data.X[:, 0] + data.X[:, 1] > 1.5) == data.feature("a&b")).mean() == pytest.approx(0.875, abs=0.01)
    v_axis, v_diag = data.X[:, 0].var(), ((data.X[:, 0] + data.X[:, 1]) / np.sqrt(2)).var()
    assert v_axis == pytest.approx(1 / 12, rel=0.03) and v_diag == pytest.approx(1 / 12, rel=0.03)


def test_synthetic_constant_b_margin_is_one_minus_c_squared():
    below, at, above = (xor.synthetic_constant_b(c, sigma=0.3, n=3000)["b_constant_train"] for c in (0.5, 1.0, 1.5))
    assert below > 0.8 and 0.35 < at < 0.65 and above < 0.2


# --- datasets --------------------------------------------------------------------------------
def test_add_xor_columns_is_parity():
    frame = pd.DataFrame({"a": [0, 0, 1, 1, 1], "b": [0, 1, 0, 1, 1], "c": [1, 1, 1, 0, 1]})
    out = datasets.add_xor_columns(frame, ["a", "b", "c"], order=3)
    assert out["a^b"].tolist() == [0, 1, 1, 0, 0]
    assert out["a^b^c"].tolist() == [1, 0, 0, 0, 1]
    assert "a^b" not in frame.columns
    with pytest.raises(datasets.DatasetFormatError, match="no column"):
        datasets.add_xor_columns(frame, ["a", "zzz"])


@pytest.mark.parametrize("negated", [False, True])
def test_cities_alice_speakers_and_labels(negated):
    plain = datasets.make_truth_dataset("neg_cities" if negated else "cities")
    frame = datasets.make_cities_alice(negated=negated)
    assert len(frame) == len(plain)
    for row in frame.itertuples():
        speaker, statement = row.statement.split(": ", 1)
        assert speaker == ("Alice" if row.has_alice else "Bob")
        assert (" is not in " in statement) == negated
        truth = row.country == row.correct_country
        assert row.label == int(truth != negated)
    for lab in (0, 1):  # Alice speaks half of the true and half of the false statements
        assert abs(frame.loc[frame.label == lab, "has_alice"].mean() - 0.5) < 0.01
    assert (frame["has_alice^label"] == (frame["has_alice"] ^ frame["label"])).all()


def test_cities_distractor_ends_with_the_word():
    frame = datasets.make_cities_distractor()
    assert all(s.endswith(" banana") == bool(b) and s.endswith(" shed") != bool(b)
               for s, b in zip(frame["statement"], frame["has_banana"]))
    assert abs(frame["has_banana"].mean() - 0.5) < 0.01
    assert (frame["label^has_banana"] == (frame["label"] ^ frame["has_banana"])).all()


@pytest.fixture(scope="module")
def toy1():
    from lib.models import load_model

    return load_model("toy-1l", device="cpu")


def test_xor_dataset_rows_are_what_they_claim(toy1):
    frame = datasets.make_xor_dataset(toy1, n_rows=48, seed=2, unlikely_rank=50, filler_tokens=(3, 8), progress=False)
    tok = toy1.tokenizer
    assert frame.groupby(["label", "has_true", "has_banana"]).size().tolist() == [6] * 8
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    for row in frame.itertuples():
        ids = tok.encode(row.statement, add_special_tokens=False)
        assert tok.decode(ids[-1:]) == (" banana" if row.has_banana else " shed")
        assert tok.decode(ids[-2:-1]) == (" true" if row.has_true else " false")
        assert 3 <= row.n_filler_tokens <= 8 and len(ids) == row.n_filler_tokens + 3
        # the token after the filler is the model's top-1 (label 1) or its 50th (label 0), specials skipped
        with torch.no_grad():
            logits = toy1(torch.tensor([[tok.bos_token_id] + ids[:-3]]), return_type="logits")[0, -1]
        ranked = [t for t in torch.argsort(logits, descending=True).tolist() if t not in special]
        assert ids[-3] == ranked[0 if row.label else 49]
        assert row.token_rank == (1 if row.label else 50)
    assert (frame["has_true^has_banana^label"] == frame["has_true"] ^ frame["has_banana"] ^ frame["label"]).all()
    again = datasets.make_xor_dataset(toy1, n_rows=48, seed=2, unlikely_rank=50, filler_tokens=(3, 8), progress=False)
    pd.testing.assert_frame_equal(frame, again)


def test_xor_dataset_explains_bad_settings(toy1, tiny_bridges):
    with pytest.raises(ValueError, match="unlikely_rank"):
        datasets.make_xor_dataset(toy1, n_rows=8, unlikely_rank=1)
    with pytest.raises(ValueError, match="filler_tokens"):
        datasets.make_xor_dataset(toy1, n_rows=8, filler_tokens=(5, 2))
    with pytest.raises(datasets.DatasetFormatError, match="one token"):
        datasets.make_xor_dataset(tiny_bridges["gpt2"], n_rows=8)  # its tiny BPE splits " banana"


def test_probe_report_matches_linear_accuracy_and_sees_no_direction_for_xor():
    data = xc.gaussian_clusters(4000, sigma=0.2, seed=0)
    r = xc.probe_report(data, "a^b")
    assert r["test_accuracy"] == xc.linear_accuracy(data, "a^b")
    assert r["weight_norm"] < 0.5 < xc.probe_report(data, "a")["weight_norm"]


def test_city_xor_datasets_by_name_and_on_disk(tmp_path):
    for name in datasets.CITY_XOR_DATASETS:
        frame = datasets.make_city_xor_dataset(name)
        assert (" is not in " in frame["statement"].iloc[0]) == name.startswith("neg_")
    with pytest.raises(KeyError, match="cities_alice"):
        datasets.make_city_xor_dataset("cities_bob")
    sampled = pd.DataFrame({"statement": ["a true banana", "b false shed"], "label": [1, 0]})
    frames = datasets.generate_xor_datasets(tmp_path, xor_frame=sampled, model_name="toy/1l")
    assert sorted(p.stem for p in tmp_path.glob("*.csv")) == sorted([*datasets.CITY_XOR_DATASETS, "xor_toy_1l"])
    assert list(frames) == [*datasets.CITY_XOR_DATASETS, "xor"]
    back = datasets.read_truth_csv(tmp_path / "neg_cities_distractor.csv")  # valid truth-dataset CSVs
    pd.testing.assert_series_equal(back["label"], frames["neg_cities_distractor"]["label"])
    pd.testing.assert_frame_equal(datasets.read_truth_csv(tmp_path / "xor_toy_1l.csv"), sampled)
    stamp = (tmp_path / "cities_alice.csv").stat().st_mtime_ns
    datasets.generate_xor_datasets(tmp_path)
    assert (tmp_path / "cities_alice.csv").stat().st_mtime_ns == stamp  # unchanged content is not rewritten
    with pytest.raises(ValueError, match="model_name"):
        datasets.generate_xor_datasets(tmp_path, xor_frame=sampled)


def test_networks_yields_trained_then_the_two_resets(toy1):
    tokens = torch.tensor([[0, 5, 6, 7]])
    seen = {}
    for name, m in xor.networks("toy-1l", reset_seed=1, device="cpu", trained=toy1):
        with torch.no_grad():
            seen[name] = m(tokens, return_type="logits")
        if name == "trained":
            assert m is toy1
    assert list(seen) == list(xor.NETWORKS)
    a, b, c = seen.values()
    assert not torch.allclose(a, b) and not torch.allclose(a, c) and not torch.allclose(b, c)


def test_best_threshold_is_one_orientation_and_never_splits_ties():
    t, acc = best_threshold(np.array([0.0, 1, 2, 3]), np.array([0, 0, 1, 1]))
    assert 1 < t < 2 and acc == 1.0
    t, acc = best_threshold(np.array([0.0, 1, 2, 3]), np.array([1, 1, 0, 0]))  # wrong way round: no cut helps
    assert acc == 0.5
    _, acc = best_threshold(np.array([0.0, 1, 1, 2]), np.array([0, 0, 1, 1]))  # the tie at 1 stays together
    assert acc == 0.75
    with pytest.raises(ValueError, match="as many labels"):
        best_threshold(np.array([0.0, 1]), np.array([1]))


def test_constant_b_auroc_and_bias_refit_tell_a_threshold_shift_from_a_flip():
    """A pure threshold shift (the b-flipped rows moved along a's own direction) costs accuracy but
    keeps AUROC 1, and refitting the bias restores it; an XOR direction stronger than a's (c = 2)
    flips the direction: AUROC near 0 and no threshold helps."""
    rng = np.random.default_rng(0)
    n = 4000
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    X = np.stack([a + 0.1 * rng.standard_normal(n) + 1.5 * (1 - b), 0.1 * rng.standard_normal(n)], 1)
    r = xor.constant_b_generalization(X, a, b, train_test_indices(n, seed=0))
    assert r["b_constant_train"] < 0.7 and r["b_constant_train_auroc"] > 0.99 and r["b_constant_train_bias_refit"] > 0.99
    data = xc.gaussian_clusters(6000, sigma=0.3, xor_strength=2.0, seed=3)
    r = xor.constant_b_generalization(data.X, data.a, data.b, train_test_indices(len(data.a), seed=0))
    assert r["b_constant_train_auroc"] < 0.1 and r["b_constant_train_bias_refit"] < 0.6
    assert r["b_varied_train_auroc"] > 0.95


def test_normalised_xor_divides_by_the_weaker_input():
    t = pd.DataFrame({"a": [0.9, 0.7, 0.5], "b": [0.8, 0.9, 0.9], "a^b": [0.65, 0.6, 0.7]}, index=["0", "1", "2"])
    got = xor.normalised_xor(t, "a^b")
    assert got["0"] == pytest.approx(0.15 / 0.3) and got["1"] == pytest.approx(0.1 / 0.2) and np.isnan(got["2"])
