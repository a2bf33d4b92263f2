"""lib.sae.sparse: the sparse TopK / BatchTopK training path against the dense reference (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from lib.sae import sparse
from lib.sae.base import SAEConfig, make_sae
from lib.sae.trainer import Trainer, TrainConfig

D_IN, D_SAE, K = 16, 96, 5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _pair(arch: str, device: str = "cpu", **kw):
    """The same SAE twice: sparse kernels and dense reference, with non-trivial biases."""
    saes = []
    for sparse_decode in (True, False):
        sae = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, sparse_decode=sparse_decode, **kw),
                       seed=0)
        with torch.no_grad():
            sae.b_dec.copy_(torch.linspace(-0.5, 0.5, D_IN))
            sae.b_enc.copy_(torch.linspace(-0.2, 0.2, D_SAE))
        saes.append(sae.to(device))
    return saes


def _grads(sae, x, dead_mask=None):
    out = sae.loss(x, recon="mse", dead_mask=dead_mask)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_and_dense_paths_agree_in_loss_and_every_gradient(arch, with_dead, device):
    fast, ref = _pair(arch, device)
    x = (torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2).to(device)
    dead = None
    if with_dead:  # a third of the latents dead: the AuxK term runs through the sparse kernels too
        dead = torch.zeros(D_SAE, dtype=torch.bool, device=device)
        dead[::3] = True
    out_s, g_s = _grads(fast, x, dead)
    out_d, g_d = _grads(ref, x, dead)
    assert out_s["features"].is_sparse and not out_d["features"].is_sparse
    torch.testing.assert_close(out_s["features"].to_dense(), out_d["features"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_s["x_hat"], out_d["x_hat"], atol=1e-5, rtol=1e-5)
    for key in ("loss", "mse", "aux"):
        torch.testing.assert_close(out_s[key], out_d[key], atol=1e-5, rtol=1e-5)
    if with_dead:
        assert float(out_s["aux"].detach()) > 0  # the comparison covers the auxiliary loss
    for name in g_d:
        assert g_d[name].abs().sum() > 0, name  # every parameter gets a gradient to compare
        torch.testing.assert_close(g_s[name], g_d[name], atol=1e-5, rtol=1e-4, msg=name)
    f = out_d["features"]
    assert torch.equal(out_s["fired"], (f > 0).any(0))
    torch.testing.assert_close(out_s["l0"], (f > 0).sum(-1).float().mean())


def test_sampled_encode_gradient_to_the_input_matches_the_dense_product():
    g = torch.Generator().manual_seed(2)
    x_c = torch.randn(8, D_IN, generator=g, requires_grad=True)
    W = torch.randn(D_IN, D_SAE, generator=g, requires_grad=True)
    b = torch.randn(D_SAE, generator=g, requires_grad=True)
    pre = x_c @ W + b
    pattern, vals = sparse.topk_pattern(pre.detach(), K)
    weights = torch.randn(pattern.nnz, generator=g)
    (sparse.sparse_encode(x_c, W, b, pattern, vals) * weights).sum().backward()
    sparse_grads = [t.grad.clone() for t in (x_c, W, b)]
    for t in (x_c, W, b):
        t.grad = None
    (pre[pattern.rows, pattern.cols] * weights).sum().backward()
    for got, want in zip(sparse_grads, (x_c.grad, W.grad, b.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batch_topk_keeps_the_batch_largest_entries_and_topk_k_per_row():
    pre = torch.randn(10, 30, generator=torch.Generator().manual_seed(3))
    pattern, vals = sparse.batch_topk_pattern(pre, 4)
    assert pattern.nnz == 40
    assert torch.equal(pre[pattern.rows, pattern.cols], vals)
    assert float(vals.min()) >= float(pre.flatten().topk(40).values.min())
    assert torch.all(pattern.rows[1:] >= pattern.rows[:-1])  # CSR order
    assert torch.bincount(pattern.rows, minlength=10).tolist() != [4] * 10  # rows differ: not a per-row TopK
    p2, v2 = sparse.topk_pattern(pre, 4)
    assert torch.bincount(p2.rows, minlength=10).tolist() == [4] * 10
    torch.testing.assert_close(p2.dense(v2), torch.zeros_like(pre).scatter(-1, pre.topk(4).indices, pre.topk(4).values))


def test_step_flops_counts_the_dense_and_sparse_paths():
    assert sparse.step_flops(4096, 768, 12288) == 10 * 4096 * 768 * 12288
    assert sparse.step_flops(4096, 768, 12288, k=32) == 2 * 4096 * 768 * 12288 + 8 * 4096 * 32 * 768


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_with_sparse_kernels_follows_the_dense_run(arch):
    """A few Adam steps: both paths end at the same weights (float rounding apart)."""
    data = torch.randn(6 * 128, D_IN, generator=torch.Generator().manual_seed(4))
    finals = []
    for sae in _pair(arch):
        cfg = TrainConfig(total_tokens=len(data), batch_size=128, lr=1e-2, init_b_dec="zeros", log_every=2,
                          dead_after_tokens=256)
        Trainer(sae, iter(data.split(128)), cfg).fit()
        finals.append(sae.state_dict())
    for name in finals[1]:
        torch.testing.assert_close(finals[0][name], finals[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_batch_topk_learns_a_threshold_and_uses_it_at_inference():
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="batchtopk", k=K), seed=0)
    data = torch.randn(40 * 256, D_IN, generator=torch.Generator().manual_seed(5))
    Trainer(sae, iter(data.split(256)), TrainConfig(total_tokens=len(data), batch_size=256, lr=3e-3,
                                                     init_b_dec="zeros", log_every=10)).fit()
    assert not sae.training  # fit() leaves the SAE in eval mode
    theta = sae.threshold
    assert float(theta.min()) > 0 and torch.all(theta == theta[0])
    x = data[:512]
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > theta))
    # the running average: old * (1 - momentum) + momentum * (smallest kept value of the batch)
    sae.train()
    with torch.no_grad():
        before = float(theta[0])
        kept = pre.flatten().topk(K * len(x)).values
        sae.loss(x)
        want = (1 - sae.threshold_momentum) * before + sae.threshold_momentum * float(kept[kept > 0].min())
        assert abs(float(sae.threshold[0]) - want) < 1e-5
        sae.threshold_momentum = 1.0  # threshold = this batch's smallest kept value
        sae.loss(x)
    sae.eval()
    with torch.no_grad():
        active = int((sae.encode(x) > 0).sum())
    assert int((kept > 0).sum()) == K * len(x)
    assert active == K * len(x) - 1  # at the batch's own threshold, inference keeps what the batch kept (bar the minimum)
