"""lib.sae.attribution: exact patching vs attribution patching vs integrated gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.sae.attribution import (active_nodes, attribution_patching, build_problem, compare_methods,
                                 country_patching_task, exact_patching, finite_difference_ig, integrated_gradients,
                                 logit_diff_metric, metric_along_path)
from lib.sae.base import SAEConfig, make_sae

HOOK = "blocks.0.hook_resid_post"


class LinearStub(nn.Module):
    """A 'model' whose logits are linear in the activation at its one hook: logits = act @ U.

    Speaks the TransformerBridge protocol the attribution code uses: ``hook_dict`` and
    ``run_with_hooks`` (a hook function returns the new activation, or None to leave it).
    """

    hook_dict = {HOOK: None}

    def __init__(self, vocab: int = 20, d: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = nn.Parameter(torch.randn(vocab, d, generator=g))
        self.U = nn.Parameter(torch.randn(d, vocab, generator=g))

    def run_with_hooks(self, tokens, fwd_hooks, return_type="logits", **kwargs):
        act = self.E[tokens]
        for _, fn in fwd_hooks:
            new = fn(act, None)
            act = act if new is None else new
        return act @ self.U


def _tokens(vocab, B=3, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, P), generator=g), torch.randint(3, vocab, (B, P), generator=g)


def _sae(arch, d, m, seed=0, **kw):
    sae = make_sae(SAEConfig(d_in=d, d_sae=m, architecture=arch, hook_name=HOOK, **kw), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        if arch == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae


@pytest.fixture(scope="module")
def neox_relu_problem(tiny_bridges):
    model = tiny_bridges["neox"]
    clean, corrupt = _tokens(300, seed=1)
    metric = logit_diff_metric(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    return build_problem(model, _sae("relu", 32, 64), clean, corrupt, metric)


def test_exact_equals_single_path_ig_for_relu(neox_relu_problem):
    prob = neox_relu_problem
    nodes = active_nodes(prob)[:12]
    assert len(nodes) >= 6
    exact = exact_patching(prob, nodes)
    ig = integrated_gradients(prob, nodes, k=32, path="single")
    torch.testing.assert_close(ig, exact, rtol=2e-3, atol=1e-4)
    # one step (the gradient at the midpoint) is a worse estimate than 32
    assert float((integrated_gradients(prob, nodes, k=1, path="single") - exact).abs().sum()) \
        > float((ig - exact).abs().sum())


def test_joint_ig_completeness(neox_relu_problem):
    prob = neox_relu_problem
    nodes = active_nodes(prob)
    with torch.no_grad():
        total = float(prob.metric_at(prob.v_corr)[0] - prob.metric_at(prob.v_clean)[0])
    assert abs(total) > 1e-3
    assert float(integrated_gradients(prob, nodes, k=64, path="joint").sum()) == pytest.approx(total, rel=2e-3, abs=1e-4)
    # patching every latent in the latent space reproduces the corrupted SAE reconstruction (+ clean error)
    res = compare_methods(prob, ks=(2,), nodes=nodes[:4])
    assert res.m_corrupt == pytest.approx(total + res.m_clean, abs=1e-5)


def test_attribution_patching_is_exact_for_a_linear_metric():
    model = LinearStub()
    clean, corrupt = _tokens(20)
    metric = logit_diff_metric(torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    prob = build_problem(model, _sae("relu", 8, 16), clean, corrupt, metric)
    res = compare_methods(prob, ks=(1, 4))
    assert len(res.nodes) > 3
    torch.testing.assert_close(res.attribution_patching, res.exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.ig[1], res.exact, rtol=1e-5, atol=1e-5)
    assert res.errors(res.attribution_patching)["mae"] < 1e-5
    assert res.errors(res.attribution_patching)["corr"] == pytest.approx(1.0, abs=1e-6)


def test_gradients_miss_a_jumprelu_jump_in_preactivation_space():
    """Linear model, JumpReLU SAE (threshold theta), path in pre-activations z, latent i alone:
    m = const + sum_(b,p) coef_bi * z * 1[z > theta] / B.  Exact patching gives the change of
    z * 1[z > theta]; a gradient integrates only 1[z > theta], so IG tends to
    coef * (max(z1, theta) - max(z0, theta)), missing theta at each crossing."""
    model = LinearStub()
    clean, corrupt = _tokens(20, seed=2)
    metric = logit_diff_metric(torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    sae = _sae("jumprelu", 8, 16)
    th = 0.3
    pre = build_problem(model, sae, clean, corrupt, metric, space="pre")
    lat = build_problem(model, sae, clean, corrupt, metric, space="latent")
    nodes = active_nodes(pre)
    torch.testing.assert_close(exact_patching(pre, nodes), exact_patching(lat, nodes), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        c = sae.W_dec @ model.U  # [m, vocab]: logit change per unit of each latent
        coef = (c[:, [3, 4, 5]] - c[:, [6, 7, 8]]).T[:, None, :]  # [B, 1, m]
    z0, z1 = pre.v_clean[:, -1:], pre.v_corr[:, -1:]  # the metric reads the last position; no mixing here
    f = lambda z: z * (z > th)  # noqa: E731
    exact = (coef * (f(z1) - f(z0))).sum((0, 1))[nodes] / 3
    ig_limit = (coef * (z1.clamp_min(th) - z0.clamp_min(th))).sum((0, 1))[nodes] / 3
    ap = (coef * (z0 > th) * (z1 - z0)).sum((0, 1))[nodes] / 3
    torch.testing.assert_close(exact_patching(pre, nodes), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attribution_patching(pre, nodes), ap, rtol=1e-5, atol=1e-5)
    k = 128
    ig_pre = integrated_gradients(pre, nodes, k=k, path="single", chunk=k)
    # midpoint rule on a step integrand: error at most one step width per crossing
    tol = (coef.abs() * (z1 - z0).abs()).sum((0, 1))[nodes] / 3 / k
    assert bool(((ig_pre - ig_limit).abs() <= tol + 1e-5).all())
    crossing = ((z0 - th) * (z1 - th) < 0).any(0).any(0)[nodes] & ((ig_limit - exact).abs() > 1e-3)
    assert bool(crossing.any())
    assert bool(((ig_limit - exact)[crossing].abs() > 5 * tol[crossing]).any())  # IG's error does not vanish
    # in latent space the model is linear in f, so IG is exact for every k
    torch.testing.assert_close(integrated_gradients(lat, nodes, k=1, path="single"), exact_patching(lat, nodes),
                               rtol=1e-5, atol=1e-5)
    # m along the pre-activation path of a crossing latent is not continuous
    node = int(nodes[crossing][0])
    alphas, m = metric_along_path(pre, node, n_points=401)
    assert float(m.diff().abs().max()) > 20 * float(m.diff().abs().median())


def test_shapes_and_errors(tiny_bridges):
    model = tiny_bridges["neox"]
    clean, corrupt = _tokens(300)
    metric = logit_diff_metric(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    with pytest.raises(ValueError, match="same shape"):
        build_problem(model, _sae("relu", 32, 64), clean, corrupt[:, :4], metric)
    with pytest.raises(ValueError, match="elementwise"):
        build_problem(model, _sae("topk", 32, 64), clean, corrupt, metric, space="pre")
    # patching only the last position leaves the other positions' values clean
    pos = torch.zeros(clean.shape, dtype=torch.bool)
    pos[:, -1] = True
    prob = build_problem(model, _sae("relu", 32, 64), clean, corrupt, metric, positions=pos)
    assert bool((prob.delta[:, :-1] == 0).all())


def test_finite_difference_ig_counts_the_jump_that_gradients_miss():
    """Same JumpReLU set-up: along one latent's pre-activation path the finite-difference IG
    telescopes to exact patching for every k (gradient IG does not, at a crossing); on the joint
    path k = 1 is exact patching, and in latent space (a linear model) every k is."""
    model = LinearStub()
    clean, corrupt = _tokens(20, seed=2)
    metric = logit_diff_metric(torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    sae = _sae("jumprelu", 8, 16)
    pre = build_problem(model, sae, clean, corrupt, metric, space="pre")
    lat = build_problem(model, sae, clean, corrupt, metric, space="latent")
    nodes = active_nodes(pre)
    exact = exact_patching(pre, nodes)
    for k in (1, 3, 16):
        torch.testing.assert_close(finite_difference_ig(pre, nodes, k, path="single"), exact, rtol=1e-5, atol=1e-5)
    gap = (integrated_gradients(pre, nodes, k=64, path="single", chunk=64) - exact).abs()
    assert float(gap.max()) > 1e-2  # a crossing that gradient IG misses
    torch.testing.assert_close(finite_difference_ig(pre, nodes, 1, path="joint"), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(finite_difference_ig(lat, nodes, 5, path="joint"), exact_patching(lat, nodes),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        finite_difference_ig(pre, nodes, 0)


def test_task_subset_rebuilds_the_metric(tiny_bridges):
    from lib.models import load_model

    model = load_model("toy-1l", device="cpu")
    task = country_patching_task(model, 4, seed=0)
    one = task.subset([2])
    assert one.clean.shape == (1, task.clean.shape[1]) and one.pairs == [task.pairs[2]]
    logits = torch.randn(4, task.clean.shape[1], model.cfg.d_vocab)
    torch.testing.assert_close(one.metric(logits[2:3]), task.metric(logits)[2:3])
