"""Tests of log I_nu and I_{nu+1} / I_nu against SciPy (scipy.special.ive, hyp0f1)."""

import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from pyro_am.special import bessel_ratio, log_bessel_iv

ORDERS = np.concatenate([np.linspace(0.0, 5.0, 21), np.linspace(5.0, 512.0, 40), [31.0, 49.5]])
KAPPAS = np.logspace(-6, 5, 300)


def _reference_log_iv(nu: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """log I_nu(kappa) from SciPy: log(ive) + kappa, or the hyp0f1 series where ive underflows."""
    nu, kappa = np.broadcast_arrays(np.asarray(nu, float), np.asarray(kappa, float))
    with np.errstate(divide="ignore"):
        result = np.log(sp.ive(nu, kappa)) + kappa
    # hyp0f1 is evaluated only where ive underflows (kappa far below nu), where it is accurate.
    under = ~np.isfinite(result)
    nu_u, kappa_u = nu[under], kappa[under]
    series = np.log(sp.hyp0f1(nu_u + 1, kappa_u**2 / 4))
    result[under] = nu_u * np.log(kappa_u / 2) - sp.gammaln(nu_u + 1) + series
    return result


def _reference_ratio(nu: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """I_{nu+1} / I_nu from SciPy: a ratio of ive, or of hyp0f1 series where ive underflows."""
    nu, kappa = np.broadcast_arrays(np.asarray(nu, float), np.asarray(kappa, float))
    with np.errstate(divide="ignore", invalid="ignore"):
        result = sp.ive(nu + 1, kappa) / sp.ive(nu, kappa)
    under = ~(np.isfinite(result) & (result > 0))
    nu_u, quarter_square = nu[under], kappa[under] ** 2 / 4
    series = sp.hyp0f1(nu_u + 2, quarter_square) / sp.hyp0f1(nu_u + 1, quarter_square)
    result[under] = kappa[under] / (2 * (nu_u + 1)) * series
    return result


def test_log_bessel_iv_dense_grid_matches_scipy():
    nu, kappa = np.meshgrid(ORDERS, KAPPAS, indexing="ij")
    reference = _reference_log_iv(nu, kappa)
    assert np.isfinite(reference).all()
    ours = log_bessel_iv(torch.tensor(nu), torch.tensor(kappa)).numpy()
    # Relative error of log I where |log I| >= 1, and relative error of I itself (absolute error
    # of log I) where log I is near zero, for example I_0 at small kappa or a zero crossing.
    error = np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))
    assert error.max() <= 1e-6


def test_log_bessel_iv_small_kappa_relative_accuracy():
    # log I_0(k) ~ k^2 / 4 is near zero, so it needs the log1p form to keep relative accuracy.
    kappa = torch.tensor([1e-6, 1e-3, 0.1], dtype=torch.float64)
    quarter_square = kappa.square() / 4
    # I_0(k) - 1 = sum_{m >= 1} (k^2 / 4)^m / (m!)^2; eight terms leave under 1e-30 relative.
    tail = sum(quarter_square.pow(m) / math.factorial(m) ** 2 for m in range(1, 9))
    ours = log_bessel_iv(0.0, kappa)
    # Positive terms summed in float64: about 1e-15 relative.
    torch.testing.assert_close(ours, torch.log1p(tail), rtol=1e-12, atol=0.0)


def test_log_bessel_iv_at_zero():
    kappa = torch.zeros(3, dtype=torch.float64)
    ours = log_bessel_iv(torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64), kappa)
    assert ours[0].item() == 0.0
    assert ours[1].item() == -np.inf
    assert ours[2].item() == -np.inf


def test_bessel_ratio_matches_scipy():
    nu, kappa = np.meshgrid(ORDERS, KAPPAS, indexing="ij")
    reference = _reference_ratio(nu, kappa)
    assert np.isfinite(reference).all()
    ours = bessel_ratio(torch.tensor(nu), torch.tensor(kappa)).numpy()
    # Observed agreement is about 5e-11 relative at the largest kappa, so 1e-8 leaves a margin.
    relative = np.abs(ours - reference) / reference
    assert relative.max() <= 1e-8
    assert (ours >= 0).all()
    assert (ours < 1).all()


def test_bessel_ratio_small_kappa_limit():
    nu = torch.tensor([0.0, 10.0, 500.0], dtype=torch.float64)
    kappa = torch.full_like(nu, 1e-6)
    # I_{nu+1} / I_nu = (k / (2 (nu + 1))) (1 + O(k^2)), so the relative error is about 1e-12.
    torch.testing.assert_close(bessel_ratio(nu, kappa), kappa / (2 * (nu + 1)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("nu", [0.0, 0.5, 4.0, 31.0, 200.0])
@pytest.mark.parametrize("kappa", [1e-3, 1.5, 2.5, 50.0, 3000.0])
def test_log_bessel_iv_gradient_finite_difference(nu, kappa):
    point = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(nu, point), point)
    step = 1e-6 * kappa
    with torch.no_grad():
        upper = log_bessel_iv(nu, point + step)
        lower = log_bessel_iv(nu, point - step)
    central = (upper - lower) / (2 * step)
    # A central difference with relative step 1e-6 is accurate to about 1e-8 relative.
    torch.testing.assert_close(grad, central, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("nu", [0.0, 2.5, 100.0])
def test_log_bessel_iv_gradient_identity(nu):
    kappa = torch.tensor([0.01, 1.0, 3.0, 80.0, 5e4], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(nu, kappa).sum(), kappa)
    values = kappa.detach().numpy()
    # d/dk log I_nu = I_nu' / I_nu = I_{nu+1} / I_nu + nu / k, with the ratio from SciPy.
    expected = _reference_ratio(np.full_like(values, nu), values) + nu / values
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-8)


def test_bessel_ratio_gradient_finite_difference():
    nu = 7.5
    kappa = torch.tensor([0.3, 2.0, 12.0, 900.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(bessel_ratio(nu, kappa).sum(), kappa)
    step = 1e-6 * kappa.detach()
    with torch.no_grad():
        central = (bessel_ratio(nu, kappa + step) - bessel_ratio(nu, kappa - step)) / (2 * step)
    # Central differences with relative step 1e-6: about 1e-8 relative error.
    torch.testing.assert_close(grad, central, rtol=1e-6, atol=1e-10)


def test_log_bessel_iv_second_derivative():
    nu = 3.0
    kappa = torch.tensor([0.5, 4.0, 40.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(nu, kappa).sum(), kappa, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), kappa)
    step = 1e-4 * kappa.detach()
    with torch.no_grad():
        values = [log_bessel_iv(nu, kappa + s * step) for s in (-1, 0, 1)]
    central = (values[2] - 2 * values[1] + values[0]) / step.square()
    # The second difference with relative step 1e-4 is accurate to about 1e-6 relative.
    torch.testing.assert_close(second, central, rtol=1e-5, atol=1e-8)


def test_float32_follows_dtype_and_device(device):
    kappa = torch.tensor([0.5, 20.0, 2e4], dtype=torch.float32, device=device)
    ours = log_bessel_iv(10.0, kappa)
    assert ours.dtype == torch.float32
    assert ours.device == kappa.device
    reference = _reference_log_iv(np.full(3, 10.0), kappa.cpu().double().numpy())
    # Evaluated in float64 and rounded once to float32: about 6e-8 relative.
    np.testing.assert_allclose(ours.cpu().numpy(), reference, rtol=1e-6)


def test_broadcasting_of_order_and_argument():
    nu = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    kappa = torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64)
    assert log_bessel_iv(nu, kappa).shape == (2, 3)
    assert bessel_ratio(nu, kappa).shape == (2, 3)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="kappa"):
        log_bessel_iv(1.0, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="nu"):
        bessel_ratio(-0.5, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="kappa"):
        log_bessel_iv(1.0, torch.tensor([float("nan")]))
