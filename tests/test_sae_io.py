"""lib.sae.io: the SAELens on-disk format, both ways, checked against SAELens itself."""
from __future__ import annotations

import json

import pytest
import torch

from lib.sae.base import SAEConfig, make_sae
from lib.sae.io import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is a test dependency (pip install -e .[dev])")
ARCHS = ["relu", "topk", "jumprelu", "gated", "gated_noaux", "batchtopk"]
HOOK = "blocks.1.hook_resid_post"


def _trained_looking(arch: str):
    """An SAE with non-trivial biases and thresholds (so every parameter matters)."""
    sae = make_sae(SAEConfig(d_in=12, d_sae=40, architecture=arch, hook_name=HOOK, model_name="toy-2l",
                             k=5, context_size=128), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(12))
        sae.b_enc.copy_(0.1 * torch.randn(40))
        if arch == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(40))
        if arch == "batchtopk":  # one learned threshold, used at inference (eval mode)
            sae.threshold.fill_(0.15)
            sae.eval()
        if arch.startswith("gated"):
            sae.r_mag.copy_(0.2 * torch.randn(40))
            sae.b_mag.copy_(0.1 * torch.randn(40))
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_here(tmp_path, arch):
    sae = _trained_looking(arch)
    path = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]
    back = load_sae(path)
    assert back.cfg == sae.cfg and type(back) is type(sae)
    x = torch.randn(20, 12)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    save_sae(back, path)  # overwriting an existing folder is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize("arch", ARCHS)
def test_ours_loads_in_saelens_with_same_outputs(tmp_path, arch):
    sae = _trained_looking(arch)
    save_sae(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == {"relu": "standard", "gated_noaux": "gated", "batchtopk": "jumprelu"}.get(arch, arch)
    assert theirs.cfg.metadata.hook_name == HOOK
    x = torch.randn(30, 12)
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        torch.testing.assert_close(f_theirs, f_ours, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(f_ours), sae.decode(f_ours), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), atol=1e-6, rtol=1e-5)


def _saelens_sae(arch: str, **cfg_kwargs):
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}
    cls, cfg_cls = classes[arch]
    torch.manual_seed(1)
    sae = cls(cfg_cls(d_in=12, d_sae=40, metadata=SAEMetadata(hook_name=HOOK, model_name="toy-2l"), **cfg_kwargs))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(40))
        if arch == "gated":  # gates open for about half the latents
            sae.b_gate.copy_(0.1 * torch.randn(40))
            sae.b_mag.copy_(0.5 + 0.1 * torch.randn(40))
    return sae


@pytest.mark.parametrize("arch,kwargs", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),  # folded into b_enc on load
    ("topk", {"k": 6}),
    ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),  # folded into the weights on load
    ("jumprelu", {}),
    ("gated", {}),
    ("gated", {"apply_b_dec_to_input": False}),  # folded into b_gate and b_mag on load
])
def test_saelens_sae_loads_here_with_same_outputs(tmp_path, arch, kwargs):
    theirs = _saelens_sae(arch, **kwargs)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert ours.cfg.hook_name == HOOK and ours.cfg.d_sae == 40
    x = torch.randn(30, 12)
    with torch.no_grad():
        assert int((theirs.encode(x) != 0).sum()) > 0  # a test that compares something
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        f = theirs.encode(x)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), atol=1e-5, rtol=1e-5)


def test_load_errors_are_explicit(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    theirs = _saelens_sae("standard")
    theirs.save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / CFG_FILENAME).read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "s" / CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations"):
        load_sae(tmp_path / "s")


def test_gated_round_trips_through_saelens_exactly(tmp_path):
    """ours -> SAELens -> ours: the same parameters, bit for bit (b_enc <-> b_gate)."""
    sae = _trained_looking("gated")
    save_sae(sae, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert theirs.b_enc is None and torch.equal(theirs.b_gate, sae.b_enc)
    theirs.save_model(tmp_path / "theirs")
    back = load_sae(tmp_path / "theirs")
    for name, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_truncated_or_misplaced_files_are_named(tmp_path):
    sae = _trained_looking("relu")
    path = save_sae(sae, tmp_path / "sae")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_sae(path / CFG_FILENAME)
    text = (path / CFG_FILENAME).read_text()
    (path / CFG_FILENAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"cfg\.json is not valid JSON.*truncated"):
        load_sae(path)
    (path / CFG_FILENAME).write_text(text)
    weights = (path / WEIGHTS_FILENAME).read_bytes()
    (path / WEIGHTS_FILENAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors is not a readable safetensors file"):
        load_sae(path)
