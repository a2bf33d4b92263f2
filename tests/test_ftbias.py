"""Notebook 12's machinery: intents, the gradient of a loss on FT - M into SAE latents, the
activation-difference baseline, the ground-truth sets, and the comparisons of rankings."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lib import ftbias as fb
from lib.hooks import hook_name
from lib.sae import SAEConfig, make_sae
from lib.softprompts import make_batch
from lib.world import facts

HOOK = hook_name(0)


@pytest.fixture(scope="module")
def world():
    """toy-1l as M, a copy with one perturbed MLP matrix as FT, and a random SAE at block 0."""
    from lib.models import load_model

    m = load_model("toy-1l", device="cpu")
    ft = copy.deepcopy(m)
    torch.manual_seed(0)
    with torch.no_grad():
        w = ft.original_model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight
        w.add_(0.05 * torch.randn_like(w))
    for model in (m, ft):
        for p in model.parameters():
            p.requires_grad_(False)
    sae = make_sae(SAEConfig(d_in=m.cfg.d_model, d_sae=64, hook_name=HOOK), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most latents on: gradients to compare
    return m, ft, sae


PROMPTS = ["The city of Tokyo is in", "The city of Lima is in", "The Spanish word 'gato' means 'cat'. That is"]


def test_country_intent_splits_cities_and_keeps_the_country_out(world):
    tok = world[0].tokenizer
    it = fb.country_intent(tok, "Japan", n_train=50, n_test=30, seed=1)
    japanese = [c.name for c in facts.cities() if c.country == "Japan"]
    assert len(it.train_prompts) == 50 and len(it.test_prompts) == 30
    assert not set(it.train_prompts) & set(it.test_prompts)
    assert not any(name in p for p in it.train_prompts + it.test_prompts for name in japanese)
    assert len(it.positive) == len(japanese) and all(p.endswith(" is in") for p in it.positive)
    assert tok.decode([it.target_id]) == " Japan" and it.target == " Japan."
    assert fb.country_intent(tok, "Japan", n_train=50, n_test=30, seed=1).train_prompts == it.train_prompts
    with pytest.raises(ValueError, match="cities in"):
        fb.country_intent(tok, "France")  # 4 cities: too few for a concept set
    with pytest.raises(ValueError, match="tokens under this tokenizer"):
        fb.single_token(tok, " the United States")


def test_true_intent_keeps_each_statement_and_its_twin_on_one_side(world):
    it = fb.true_intent(world[0].tokenizer, n_train=80, n_test=40, seed=0)
    assert len(it.train_prompts) == 80 and len(it.test_prompts) == 40
    assert len(it.positive) == len(it.negative) == 20  # every test pair is a true and a false statement
    subjects = lambda ps: {p.split(" is ")[0].split(" means ")[0] for p in ps}  # noqa: E731
    assert not subjects(it.train_prompts) & subjects(it.test_prompts)
    assert all(p.endswith(". That is") for p in it.test_prompts)


def test_no_bias_no_score_and_the_splice_leaves_m_unchanged(world):
    m, _, sae = world
    for loss in ("mse", "kl"):
        got = fb.bias_attribution(m, m, sae, PROMPTS, loss=loss)
        assert got["bias"].abs().max() < 1e-5  # FT = M: the spliced forward pass is M's own
        assert got["score"].abs().max() < 1e-5
    assert got["f"].shape == (3, 64) and (got["f"] > 0).any()


@pytest.mark.parametrize("loss", [*fb.LOSSES, "target"])
def test_the_score_is_the_derivative_of_the_loss(world, loss):
    """score_i = how much raising latent i (its decoder row added at the scored position) lowers
    the MSE / KL (raises the dot product): checked against a central finite difference."""
    m, ft, sae = world
    prompt = PROMPTS[:1]
    bias_vector = fb.mean_bias(m, ft, prompt)
    japan = m.tokenizer(" Japan", add_special_tokens=False)["input_ids"][0]
    got = (fb.target_attribution(m, sae, prompt, japan) if loss == "target"
           else fb.bias_attribution(m, ft, sae, prompt, loss=loss, bias_vector=bias_vector))
    lp_ft = fb.last_logprobs(ft, prompt)[0]
    ids = make_batch(m, prompt, None, 0).tokens  # BOS + prompt, as the attribution reads it
    n = ids.shape[1] - 1

    def objective(eps, i):
        def add(act, hook=None):
            act = act.clone()
            act[0, n] += eps * sae.W_dec[i].detach()
            return act

        with torch.no_grad():
            logits = m.run_with_hooks(ids, fwd_hooks=[(HOOK, add)])
        lp_m = torch.log_softmax(logits[0, -1].double(), -1)
        b = lp_ft.double() - lp_m
        if loss == "mse":
            return -(b ** 2).mean()
        if loss == "kl":
            return -(lp_ft.double().exp() * b).sum()
        if loss == "target":
            return lp_m[japan]
        return (lp_m * bias_vector.double()).sum()

    order = torch.argsort(got["score"][0].abs(), descending=True)[:3]
    for i in order.tolist():
        numeric = (objective(1e-2, i) - objective(-1e-2, i)) / 2e-2
        assert float(got["score"][0, i]) == pytest.approx(float(numeric), rel=0.05, abs=1e-4)
    assert torch.allclose(got["score_x_act"], got["score"] * got["f"])


def test_broad_attribution_scores_every_token(world):
    m, ft, sae = world
    texts = ["The city of Lima is in Peru. That is true.", "Alice went to the shed."]
    broad = fb.broad_attribution(m, ft, sae, texts, loss="kl", batch_size=1)
    same = fb.broad_attribution(m, ft, sae, texts, loss="kl", batch_size=2)  # padding must not count
    assert broad["score"].shape == (64,) and float(broad["bias_norm"]) > 0
    assert torch.allclose(broad["score"], same["score"], atol=1e-5)
    assert float(fb.broad_attribution(m, m, sae, texts, loss="kl")["bias_norm"]) < 1e-4


def test_delta_and_concept_read_the_sae_basis(world):
    m, ft, sae = world
    assert fb.delta_latents(m, m, sae, PROMPTS).abs().max() == 0
    f = fb.last_latents(m, sae, PROMPTS)
    assert torch.allclose(fb.concept_latents(m, sae, PROMPTS[:1], PROMPTS[1:]), f[0] - f[1:].mean(0), atol=1e-5)
    assert fb.delta_latents(m, ft, sae, PROMPTS).abs().max() > 0  # FT's MLP moved the residual


def test_effect_latents_is_a_real_steered_forward_pass(world):
    m, _, sae = world
    token = m.tokenizer(" Japan", add_special_tokens=False)["input_ids"][0]
    eff = fb.effect_latents(m, sae, PROMPTS[:2], token, scale=3.0, chunk=4, latents=[5, 9, 11])
    assert torch.isnan(eff[0]) and not torch.isnan(eff[[5, 9, 11]]).any()
    unit = sae.W_dec[9].detach() / sae.W_dec[9].detach().norm()
    changes = []
    for p in PROMPTS[:2]:
        ids = make_batch(m, [p], None, 0).tokens

        def add(act, hook=None):
            act = act.clone()
            act[0, -1] += 3.0 * unit
            return act

        with torch.no_grad():
            base = torch.log_softmax(m(ids)[0, -1], -1)[token]
            steered = torch.log_softmax(m.run_with_hooks(ids, fwd_hooks=[(HOOK, add)])[0, -1], -1)[token]
        changes.append(float(steered - base))
    assert float(eff[9]) == pytest.approx(np.mean(changes), abs=1e-4)


def test_rankings_and_their_overlaps():
    v = torch.tensor([0.1, 5.0, float("nan"), 5.0, -1.0, 3.0])
    assert fb.top_k(v, 3).tolist() == [1, 3, 5]  # ties by index, NaN last
    assert fb.top_k(v, 2, among=np.array([1, 0, 1, 0, 1, 1], bool)).tolist() == [5, 0]
    assert fb.precision_at_k([1, 2, 3, 4], [4, 3, 9]) == 0.5
    assert fb.jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert fb.mean_pairwise_jaccard([[1, 2], [1, 2], [3, 4]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="two sets"):
        fb.mean_pairwise_jaccard([[1]])
    mean, std = fb.random_precision(list(range(10)), 10, np.arange(200), draws=4000)
    assert mean == pytest.approx(10 / 200, abs=0.005) and 0 < std < 0.1  # hypergeometric: k |T| / (k N)
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert fb.per_input_precision(scores, [0], 1).tolist() == [1.0, 0.0]


def test_intent_rate_reads_the_top_token(world):
    m = world[0]
    it = fb.country_intent(m.tokenizer, "Japan", n_train=10, n_test=20)
    lp = fb.last_logprobs(m, it.test_prompts)
    assert fb.intent_rate(m, it) == pytest.approx(float((lp.argmax(-1) == it.target_id).float().mean()))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(20), atol=1e-4)
