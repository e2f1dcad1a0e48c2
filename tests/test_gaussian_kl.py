"""gaussian_kl on every backend: values, gradients, double backward, registration, edges."""

import pytest
import torch
from conftest import DTYPES, REDUCTIONS, SHAPES
from helpers import assert_grad_close, assert_loss_close, kernels_of, latents, leaf, noncontiguous, upstream

import vaekern
from vaekern.reference import gaussian_kl_ref


def _check(backend, mu, logvar, reduction, dtype):
    ma, la = leaf(mu), leaf(logvar)
    out = vaekern.gaussian_kl(ma, la, reduction=reduction, backend=backend)
    mr, lr = leaf(mu.double()), leaf(logvar.double())
    ref = gaussian_kl_ref(mr, lr, reduction=reduction)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(out, ref, dtype)
    g = upstream(out)
    out.backward(g)
    ref.backward(g.double())
    assert_grad_close(ma.grad, mr.grad, dtype)
    assert_grad_close(la.grad, lr.grad, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, device, shape, dtype):
    mu, logvar = latents(shape, dtype, device)
    for reduction in REDUCTIONS:
        _check(backend, mu, logvar, reduction, dtype)


def test_noncontiguous(backend, device):
    mu, logvar = latents((9, 20), torch.float32, device)
    _check(backend, noncontiguous(mu), noncontiguous(logvar), "none", torch.float32)
    _check(backend, mu.t().contiguous().t(), logvar, "mean", torch.float32)


def test_independent_formula(backend, device):
    """Against torch.distributions.kl_divergence between two Normals."""
    mu, logvar = latents((6, 5), torch.float64, device)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=1)
    torch.testing.assert_close(vaekern.gaussian_kl(mu, logvar, reduction="none", backend=backend), expected)


def test_sums_latent_dims_not_averages(backend, device):
    """The classic scaling bug: a KL averaged over latent dims is D times too small."""
    mu = torch.full((4, 32), 0.5, dtype=torch.float64, device=device)
    logvar = torch.zeros_like(mu)
    out = vaekern.gaussian_kl(mu, logvar, backend=backend)
    torch.testing.assert_close(out, torch.tensor(32 * 0.125, dtype=torch.float64, device=device))


def test_extreme_logvar(backend, device):
    """logvar in [-100, 100] never overflows; the clamp at 60 is straight-through."""
    logvar = torch.tensor([[-100.0, -30.0, 0.5, 30.0, 59.0, 61.0, 100.0]], device=device).repeat(2, 1)
    mu = torch.full_like(logvar, 0.25)
    ma, la = leaf(mu), leaf(logvar)
    out = vaekern.gaussian_kl(ma, la, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(la.grad).all()
    mr, lr = leaf(mu.double()), leaf(logvar.double())
    gaussian_kl_ref(mr, lr, reduction="none").sum().backward()
    torch.testing.assert_close(out.double(), gaussian_kl_ref(mu, logvar, reduction="none"), rtol=1e-5, atol=0)
    torch.testing.assert_close(la.grad.double(), lr.grad, rtol=1e-5, atol=1e-6)
    # Straight-through: beyond the clamp the gradient still pushes logvar down.
    assert (la.grad[:, -2:] > 0).all()


def test_nan_propagates(backend, device):
    mu, logvar = latents((3, 8), torch.float32, device)
    logvar[2, 3] = float("nan")
    ma, la = leaf(mu), leaf(logvar)
    out = vaekern.gaussian_kl(ma, la, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isnan(out[2]) and torch.isfinite(out[:2]).all()
    assert torch.isnan(la.grad[2, 3]) and torch.isfinite(la.grad[:2]).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(backend, device, reduction):
    mu, logvar = latents((3, 7), torch.float64, device)
    fn = lambda m, lv: vaekern.gaussian_kl(m, lv, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaf(mu), leaf(logvar)), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (leaf(mu), leaf(logvar)), fast_mode=True)


def test_opcheck(backend, device):
    ops = kernels_of(backend, device)
    mu, logvar = latents((5, 13), torch.float32, device)
    for reduction in (0, 1, 2):
        torch.library.opcheck(ops.gaussian_kl, (leaf(mu), leaf(logvar), reduction))
        grad_out = torch.rand(5, device=device) if reduction == 0 else torch.tensor(2.5, device=device)
        torch.library.opcheck(ops.gaussian_kl_backward, (grad_out, mu, logvar, reduction))


def test_torch_func_grad_hessian_and_per_sample_gradients(backend, device):
    """Issue 16, item 10: torch.func.grad, jacrev of it, and vmap over it (per-sample
    gradients), on every backend, as the reference gives them."""
    from torch.func import grad, jacrev, vmap

    mu, logvar = latents((4, 3), torch.float64, device)

    def kl(b, mu, logvar):
        return vaekern.gaussian_kl(mu, logvar, backend=b) * 3

    for argnums in (1, 2):
        torch.testing.assert_close(grad(kl, argnums)(backend, mu, logvar), grad(kl, argnums)("reference", mu, logvar))
        hessian = jacrev(grad(kl, argnums), argnums)
        torch.testing.assert_close(hessian(backend, mu, logvar), hessian("reference", mu, logvar))
    per_sample = vmap(grad(lambda b, m, lv: kl(b, m[None], lv[None]), argnums=(1, 2)), in_dims=(None, 0, 0))
    for got, want in zip(per_sample(backend, mu, logvar), per_sample("reference", mu, logvar)):
        torch.testing.assert_close(got, want)
