"""lib.toys.compressed_computation: data, embeddings, the naive baseline, training, attributions.

Known answers are computed independently of the library's shortcuts: the full residual model is
run explicitly (embed, MLP in d_resid, unembed) and compared with the effective form; the Gram /
sparse training objective is compared with the dense squared error; the batched engine is
compared with the plain training loop it implements (``train_reference``); ablations with models
whose weights were zeroed by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

from lib.toys import compressed_computation as cc
from lib.toys.compressed_computation import sparse


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a busy 2-core machine two threads mostly wait for each other."""
    with cc.num_threads(1):
        yield


def _full_forward(x, w_e, w_in, w_out):
    """The APD residual MLP written out: residual x W_E, + ReLU(r W_in) W_out, read off by W_E^T."""
    r = x @ w_e
    r = r + torch.relu(r @ w_in) @ w_out
    return r @ w_e.T


def test_feature_distribution():
    g = torch.Generator().manual_seed(0)
    p, n, batch = 0.05, 100, 40_000
    x = cc.sample_features(batch, n, p, g)
    present = x != 0
    sd = math.sqrt(p * (1 - p) / present.numel())
    assert abs(present.float().mean().item() - p) < 5 * sd
    v = x[present]
    assert v.min() >= -1 and v.max() <= 1
    assert abs(v.mean().item()) < 0.01
    assert abs(v.pow(2).mean().item() - 1 / 3) < 0.01  # U[-1, 1]
    # the sparse sampler draws the same law, in row-major order
    rows, cols, vals = cc.sample_sparse(batch, n, p, g)
    assert abs(len(vals) / (batch * n) - p) < 5 * sd
    assert vals.min() >= -1 and vals.max() <= 1
    assert abs(vals.pow(2).mean().item() - 1 / 3) < 0.01
    flat = rows * n + cols
    assert bool((flat[1:] > flat[:-1]).all()) and int(rows.max()) < batch
    per_feature = torch.bincount(cols, minlength=n).float() / batch
    assert (per_feature - p).abs().max() < 6 * math.sqrt(p * (1 - p) / batch)


def test_active_rows_and_weight():
    g = torch.Generator().manual_seed(1)
    p, n = 0.01, 100
    x, pa = cc.sample_active_rows(5000, n, p, g)
    assert x.shape == (5000, n) and bool((x != 0).any(dim=1).all())
    plain = cc.sample_features(50_000, n, p, g)
    frac = (plain != 0).any(dim=1).float().mean().item()
    assert abs(frac - pa) < 5 * math.sqrt(pa * (1 - pa) / 50_000)


@pytest.mark.parametrize("kind", ["onehot", "orthonormal"])
def test_clean_embedding_is_orthonormal(kind):
    w = cc.make_embedding("clean", 100, 300, torch.Generator().manual_seed(0), clean_kind=kind)
    assert w.shape == (100, 300)
    torch.testing.assert_close(w @ w.T, torch.eye(100), atol=1e-5, rtol=0)


def test_random_embedding_and_mixing():
    d = 400
    w = cc.make_embedding("random", 100, d, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    m = w @ w.T - torch.eye(100)
    off = ~torch.eye(100, dtype=torch.bool)
    rms = m[off].pow(2).mean().sqrt().item()
    assert abs(rms - cc.matched_sigma(d)) < 0.1 * cc.matched_sigma(d)
    m0 = cc.make_mixing(100, d, torch.Generator().manual_seed(0), "embedding")
    torch.testing.assert_close(m0 * rms, m - torch.diag(torch.diag(m)), atol=1e-6, rtol=0)
    g0 = cc.make_mixing(100, d, torch.Generator().manual_seed(0), "gaussian")
    torch.testing.assert_close(g0, g0.T)
    assert torch.diag(g0).abs().max() == 0 and abs(g0[off].pow(2).mean().item() - 1) < 1e-5


def test_sigma_zero_is_clean_and_matched_sigma_is_random():
    cfg = cc.TrainConfig(d_resid=400)
    _, mix_clean = cc.model_matrices(cc.ModelSpec(0.01, "clean", 0.0, 3), cfg)
    assert mix_clean.abs().max() == 0
    _, mix_rand = cc.model_matrices(cc.ModelSpec(0.01, "random", 0.0, 3), cfg)
    off = ~torch.eye(100, dtype=torch.bool)
    rms = mix_rand[off].pow(2).mean().sqrt().item()
    _, mix_sig = cc.model_matrices(cc.ModelSpec(0.01, "clean", rms, 3), cfg)
    torch.testing.assert_close(mix_sig, mix_rand, atol=1e-6, rtol=0)
    # and training a sigma = 0 model is training the clean one
    small = cc.TrainConfig(n_features=20, d_resid=40, d_mlp=10, batch_size=128, steps=20, log_every=10, workers=1)
    a = cc.train_models([cc.ModelSpec(0.1, "clean", 0.0, 0)], small)
    b = cc.train_models([cc.ModelSpec(0.1, "clean", 0.0, 0), cc.ModelSpec(0.1, "clean", 0.05, 0)], small)
    torch.testing.assert_close(a.A[0], b.A[0])
    torch.testing.assert_close(a.B[0], b.B[0])


@pytest.mark.parametrize("embedding,clean_kind", [("random", "onehot"), ("clean", "onehot"), ("clean", "orthonormal")])
def test_effective_form_equals_full_model(embedding, clean_kind):
    """out = x + x mix + ReLU(x A) B with A = W_E W_in, B = W_out W_E^T; clean reduces to none."""
    g = torch.Generator().manual_seed(2)
    n, d, h = 30, 80, 10
    w_e = cc.make_embedding(embedding, n, d, g, clean_kind=clean_kind)
    w_in, w_out = torch.randn(d, h, generator=g), torch.randn(h, d, generator=g)
    x = cc.sample_features(500, n, 0.2, g)
    full = _full_forward(x, w_e, w_in, w_out)
    A, B, mix = w_e @ w_in, w_out @ w_e.T, w_e @ w_e.T - torch.eye(n)
    torch.testing.assert_close(full, x + x @ mix + cc.mlp_out(x, A, B), atol=1e-4, rtol=1e-4)
    loss_full = (full - (x + torch.relu(x))).pow(2).mean(0)
    torch.testing.assert_close(cc.per_feature_loss(x, A, B, mix), loss_full, atol=1e-4, rtol=1e-4)
    if embedding == "clean":  # the no-embedding model with the same effective weights
        torch.testing.assert_close(cc.per_feature_loss(x, A, B, None), loss_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("embedding", ["clean", "random"])
def test_naive_baseline_analytic_matches_empirical(embedding):
    """Hand-built naive model in the full residual parametrization vs p/6 (n-h)/n (+ mixing)."""
    g = torch.Generator().manual_seed(3)
    n, d, h, p = 100, 150, 50, 0.05
    w_e = cc.make_embedding(embedding, n, d, g)
    gram_inv = torch.linalg.inv(w_e @ w_e.T)
    w_in = (w_e.T @ gram_inv)[:, :h]  # W_E W_in = first h columns of I: neuron j reads x_j
    w_out = (gram_inv @ w_e)[:h]  # W_out W_E^T = first h rows of I: neuron j writes feature j
    x = cc.sample_features(60_000, n, p, g)
    out = _full_forward(x, w_e, w_in, w_out)
    empirical = (out - (x + torch.relu(x))).pow(2).mean().item()
    mix = w_e @ w_e.T - torch.eye(n)
    analytic = cc.naive_loss_analytic(p, n, h, mix if embedding == "random" else None)
    assert abs(empirical - analytic) < 0.03 * analytic
    if embedding == "clean":
        assert math.isclose(analytic, p / 12, rel_tol=1e-12)
    # the library's own evaluation of the effective-form naive model agrees too
    A, B = cc.naive_weights(n, h)
    lib = cc.evaluate_weights(A, B, mix if embedding == "random" else None, p, n_rows=30_000).mean().item()
    assert abs(lib - analytic) < 0.03 * analytic


@pytest.mark.parametrize("p", [0.01, 0.3])  # the CSR path and the dense path
def test_training_objective_equals_dense_squared_error(p):
    """The Gram-form loss (and its gradient, and the per-feature SSE) vs the plain computation."""
    g = torch.Generator().manual_seed(4)
    n, h, K = 20, 8, 3
    sm = sparse._Sample(512, n, p, g)
    sb = sparse._Batch(sm, p)
    assert sb.sparse == (p < sparse._Batch.DENSE_FROM)
    A = torch.randn(K, n, h, generator=g, requires_grad=True)
    B = torch.randn(K, h, n, generator=g)
    mix = torch.randn(K, n, n, generator=g) * torch.tensor([0.0, 1.0, 1.0])[:, None, None]
    obj = sparse._objective(sb, A, B, mix)
    x = sm.dense()
    assert x.shape[0] == sm.R and bool((x != 0).any(dim=1).all())  # all-zero rows dropped
    t = torch.relu(x)[None] - x[None] @ mix
    err = torch.relu(x[None] @ A) @ B - t
    direct = err.pow(2).sum((1, 2)) - t.pow(2).sum((1, 2))
    torch.testing.assert_close(obj, direct, atol=1e-3, rtol=1e-4)
    (ga,) = torch.autograd.grad(obj.sum(), A)
    (gd,) = torch.autograd.grad(direct.sum(), A)
    torch.testing.assert_close(ga, gd, atol=1e-3, rtol=1e-4)
    sse = sparse._per_feature_sse(sb, A.detach(), B, mix)
    torch.testing.assert_close(sse, err.detach().pow(2).sum(1), atol=1e-3, rtol=1e-4)


def test_training_reduces_loss():
    cfg = cc.TrainConfig(n_features=20, d_resid=40, d_mlp=10, batch_size=256, steps=300, log_every=50, workers=1)
    specs = [cc.ModelSpec(0.1, e, 0.0, 0) for e in cc.EMBEDDINGS]
    trained = cc.train_models(specs, cfg)
    start = cc.train_models(specs, cc.TrainConfig(**{**cfg.__dict__, "steps": 1, "lr": 0.0, "log_every": 1}))
    after = cc.evaluate(trained, active_rows=8000).mean(1)
    before = cc.evaluate(start, active_rows=8000).mean(1)
    assert bool((after < 0.75 * before).all()), (before, after)
    assert bool((trained.loss_curves[:, -1] < trained.loss_curves[:, 0]).all())


@pytest.mark.parametrize("p", [0.01, 0.1])  # the CSR path and the dense path
def test_engine_trains_what_the_reference_loop_trains(p):
    """The batched, sparse, multi-model engine against the plain dense loop, model by model:
    full and effective parametrizations, all three embeddings, explicit mixing."""
    cfg = cc.TrainConfig(n_features=20, d_resid=40, d_mlp=10, batch_size=256, steps=40, log_every=10, workers=1)
    specs = [cc.ModelSpec(p, "random", 0.0, 0), cc.ModelSpec(p, "clean", 0.3, 1), cc.ModelSpec(p, "none", 0.0, 0),
             cc.ModelSpec(p, "random", 0.0, 1, parametrization="effective")]
    trained = cc.train_models(specs, cfg)
    for i, spec in enumerate(specs):
        A, B, mix = cc.train_reference(spec, cfg)
        torch.testing.assert_close(trained.mix[i], mix)
        torch.testing.assert_close(trained.A[i], A, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(trained.B[i], B, atol=2e-4, rtol=1e-3)
    untrained = cc.train_reference(specs[0], cc.TrainConfig(**{**cfg.__dict__, "steps": 0}))
    assert (trained.A[0] - untrained[0]).abs().max() > 1e-2  # it did train


def test_results_do_not_depend_on_workers_or_grouping():
    """Jobs share p's data stream; splitting models into jobs / processes changes nothing."""
    base = dict(n_features=20, d_resid=40, d_mlp=10, batch_size=128, steps=30, log_every=10)
    specs = [cc.ModelSpec(0.1, "random", 0.0, 0), cc.ModelSpec(0.1, "none", 0.0, 1),
             cc.ModelSpec(0.05, "clean", 0.0, 0)]
    one = cc.train_models(specs, cc.TrainConfig(**base, workers=1, job_size=6))
    two = cc.train_models(specs, cc.TrainConfig(**base, workers=2, job_size=1))
    torch.testing.assert_close(one.A, two.A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.B, two.B, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.loss_curves, two.loss_curves, atol=1e-7, rtol=1e-5)


def test_full_parametrization_starts_from_the_same_function():
    cfg_e = cc.TrainConfig(
        n_features=20, d_resid=40, d_mlp=10, batch_size=64, steps=1, lr=0.0, log_every=1, workers=1,
        parametrization="effective",
    )
    cfg_f = cc.TrainConfig(**{**cfg_e.__dict__, "parametrization": "full"})
    specs = [cc.ModelSpec(0.1, "random", 0.0, 0), cc.ModelSpec(0.1, "clean", 0.0, 0)]
    e, f = cc.train_models(specs, cfg_e), cc.train_models(specs, cfg_f)
    torch.testing.assert_close(e.A, f.A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.B, f.B, atol=1e-5, rtol=1e-5)


def _tiny_model(seed=5, n=12, h=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, h, generator=g)
    B = torch.randn(h, n, generator=g) * 0.5
    mix = 0.1 * torch.randn(n, n, generator=g)
    x, _ = cc.sample_active_rows(300, n, 0.2, g)
    return x, A, B, mix


def test_ablation_attribution_is_the_loss_change():
    x, A, B, mix = _tiny_model()
    attr = cc.component_attributions(x, A, B, mix, ig_steps=4)
    full = (cc.mlp_out(x, A, B) - cc.mlp_target(x, mix)).pow(2).mean(-1)
    for j in range(A.shape[1]):
        A2, B2 = A.clone(), B.clone()
        A2[:, j] = 0
        B2[j, :] = 0
        ablated = (cc.mlp_out(x, A2, B2) - cc.mlp_target(x, mix)).pow(2).mean(-1)
        torch.testing.assert_close(attr["ablation"][:, j], ablated - full, atol=1e-5, rtol=1e-5)


def test_gradient_attribution_is_the_first_order_change():
    x, A, B, mix = _tiny_model()
    attr = cc.component_attributions(x, A, B, mix, ig_steps=2)
    eps = 1e-3
    h = A.shape[1]
    for j in range(h):
        m = torch.ones(h, dtype=torch.float64)
        m[j] -= eps
        lo = cc.masked_sample_loss(x.double(), A.double(), B.double(), mix.double(), m)
        hi = cc.masked_sample_loss(x.double(), A.double(), B.double(), mix.double(), torch.ones(h, dtype=torch.float64))
        torch.testing.assert_close(attr["gradient"][:, j].double(), (lo - hi) / eps, atol=2e-3, rtol=2e-2)


def test_integrated_gradients_completeness():
    """IG (path: all components from ablated to present) sums to the loss change of ablating all."""
    x, A, B, mix = _tiny_model()
    h = A.shape[1]
    attr = cc.component_attributions(x, A, B, mix, ig_steps=256)
    full = cc.masked_sample_loss(x, A, B, mix, torch.ones(h))
    none = cc.masked_sample_loss(x, A, B, mix, torch.zeros(h))
    torch.testing.assert_close(attr["integrated_gradients"].sum(1), none - full, atol=1e-3, rtol=1e-3)
    # with few steps the midpoint rule is visibly off: the check above is not vacuous
    rough = cc.component_attributions(x, A, B, mix, ig_steps=1)["integrated_gradients"].sum(1)
    assert (rough - (none - full)).abs().max() > 1e-2


def test_attribution_table_shape():
    x, A, B, mix = _tiny_model()
    table = cc.attribution_table(cc.component_attributions(x, A, B, mix, ig_steps=8))
    assert set(table) == {"ablation", "gradient", "integrated_gradients"}
    assert math.isclose(table["ablation"]["per_input_pearson"], 1.0, rel_tol=1e-9)
    for row in table.values():
        assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 for v in row.values())


# ----------------------------------------------------------------------------------------------
# The committed sweep (lib.toys.compressed_computation.sweep) and the seed statistics
# ----------------------------------------------------------------------------------------------
_TINY = dict(n_features=20, d_resid=40, d_mlp=10, batch_size=128)


def _tiny_plan():
    return cc.sweep_plan(steps=20, short_steps=10, seeds=2, ps=(0.05, 0.1), sigma_p=0.1, sigma_scales=(2.0,),
                         d_resid=_TINY["d_resid"])


def test_sweep_plan_covers_every_p_and_sigma_with_every_seed():
    (long_steps, long), (short_steps, short) = cc.sweep_plan(seeds=3)
    assert (long_steps, short_steps) == (10_000, 1_000)
    full = [s for s in long if s.parametrization is None]
    for p in cc.sweep.PS:
        for e in cc.EMBEDDINGS:
            assert sorted(s.seed for s in full if s.p == p and s.embedding == e and s.sigma == 0) == [0, 1, 2]
            assert sorted(s.seed for s in short if s.p == p and s.embedding == e) == [0, 1, 2]
    sm = cc.matched_sigma(1000)
    for k in cc.sweep.SIGMA_SCALES:
        assert sorted(s.seed for s in full if s.mixing == "embedding" and math.isclose(s.sigma, k * sm)) == [0, 1, 2]
    assert sorted(s.seed for s in full if s.mixing == "gaussian" and s.sigma > 0) == [0, 1, 2]
    assert len(set(long)) == len(long)


def test_sweep_rows_are_what_train_models_trains(tmp_path):
    """The sweep (job by job, in this process) against train_models on the same specs and config."""
    cfg = cc.TrainConfig(**_TINY)
    plan = _tiny_plan()
    res = cc.run_sweep(tmp_path / "s.json", plan, cfg, eval_rows=2000)
    assert not (tmp_path / "s.json.partial.jsonl").exists() and (tmp_path / "s.json").exists()
    assert res["config"]["steps"] == 20 and len(res["runs"]) == sum(len(s) for _, s in plan)
    steps, specs = plan[0]
    direct = cc.results_frame(cc.train_models(specs, cc.TrainConfig(**_TINY, steps=steps, log_every=1, workers=1),
                                              eval_rows=2000))
    df = cc.load_sweep(tmp_path / "s.json", steps=steps)
    assert len(df) == len(direct)
    merged = df.merge(direct, on=["p", "embedding", "sigma", "seed", "parametrization"], suffixes=("", "_direct"))
    assert len(merged) == len(direct)
    torch.testing.assert_close(torch.tensor(merged.loss_over_p.values), torch.tensor(merged.loss_over_p_direct.values),
                               atol=0, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(merged.naive_empirical.values),
                               torch.tensor(merged.naive_empirical_direct.values))


def test_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    from lib.toys.compressed_computation import sweep

    cfg = cc.TrainConfig(**_TINY)
    plan = _tiny_plan()
    whole = cc.run_sweep(tmp_path / "a.json", plan, cfg, eval_rows=2000)
    real, calls = sweep._job_rows, []

    def dies_after_two(specs, c, rows):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(specs)
        return real(specs, c, rows)

    monkeypatch.setattr(sweep, "_job_rows", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        cc.run_sweep(tmp_path / "b.json", plan, cfg, eval_rows=2000)
    assert not (tmp_path / "b.json").exists()
    assert len((tmp_path / "b.json.partial.jsonl").read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(sweep, "_job_rows", lambda *a: calls.append(a[0]) or real(*a))
    again = cc.run_sweep(tmp_path / "b.json", plan, cfg, eval_rows=2000)
    n_jobs = len((tmp_path / "b.json.log").read_text().split("job ")) - 1
    assert len(calls) == n_jobs - 2 > 0  # only the jobs not yet done
    assert again == whole


def test_paired_verdict():
    assert cc.paired_verdict([-0.010, -0.011, -0.009]) == "below"
    assert cc.paired_verdict([0.010, 0.011, 0.009]) == "above"
    # mean 0.001, sd 0.01: the 95% interval over 3 seeds is +- 0.025
    assert cc.paired_verdict([0.011, -0.009, 0.001]) == "within noise"
    assert cc.paired_verdict([0.5]) == "one seed"


def test_naive_comparison_and_tables_on_known_numbers():
    import pandas as pd

    rows = []
    for seed, (r, c) in enumerate([(0.070, 0.0835), (0.071, 0.0830), (0.069, 0.0840)]):
        for e, v in (("random", r), ("clean", c)):
            rows.append({"p": 0.01, "embedding": e, "sigma": 0.0, "sigma_scale": 0.0, "mixing": "", "seed": seed,
                         "loss_over_p": v, "naive_loss_per_feature": 0.01 / 12, "naive_in_setting": 0.01 / 12,
                         "naive_empirical": 0.01 * 0.0835, "parametrization": "full", "steps": 100})
    df = pd.DataFrame(rows)
    cmp = cc.naive_comparison(df).set_index("embedding")
    assert cmp.loc["random", "vs_naive"] == "below" and cmp.loc["clean", "vs_naive"] == "within noise"
    assert math.isclose(cmp.loc["random", "mean"], 0.070) and math.isclose(cmp.loc["random", "sd"], 0.001)
    assert math.isclose(cmp.loc["clean", "diff"], 0.0, abs_tol=1e-12)
    table = cc.sweep_table(df)
    assert table.loc[0.01, "random"] == "0.0700 ± 0.0010" and table.loc[0.01, "clean vs naive"] == "within noise"
    short = df.assign(loss_over_p=df.loss_over_p + 0.01, steps=10)
    lt = cc.length_table(df, short)
    assert set(lt.verdict) == {"below"} and list(lt.loc[0.01].index) == ["random", "clean"]
