"""lib.truth: the Geometry of Truth protocol's splits and data, and one study run end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib import datasets as ds
from lib import truth
from lib.probes import PROBES, generalization_matrix


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {n: ds.make_truth_dataset(n, seed=0) for n in ds.TRUTH_DATASETS}


def test_probe_data_centres_splits_and_keeps_pairs_together(frames):
    names = ["cities", "neg_cities", "sp_en_trans", "cities_cities_conj"]
    rng = np.random.default_rng(0)
    acts = {n: rng.normal(size=(len(frames[n]), 4)) + 3.0 for n in names}
    data = truth.truth_probe_data({n: frames[n] for n in names}, acts, test_fraction=0.2, seed=0)
    for n in names:
        assert np.allclose(data.X[n].mean(0), 0)
        assert len(np.intersect1d(data.train[n], data.test[n])) == 0
        assert len(data.train[n]) + len(data.test[n]) == len(frames[n])
        assert abs(len(data.test[n]) / len(frames[n]) - 0.2) < 0.01
        assert data.y[n][data.test[n]].mean() == pytest.approx(0.5, abs=0.01)
    # whole facts are held out: no city is on both sides, in either polarity
    keys = {n: ds.fact_keys(frames[n]) for n in ("cities", "neg_cities")}
    seen = set(keys["cities"][data.train["cities"]]) | set(keys["neg_cities"][data.train["neg_cities"]])
    held = set(keys["cities"][data.test["cities"]]) | set(keys["neg_cities"][data.test["neg_cities"]])
    assert not seen & held and set(keys["cities"][data.test["cities"]]) == set(keys["neg_cities"][data.test["neg_cities"]])
    rows, partner_rows, _ = data.pairs["cities"]
    assert (np.isin(rows, data.test["cities"]) == np.isin(partner_rows, data.test["neg_cities"])).all()
    X, y = data.train_set("cities+neg_cities")
    assert len(X) == len(data.train["cities"]) + len(data.train["neg_cities"]) == len(y)
    pos, neg, yy = data.ccs_train_set("cities")
    assert pos.shape == neg.shape and len(yy) == len(data.train["cities"])
    assert data.ccs_train_set("cities_cities_conj") is None
    assert data.train_sets(["cities_cities_conj"], probe="ccs") == {"cities_cities_conj": None}


def test_probe_study_runs_the_protocol_once(frames, tiny_bridges, isolated_root):
    """On a tiny model: the study's matrices are the protocol's, its directions unit vectors, its
    causal sweep in units of the residual norm; given the same activations it repeats itself."""
    small = {n: f.iloc[:120].reset_index(drop=True) for n, f in frames.items()}
    model = tiny_bridges["neox"]
    study = truth.probe_study(model, small, layer=1, alphas=[-0.5, 0.5], seed=0, batch_size=64)
    assert study.hook == "blocks.1.hook_resid_post" and study.names == list(small)
    names = truth.training_sets(small)
    assert names[-3:] == ["cities+neg_cities", "sp_en_trans+neg_sp_en_trans", "larger_than+smaller_than"]
    data = truth.truth_probe_data(small, study.acts, seed=0)
    lda = generalization_matrix(PROBES["lda"], data.train_sets(names), data.test_sets())
    pd.testing.assert_frame_equal(study.gen["lda"], lda)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-9 for v in study.directions.values())
    assert sorted(study.sweep["alpha"].unique()) == [-0.5, 0.5]
    row = study.size_row()
    assert row["layer"] == 1 and set(row) >= {"judgement acc", "dim off-diag", "NIE dim", "NIE lr"}
    again = truth.probe_study(model, small, layer=1, alphas=[-0.5, 0.5], seed=0, acts=study.acts)
    assert again.size_row() == row
    table = truth.size_table({"a": row, "b": row})
    assert list(table.index) == ["a", "b"] and table["n_layers"].dtype == int


def test_group_mean_std_interleaves_population_spreads():
    f = pd.DataFrame({"g": ["a", "a", "b"], "x": [1.0, 3.0, 5.0], "y": [0.0, 4.0, 2.0]})
    out = truth.group_mean_std(f, ["g"], ["x", "y"])
    assert list(out.columns) == ["x", "x_std", "y", "y_std"]
    assert out.loc["a"].tolist() == [2.0, 1.0, 2.0, 2.0] and out.loc["b", "x_std"] == 0.0


def test_generalization_spread_is_the_mean_of_single_splits(frames):
    names = ["cities", "neg_cities", "sp_en_trans"]
    small = {n: frames[n].iloc[:200].reset_index(drop=True) for n in names}
    rng = np.random.default_rng(0)
    acts = {n: rng.normal(size=(len(small[n]), 6)) + small[n]["label"].to_numpy()[:, None] * 0.5 for n in names}
    spread = truth.generalization_spread(small, acts, seeds=[0, 1, 2], probes=["dim", "ccs"])
    one = [truth.generalization(truth.truth_probe_data(small, acts, seed=s), truth.training_sets(small), ["dim"])["dim"]
           for s in (0, 1, 2)]
    stack = np.stack([g.to_numpy() for g in one])
    assert np.allclose(spread["mean"]["dim"].to_numpy(), stack.mean(0))
    assert np.allclose(spread["std"]["dim"].to_numpy(), stack.std(0))
    assert (spread["std"]["dim"].to_numpy() > 0).any()  # the splits differ
    # CCS has no column-free cell on sp_en_trans's row (no negated partner loaded): NaN, not a number
    assert spread["mean"]["ccs"].loc["sp_en_trans"].isna().all()
    assert len(spread["claims"]) == 6 and set(spread["claims"]["probe"]) == {"dim", "ccs"}


def test_site_sweep_reset_baseline_and_causal_sites(frames, tiny_model_dirs, tiny_bridges, isolated_root):
    """On a tiny random model: the sweep covers every position x seed x layer x probe x dataset;
    a reset network's probes are scored on the same protocol; the causal sites report one row per
    site x split x direction, and a push at the period of the last block does nothing."""
    from lib.activations import harvest
    from lib.hooks import resid_hooks
    from lib.interventions import statement_end_positions

    model = tiny_bridges["neox"]
    names = ["cities", "neg_cities"]
    small = {n: frames[n].iloc[:80].reset_index(drop=True) for n in names}
    hooks = resid_hooks(model, [0, 1])
    by_position = {"period": {n: harvest(model, f["statement"].tolist(), hooks, cache=False) for n, f in small.items()},
                   "answer": {n: harvest(model, truth.judgement_texts(f), hooks, cache=False) for n, f in small.items()}}
    # the period's activations do not depend on the judgement prefix that follows it
    texts = small["cities"]["statement"].tolist()
    inside = harvest(model, truth.judgement_texts(small["cities"]), hooks, statement_end_positions(model, texts), cache=False)
    assert np.allclose(inside.numpy(hooks[1]), by_position["period"]["cities"].numpy(hooks[1]), atol=1e-5)
    sweep = truth.site_sweep(small, by_position, [0, 1], seeds=[0, 1], probes=["dim"])
    assert len(sweep) == 2 * 2 * 2 * 1 * 2 and set(sweep["position"]) == {"period", "answer"}
    assert sweep["accuracy"].between(0, 1).all()
    causal = truth.causal_sites(model, small, by_position, [("period", 1), ("answer", 1)], seeds=[0, 1], n_statements=10)
    assert len(causal) == 2 * 2 * 3 and set(causal["direction"]) == {"dim", "lr", "random"}
    period_last = causal[causal["position"] == "period"]
    assert np.allclose(period_last[["false_to_true", "true_to_false"]].to_numpy(), 0, atol=1e-6)
    assert not np.allclose(causal[causal["position"] == "answer"]["false_to_true"], 0)
    reset = truth.reset_baseline(str(tiny_model_dirs["neox"]), small, 1, draws=2, max_rows=60, probes=["dim"])
    assert len(reset) == 2 * 2 * 1 * 2 and set(reset["mode"]) == {"reinit", "shuffle"}
    # different draws are different networks
    by_draw = reset.pivot_table(index=["mode", "dataset"], columns="draw", values="accuracy")
    assert reset["accuracy"].between(0, 1).all() and len(by_draw) == 4


def test_notebook_01_runs_on_geometry_of_truth_csvs(tmp_path, isolated_root):
    """``datasets_dir`` pointed at files in the original CSVs' minimal form (``statement`` and ``label`` only,
    the columns every Geometry of Truth file has): notebook 01 reads them instead of generating its own and
    runs through (smoke profile); the object tokens, pairs and negations come from the statements' text."""
    import json

    from lib import run

    generated = ds.generate_truth_datasets(tmp_path / "generated")
    got = tmp_path / "got"
    got.mkdir()
    rows = {}
    for f in sorted(generated.glob("*.csv")):
        frame = pd.read_csv(f)[["statement", "label"]]
        frame.to_csv(got / f.name, index=False)
        rows[f.stem] = len(frame)
    [book] = run.find_notebooks("01")
    params = {**run.PROFILES["smoke"]["01"], "datasets_dir": str(got)}
    status, _, error = run.run_notebook(book, tmp_path / "out" / book.name, params)
    assert status == "ok", error
    results = json.loads((isolated_root / "data" / "results" / "01_truth_probes.json").read_text())
    assert not (isolated_root / "data" / "datasets").exists()  # nothing generated: the folder's files were read
    assert set(results["datasets"]) <= set(rows) and all(0 < n <= rows[k] for k, n in results["datasets"].items())
