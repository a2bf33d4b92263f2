"""lib.sae.gated: the gated SAE's formulas, where each loss term's gradient goes, and that it trains."""
from __future__ import annotations

import pytest
import torch

from lib.sae.base import SAEConfig, make_sae
from lib.sae.buffer import TensorSource
from lib.sae.gated import GatedNoAuxSAE, GatedSAE
from lib.sae.trainer import TrainConfig, train_sae
from tests.test_sae_trainer import sparse_data


def _gated(aux: bool = True, d_in: int = 6, d_sae: int = 10) -> GatedSAE:
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="gated" if aux else "gated_noaux"), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-1, 1, d_in))
        sae.b_enc.copy_(torch.linspace(-0.3, 0.3, d_sae))
        sae.r_mag.copy_(torch.linspace(-0.5, 0.5, d_sae))
        sae.b_mag.copy_(torch.linspace(0.2, -0.2, d_sae))
    return sae


def test_encode_known_formula_and_shared_direction():
    sae = _gated()
    x = torch.randn(20, 6)
    xc = x - sae.b_dec
    gate = xc @ sae.W_enc + sae.b_enc
    mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag  # W_mag = exp(r_mag) * W_gate, column-wise
    expected = (gate > 0).float() * torch.relu(mag)
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ sae.W_dec + sae.b_dec)
    # a latent is non-zero only where its gate is open
    assert not bool(((sae.encode(x) != 0) & (gate <= 0)).any())


def test_loss_has_the_three_terms():
    sae = _gated()
    x = torch.randn(32, 6)
    out = sae.loss(x, sparsity_coefficient=0.3)
    f = sae.encode(x)
    gate = sae.pre_acts(x)
    recon = (sae.decode(f) - x).pow(2).sum(-1).mean()
    sparsity = (torch.relu(gate) * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    aux = (torch.relu(gate) @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["recon"], recon)
    torch.testing.assert_close(out["sparsity"], sparsity)
    torch.testing.assert_close(out["aux"], aux)
    torch.testing.assert_close(out["loss"], recon + 0.3 * sparsity + aux)
    no_aux = _gated(aux=False).loss(x, 0.3)
    assert isinstance(_gated(aux=False), GatedNoAuxSAE) and no_aux["aux"].item() == 0.0
    torch.testing.assert_close(no_aux["loss"], recon + 0.3 * sparsity)


def test_sparsity_is_weighted_by_decoder_norms():
    sae = make_sae(SAEConfig(d_in=4, d_sae=6, architecture="gated", normalize_decoder=False), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = torch.randn(8, 4)
    gate = sae.pre_acts(x)
    expected = (torch.relu(gate) * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(sae.loss(x, 1.0)["sparsity"], expected)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    torch.testing.assert_close(sae.loss(x, 1.0)["sparsity"], 2 * expected)


def test_gradients_go_where_the_paper_says():
    x = torch.randn(64, 6)
    # the auxiliary term alone: gradient reaches the gate (W_enc, b_enc) but not the frozen decoder
    sae = _gated()
    f, pre = sae.training_features(x)
    sae.aux_loss(x, sae.decode(f), pre, None).backward()
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec only through the centring of x
    assert sae.b_enc.grad is not None and float(sae.b_enc.grad.abs().sum()) > 0
    assert sae.r_mag.grad is None and sae.b_mag.grad is None
    # the reconstruction alone: no gradient to the gate bias (the Heaviside passes none)
    sae = _gated()
    out = sae.loss(x, 0.0)
    out["recon"].backward()
    assert sae.b_enc.grad is None or float(sae.b_enc.grad.abs().sum()) == 0.0
    assert float(sae.b_mag.grad.abs().sum()) > 0 and float(sae.r_mag.grad.abs().sum()) > 0
    # without aux, the only gradient on the gate bias is the sparsity term's, which is >= 0 everywhere
    sae = _gated(aux=False)
    sae.loss(x, 1.0)["loss"].backward()
    assert bool((sae.b_enc.grad >= 0).all()) and float(sae.b_enc.grad.sum()) > 0


def test_gated_trains_with_the_shared_trainer():
    x, dirs = sparse_data(n=2048)
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="gated")
    sae, hist = train_sae(cfg, TensorSource(x, 256, seed=0),
                          TrainConfig(total_tokens=256 * 120, batch_size=256, lr=5e-3, sparsity_coefficient=1.0,
                                      log_every=100))
    with torch.no_grad():
        x_hat, f = sae(x, output_features=True)
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.2
    assert float((f != 0).sum(-1).float().mean()) < 6  # ~2 true features per input
    cos = (dirs @ sae.W_dec.T).max(1).values
    assert float((cos > 0.9).float().mean()) > 0.5


def test_w_gate_gets_the_reconstruction_gradient_b_gate_does_not():
    """The docstring's claim: W_gate is tied to W_mag, so the reconstruction term alone moves W_enc;
    it never moves b_enc (b_gate)."""
    sae = _gated()
    x = torch.randn(64, 6)
    sae.loss(x, 0.0)["recon"].backward()
    assert sae.W_enc.grad is not None and float(sae.W_enc.grad.abs().sum()) > 0
    assert sae.b_enc.grad is None or float(sae.b_enc.grad.abs().sum()) == 0.0


def test_gate_statistics_known_values():
    from lib.sae.gated import gate_statistics

    sae = make_sae(SAEConfig(d_in=2, d_sae=2, architecture="gated", normalize_decoder=False), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(2 * torch.eye(2))  # decoder rows of norm 2
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.b_mag.zero_()
        sae.r_mag.copy_(torch.log(torch.tensor([100.0, 1.0])))  # latent 0: magnitude 100x its gate
    x = torch.tensor([[0.01, 1.0], [0.02, -1.0], [-1.0, 2.0]])
    st = gate_statistics(sae, x, tiny=0.05)
    # open gates: (0,0) 0.01 [f 1.0], (0,1) 1.0 [f 1.0], (1,0) 0.02 [f 2.0], (2,1) 2.0 [f 2.0]
    assert st["gate_open_per_token"] == pytest.approx(4 / 3)
    assert st["mean_gate_preact"] == pytest.approx((0.01 + 1 + 0.02 - 1 - 1 + 2) / 6)
    assert st["frac_alive"] == 1.0
    assert st["frac_open_tiny"] == pytest.approx(0.5)  # the two latent-0 gates are < 5% of their f
    assert st["gate_l1_per_token"] == pytest.approx(2 * (0.01 + 1 + 0.02 + 2) / 3)
    assert st["mean_exp_r_mag"] == pytest.approx(50.5)
    assert st["mean_w_gate_norm"] == pytest.approx(1.0)
    assert st["open_mag_median"] == pytest.approx(1.0)  # torch.median: the lower middle of (1, 1, 2, 2)
    # no gate open: tiny fraction 0, medians NaN
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)
    st = gate_statistics(sae, x)
    assert st["gate_open_per_token"] == 0.0 and st["frac_open_tiny"] == 0.0


def test_train_with_gate_trace_is_the_plain_run():
    from lib.sae.gated import train_with_gate_trace

    x, _ = sparse_data(n=1024)
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="gated_noaux")
    tc = TrainConfig(total_tokens=128 * 30, batch_size=128, lr=5e-3, sparsity_coefficient=1.0, log_every=10)
    sae, trace = train_with_gate_trace(cfg, tc, TensorSource(x, 128, seed=0), x[:256], every=8)
    assert [r["step"] for r in trace] == [0, 8, 16, 24, 30]
    ref, _ = train_sae(cfg, TensorSource(x, 128, seed=0), tc)
    for a, b in zip(sae.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    from lib.sae.gated import gate_statistics
    assert trace[-1]["gate_open_per_token"] == pytest.approx(gate_statistics(ref, x[:256])["gate_open_per_token"])
    with pytest.raises(ValueError, match="gated architecture"):
        train_with_gate_trace(SAEConfig(d_in=16, d_sae=32), tc, TensorSource(x, 128, seed=0), x[:8], every=8)
