"""lib.rerouting: the RR losses and schedule, the split, the detectors' metrics, the parameter-matched
MLP probe, and RR / LoRA + head training on a small toy model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib import rerouting as rr


def test_rr_coefficients_follow_the_circuit_breakers_schedule():
    T, alpha = 100, 4.0
    assert rr.rr_coefficients(0, T, alpha) == (4.0, 0.0)
    assert rr.rr_coefficients(T, T, alpha) == pytest.approx((2.0, 2.0))  # they meet at the end
    c = np.array([rr.rr_coefficients(t, T, alpha) for t in range(T + 1)])
    assert np.allclose(c.sum(1), alpha)  # c_rr + c_retain = alpha throughout
    assert np.allclose(np.diff(c[:, 0]), -alpha / (2 * T)) and np.allclose(np.diff(c[:, 1]), alpha / (2 * T))


def test_rerouting_and_retain_losses_on_known_vectors():
    h0 = torch.tensor([[[[3.0, 4.0], [1.0, 0.0]]]])  # (L=1, B=1, T=2, d=2)
    assert rr.rerouting_loss(h0, h0) == pytest.approx(1.0)  # unchanged: cos 1
    assert rr.rerouting_loss(-h0, h0) == pytest.approx(0.0)  # opposite: cos -1, ReLU clips it to 0
    orth = torch.tensor([[[[-4.0, 3.0], [0.0, 2.0]]]])
    assert rr.rerouting_loss(orth, h0) == pytest.approx(0.0, abs=1e-7)
    half = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]]]])  # first position unchanged, second orthogonal
    assert rr.rerouting_loss(half, h0) == pytest.approx(0.5)
    mask = torch.tensor([[True, False]])
    assert rr.rerouting_loss(half, h0, mask) == pytest.approx(1.0)  # the masked position does not count
    moved = h0 + torch.tensor([[[[0.0, 0.0], [3.0, 4.0]]]])  # second position moved by a vector of norm 5
    assert rr.retain_loss(moved, h0) == pytest.approx(2.5)
    assert rr.retain_loss(moved, h0, torch.tensor([[False, True]])) == pytest.approx(5.0)


def test_last_picks_each_rows_last_real_token():
    from lib.softprompts import SoftBatch

    mask = torch.tensor([[True, True, True], [True, True, False]])
    batch = SoftBatch(torch.zeros(2, 3, dtype=torch.long), mask, torch.zeros_like(mask), 1, 0)
    h = torch.arange(2 * 3, dtype=torch.float).reshape(1, 2, 3, 1).expand(2, 2, 3, 1)  # (L, B, T, d): value 3b + t
    assert rr.last(h, batch)[1, :, 0].tolist() == [2.0, 4.0]
    assert rr.request_mask(batch).tolist() == [[False, True, True], [False, True, False]]


def test_auroc_matches_sklearn_and_tpr_at_fpr_on_hand_made_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y + np.round(rng.normal(size=200))  # with ties
    assert rr.auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    neg = np.arange(100.0)  # 100 negatives 0..99: at 1% FPR one negative (99) may score above the threshold (98)
    pos = np.array([99.5, 98.5, 98.0, 50.0])
    scores, labels = np.concatenate([neg, pos]), np.r_[np.zeros(100), np.ones(4)]
    assert rr.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.5)  # 99.5 and 98.5 flagged; 98.0 is not above
    assert rr.tpr_at_fpr(scores, labels, 0.0) == pytest.approx(0.25)  # only above every negative
    assert rr.tpr_at_fpr(scores, labels, 0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both classes"):
        rr.auroc([1.0, 2.0], [1, 1])


def test_split_holds_out_templates_and_cities_and_labels_by_country():
    from lib.world import facts

    split = rr.make_split(0)
    country = {c.name: c.country for c in facts.cities()}
    seen, held = set(split["templates"].seen), set(split["templates"].held)
    assert len(seen) == 5 and len(held) == 3 and not seen & held
    train_cities = set(split["train"].cities)
    assert set(split["test_id"].cities) <= train_cities
    for name in ("val", "test_entities", "test_heldout"):
        assert not set(split[name].cities) & train_cities
    assert set(split["test_entities"].cities) == set(split["test_heldout"].cities)
    assert {t for n in ("train", "val", "test_id", "test_entities") for t in split[n].templates} <= seen
    assert set(split["test_heldout"].templates) <= held
    assert not {(c, t) for c, t in zip(split["train"].cities, split["train"].templates)} & \
        {(c, t) for c, t in zip(split["test_id"].cities, split["test_id"].templates)}
    for rows in (split["train"], split["test_heldout"]):
        assert [int(country[c] in rr.HARMFUL_COUNTRIES) for c in rows.cities] == rows.labels.tolist()
        assert all(p.startswith("Q: ") and p.endswith("\nA:" + rr.ANSWER_PREFIX) for p in rows.prompts)
        assert all(p == r + rr.ANSWER_PREFIX for p, r in zip(rows.prompts, rows.requests))
    assert 0.15 < split["train"].labels.mean() < 0.3
    again = rr.make_split(0)
    assert again["train"].prompts == split["train"].prompts
    assert rr.make_split(1)["train"].prompts != split["train"].prompts
    with pytest.raises(ValueError, match="no cities of"):
        rr.make_split(0, harmful_countries=["Atlantis"])


@pytest.fixture(scope="module")
def toy():
    """toy-2l as a plain Hugging Face model, a bridge of it, and a small harmful / harmless split."""
    hf, tok = rr.load_hf("toy-2l", device="cpu")
    split = rr.make_split(0)
    return hf, tok, rr.as_bridge(hf, "toy-2l", "toy-2l"), split


def test_lora_wrap_adapts_only_the_blocks_asked_for(toy):
    import copy

    from lib.finetune import lora_wrap

    hf, *_ = toy
    wrapped = lora_wrap(copy.deepcopy(hf), rank=4, alpha=8, layers=[0])
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all(".layers.0." in n for n in names)
    d = hf.config.hidden_size  # q/k/v (d -> 3d), o (d -> d), MLP (d -> 4d, 4d -> d): rank x (in + out) each
    n_trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert n_trainable == 4 * (4 * d + 2 * d + 5 * d + 5 * d)


def test_training_reads_the_same_residual_as_the_scores(toy):
    from lib.softprompts import make_batch

    hf, tok, bridge, split = toy
    prompts = split["val"].prompts[:5]
    batch = make_batch(bridge, prompts, None, 0, True)
    with torch.no_grad():
        h = rr.last(rr._hidden(hf, batch, [0]), batch)[0]
    assert torch.allclose(h, rr.last_acts(bridge, prompts, [0])[0], atol=1e-4)


def test_head_training_lowers_its_classification_loss_and_rr_reroutes(toy):
    hf, tok, bridge, split = toy
    bad, good = split["train"].where(1)[:64], split["train"].where(0)[:64]
    cfg = rr.DefenseConfig(layers=(0,), rank=2, steps=60, batch_size=8, lr=1e-2)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    head = rr.train_defense(hf, tok, bad, good, "head", cfg, seed=0)
    main = head.log["main"]
    assert np.mean(main[-5:]) < 0.7 * np.mean(main[:5])
    assert head.params == 2 * 16 * hf.config.hidden_size + hf.config.hidden_size + 1  # adapters of block 0 + head
    rer = rr.train_defense(hf, tok, bad, good, "rr", cfg, seed=0)
    assert rer.log["main"][0] > 0.99 and np.mean(rer.log["main"][-5:]) < 0.5  # cos(h_rr, h_orig) on harmful rows falls
    assert rer.params == head.params - hf.config.hidden_size - 1
    moved = rr.as_bridge(rer.model, "toy-2l", "toy-2l+rr")
    score = rr.rerouting_scores(bridge, moved, bad[:16] + good[:16], [0])
    # the harmful training rows are rerouted (1 - cos above 0.5: the cosine with the original fell below 0.5);
    # with one target block on toy-2l the retain loss does not hold harmless rows apart (both near 1.03 natively,
    # order flipping under other CPU kernels), so detection is measured in the notebook, on toy-4l, not here
    assert float(score[:16].mean()) > 0.5
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())  # the model it started from is untouched
    assert not any(p.requires_grad for p in rer.model.parameters())
    with pytest.raises(ValueError, match="below the last block"):
        rr.train_defense(hf, tok, bad, good, "rr", rr.DefenseConfig(layers=(1,)), seed=0)


def test_parameter_matched_mlp_probe(toy):
    hf, *_ = toy
    d = 128
    for lora in (24_576, 49_152, 3_000):
        probe = rr.MLPProbe(d, rr.mlp_hidden_for(lora, d))
        assert abs(probe.n_params - lora) / lora < 0.02
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR-like: no linear probe separates it
    probe = rr.MLPProbe(8, 32, seed=0)
    losses = probe.fit(X, y, steps=300, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0] and rr.auroc(probe.decision_function(X), y) > 0.95


def test_soft_prompt_attack_reads_the_detectors_scores_and_lowers_them(toy):
    """lib.rerouting_attack: at k = 0 the attack's differentiable scores are the notebook's scores (probe
    logit through harvest, RR's 1 - cos, teacher-forced answers); a k = 1 prompt trained against a
    probe lowers its logit on held-out harmful rows and the AUROC (attacked harmful vs clean harmless)."""
    import copy

    from lib import rerouting_attack as ra
    from lib.probes import LogisticProbe
    from lib.softprompts import make_batch
    from lib.world import facts

    hf, tok, bridge, split = toy
    train, held = split["train"], split["test_entities"]
    X = rr.last_acts(bridge, train.prompts, [0])[0]
    probe = LogisticProbe(fit_bias=True, standardize=True).fit(X, train.labels)
    det = ra.readout_detector(bridge, 0, ra.linear_readout(probe.direction, probe.bias))
    prompts = held.prompts[:96]
    clean = probe.decision_function(rr.last_acts(bridge, prompts, [0])[0])
    assert np.allclose(ra.scores(det, None, prompts), clean, atol=1e-4)

    bad, good = held.where(1)[:48], held.where(0)[:96]
    prompt, losses = ra.train_attack(det, train.where(1)[:64], 1, steps=25, lr=0.1, batch_size=16, seed=0)
    assert prompt.k == 1 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    before, after = ra.scores(det, None, bad), ra.scores(det, prompt, bad)
    assert after.mean() < before.mean() - 1.0  # the attacked rows' logits fall
    s0, y = ra.attacked_scores(det, None, bad, good)
    s1, _ = ra.attacked_scores(det, prompt, bad, good)
    assert np.array_equal(s0[len(bad):], s1[len(bad):])  # harmless rows are scored without the prompt
    assert rr.auroc(s1, y) < rr.auroc(s0, y) - 0.1

    moved = copy.deepcopy(hf)  # a stand-in for a rerouted model: perturbed weights
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
    other = rr.as_bridge(moved, "toy-2l", "toy-2l+noise")
    rer = ra.rerouting_detector(bridge, other, [0])
    expected = rr.rerouting_scores(bridge, other, prompts[:32], [0])
    assert np.allclose(ra.scores(rer, None, prompts[:32]), expected, atol=1e-5)
    p_rr, _ = ra.train_attack(rer, train.where(1)[:64], 1, steps=15, lr=0.1, batch_size=16, seed=0)
    assert ra.scores(rer, p_rr, bad).mean() < ra.scores(rer, None, bad).mean()
    cities = facts.cities()[:64]  # the base model recalls countries: a mix of hits and misses
    reqs, answers = [f"The city of {c.name} is in" for c in cities], [f" {c.country}." for c in cities]
    hit = ra.answered_with(bridge, None, reqs, answers)
    assert np.array_equal(hit, rr.answered(hf, tok, reqs, answers)) and 0 < hit.mean() < 1
    assert ra.answered_with(bridge, prompt, reqs, answers).shape == (64,)
    with pytest.raises(ValueError, match="k=0"):
        det(prompt.embeddings, make_batch(bridge, bad[:2], None, 0))
