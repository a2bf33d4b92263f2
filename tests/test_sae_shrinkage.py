"""lib.sae.shrinkage: the correct closed form is the argmin, the reverse (first-printed) form is not."""
from __future__ import annotations

import math

import pytest
import torch

from lib.sae.shrinkage import (gamma_check, gamma_closed_form, gamma_inverse_form, gamma_numeric,
                               gamma_reverse_form, sae_gamma, shrinkage_objective)


def _brute_force(x_hat, x, lo=0.01, hi=10.0, n=200_001):
    """argmin over a dense log-spaced grid, computed from the moments by plain evaluation."""
    grid = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    hh = float(x_hat.double().pow(2).sum(-1).mean())
    hx = float((x_hat.double() * x.double()).sum(-1).mean())
    xx = float(x.double().pow(2).sum(-1).mean())
    obj = hh / grid**2 - 2 * hx / grid + xx
    return float(grid[obj.argmin()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_is_the_numeric_argmin_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 16, generator=g)
    x_hat = 0.7 * x + 0.3 * torch.randn(500, 16, generator=g)  # shrunk and noisy
    closed, numeric = gamma_closed_form(x_hat, x), gamma_numeric(x_hat, x)
    assert numeric == pytest.approx(closed, rel=1e-7)
    assert _brute_force(x_hat, x) == pytest.approx(closed, rel=1e-4)
    # it is a minimum: nearby gammas do worse
    for eps in (1e-3, -1e-3):
        assert shrinkage_objective(closed * (1 + eps), x_hat, x) > shrinkage_objective(closed, x_hat, x)
    # and the reverse form is not the argmin here
    assert abs(gamma_reverse_form(x_hat, x) - closed) > 0.05
    assert gamma_inverse_form(x_hat, x) == pytest.approx(1 / closed)


def test_one_dimensional_cases():
    # one sample in 1-D: both forms give x_hat / x
    x, x_hat = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert gamma_closed_form(x_hat, x) == pytest.approx(0.5)
    assert gamma_reverse_form(x_hat, x) == pytest.approx(0.5)
    assert gamma_numeric(x_hat, x) == pytest.approx(0.5, rel=1e-7)
    # several samples in 1-D: x = (1, 2), x_hat = (1, 1): argmin 2/3, reverse 3/5
    x, x_hat = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    assert gamma_numeric(x_hat, x) == pytest.approx(2 / 3, rel=1e-7)
    assert gamma_closed_form(x_hat, x) == pytest.approx(2 / 3)
    assert gamma_reverse_form(x_hat, x) == pytest.approx(3 / 5)
    # exact reconstruction scaled by one common c: every form gives c
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(3))
    for form in (gamma_closed_form, gamma_reverse_form, gamma_numeric):
        assert form(0.8 * x, x) == pytest.approx(0.8, rel=1e-7)


def test_nearly_perpendicular_vectors():
    """x_hat almost perpendicular to x: <x_hat, x> is tiny, so the argmin gamma is huge (dividing
    x_hat by a large number is the best one can do), while the reverse form goes to zero."""
    x = torch.tensor([[1.0, 0.0]])
    x_hat = torch.tensor([[0.05, 1.0]])
    closed = gamma_closed_form(x_hat, x)
    assert closed == pytest.approx((0.05**2 + 1) / 0.05)
    assert gamma_numeric(x_hat, x, hi=1e4) == pytest.approx(closed, rel=1e-6)
    assert gamma_reverse_form(x_hat, x) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no positive gamma"):
        gamma_closed_form(torch.tensor([[0.0, 1.0]]), x)


@pytest.mark.parametrize("angle", [0.3, 0.8, 1.2])
def test_equal_length_vectors_at_an_angle(angle):
    """||x_hat|| = ||x||, angle theta: argmin gamma = 1/cos(theta) > 1; reverse form cos(theta) < 1."""
    x = torch.tensor([[1.0, 0.0]])
    x_hat = torch.tensor([[math.cos(angle), math.sin(angle)]])
    check = gamma_check(x_hat, x)
    assert check["correct_closed_form"] == pytest.approx(1 / math.cos(angle))
    assert check["numeric_argmin"] == pytest.approx(1 / math.cos(angle), rel=1e-7)
    assert check["reverse_closed_form"] == pytest.approx(math.cos(angle))


def test_sae_gamma_matches_closed_form_on_its_reconstructions():
    from lib.sae.base import SAEConfig, make_sae

    sae = make_sae(SAEConfig(d_in=8, d_sae=16), seed=0)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_hat = sae(x)
    assert sae_gamma(sae, x, batch_size=64) == pytest.approx(gamma_closed_form(x_hat, x), rel=1e-9)


def test_commenters_one_d_example_and_the_other_forms():
    """The public comment's 1-D check: x = 1, x_hat = 1/2.  The definition's argmin is 1/2, as are the
    correct closed form, the reverse form and the comment's projection form; the unsourced
    'pythagorean' reconstruction gives the 1/sqrt(3) the comment quotes for the printed eq. (10)."""
    from lib.sae.shrinkage import gamma_forms

    forms = gamma_forms(torch.tensor([[0.5]]), torch.tensor([[1.0]]))
    for key in ("numeric_argmin", "correct_closed_form", "reverse_form", "projection_form"):
        assert forms[key] == pytest.approx(0.5, rel=1e-7)
    assert forms["pythagorean_form"] == pytest.approx(1 / math.sqrt(3))
    # several samples: x = (1, 2), x_hat = (1, 1): projection form = mean(1/1, 2/4) = 3/4
    forms = gamma_forms(torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [2.0]]))
    assert forms["projection_form"] == pytest.approx(0.75)
    assert forms["correct_closed_form"] == pytest.approx(2 / 3)
    # E||x||^2 = 5/2, E||x_hat - x||^2 = 1/2, E||x_hat||^2 = 1: sqrt(1 / 2)
    assert forms["pythagorean_form"] == pytest.approx(math.sqrt(0.5))
    # an exact reconstruction: every form is 1
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    assert all(v == pytest.approx(1.0, rel=1e-6) for v in gamma_forms(x.clone(), x).values())


def test_value_at_interpolates_in_log_x_and_refuses_to_extrapolate():
    from lib.sae.shrinkage import value_at

    assert value_at([1, 4], [0.0, 2.0], 2) == pytest.approx(1.0)  # halfway in log 2
    assert value_at([1, 4], [0.0, 2.0], 2, log_x=False) == pytest.approx(2 / 3)
    assert value_at([4, 1, 16], [2.0, 0.0, 4.0], 8) == pytest.approx(3.0)  # unsorted input
    assert value_at([1, 4], [0.0, 2.0], 4) == pytest.approx(2.0)
    assert math.isnan(value_at([1, 4], [0.0, 2.0], 5)) and math.isnan(value_at([1, 4], [0.0, 2.0], 0.5))


def test_shrinkage_point_matches_independent_computation():
    from lib.sae.base import SAEConfig, make_sae
    from lib.sae.shrinkage import shrinkage_point

    sae = make_sae(SAEConfig(d_in=8, d_sae=16), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)  # some latents off
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    pt = shrinkage_point(sae, x)
    with torch.no_grad():
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        x_hat = f @ sae.W_dec + sae.b_dec
    assert pt["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()))
    assert 0 < pt["l0"] < 16
    assert pt["gamma"] == pytest.approx(gamma_numeric(x_hat, x), rel=1e-6)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert pt["var_explained"] == pytest.approx(1 - fvu, rel=1e-5)


def test_mean_std_skips_missing_values():
    from lib.sae.shrinkage import mean_std

    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([1.0, float("nan"), None, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([float("nan")])["n"] == 0
