"""Where vaekern stores a value narrower than it computes it (docs/precision.md): each place
that the sweep found to be a fault, against the float64 oracle.
"""

import pytest
import torch

import vaekern
from vaekern import reference

# A GradScaler's usual scale: the upstream gradient that float16 training puts on the loss.
GRAD_SCALE = 65536.0
# float16's unit roundoff: one correct rounding is within U relative, a double one within 2U.
U16 = 2.0**-11


@pytest.mark.parametrize("mode", ["create_graph", "func_grad"])
def test_kl_gradient_float16_double_backward_path_does_not_overflow(backend, device, mode):
    """The differentiable KL gradient (create_graph=True, torch.func) is formed in float32 and
    rounded once, as the kernels do: 0.5 * expm1(12) / 128 = 636 is a float16, expm1(12) is not."""
    B = 128
    mu = torch.zeros(B, 1, dtype=torch.float16, device=device)
    lv = torch.full((B, 1), 12.0, dtype=torch.float16, device=device)
    if mode == "create_graph":
        lv.requires_grad_(True)
        (got,) = torch.autograd.grad(vaekern.gaussian_kl(mu, lv, backend=backend), lv, create_graph=True)
    else:
        got = torch.func.grad(lambda lv_: vaekern.gaussian_kl(mu, lv_, backend=backend))(lv)
    lv64 = lv.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.gaussian_kl_ref(mu, lv64), lv64)
    assert torch.isfinite(want.half()).all()
    torch.testing.assert_close(got.double(), want, rtol=U16, atol=0)


@pytest.mark.parametrize("noise", ["eps", "seed"])
def test_reparameterize_float16_double_backward_path_does_not_overflow(backend, device, noise):
    """d z / d logvar = g * 0.5 * exp(lv / 2) * eps is finite for a small upstream g even where
    exp(lv / 2) alone is beyond float16 (lv = 23); the create_graph=True form must agree with
    the plain backward."""
    if noise == "seed" and backend == "reference":
        pytest.skip("the reference draws eps with torch.randn, outside the op: nothing to regenerate")
    mu = torch.zeros(4, 8, dtype=torch.float16, device=device)
    lv = torch.full((4, 8), 23.0, dtype=torch.float16, device=device, requires_grad=True)
    eps = torch.full((4, 8), 0.01, dtype=torch.float16, device=device) if noise == "eps" else None
    gz = torch.full((4, 8), 1e-3, dtype=torch.float16, device=device)
    g = torch.Generator(device=device).manual_seed(3) if eps is None else None
    (plain,) = torch.autograd.grad(vaekern.reparameterize(mu, lv, eps=eps, generator=g, backend=backend), lv, gz)
    g = torch.Generator(device=device).manual_seed(3) if eps is None else None
    z = vaekern.reparameterize(mu, lv, eps=eps, generator=g, backend=backend)
    (graph,) = torch.autograd.grad(z, lv, gz, create_graph=True)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(graph.double(), plain.double(), rtol=U16, atol=0)


@pytest.mark.parametrize("op", ["bernoulli_nll", "vae_loss"])
def test_float16_recon_gradient_under_grad_scaler(backend, device, op):
    """The reconstruction gradient, saved in float16 with the 1/B of "mean" folded in, is a
    float16 subnormal wherever |sigmoid(x) - t| < 2**-14 * B (below 7.8e-3 at B = 128), with
    fewer bits than a GradScaler factor applied afterwards could use: backward recomputes
    those elements. The exact gradient after the scale is a normal float16, which one
    rounding gives within 2**-11; before the recompute the fused backends were off by 1e-2."""
    B, D = 128, 64
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, D, dtype=torch.float64, generator=gen) * 4 + 4  # sigmoid(x) - 1 in (-1.8e-2, -3.4e-4)
    x = x0.to(torch.float16).to(device).requires_grad_(True)
    t = torch.ones(B, D, dtype=torch.float16, device=device)
    mu = torch.zeros(B, 2, dtype=torch.float16, device=device)
    if op == "bernoulli_nll":
        loss = vaekern.bernoulli_nll(x, t, backend=backend)
    else:
        loss = vaekern.vae_loss(x, t, mu, mu, backend=backend)
    (loss * GRAD_SCALE).backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    (reference.bernoulli_nll_ref(x64, t.cpu()) * GRAD_SCALE).backward()
    want = x64.grad
    assert want.abs().min() > torch.finfo(torch.float16).tiny  # a normal float16 after the scale
    torch.testing.assert_close(x.grad.cpu().double(), want, rtol=2 * U16, atol=0)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_module_beta_keeps_its_dtype_when_the_model_is_cast(cast):
    """VAELoss's tensor beta is a buffer: a model cast (``.half()``, ``.to(torch.bfloat16)``)
    used to round it, so the loss weighted the KL by 0.10009765625 instead of 0.1 and an
    in-place annealing ``beta += 1e-4`` stalled. It keeps its dtype; the loss matches the oracle."""
    loss_fn = vaekern.nn.VAELoss(beta=torch.tensor(0.0), backend="reference")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), loss_fn)
    model.half() if cast == "half" else model.to(torch.bfloat16)
    assert model[0].weight.dtype != torch.float32 and loss_fn.beta.dtype == torch.float32
    for _ in range(1000):
        loss_fn.beta += 1e-4
    torch.testing.assert_close(loss_fn.beta, torch.tensor(0.1), rtol=1e-4, atol=0)
    r, t = torch.randn(3, 5), torch.rand(3, 5)
    mu, lv = torch.randn(3, 2), torch.randn(3, 2)
    want = reference.vae_loss_ref(r, t, mu, lv, beta=loss_fn.beta.double())[0]
    torch.testing.assert_close(loss_fn(r, t, mu, lv).double(), want, rtol=1e-6, atol=0)
