"""vaekern.diagnostics: active units (Burda et al. 2016) for logging posterior collapse."""

import pytest
import torch

import vaekern
from vaekern.diagnostics import active_units


def test_active_units_counts_the_units_whose_mean_moves_with_the_data():
    torch.manual_seed(0)
    n = 500
    mu = torch.empty(n, 6)
    mu[:, 0] = torch.randn(n)  # variance 1: active
    mu[:, 1] = torch.randn(n) * 0.2  # variance 0.04: active
    mu[:, 2] = torch.randn(n) * 0.05  # variance 0.0025: inactive
    mu[:, 3] = 0.7  # collapsed to a constant: inactive
    mu[:, 4] = torch.randn(n) * 3 + 5
    mu[:, 5] = torch.randn(n) * 1e-3
    active = active_units(mu)
    assert active.dtype == torch.bool and active.shape == (6,)
    assert active.tolist() == [True, True, False, False, True, False]
    assert int(active.sum()) == 3
    assert active_units(mu, threshold=0.001).tolist() == [True, True, True, False, True, False]


def test_active_units_is_the_population_variance_over_dim_0():
    """Over 2 points (0, p) the population variance is p^2/4 and the unbiased one p^2/2: a
    threshold between them tells the two apart."""
    mu = torch.tensor([[0.0, 1.0], [0.2, 1.0]], dtype=torch.float16).reshape(2, 1, 2)
    p = mu[1, 0, 0].double().item()  # 0.2 as float16 holds it
    assert active_units(mu, threshold=0.9 * p * p / 4).tolist() == [[True, False]]
    assert active_units(mu, threshold=1.1 * p * p / 4).tolist() == [[False, False]]
    assert active_units(mu).shape == (1, 2)


def test_active_units_with_a_trained_posterior():
    """A posterior whose unit 1 ignores the data is collapsed: its KL per element is ~0 and
    it is inactive; per-element KL and active units agree."""
    torch.manual_seed(1)
    x = torch.randn(200, 1)
    mu = torch.cat([x, torch.full_like(x, 1e-3)], dim=1)
    logvar = torch.cat([torch.full_like(x, -2.0), torch.zeros_like(x)], dim=1)
    _, per_dim = vaekern.gaussian_kl(mu, logvar, return_per_dim=True, backend="reference")
    assert per_dim[1] < 1e-5 < per_dim[0]
    assert active_units(mu).tolist() == [True, False]


@pytest.mark.parametrize(
    "mu, threshold, error, match",
    [
        ([[0.0]], 0.01, TypeError, "mu must be a torch.Tensor"),
        (torch.zeros(3, 2, dtype=torch.int64), 0.01, TypeError, "mu must be a floating tensor"),
        (torch.zeros(1, 4), 0.01, ValueError, "at least 2 data points"),
        (torch.zeros(()), 0.01, ValueError, "at least 2 data points"),
        (torch.zeros(3, 2), -1.0, ValueError, "threshold must be finite and >= 0"),
        (torch.zeros(3, 2), float("nan"), ValueError, "threshold must be finite and >= 0"),
        (torch.zeros(3, 2), "0.1", TypeError, "threshold must be a float"),
        (torch.zeros(3, 2), True, TypeError, "threshold must be a float"),
        (torch.zeros(3, 2).to_sparse(), 0.01, TypeError, "mu must be a dense"),
    ],
)
def test_bad_arguments_are_named(mu, threshold, error, match):
    with pytest.raises(error, match=match):
        active_units(mu, threshold)
