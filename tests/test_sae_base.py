"""lib.sae.base: the architectures' formulas, the loss variants' scaling, the decoder constraint."""
from __future__ import annotations

import pytest
import torch

from lib.sae.base import ARCHITECTURES, SAE, SAEConfig, make_sae, register


def _sae(arch: str, d_in: int = 6, d_sae: int = 10, **kw) -> SAE:
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, **kw), seed=0)
    with torch.no_grad():  # non-trivial biases so the centring is exercised
        sae.b_dec.copy_(torch.linspace(-1, 1, d_in))
        sae.b_enc.copy_(torch.linspace(-0.3, 0.3, d_sae))
    return sae


def test_relu_encode_decode_known_formula():
    sae = _sae("relu")
    x = torch.randn(5, 6)
    f_expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f_expected)
    torch.testing.assert_close(sae.decode(f_expected), f_expected @ sae.W_dec + sae.b_dec)
    x_hat, f = sae(x, output_features=True)
    torch.testing.assert_close(f, f_expected)
    torch.testing.assert_close(x_hat, sae(x))
    assert sae.W_enc.shape == (6, 10) and sae.W_dec.shape == (10, 6)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10))  # unit-norm decoder at init


def test_topk_keeps_exactly_k_largest():
    sae = _sae("topk", k=3)
    x = torch.randn(7, 6)
    pre = sae.pre_acts(x)
    f = sae.encode(x)
    for row_f, row_pre in zip(f, pre):
        top = row_pre.topk(3).indices
        expected = torch.zeros_like(row_pre)
        expected[top] = row_pre[top].relu()
        torch.testing.assert_close(row_f, expected)
    assert int((f != 0).sum(-1).max()) <= 3


def test_jumprelu_threshold_and_straight_through_gradient():
    sae = _sae("jumprelu", jumprelu_bandwidth=0.5)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    x = torch.randn(50, 6)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.2))
    # L0 penalty's gradient wrt threshold: -(1/eps) * #{|pre - theta| < eps/2} / n_tokens per latent
    f, pre_t = sae.training_features(x)
    sae.sparsity_penalty(f, pre_t).backward()
    near = ((pre.detach() - 0.2).abs() < 0.25).float().sum(0) / 50
    torch.testing.assert_close(sae.threshold.grad, -near / 0.5)


def test_wrong_input_width_says_what_to_do():
    sae = _sae("relu", hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="6-dimensional.*blocks.0.hook_resid_post"):
        sae.encode(torch.randn(2, 5))


def test_loss_terms_and_known_mse():
    sae = _sae("relu")
    x = torch.randn(32, 6)
    out = sae.loss(x, sparsity_coefficient=0.5)
    x_hat, f = sae(x, output_features=True)
    mse = (x_hat - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["recon"], mse)
    torch.testing.assert_close(out["sparsity"], f.sum(-1).mean())
    torch.testing.assert_close(out["loss"], mse + 0.5 * f.sum(-1).mean())
    assert set(out) >= {"loss", "recon", "mse", "sparsity", "aux", "features", "x_hat"}


def _scaled_copy(sae: SAE, c: float) -> SAE:
    """The same SAE for inputs scaled by c: biases scale by c, so latents scale by c."""
    other = make_sae(sae.cfg)
    other.load_state_dict(sae.state_dict())
    with torch.no_grad():
        other.b_dec.mul_(c)
        other.b_enc.mul_(c)
    return other


def test_batch_variance_normalisation_makes_l1_weight_scale_dependent():
    """Pitfall (e): scaling activations by c leaves the variance-normalised MSE unchanged but
    multiplies the L1 term by c; the unsquared l2 loss scales with L1, keeping their balance."""
    sae = _sae("relu")
    x = torch.randn(64, 6)
    c = 4.0
    big = _scaled_copy(sae, c)
    a, b = sae.loss(x, 1.0, recon="mse_batch_var"), big.loss(c * x, 1.0, recon="mse_batch_var")
    torch.testing.assert_close(b["recon"], a["recon"])
    torch.testing.assert_close(b["sparsity"], c * a["sparsity"])
    a, b = sae.loss(x, 1.0, recon="l2"), big.loss(c * x, 1.0, recon="l2")
    torch.testing.assert_close(b["recon"], c * a["recon"])
    torch.testing.assert_close(b["loss"], c * a["loss"])
    with pytest.raises(ValueError, match="recon must be one of"):
        sae.loss(x, recon="mae")


def test_decoder_constraint_and_gradient_projection():
    sae = _sae("relu")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.apply_constraints_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10))
    sae.loss(torch.randn(16, 6), 0.1)["loss"].backward()
    sae.project_grads_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(10), atol=1e-6, rtol=0)


def test_topk_aux_loss_only_with_dead_latents():
    sae = _sae("topk", k=2)
    x = torch.randn(16, 6)
    assert sae.loss(x)["aux"].item() == 0.0
    dead = torch.zeros(10, dtype=torch.bool)
    dead[:4] = True
    assert sae.loss(x, dead_mask=dead)["aux"].item() > 0.0


def test_a_new_architecture_plugs_in():
    """The interface notebook 04's gated SAE needs: subclass, register, override encode."""

    @register("test-gated-like")
    class GatedLike(SAE):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.r_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))

        def activation(self, pre):
            return (pre > 0).to(pre.dtype) * torch.relu(pre * self.r_mag.exp())

    try:
        sae = make_sae(SAEConfig(d_in=4, d_sae=8, architecture="test-gated-like"))
        assert isinstance(sae, GatedLike) and sae.architecture == "test-gated-like"
        out = sae.loss(torch.randn(3, 4), 0.1)
        out["loss"].backward()
        assert sae.r_mag.grad is not None
    finally:
        ARCHITECTURES.pop("test-gated-like")
    with pytest.raises(ValueError, match="Unknown SAE architecture"):
        make_sae(SAEConfig(d_in=4, d_sae=8, architecture="nope"))


def test_configs_refuse_impossible_values():
    import numpy as np

    from lib.sae.trainer import TrainConfig

    assert SAEConfig(d_in=np.int64(8), d_sae=16).d_in == 8  # NumPy sizes are fine
    for kwargs, match in [({"d_in": 0, "d_sae": 4}, "d_in must be a positive integer"),
                          ({"d_in": 4, "d_sae": 2.5}, "d_sae must be a positive integer"),
                          ({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 9}, "k = 9 exceeds d_sae = 8"),
                          ({"d_in": 4, "d_sae": 8, "k": 0}, "k .TopK"),
                          ({"d_in": 4, "d_sae": 8, "dtype": "float33"}, "not a torch dtype"),
                          ({"d_in": 4, "d_sae": 8, "jumprelu_bandwidth": 0}, "bandwidth")]:
        with pytest.raises(ValueError, match=match):
            SAEConfig(**kwargs)
    with pytest.raises(ValueError, match="Unknown SAE architecture 'relux'"):
        make_sae(SAEConfig(d_in=4, d_sae=8, architecture="relux"))
    for kwargs, match in [({"total_tokens": 100, "batch_size": 256}, "less than one batch"),
                          ({"total_tokens": 1000, "lr": 0}, "lr must be > 0"),
                          ({"total_tokens": 1000, "recon": "mae"}, "recon must be"),
                          ({"total_tokens": 1000, "autocast_dtype": "bf16"}, "not a torch dtype"),
                          ({"total_tokens": 1000, "sparsity_coefficient": -1}, "sparsity_coefficient"),
                          ({"total_tokens": 1000, "lr_decay_frac": 2}, "fractions"),
                          ({"total_tokens": "1e6"}, "total_tokens must be a positive integer")]:
        kwargs.setdefault("batch_size", 10)
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


def test_training_says_when_the_data_runs_out_or_has_the_wrong_width():
    from lib.sae.trainer import Trainer, TrainConfig

    sae = make_sae(SAEConfig(d_in=4, d_sae=8), seed=0)
    with pytest.raises(RuntimeError, match="ran out at step 2 of 5"):
        Trainer(sae, iter([torch.randn(10, 4)] * 2), TrainConfig(total_tokens=50, batch_size=10)).fit()
    with pytest.raises(ValueError, match=r"served \(10, 5\); the SAE needs \[batch, 4\]"):
        Trainer(sae, iter([torch.randn(10, 5)]), TrainConfig(total_tokens=50, batch_size=10)).fit()
