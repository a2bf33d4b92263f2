"""The retrodictor's tools (lib.world.retro): reversed rows, scoring by token ids, city retrodiction
and its ceiling, prefixes sampled backwards, steering at one column, activation matching."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lib import paths
from lib.hooks import hook_name
from lib.models import load_model
from lib.world import facts, retro
from lib.world.recall import _encode


@pytest.fixture(scope="module")
def toy():
    return load_model("toy-1l", device="cpu")


@pytest.fixture(scope="module")
def rev():
    return load_model("toy-2l-rev", device="cpu")


def test_reverse_rows_keeps_bos_and_is_an_involution():
    rows = torch.tensor([[0, 5, 6, 7], [0, 9, 8, 3]])
    r = retro.reverse_rows(rows)
    assert r.tolist() == [[0, 7, 6, 5], [0, 3, 8, 9]]
    assert torch.equal(retro.reverse_rows(r), rows)


def test_continuation_logprobs_sum_only_the_continuation(toy):
    tok = toy.tokenizer
    ctx, cont = _encode(tok, "The city of Paris is in"), _encode(tok, " France.")
    x = torch.tensor([[tok.bos_token_id, *ctx, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(toy.original_model(x).logits[0].float(), -1)
    manual = sum(float(logp[len(ctx) + i, t]) for i, t in enumerate(cont))
    got = retro.continuation_logprobs(toy, [ctx, ctx[:3]], [cont, cont])  # rows of two lengths, padded together
    assert got[0] == pytest.approx(manual, abs=1e-4)
    x2 = torch.tensor([[tok.bos_token_id, *ctx[:3], *cont]])
    with torch.no_grad():
        lp2 = torch.log_softmax(toy.original_model(x2).logits[0].float(), -1)
    assert got[1] == pytest.approx(sum(float(lp2[3 + i, t]) for i, t in enumerate(cont)), abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_continuation_logprobs_on_every_architecture(arch, tiny_bridges):
    """Only the continuation's positions are unembedded (base model + output embedding): the same
    numbers as the full logits, on each architecture's tiny model."""
    model = tiny_bridges[arch]
    hf = model.original_model
    ctxs, conts = [[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15], [16]]
    got = retro.continuation_logprobs(model, ctxs, conts, batch_size=2)
    for (c, x), g in zip(zip(ctxs, conts), got):
        row = torch.tensor([[hf.config.bos_token_id, *c, *x]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(row).logits[0].float(), -1)
        assert g == pytest.approx(sum(float(logp[len(c) + i, t]) for i, t in enumerate(x)), abs=1e-4)


def test_row_nll_matches_the_training_loss(toy):
    from lib.world.train import lm_loss

    rows = torch.tensor([[0, *_encode(toy.tokenizer, "The city of Paris is in France. That is true.")]])
    with torch.no_grad():
        ref = float(lm_loss(toy.original_model, rows))
    assert float(retro.row_nll(toy, rows).mean()) == pytest.approx(ref, abs=1e-5)


def test_city_retrodiction_reports_a_ceiling_it_cannot_beat(toy):
    """Only the country is in the context, so at most one city per country can be right: accuracy
    never exceeds the ceiling (countries / cities), whatever the model."""
    r = retro.city_retrodiction(toy, toy.tokenizer, max_cities=60)
    cs = facts.cities()[:60]
    assert r["n_cities"] == 60 and r["n_countries"] == len({c.country for c in cs})
    assert r["ceiling"] == pytest.approx(r["n_countries"] / 60)
    assert 0 <= r["accuracy"] <= r["ceiling"] + 1e-12
    for k in ("in_country", "mass_in_country", "mass_chance", "mass_wrong_country"):
        assert 0 <= r[k] <= 1
    assert r["nll_true_city"] >= 0 and len(r["per_city"]) == 60


def test_the_built_retrodictor_retrodicts_cities_and_reads_backwards(rev, toy):
    info = json.loads((paths.models_dir() / "toy-2l-rev" / "provenance.json").read_text())
    assert info["reversed"] and info["forward_twin"] == "toy-2l" and "judgement_auroc" not in info
    r = retro.city_retrodiction(rev, rev.tokenizer, max_cities=150)
    # it knows where the cities are: its top city lies in the named country, and the named country's
    # cities get several times their share (false statements in the corpus keep it well below 1)
    assert r["in_country"] > 0.9 and r["accuracy"] == pytest.approx(r["ceiling"], abs=0.02)
    assert r["mass_in_country"] > 3 * max(r["mass_chance"], r["mass_wrong_country"])
    # a forward reader of reversed text knows nothing of the kind
    f = retro.city_retrodiction(toy, toy.tokenizer, max_cities=150)
    assert f["mass_in_country"] < r["mass_in_country"] / 2


def test_sampled_prefixes_come_in_reading_order(rev):
    """The retrodictor writes backwards: its sampled tokens, reversed, read forward and continue
    into the chunk (greedy, so the check is exact)."""
    tok = rev.tokenizer
    text = _encode(tok, " is in France.")
    pre = retro.sample_prefixes(rev, tok, text, n=3, n_tokens=5, temperature=0.0)
    assert len(pre) == 3 and all(len(p) == 5 for p in pre) and pre[0] == pre[1]
    # the first sampled token (the one right before the chunk) is the retrodictor's greedy choice
    row = torch.tensor([[tok.bos_token_id, *text[::-1]]])
    assert pre[0][-1] == int(rev.original_model(row).logits[0, -1].argmax())
    again = retro.sample_prefixes(rev, tok, text, n=4, n_tokens=5, seed=3)
    assert again == retro.sample_prefixes(rev, tok, text, n=4, n_tokens=5, seed=3)


def test_steering_one_column_leaves_the_earlier_positions_alone(toy):
    ids = _encode(toy.tokenizer, "The city of Lyon is in")
    hook, read = hook_name(0, "resid_pre"), hook_name(0)
    v = torch.randn(toy.cfg.d_model)
    plain = retro.source_activations(toy, ids, read)
    col = len(ids)  # BOS + ids: the last token
    steered = retro.source_activations(toy, ids, read, hook, v, 3.0, column=col)
    assert torch.allclose(steered[: col - 1], plain[: col - 1], atol=1e-5)
    assert not torch.allclose(steered[col - 1], plain[col - 1], atol=1e-2)
    every = retro.source_activations(toy, ids, read, hook, v, 3.0)
    assert not torch.allclose(every[0], plain[0], atol=1e-2)


def test_activation_matching_finds_the_true_prefix(toy):
    tok = toy.tokenizer
    read = hook_name(0)
    prefix, text = _encode(tok, " The city of Paris is in"), _encode(tok, " France. That is true.")
    target = retro.source_activations(toy, prefix + text, read)[len(prefix):]
    others = retro.random_prefixes(len(tok), 6, len(prefix), seed=1)
    ranked = retro.rank_candidates(toy, tok, text, {"random": others, "true": [prefix], "short": [prefix[-2:]]},
                                   read, target)
    assert ranked.source[0] == "true" and ranked.mse[0] == pytest.approx(0.0, abs=1e-8)
    assert len(ranked) == 8 and (ranked.mse.diff().dropna() >= 0).all()
    empty = retro.prefix_activation_mse(toy, text, [[]], read, target)[0]
    assert ranked.ratio.iloc[-1] == pytest.approx(ranked.mse.iloc[-1] / empty)
    # the pair form reads what a block writes: resid_post - resid_pre
    pair = (hook_name(0), hook_name(0, "resid_pre"))
    acts = retro.source_activations(toy, text, pair)
    assert torch.allclose(acts, retro.source_activations(toy, text, hook_name(0))
                          - retro.source_activations(toy, text, hook_name(0, "resid_pre")), atol=1e-5)


def test_country_direction_moves_the_answer(toy):
    hook = hook_name(0)  # after the block: at resid_pre " in" is one embedding for every city
    v = retro.country_direction(toy, "Japan", hook)
    ids = _encode(toy.tokenizer, "The city of Lyon is in")
    assert toy.tokenizer.decode(retro.steered_greedy(toy, ids, 1)) == " France"
    said = toy.tokenizer.decode(retro.steered_greedy(toy, ids, 1, hook, v, 6.0, column=len(ids)))
    assert said == " Japan"
    with pytest.raises(ValueError, match="no known city"):
        retro.country_direction(toy, "Atlantis", hook)


def test_build_trains_a_reversed_model_with_its_own_logs(tmp_path, isolated_root):
    """A few steps of the real build into a scratch folder: reversed rows, the retrodiction probe
    in the log, no forward judgement in the provenance."""
    assert retro.main(["--steps", "3", "--n-docs", "16", "--out", str(tmp_path), "--probe-every", "3",
                       "--probe-cities", "20", "--record-cities", "20"]) == 0
    out = tmp_path / "toy-2l-rev"
    info = json.loads((out / "provenance.json").read_text())
    log = json.loads((out / "training_log.json").read_text())
    assert info["reversed"] and info["corpus"]["reversed"] and "fact_recall" not in info
    assert set(info["city_retrodiction"]) >= {"accuracy", "ceiling", "mass_in_country"}
    assert log["probe"][-1]["step"] == 3 and "ceiling" in log["probe"][-1]
