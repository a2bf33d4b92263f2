"""lib.sae.ito: exact recovery with orthonormal atoms, L0 respected, no worse than the encoder."""
from __future__ import annotations

import pytest
import torch

from lib.sae.base import SAEConfig, make_sae
from lib.sae.buffer import TensorSource
from lib.sae.ito import code_replacement, ito_encode, ito_sae, refit_sae, refit_support, threshold_codes
from lib.sae.trainer import TrainConfig, train_sae
from tests.test_sae_trainer import sparse_data


def _orthonormal_problem(n=64, d=32, m=24, k=4, seed=0, nonneg=True):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    W = q.T.contiguous()  # [m, d], orthonormal rows
    codes = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        idx = torch.randperm(m, generator=g)[:k]
        vals = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        codes[i, idx] = vals if nonneg else vals * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double()
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return W, b, codes, codes @ W + b


@pytest.mark.parametrize("method", ["gp", "mp"])
def test_recovers_exact_codes_with_orthonormal_atoms(method):
    W, b, codes, x = _orthonormal_problem()
    c = ito_encode(W, b, x, k=4, method=method)
    torch.testing.assert_close(c, codes, atol=1e-10, rtol=0)


def test_signed_codes_when_not_nonneg():
    W, b, codes, x = _orthonormal_problem(nonneg=False, seed=1)
    c = ito_encode(W, b, x, k=4, nonneg=False)
    torch.testing.assert_close(c, codes, atol=1e-10, rtol=0)
    # with nonneg=True the negative parts cannot be represented: never negative codes
    assert bool((ito_encode(W, b, x, k=4) >= 0).all())


def test_l0_is_respected_per_row_and_batches_agree():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 12, generator=g)
    x = torch.randn(50, 12, generator=g)
    k = torch.randint(0, 7, (50,), generator=g)
    for method in ("gp", "mp"):
        c = ito_encode(W, None, x, k, method=method, nonneg=False)
        assert bool(((c != 0).sum(-1) <= k).all())
        assert bool(((c != 0).sum(-1) == k).all()) or method == "mp"  # gp uses every allowed atom
        torch.testing.assert_close(ito_encode(W, None, x, k, method=method, nonneg=False, batch_size=7), c)
    # more atoms never hurt gradient pursuit (greedy, nested supports, exact line search)
    errs = [float((x - ito_encode(W, None, x, kk, nonneg=False) @ W).pow(2).sum()) for kk in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="method"):
        ito_encode(W, None, x, 3, method="lasso")


def test_threshold_codes():
    f = torch.tensor([[0.5, 2.0, -0.1, 3.0]])
    torch.testing.assert_close(threshold_codes(f, 1.0), torch.tensor([[0.0, 2.0, 0.0, 3.0]]))
    torch.testing.assert_close(threshold_codes(f, 0.0), f)


@pytest.fixture(scope="module")
def trained_sae():
    """A ReLU SAE trained on sparse synthetic data, 512 held inputs, its encoder's codes and MSE."""
    x, _ = sparse_data(n=1024)
    sae, _ = train_sae(SAEConfig(d_in=16, d_sae=64), TensorSource(x, 256, seed=0),
                       TrainConfig(total_tokens=256 * 100, batch_size=256, lr=5e-3, sparsity_coefficient=0.3))
    x = x[:512]
    with torch.no_grad():
        f_enc = sae.encode(x)
        return sae, x, f_enc, float((sae.decode(f_enc) - x).pow(2).sum(-1).mean())


def test_no_worse_than_the_encoder_at_matched_l0_on_a_trained_sae(trained_sae):
    sae, x, f_enc, mse_enc = trained_sae
    f_ito = ito_sae(sae, x, refine_steps=5)
    with torch.no_grad():
        mse_ito = float((sae.decode(f_ito) - x).pow(2).sum(-1).mean())
    assert bool(((f_ito != 0).sum(-1) <= (f_enc != 0).sum(-1)).all())  # matched (at most) per token
    assert mse_ito <= mse_enc
    # the splice function does the same thing on [batch, pos, d] activations
    with torch.no_grad():
        out = code_replacement(sae, "ito", refine_steps=5)(x.reshape(8, 64, 16))
        torch.testing.assert_close(out.reshape(512, 16), sae.decode(f_ito), atol=1e-5, rtol=1e-5)


def test_support_refit_recovers_codes_on_their_support_with_orthonormal_atoms():
    """Given the right support and wrong magnitudes, the refit finds the exact magnitudes."""
    W, b, codes, x = _orthonormal_problem(seed=2)
    wrong = codes * (0.3 + torch.rand(codes.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    torch.testing.assert_close(refit_support(W, b, x, wrong), codes, atol=1e-10, rtol=0)


def test_support_refit_is_least_squares_on_each_rows_support():
    """Correlated atoms, signed codes: each row equals torch.linalg.lstsq on that row's atoms."""
    g = torch.Generator().manual_seed(3)
    n, d, m = 40, 12, 30
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    support = torch.rand(n, m, generator=g) < 0.2
    support[0] = False  # an empty support stays empty
    c = refit_support(W, b, x, support.double(), nonneg=False)
    assert bool((c[~support] == 0).all()) and bool((c[0] == 0).all())
    for i in range(1, n):
        idx = support[i].nonzero()[:, 0]
        ref = torch.linalg.lstsq(W[idx].T, (x[i] - b)[:, None]).solution[:, 0]
        torch.testing.assert_close(c[i, idx], ref, atol=1e-8, rtol=1e-8)


def test_nonneg_support_refit_matches_nnls_and_never_leaves_the_support():
    from scipy.optimize import nnls

    g = torch.Generator().manual_seed(4)
    n, d, m = 60, 16, 40
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    support = torch.rand(n, m, generator=g) < 0.25
    c = refit_support(W, None, x, support.double())
    assert bool((c >= 0).all()) and bool((c[~support] == 0).all())
    ours = (x - c @ W).norm(dim=-1)
    best = torch.tensor([nnls(W[support[i]].T.numpy(), x[i].numpy())[1] if support[i].any() else float(x[i].norm())
                         for i in range(n)], dtype=torch.float64)
    assert bool((ours >= best - 1e-9).all())  # NNLS is the optimum on the support
    assert float((ours - best).abs().max()) < 1e-9  # and reaches it


def test_support_refit_beats_the_encoder_on_its_own_support(trained_sae):
    sae, x, f_enc, mse_enc = trained_sae
    with torch.no_grad():
        f_fit = refit_sae(sae, x)
        mse_fit = float((sae.decode(f_fit) - x).pow(2).sum(-1).mean())
        out = code_replacement(sae, "support_refit")(x.reshape(8, 64, 16))
    assert bool(((f_fit != 0) <= (f_enc != 0)).all())  # only the encoder's latents
    assert mse_fit < 0.9 * mse_enc  # an L1-trained encoder shrinks: its magnitudes are too small
    torch.testing.assert_close(out.reshape(512, 16), sae.decode(f_fit), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="coder must be one of"):
        code_replacement(sae, "oracle")
