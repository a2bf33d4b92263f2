"""lib.sae.shared: one SAE shared by every block, trained with the LM (notebook 11)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lib.sae import shared
from lib.world.registry import ModelSpec
from lib.world.train import build_hf_model, lm_loss

SPEC = ModelSpec("t", "neox", n_layers=3, d_model=32, n_heads=4, steps=4, n_ctx=16, batch_size=2, warmup=1)
VOCAB = 50


def _model_and_tokens(seed: int = 0):
    torch.manual_seed(seed)
    model = build_hf_model(SPEC, VOCAB)
    tokens = torch.randint(3, VOCAB, (2, 16))
    tokens[:, 0] = 0  # BOS
    return model, tokens


def _block_outputs(model, tokens) -> list[torch.Tensor]:
    return list(model(tokens, output_hidden_states=True).hidden_states[1:])


def test_fvu_is_zero_for_a_perfect_reconstruction_one_for_the_mean_and_blind_to_scale():
    x = torch.randn(50, 8)
    assert float(shared.fvu(x, x)) == 0.0
    assert float(shared.fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    noisy = x + 0.3 * torch.randn_like(x)
    assert float(shared.fvu(7 * x, 7 * noisy)) == pytest.approx(float(shared.fvu(x, noisy)), rel=1e-5)
    xn, scale = shared.normalize(3 * x)
    assert torch.allclose(xn.norm(dim=-1), torch.full((50,), math.sqrt(8)), atol=1e-5)
    assert torch.allclose(xn * scale, 3 * x, atol=1e-5)


def test_aux_mode_leaves_the_forward_pass_clean_and_trains_the_model_through_the_fvu():
    model, tokens = _model_and_tokens()
    obj = shared.JointObjective(shared.JointConfig("aux", d_sae=64, k=4), SPEC.d_model)
    loss, terms = obj(model, tokens)
    assert terms["lm"] == pytest.approx(lm_loss(model, tokens).item(), abs=1e-4)  # the model ran clean
    assert loss.item() == pytest.approx(terms["lm"] + terms["fvu"], abs=2e-3)  # no dead latents yet: AuxK is 0
    # the FVU term alone reaches the model's weights (through the residuals the SAE reads)
    model.zero_grad()
    obj.zero_grad()
    (loss - lm_loss(model, tokens)).backward()
    grad = model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert obj.sae.W_enc.grad is not None and float(obj.sae.W_enc.grad.abs().sum()) > 0


def test_spliced_mode_replaces_every_block_but_bos():
    model, tokens = _model_and_tokens()
    obj = shared.JointObjective(shared.JointConfig("spliced", d_sae=64, k=4), SPEC.d_model)
    read = []

    def pre(module, args, kwargs):  # what block 1 reads: block 0's output after the splice
        read.append(args[0] if args else kwargs["hidden_states"])

    handle = model.gpt_neox.layers[1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            _, terms = obj(model, tokens)
    finally:
        handle.remove()
    assert terms["lm"] != pytest.approx(float(lm_loss(model, tokens)), abs=1e-3)
    with torch.no_grad():
        block0 = _block_outputs(model, tokens)[0]  # block 0 reads the embeddings: its output is the clean one
        x_hat = obj.reconstruct(block0[:, 1:].reshape(-1, SPEC.d_model))[0].reshape(2, 15, SPEC.d_model)
    assert torch.equal(read[0][:, 0], block0[:, 0])  # BOS passes untouched
    assert torch.allclose(read[0][:, 1:], x_hat, atol=1e-5)  # every other position: the SAE's reconstruction
    assert not torch.allclose(x_hat, block0[:, 1:], atol=1e-2)


def test_the_bridge_splice_matches_the_training_splice(tmp_path):
    """notebook 11 measures spliced losses through the TransformerBridge hooks (blocks.{i}.hook_resid_post);
    training splices through forward hooks on the HF blocks: the two must be the same computation."""
    from lib.models import load_model
    from lib.sae.recipe import prepare
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_hf_model(SPEC, len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bridge = load_model(tmp_path, device="cpu")
    obj = shared.JointObjective(shared.JointConfig("spliced", d_sae=64, k=4), SPEC.d_model)
    obj.eval()
    data = prepare(bridge, shared.block_hooks(bridge), 0, 3, context_size=16, docs=["a b c d e f g h i j k l m n o p q r"] * 3)
    batch = data.eval_batch()
    assert bool(batch.attention_mask.all()), "full rows: the training path has no padding"
    with torch.no_grad():
        _, terms = obj(model, batch.tokens)
    assert shared.eval_loss(bridge, batch, obj.sae) == pytest.approx(terms["lm"], abs=1e-4)
    assert shared.eval_loss(bridge, batch) == pytest.approx(float(lm_loss(model, batch.tokens)), abs=1e-4)
    with shared.spliced(bridge, obj.sae), torch.no_grad():
        logits = bridge(batch.tokens, return_type="logits")
    from lib.sae.metrics import token_ce

    assert float(token_ce(logits, batch.tokens).mean()) == pytest.approx(terms["lm"], abs=1e-4)


def test_run_spliced_takes_a_dict_of_hooks(tiny_bridges):
    from lib.sae.splice import run_spliced, zero_replacement

    model = tiny_bridges["neox"]
    tokens = torch.randint(3, 100, (2, 8))
    clean = run_spliced(model, tokens, None)
    hooks = shared.block_hooks(model)
    same = run_spliced(model, tokens, {h: (lambda a: a) for h in hooks})
    assert torch.equal(same, clean)
    one = run_spliced(model, tokens, zero_replacement, hook=hooks[0])
    assert torch.equal(run_spliced(model, tokens, {hooks[0]: zero_replacement}), one)
    with pytest.raises(KeyError, match="unknown hook"):
        run_spliced(model, tokens, {"blocks.9.hook_resid_post": zero_replacement})


def test_layer_variance_separates_one_block_per_token_from_every_block_at_once():
    n_tok, n_blocks = 400, 4
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, n_blocks, (n_tok,), generator=g)
    act = torch.zeros(n_tok, n_blocks, 2)
    act[torch.arange(n_tok), block, 0] = 1.0 + torch.rand(n_tok, generator=g)  # latent 0: one block per token
    act[:, :, 1] = 1.0  # latent 1: every block, every token, equally
    stats0 = shared.layer_variance(act[..., :1])
    assert stats0["var_within"] == pytest.approx(0.0, abs=1e-9)
    assert stats0["var_aggregate"] == pytest.approx(float(block.float().var(unbiased=False)), rel=0.1)
    assert stats0["one_block_share"] == 1.0
    stats1 = shared.layer_variance(act[..., 1:])
    assert stats1["ratio_of_means"] == pytest.approx(1.0)  # nothing varies across tokens
    assert stats1["var_within"] == pytest.approx(1.25)  # uniform over 0..3
    dist = shared.layer_distribution(act)
    assert torch.allclose(dist.sum(1), torch.ones(2))
    assert torch.allclose(dist[1], torch.full((4,), 0.25))
    # a latent seen on fewer than min_tokens tokens is left out
    rare = torch.zeros(n_tok, n_blocks, 1)
    rare[:5, 0, 0] = 1.0
    assert shared.layer_variance(rare)["n_latents"] == 0


def test_latents_for_fvu_interpolates_in_log_latents():
    curve = [(64, 0.4), (256, 0.2), (1024, 0.1)]
    assert shared.latents_for_fvu(curve, 0.3) == pytest.approx(128.0)
    assert shared.latents_for_fvu(curve, 0.2) == pytest.approx(256.0)
    assert shared.latents_for_fvu(curve, 0.05) is None
    assert shared.latents_for_fvu(curve, 0.5) is None


def test_reconstruction_counts_a_per_block_set_as_all_its_latents():
    from lib.sae.base import SAEConfig, make_sae

    acts = {f"blocks.{i}.hook_resid_post": torch.randn(64, 8) for i in range(3)}
    per_block = {h: make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2), seed=i) for i, h in enumerate(acts)}
    r = shared.reconstruction(per_block, acts)
    assert r["latents"] == 48 and r["l0"] == pytest.approx(2.0, abs=0.01)
    one = shared.reconstruction(per_block[next(iter(acts))], acts)
    assert one["latents"] == 16
    assert set(one["fvu_by_block"]) == set(acts)
    assert one["fvu"] == pytest.approx(sum(one["fvu_by_block"].values()) / 3)


def test_posthoc_training_lowers_the_fvu_and_a_shared_sae_reads_every_block():
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(24, 8, generator=g)
    def draw(n):
        code = (torch.rand(n, 24, generator=g) < 0.1).float() * torch.rand(n, 24, generator=g)
        return shared.normalize(code @ dirs + 0.01 * torch.randn(n, 8, generator=g))[0]
    acts = {f"blocks.{i}.hook_resid_post": draw(2000) for i in range(2)}
    held = {h: draw(500) for h in acts}
    sae = shared.train_posthoc(acts, 32, 4, shared=True, epochs=4, batch_size=128)
    saes = shared.train_posthoc(acts, 32, 4, shared=False, epochs=4, batch_size=128)
    assert set(saes) == set(acts)
    assert shared.reconstruction(sae, held)["fvu"] < 0.5
    assert shared.reconstruction(saes, held)["fvu"] < 0.5


def test_the_build_writes_a_model_with_its_joint_sae(tmp_path, isolated_root):
    """A few steps of the real build into a scratch folder: the joint SAE saved with the model, its
    loss terms in the training log, its configuration in the provenance and the resume key."""
    assert shared.main(["--only", "toy-shared-spliced-s0", "--steps", "3", "--n-docs", "16", "--out", str(tmp_path),
                        "--probe-every", "3", "--jobs", "1"]) == 0
    spliced_dir = tmp_path / "toy-shared-spliced-s0"
    info = json.loads((spliced_dir / "provenance.json").read_text())
    log = json.loads((spliced_dir / "training_log.json").read_text())
    assert info["joint"]["mode"] == "spliced" and info["corpus"]["joint"]["mode"] == "spliced"
    assert len(log["fvu"]) == len(log["lm"]) == 3
    sae = shared.load_joint_sae(str(spliced_dir))
    assert sae.cfg.d_sae == info["joint"]["d_sae"] and sae.cfg.objective == "joint_spliced"
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no jointly trained SAE"):
        shared.load_joint_sae(str(tmp_path / "plain"))


def test_a_resumed_joint_run_restores_its_sae(tmp_path):
    from lib.world.train import train

    torch.manual_seed(0)
    rows = torch.randint(3, VOCAB, (16, 16))
    rows[:, 0] = 0
    cfg = shared.JointConfig("spliced", d_sae=32, k=4)
    full = train(SPEC, rows, rows[:4], VOCAB, objective=shared.JointObjective(cfg, SPEC.d_model), eval_every=2)
    ckpt = tmp_path / "ckpt.pt"
    train(SPEC, rows, rows[:4], VOCAB, objective=shared.JointObjective(cfg, SPEC.d_model), checkpoint=ckpt,
          stop_at=2, ckpt_every=1, eval_every=2)
    resumed_obj = shared.JointObjective(cfg, SPEC.d_model)
    resumed = train(SPEC, rows, rows[:4], VOCAB, objective=resumed_obj, checkpoint=ckpt, ckpt_every=1, eval_every=2)
    assert resumed.log["train_loss"] == full.log["train_loss"]
    assert resumed.log["fvu"] == full.log["fvu"]
    assert int(resumed_obj.step) == 4
