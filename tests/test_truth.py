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
