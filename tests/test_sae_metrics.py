"""lib.sae.metrics and lib.sae.splice: known answers, padding never counted, the conventions' formulas."""
from __future__ import annotations

import pytest
import torch

from lib.sae.base import SAEConfig, make_sae
from lib.activations import harvest, tokenize
from lib.sae.metrics import (CONVENTION_SETTINGS, CONVENTIONS, ReconStats, collect, compare_conventions, evaluate,
                             splice_check)
from lib.sae.splice import run_spliced, splice_hook, tensor_replacement, zero_replacement
from tests.tiny_models import TEXT

HOOK = "blocks.0.hook_resid_post"
TEXTS = [t[: 10 + 9 * i] for i, t in enumerate(TEXT * 2)]


def identity_sae(d: int):
    """relu(x) - relu(-x) = x: a ReLU SAE with d_sae = 2d that reconstructs exactly."""
    sae = make_sae(SAEConfig(d_in=d, d_sae=2 * d, hook_name=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int, seed: int = 0):
    sae = make_sae(SAEConfig(d_in=d, d_sae=4 * d, hook_name=HOOK), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    return sae


def test_identity_sae_known_answers(tiny_bridges):
    model = tiny_bridges["neox"]
    r = evaluate(identity_sae(32), model, TEXTS, batch_size=3)
    assert r["mse"] < 1e-10 and abs(r["var_explained"] - 1) < 1e-9
    assert abs(r["ce_spliced"] - r["ce_clean"]) < 1e-5 and abs(r["loss_recovered"] - 1) < 1e-3
    batch = tokenize(model, TEXTS, 128)
    assert r["n_tokens"] == batch.n_real - len(TEXTS)  # pads and BOS never counted
    assert r["n_ce_tokens"] == batch.n_real - len(TEXTS)  # every real token but BOS is a target
    acts = harvest(model, TEXTS, HOOK, "all", exclude={"bos"}, cache=False)[HOOK].double()
    assert abs(r["l1"] - float(acts.abs().sum(-1).mean())) < 1e-4
    assert abs(r["l0"] - float((acts != 0).sum(-1).double().mean())) < 1e-12


def test_zero_sae_recovers_nothing(tiny_bridges):
    model = tiny_bridges["neox"]
    sae = identity_sae(32)
    with torch.no_grad():
        sae.W_dec.zero_()
    r = evaluate(sae, model, TEXTS)
    assert abs(r["ce_spliced"] - r["ce_zero_ablated"]) < 1e-9 and abs(r["loss_recovered"]) < 1e-6


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_metrics_match_independent_computation(tiny_bridges, arch):
    model = tiny_bridges[arch]
    sae = random_sae(32)
    r = evaluate(sae, model, TEXTS, batch_size=4)
    x = harvest(model, TEXTS, HOOK, "all", exclude={"bos"}, cache=False)[HOOK].double()
    with torch.no_grad():
        x_hat, f = sae(x.float(), output_features=True)
    x_hat, f = x_hat.double(), f.double()
    e = x_hat - x
    assert r["mse"] == pytest.approx(float(e.pow(2).sum(-1).mean()), rel=1e-5)
    tv = float((x - x.mean(0)).pow(2).sum())
    assert r["var_explained"] == pytest.approx(1 - float(e.pow(2).sum()) / tv, rel=1e-5)
    assert r["l1"] == pytest.approx(float(f.abs().sum(-1).mean()), rel=1e-5)
    assert r["l0"] == pytest.approx(float((f != 0).sum(-1).double().mean()), rel=1e-12)
    assert r["frac_alive"] == pytest.approx(float((f != 0).any(0).double().mean()))
    assert r["loss_recovered"] == pytest.approx(
        (r["ce_zero_ablated"] - r["ce_spliced"]) / (r["ce_zero_ablated"] - r["ce_clean"]))


def test_padding_is_never_counted(tiny_bridges):
    """The same texts padded to 128 positions give the same numbers as padded to the longest text."""
    model = tiny_bridges["neox"]
    sae = random_sae(32)
    tight = evaluate(sae, model, tokenize(model, TEXTS, 64))
    wide = evaluate(sae, model, tokenize(model, TEXTS, 64, pad_to=64))
    for k in tight:
        assert wide[k] == pytest.approx(tight[k], rel=1e-5, abs=1e-7), k
    # a bare token tensor: padding found from the (distinct) pad id
    b = tokenize(model, TEXTS, 64, pad_to=64)
    bare = evaluate(sae, model, b.tokens)
    assert bare["n_tokens"] == tight["n_tokens"]


def test_conventions_table(tiny_bridges):
    model = tiny_bridges["neox"]
    sae = random_sae(32)
    table = compare_conventions(sae, model, TEXTS)
    assert list(table.columns) == [*CONVENTIONS, "dictionary_learning_bos_kept"]
    assert set(table.columns) == set(CONVENTION_SETTINGS)
    # dictionary_learning's default keeps BOS: its reconstruction sums run over BOS + the counted
    # tokens; its mean unsquared error norm, recomputed here from the activations themselves
    batch = tokenize(model, TEXTS, 128)
    acts = harvest(model, batch, HOOK, "all", exclude={"pad"}, cache=False)[HOOK]
    with torch.no_grad():
        err = (sae(acts) - acts).norm(dim=-1)
    kept, dropped = table["dictionary_learning_bos_kept"], table["dictionary_learning"]
    assert kept["mse"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert kept["n_tokens"] == dropped["n_tokens"] + len(TEXTS)  # one BOS per text
    assert kept["ce_spliced"] == dropped["ce_spliced"]  # the CE runs splice everywhere in both
    ours, now, old = table["ours"], table["saelens_now"], table["saelens_old"]
    assert now["var_explained"] == pytest.approx(ours["var_explained"])  # no EOS in these texts
    assert now["mse"] == pytest.approx(ours["mse"])
    stats = collect(sae, model, TEXTS, conventions=CONVENTIONS, batch_size=16)
    per_batch_tokens = stats.recon["saelens"].per_batch[0][0]
    assert old["mse"] == pytest.approx(now["mse"] / per_batch_tokens)  # one eval batch here
    assert old["var_explained"] > now["var_explained"]  # variance about zero is larger
    # SAELens zero-ablates every position (BOS included), so its zero-ablated CE differs from ours
    assert now["ce_zero_ablated"] != pytest.approx(ours["ce_zero_ablated"])


def test_conventions_over_several_batches_match_one_batch(tiny_bridges):
    """Every convention's sums accumulate across batches: 3 batches give the one-batch numbers
    (except SAELens-as-it-was's MSE, which is per batch by construction)."""
    model = tiny_bridges["neox"]
    sae = random_sae(32)
    one = compare_conventions(sae, model, TEXTS, batch_size=len(TEXTS))
    several = compare_conventions(sae, model, TEXTS, batch_size=3)
    for conv in CONVENTIONS:
        for metric in ("var_explained", "l0", "ce_clean", "ce_spliced", "ce_zero_ablated"):
            if conv == "saelens_old" and metric == "var_explained":
                continue
            assert several[conv][metric] == pytest.approx(one[conv][metric], rel=1e-5, abs=1e-6), (conv, metric)


def test_recon_stats_formulas_on_known_data():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    s = ReconStats(2, 3)
    s.add(x, x + torch.tensor([0.5, -0.5]), f)  # a constant offset
    assert s.mse == pytest.approx(0.5)
    assert s.mse_mean_over_dims == pytest.approx(0.25)
    tv = float((x - x.mean(0)).pow(2).sum())
    assert s.var_explained == pytest.approx(1 - 1.5 / tv)
    assert s.var_explained_about_zero == pytest.approx(1 - 1.5 / float(x.pow(2).sum()))
    assert s.dl_frac_variance_explained == pytest.approx(1.0)  # a constant offset costs nothing there
    assert s.dl_l2_loss == pytest.approx(0.5 ** 0.5)
    assert s.l1 == pytest.approx(4 / 3) and s.l0 == pytest.approx(1.0) and s.frac_alive == pytest.approx(1.0)


def test_splice_identity_reproduces_clean_ce_exactly(tiny_bridges):
    for arch in ("neox", "gpt2", "llama"):
        r = splice_check(tiny_bridges[arch], TEXTS, hook=HOOK)
        assert r["ce_spliced"] == r["ce_clean"] and r["max_abs_logit_diff"] == 0.0


def test_splice_touches_only_the_given_positions(tiny_bridges):
    model = tiny_bridges["neox"]
    b = tokenize(model, TEXTS[:3], 64)
    clean = run_spliced(model, b.tokens, None)
    positions = torch.zeros_like(b.attention_mask)
    positions[:, 5] = True
    ablated = run_spliced(model, b.tokens, zero_replacement, positions, hook=HOOK)
    assert torch.equal(ablated[:, :5], clean[:, :5])  # causal: earlier positions unchanged
    assert not torch.allclose(ablated[:, 5], clean[:, 5])
    with pytest.raises(ValueError, match="do not match"):
        run_spliced(model, b.tokens, tensor_replacement(torch.zeros(1, 2, 32)), hook=HOOK)
    with pytest.raises(KeyError, match="hook_names"):
        run_spliced(model, b.tokens, zero_replacement, hook="blocks.9.hook_nothing")
    with pytest.raises(ValueError, match="no hook"):
        run_spliced(model, b.tokens, zero_replacement)  # a bare function names no hook
    sae = identity_sae(32)  # an SAE splices at its own hook
    torch.testing.assert_close(run_spliced(model, b.tokens, sae), run_spliced(model, b.tokens, sae, hook=HOOK))
    hook = splice_hook(zero_replacement, positions[:, :3])
    with pytest.raises(ValueError, match="positions"):
        hook(torch.zeros(3, 8, 32))
