"""reparameterize on every backend: values, gradients, in-op noise, registration."""

import pytest
import torch
from conftest import DTYPES, SHAPES
from helpers import assert_grad_close, kernels_of, latents, leaf, noncontiguous

import vaekern
from vaekern.reference import reparameterize_ref

# z is a single rounding of mu + std*eps; compare it like a gradient.
from conftest import GRAD_TOL  # noqa: E402


def _check_given_eps(backend, mu, logvar, eps, dtype):
    ma, la = leaf(mu), leaf(logvar)
    z = vaekern.reparameterize(ma, la, eps=eps, backend=backend)
    mr, lr = leaf(mu.double()), leaf(logvar.double())
    zr = reparameterize_ref(mr, lr, eps)
    assert z.dtype == dtype and z.shape == mu.shape
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(z.double(), zr.detach(), atol=atol, rtol=rtol)
    g = torch.randn_like(zr) * 3
    z.backward(g.to(dtype))
    zr.backward(g.to(dtype).double())
    assert_grad_close(ma.grad, mr.grad, dtype)
    assert_grad_close(la.grad, lr.grad, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_given_eps_matches_reference(backend, device, shape, dtype):
    mu, logvar = latents(shape, dtype, device)
    eps = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    _check_given_eps(backend, mu, logvar, eps, dtype)


def test_noncontiguous(backend, device):
    mu, logvar = latents((6, 10), torch.float32, device)
    eps = torch.randn(6, 10, device=device)
    _check_given_eps(backend, noncontiguous(mu), noncontiguous(logvar), noncontiguous(eps), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_in_op_noise_is_standard_normal_and_gradients_match_it(backend, device, dtype):
    shape = (64, 257)
    mu, logvar = latents(shape, dtype, device)
    # A small mu, so that the noise recovered from a low-precision z is not lost to
    # cancellation in z - mu.
    mu = (mu.double() * 0.01).to(dtype)
    ma, la = leaf(mu), leaf(logvar)
    z = vaekern.reparameterize(ma, la, backend=backend)
    # The noise the op drew, recovered: eps = (z - mu) / std, in float64.
    std = torch.exp(0.5 * logvar.double())
    eps = (z.double() - mu.double()) / std
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    g = torch.rand(shape, device=device, dtype=dtype) + 0.5
    z.backward(g)
    torch.testing.assert_close(ma.grad, g)
    expected = g.double() * 0.5 * std * eps
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(la.grad.double(), expected, atol=10 * atol, rtol=10 * rtol)


def test_noise_follows_generator_and_manual_seed(backend, device):
    mu, logvar = latents((4, 100), torch.float32, device)
    gen = torch.Generator(device=device)
    z1 = vaekern.reparameterize(mu, logvar, generator=gen.manual_seed(7), backend=backend)
    z2 = vaekern.reparameterize(mu, logvar, generator=gen.manual_seed(7), backend=backend)
    z3 = vaekern.reparameterize(mu, logvar, generator=gen, backend=backend)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    torch.manual_seed(3)
    a = vaekern.reparameterize(mu, logvar, backend=backend)
    torch.manual_seed(3)
    b = vaekern.reparameterize(mu, logvar, backend=backend)
    assert torch.equal(a, b)


def test_extreme_logvar(backend, device):
    logvar = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]], device=device).repeat(3, 1)
    mu = torch.full_like(logvar, 0.5)
    eps = torch.randn_like(mu)
    z = vaekern.reparameterize(mu, logvar, eps=eps, backend=backend)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.double(), reparameterize_ref(mu, logvar, eps), rtol=1e-5, atol=1e-6)


def test_nan_propagates(backend, device):
    mu, logvar = latents((3, 8), torch.float32, device)
    mu[1, 2] = float("nan")
    z = vaekern.reparameterize(mu, logvar, eps=torch.randn_like(mu), backend=backend)
    assert torch.isnan(z[1, 2]) and torch.isfinite(z[0]).all()


def test_gradcheck_and_gradgradcheck(backend, device):
    mu, logvar = latents((3, 7), torch.float64, device)
    eps = torch.randn(3, 7, dtype=torch.float64, device=device)
    fn = lambda m, lv: vaekern.reparameterize(m, lv, eps=eps, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaf(mu), leaf(logvar)), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (leaf(mu), leaf(logvar)), fast_mode=True)
    gen = torch.Generator(device=device)

    def sampled(m, lv):  # the same in-op noise on every call, so the function is deterministic
        return vaekern.reparameterize(m, lv, generator=gen.manual_seed(11), backend=backend)

    assert torch.autograd.gradcheck(sampled, (leaf(mu), leaf(logvar)), fast_mode=True)
    assert torch.autograd.gradgradcheck(sampled, (leaf(mu), leaf(logvar)), fast_mode=True)


def test_opcheck(backend, device):
    ops = kernels_of(backend, device)
    mu, logvar = latents((5, 13), torch.float32, device)
    eps = torch.randn(5, 13, device=device)
    seed = torch.randint(2**62, (1,), device=device)
    torch.library.opcheck(ops.reparameterize, (leaf(mu), leaf(logvar), eps, None))
    torch.library.opcheck(ops.reparameterize, (leaf(mu), leaf(logvar), None, seed))
    g = torch.randn(5, 13, device=device)
    torch.library.opcheck(ops.reparameterize_backward, (g, mu, logvar, eps, None))
    torch.library.opcheck(ops.reparameterize_backward, (g, mu, logvar, None, seed))


def test_torch_func_grad_and_per_sample_gradients(backend, device):
    """Issue 16, item 10: torch.func.grad and vmap over it, with given noise (as the
    reference) and with the op's own noise (d/dmu is 1, d/dlogvar matches the noise drawn)."""
    from torch.func import grad, vmap

    mu, logvar = latents((4, 3), torch.float64, device)
    eps = torch.randn(4, 3, dtype=torch.float64, device=device)
    w = torch.rand(4, 3, dtype=torch.float64, device=device)

    def f(b, mu, logvar, eps=eps):
        return (vaekern.reparameterize(mu, logvar, eps=eps, backend=b) * w).sum()

    for argnums in (1, 2):
        torch.testing.assert_close(grad(f, argnums)(backend, mu, logvar), grad(f, argnums)("reference", mu, logvar))
    per_sample = vmap(grad(lambda b, m, lv, e: f(b, m[None], lv[None], e[None]), argnums=(1, 2)), in_dims=(None, 0, 0, 0))
    for got, want in zip(per_sample(backend, mu, logvar, eps), per_sample("reference", mu, logvar, eps)):
        torch.testing.assert_close(got, want)
    gen = torch.Generator(device=device)
    z = vaekern.reparameterize(mu, logvar, generator=gen.manual_seed(5), backend=backend)
    drawn = (z - mu) / torch.exp(0.5 * logvar)

    def sampled(mu, logvar):
        return (vaekern.reparameterize(mu, logvar, generator=gen.manual_seed(5), backend=backend) * w).sum()

    g_mu, g_lv = grad(sampled, argnums=(0, 1))(mu, logvar)
    torch.testing.assert_close(g_mu, w)
    torch.testing.assert_close(g_lv, w * 0.5 * torch.exp(0.5 * logvar) * drawn)
