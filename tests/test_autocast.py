"""vaekern under torch.autocast: a small model under CPU bfloat16 autocast feeds every op.

Autocast runs the model's Linear layers in bfloat16, so recon, mu and logvar reach vaekern
in bfloat16. vaekern's ops have no autocast rule of their own, so they take their inputs
as they come, and the documented dtypes follow: losses in float32, z in mu's dtype, and each
gradient in its input's dtype (bfloat16 here, then float32 on the parameters, as the
Linear layers' backward casts it). Each result is compared with the float64 reference on
the same bfloat16 tensors. On a GPU, the same checks apply to cuda float16 and bfloat16.
"""

import pytest
import torch
from conftest import GRAD_TOL
from helpers import assert_grad_close, assert_loss_close

import vaekern
from vaekern import reference

BF16 = torch.bfloat16


class TinyVAE(torch.nn.Module):
    def __init__(self, d=37, z=5):
        super().__init__()
        self.enc = torch.nn.Linear(d, 2 * z)
        self.dec = torch.nn.Linear(z, d)

    def forward(self, x, eps, backend):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        for t in (mu, logvar):
            t.retain_grad()
        z = vaekern.reparameterize(mu, logvar, eps=eps, backend=backend)
        z.retain_grad()
        logits = self.dec(z)
        logits.retain_grad()
        return logits, mu, logvar, z


def _model_and_data(device):
    torch.manual_seed(0)
    model = TinyVAE().to(device)
    x = torch.rand(6, 37, device=device)
    eps = torch.randn(6, 5, device=device, dtype=BF16)
    return model, x, eps


def test_vae_loss_under_autocast(backend, device):
    model, x, eps = _model_and_data(device)
    with torch.autocast("cpu", dtype=BF16):
        logits, mu, logvar, z = model(x, eps, backend)
        parts = vaekern.vae_loss(logits, x, mu, logvar, beta=0.5, return_parts=True, backend=backend)
    assert (logits.dtype, mu.dtype, logvar.dtype, z.dtype) == (BF16,) * 4
    assert all(p.dtype == torch.float32 for p in parts), [p.dtype for p in parts]
    z_ref = reference.reparameterize_ref(mu.detach(), logvar.detach(), eps)
    torch.testing.assert_close(z.detach().double(), z_ref.to(BF16).double(), atol=GRAD_TOL[BF16][0], rtol=GRAD_TOL[BF16][1])

    leaves = [t.detach().double().requires_grad_() for t in (logits, mu, logvar)]
    want = reference.vae_loss_ref(leaves[0], x, leaves[1], leaves[2], beta=0.5)
    for got, w in zip(parts, want):
        assert_loss_close(got, w, BF16)

    (parts.loss * 3).backward()
    # The reference graph stops at recon, mu and logvar: add the part of mu's and logvar's
    # gradient that comes through z (and so through recon), read off the model's z.grad.
    want[0].mul(3).backward()
    assert_grad_close(logits.grad, leaves[0].grad, BF16)
    through_z = {
        "mu": z.grad.double(),
        "logvar": z.grad.double() * 0.5 * torch.exp(0.5 * logvar.detach().double()) * eps.double(),
    }
    assert_grad_close(mu.grad, (leaves[1].grad + through_z["mu"]).to(BF16), BF16)
    assert_grad_close(logvar.grad, (leaves[2].grad + through_z["logvar"]).to(BF16), BF16)
    for p in model.parameters():  # autocast's Linear backward returns the parameters' dtype
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("op", ["bernoulli_nll", "gaussian_kl"])
def test_other_ops_under_autocast(backend, device, op):
    model, x, eps = _model_and_data(device)
    with torch.autocast("cpu", dtype=BF16):
        logits, mu, logvar, _ = model(x, eps, backend)
        if op == "bernoulli_nll":
            inputs, out = (logits,), vaekern.bernoulli_nll(logits, x, reduction="none", backend=backend)
        else:
            inputs, out = (mu, logvar), vaekern.gaussian_kl(mu, logvar, reduction="none", backend=backend)
    assert out.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    if op == "bernoulli_nll":
        want = reference.bernoulli_nll_ref(leaves[0], x, reduction="none")
    else:
        want = reference.gaussian_kl_ref(*leaves, reduction="none")
    assert_loss_close(out, want, BF16)
    grads = torch.autograd.grad(out, inputs, torch.linspace(0.5, 2.0, out.numel(), device=device))
    wants = torch.autograd.grad(want, leaves, torch.linspace(0.5, 2.0, out.numel(), dtype=torch.float64))
    for g, w in zip(grads, wants):
        assert_grad_close(g, w, BF16)
