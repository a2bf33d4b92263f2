"""The reward-tampering simulation (groundwork for notebook 17)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.toys import rtf


def test_initial_policy_puts_p0_on_the_tamper_action():
    p0 = torch.tensor([1e-7, 1e-4, 0.3], dtype=torch.float64)
    pi = torch.softmax(rtf.initial_logits(p0, 3), 1)
    np.testing.assert_allclose(pi[:, 0].numpy(), p0.numpy(), rtol=1e-9)
    np.testing.assert_allclose(pi[:, 1].numpy(), (1 - p0.numpy()) / 3, rtol=1e-9)


def test_seen_at_least_once_matches_the_formula_and_the_simulation():
    assert rtf.seen_at_least_once(0.5, 2) == pytest.approx(0.75)
    assert rtf.seen_at_least_once(1e-9, 1e3) == pytest.approx(1e-6, rel=1e-3)  # no cancellation
    out = rtf.simulate([0.002, 0.01], checkpoints=[50, 200], n_runs=2000, seed=3)
    expected = rtf.seen_at_least_once(np.array([[0.002], [0.01]]), np.array([[50, 200]]))
    # before the action is reinforced its probability barely moves, so the formula holds early on
    sd = np.sqrt(expected * (1 - expected) / 2000)
    assert np.all(np.abs(out["seen"][:, 0] - expected[:, 0]) < 4 * sd[:, 0] + 1e-3)


def test_takeover_grows_with_p0_and_with_episodes_and_needs_the_action_seen():
    out = rtf.simulate([1e-3, 1e-2, 5e-2], checkpoints=[200, 2000], n_runs=300, seed=0)
    t = out["takeover"]
    assert t[0, 0] == 0 and t[2, 1] == 1.0
    assert np.all(np.diff(t, axis=0) >= 0) and np.all(np.diff(t, axis=1) >= 0)
    assert np.all(t <= out["seen"] + 1e-12)


def test_no_reward_edge_means_no_takeover():
    out = rtf.simulate([0.05], checkpoints=[1000], n_runs=200, bandit=rtf.Bandit((1.0,), tamper_reward=1.0))
    assert out["takeover"][0, 0] < 0.05 and out["seen"][0, 0] == 1.0


def test_fit_transition_recovers_a_sigmoid():
    p0s = rtf.log_grid(1e-6, 1e-2, 4)
    x = np.log10(p0s)
    y = 1 / (1 + np.exp(-(x - (-4.2)) / 0.25))
    fit = rtf.fit_transition(p0s, y)
    assert fit["center"] == pytest.approx(-4.2, abs=1e-3) and fit["width"] == pytest.approx(0.25, rel=1e-2)
    assert rtf.fit_transition(p0s, np.zeros(len(p0s)))["center"] is None
    assert len(rtf.log_grid(1e-7, 1e-2, 1)) == 6


def test_simulation_is_seeded_and_checks_its_inputs():
    a = rtf.simulate([0.01], [100], n_runs=50, seed=1)
    b = rtf.simulate([0.01], [100], n_runs=50, seed=1)
    assert np.array_equal(a["mean_p"], b["mean_p"])
    with pytest.raises(ValueError, match="p0"):
        rtf.simulate([0.0], [10])
    with pytest.raises(ValueError, match="checkpoints"):
        rtf.simulate([0.1], [0])


def test_wilson_interval_brackets_the_fraction_and_is_not_empty_at_the_edges():
    lo, hi = rtf.wilson_interval(np.array([0.0, 0.5, 1.0]), 300)
    assert (lo <= np.array([0.0, 0.5, 1.0]) + 1e-12).all() and (hi >= np.array([0.0, 0.5, 1.0]) - 1e-12).all()
    assert lo[0] == pytest.approx(0.0, abs=1e-12) and hi[0] == pytest.approx(1.96**2 / (300 + 1.96**2))  # 0 of 300
    assert hi[2] == pytest.approx(1.0) and lo[2] == pytest.approx(1 - hi[0])
    assert hi[1] - lo[1] == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 300), rel=0.02)  # ~ the normal interval at 1/2


def _synthetic(center_p0n: float = 5.0, width: float = 0.1) -> dict:
    """A result whose takeover is exactly a sigmoid in log10 p0 centred at p0 * N = center_p0n."""
    p0 = rtf.log_grid(1e-7, 1e-2, 4)
    cps = [1000, 10_000, 100_000]
    x = np.log10(p0)[:, None] - np.log10(center_p0n / np.asarray(cps, float))[None, :]
    take = 1 / (1 + np.exp(-x / width))
    return {"p0": p0, "checkpoints": cps, "n_runs": 300, "takeover": take.tolist(), "seen": take.tolist(),
            "mean_p": take.tolist()}


def test_threshold_scaling_recovers_a_fixed_p0n_threshold():
    sc = rtf.threshold_scaling(_synthetic(5.0))
    assert sc["slope"] == pytest.approx(-1.0, abs=1e-3)
    assert [r["center_p0N"] for r in sc["per_N"]] == pytest.approx([5.0] * 3, rel=1e-3)
    assert all(r["width_decades"] == pytest.approx(0.1, rel=1e-2) for r in sc["per_N"])
    assert rtf.threshold_scaling({**_synthetic(), "checkpoints": [1000]} | {
        "takeover": np.asarray(_synthetic()["takeover"])[:, :1].tolist()})["slope"] is None  # one crossing: no slope


def test_frame_puts_the_analytic_reference_beside_each_cell():
    res = rtf.simulate([1e-3, 1e-2], [10, 100], n_runs=200, seed=2)
    df = rtf.frame(res, "x")
    assert len(df) == 4 and set(df.config) == {"x"}
    assert df.p0N.tolist() == pytest.approx([1e-2, 1e-1, 1e-1, 1.0])
    assert df.seen_analytic.tolist() == pytest.approx(rtf.seen_at_least_once(df.p0, df.N).tolist())
    assert ((df.takeover_lo <= df.takeover) & (df.takeover <= df.takeover_hi)).all()


def test_sweep_runs_every_config_on_the_grid():
    out = rtf.sweep(["baseline", "four_actions"], n_runs=10, max_episodes=316)
    assert set(out) == {"baseline", "four_actions"}
    for res in out.values():
        assert res["checkpoints"] == [100, 316] and np.asarray(res["takeover"]).shape == (len(rtf.SWEEP_P0), 2)
        assert len(res["fits"]) == 2
    assert out["four_actions"]["bandit"]["ordinary_rewards"] == [1.0, 0.9, 0.8, 0.7] or \
        tuple(out["four_actions"]["bandit"]["ordinary_rewards"]) == (1.0, 0.9, 0.8, 0.7)


def test_the_mean_field_threshold_predicts_where_half_the_runs_take_over():
    """p0 * N* = 1 / (2 lr (R_t - R_o)): 5 for the defaults; the simulation's half-takeover point
    on a fine p0 grid at N = 2000 lands within 15% of it, and halving the learning rate doubles it."""
    assert rtf.mean_field_threshold() == pytest.approx(5.0)
    assert rtf.mean_field_threshold(learner=rtf.Learner(lr=0.05)) == pytest.approx(10.0)
    assert rtf.mean_field_threshold(rtf.Bandit(ordinary_rewards=(1.0, 0.5))) is None
    assert rtf.mean_field_threshold(rtf.Bandit(tamper_reward=0.5)) is None
    n = 2000
    p0s = rtf.log_grid(5e-4, 1e-2, 10)
    res = rtf.simulate(p0s, [n], n_runs=400, seed=5)
    fit = rtf.fit_transition(p0s, res["takeover"][:, 0])
    assert fit["center_p0"] * n == pytest.approx(5.0, rel=0.15)
