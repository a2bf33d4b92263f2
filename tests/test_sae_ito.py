"""lib.sae.ito: exact recovery with orthonormal atoms, L0 respected, no worse than the encoder."""
from __future__ import annotations

import pytest
import torch

from lib.sae.base import SAEConfig, make_sae
from lib.sae.buffer import TensorSource
from lib.sae.ito import code_replacement, ito_encode, ito_sae, threshold_codes
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


def test_no_worse_than_the_encoder_at_matched_l0_on_a_trained_sae():
    x, _ = sparse_data(n=1024)
    sae, _ = train_sae(SAEConfig(d_in=16, d_sae=64), TensorSource(x, 256, seed=0),
                       TrainConfig(total_tokens=256 * 100, batch_size=256, lr=5e-3, sparsity_coefficient=0.3))
    x = x[:512]
    with torch.no_grad():
        f_enc = sae.encode(x)
        mse_enc = float((sae.decode(f_enc) - x).pow(2).sum(-1).mean())
    f_ito = ito_sae(sae, x, refine_steps=5)
    with torch.no_grad():
        mse_ito = float((sae.decode(f_ito) - x).pow(2).sum(-1).mean())
    assert bool(((f_ito != 0).sum(-1) <= (f_enc != 0).sum(-1)).all())  # matched (at most) per token
    assert mse_ito <= mse_enc
    # the splice function does the same thing on [batch, pos, d] activations
    with torch.no_grad():
        out = code_replacement(sae, "ito", refine_steps=5)(x.reshape(8, 64, 16))
        torch.testing.assert_close(out.reshape(512, 16), sae.decode(f_ito), atol=1e-5, rtol=1e-5)
