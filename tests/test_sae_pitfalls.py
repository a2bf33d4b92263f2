"""lib.sae.pitfalls: each measurement agrees with the plain evaluation where it should."""
from __future__ import annotations

import pytest
import torch

from lib.sae import pitfalls
from lib.sae.base import SAEConfig, make_sae
from lib.activations import pad, tokenize
from lib.sae.metrics import collect, evaluate
from lib.sae.trainer import TrainConfig
from tests.tiny_models import TEXT

HOOK = "blocks.0.hook_resid_post"
DOCS = [" ".join(TEXT[i:] + TEXT[:i]) for i in range(4)] * 2


def _sae(seed=0):
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name=HOOK), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)
    return sae


def test_variable_length_texts_are_sentence_prefixes():
    texts = pitfalls.variable_length_texts(DOCS, seed=0, max_sentences=3)
    assert len(texts) == len(DOCS)
    for t, d in zip(texts, DOCS):
        assert d.startswith(t.rstrip(".")) and 1 <= t.count(".") + t.count("?") <= 6
    assert len({len(t) for t in texts}) > 1


def test_reconstruction_pairs(tiny_bridges):
    stats = collect(_sae(), tiny_bridges["neox"], DOCS)
    pairs = pitfalls.reconstruction_pairs(stats)
    assert pairs["a_mse_mean_vs_sum"]["ratio"] == pytest.approx(32)
    assert pairs["b_variance_without_mean"]["right"] == pytest.approx(stats.metrics()["var_explained"])


def test_padding_in_ce_right_matches_evaluate(tiny_bridges):
    model = tiny_bridges["neox"]
    batch = tokenize(model, pitfalls.variable_length_texts(DOCS, seed=1), 64, pad_to=64)
    out = pitfalls.padding_in_ce(_sae(), model, batch)
    ours = evaluate(_sae(), model, batch)
    assert out["right"]["ce_spliced"] == pytest.approx(ours["ce_spliced"])
    assert out["right"]["loss_recovered"] == pytest.approx(ours["loss_recovered"])
    assert out["wrong"]["n_ce_tokens"] == len(batch) * 63 and 0.2 < out["pad_fraction"] < 1


def test_padding_in_ce_with_eos_as_pad(tiny_bridges):
    """Re-padded with EOS, the counted (right) CE is unchanged (right padding: no real token sees a
    pad), and the wrong clean CE is the token-weighted mix of the real and the pad targets' CE."""
    model = tiny_bridges["neox"]
    batch = tokenize(model, pitfalls.variable_length_texts(DOCS, seed=1), 64, pad_to=64)
    eos = model.tokenizer.eos_token_id
    assert eos != model.tokenizer.pad_token_id
    outs = {p: pitfalls.padding_in_ce(_sae(), model, b) for p, b in
            (("pad", batch), ("eos", pad(batch.sequences(), eos, "right", width=64)))}
    assert outs["pad"]["pad_id"] == model.tokenizer.pad_token_id and outs["eos"]["pad_id"] == eos
    assert outs["eos"]["right"]["ce_clean"] == pytest.approx(outs["pad"]["right"]["ce_clean"], rel=1e-6)
    for out in outs.values():
        f = out["pad_fraction"]
        mix = (1 - f) * out["right"]["ce_clean"] + f * out["pad_target_ce"]
        assert out["wrong"]["ce_clean"] == pytest.approx(mix, rel=1e-6)
    assert outs["eos"]["pad_target_ce"] != pytest.approx(outs["pad"]["pad_target_ce"])


def test_context_length_rows_split_by_position(tiny_bridges):
    model = tiny_bridges["gpt2"]
    batch = tokenize(model, DOCS, 48)
    rows = pitfalls.context_length_rows(_sae(), model, batch, split=16, label="tiny")
    assert [r["positions"] for r in rows] == ["< 16", ">= 16"]
    short = evaluate(_sae(), model, tokenize(model, DOCS, 16))
    assert rows[0]["mse"] == pytest.approx(short["mse"], rel=1e-5)  # causal: early positions are unchanged


def test_splice_identity_right_is_exact(tiny_bridges):
    out = pitfalls.splice_identity(tiny_bridges["neox"], HOOK, DOCS, context_size=32)
    assert out["right"] == out["ce_clean"] and out["right_max_abs_logit_diff"] == 0.0
    assert out["wrong"] != out["ce_clean"]


def test_scale_dependence_rows():
    x = torch.randn(600, 8) + 1.0
    cfg = SAEConfig(d_in=8, d_sae=16)
    tcs = {"var": TrainConfig(total_tokens=640, batch_size=64, recon="mse_batch_var", sparsity_coefficient=0.01)}
    rows = pitfalls.scale_dependence(x, cfg, tcs, scales=(0.5, 2.0), n_eval=100)
    assert [(r["loss"], r["scale"]) for r in rows] == [("var", 0.5), ("var", 2.0)]
    assert all(0 <= r["l0"] <= 16 for r in rows)
