"""gaussian_nll on every backend: values and gradients (input and a learned log_scale of
every shape, and "optimal"), against the float64 oracle and torch.distributions; dtypes,
layouts, extremes, bad inputs, registration and transforms."""

import math

import pytest
import torch
from conftest import DTYPES, REDUCTIONS
from helpers import (
    SizedOps,
    assert_compiled_matches_eager,
    assert_grad_close,
    assert_loss_close,
    kernels_of,
    leaf,
    noncontiguous,
    upstream,
)

import vaekern
from vaekern import reference
from vaekern._ops._common import SQUARED_ERROR_LOG_SCALE
from vaekern.reference import gaussian_nll_ref

# Rows past a Triton block (1024 float64 columns) and the CPU chunk are covered by (3, 9000).
SHAPES = ((1, 1), (3, 7), (4, 3, 5, 5), (3, 9000))


def _data(shape, dtype, device):
    x = torch.randn(shape, dtype=torch.float64)
    t = x + torch.randn(shape, dtype=torch.float64) * 0.7
    return x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def _log_scales(shape, device):
    """One log_scale of each kind the API takes, for rows of ``shape[1:]``."""
    row = shape[1:]
    kinds = {"float": -0.3, "scalar": torch.tensor(0.2, device=device), "optimal": "optimal"}
    kinds["feature"] = (torch.randn(row, dtype=torch.float64) * 0.3).float().to(device)
    if len(row) == 3:
        kinds["channel"] = (torch.randn(row[0], 1, 1, dtype=torch.float64) * 0.3).float().to(device)
    return kinds


def _check(backend, x, t, log_scale, *, reduction, dtype):
    """Loss and gradients (upstream != 1) against autograd through the float64 oracle."""
    learned = isinstance(log_scale, torch.Tensor)
    ls, ls64 = (leaf(log_scale), leaf(log_scale.double())) if learned else (log_scale, log_scale)
    xa, xr = leaf(x), leaf(x.double())
    out = vaekern.gaussian_nll(xa, t, ls, reduction=reduction, backend=backend)
    ref = gaussian_nll_ref(xr, t, ls64, reduction=reduction)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == ref.shape
    assert_loss_close(out, ref, dtype)
    g = upstream(out)
    out.backward(g)
    ref.backward(g.double())
    assert_grad_close(xa.grad, xr.grad, dtype)
    if learned:
        assert ls.grad.shape == ls.shape and ls.grad.dtype == ls.dtype
        # A sum over the broadcast elements of terms of size g: scale the tolerance by their count.
        count = max(1, math.prod(x.shape) // max(1, ls.numel()))
        torch.testing.assert_close(ls.grad.double().cpu(), ls64.grad.cpu(), rtol=1e-4, atol=1e-5 * count * g.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, device, shape, dtype):
    if backend == "triton" and shape == SHAPES[-1] and dtype != torch.float32:
        pytest.skip("the interpreter is slow: the long row runs in float32 only")
    x, t = _data(shape, dtype, device)
    for name, log_scale in _log_scales(shape, device).items():
        for reduction in REDUCTIONS:
            _check(backend, x, t, log_scale, reduction=reduction, dtype=dtype)


def test_matches_torch_distributions(backend, device):
    """In float64, -Normal(input, exp(log_scale)).log_prob(target) summed per row."""
    x, t = _data((4, 3, 2, 5), torch.float64, device)
    ls = torch.randn(3, 1, 1, dtype=torch.float64, device=device) * 0.5
    got = vaekern.gaussian_nll(x, t, ls, reduction="none", backend=backend)
    want = -torch.distributions.Normal(x, ls.exp()).log_prob(t).sum((1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_optimal_has_the_closed_form(backend, device):
    """With sigma^2 = the batch's mse, the mean-reduced loss is D/2 * (log(2 pi mse) + 1), and
    its gradient is that closed form's: the total gradient, mse's dependence on the input
    included (under mean it sums to 0: the mse minimizes the loss over sigma)."""
    x, t = _data((6, 40), torch.float64, device)
    xa = leaf(x)
    out = vaekern.gaussian_nll(xa, t, "optimal", backend=backend)
    xc = leaf(x)
    mse = ((xc - t) ** 2).mean()
    closed = 40 / 2 * (torch.log(2 * math.pi * mse) + 1)
    torch.testing.assert_close(out, closed, rtol=1e-12, atol=1e-12)
    out.backward()
    closed.backward()
    torch.testing.assert_close(xa.grad, xc.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, device, reduction):
    x, t = _data((3, 2, 4), torch.float64, device)
    for ls in (leaf(torch.tensor(0.3, dtype=torch.float64, device=device)), leaf(torch.randn(2, 1, dtype=torch.float64, device=device))):
        fn = lambda x, s: vaekern.gaussian_nll(x, t, s, reduction=reduction, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (leaf(x), ls), fast_mode=True)
    fn = lambda x: vaekern.gaussian_nll(x, t, "optimal", reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaf(x),), fast_mode=True)


def test_noncontiguous(backend, device):
    x, t = _data((6, 40), torch.float32, device)
    ls = torch.randn(20, device=device)[::2].repeat(4)  # a strided-then-copied feature scale
    for xi, ti in ((noncontiguous(x), t), (x, noncontiguous(t)), (x.t().contiguous().t(), t)):
        _check(backend, xi, ti, ls, reduction="none", dtype=torch.float32)
    _check(backend, x, t, torch.randn(1, 40, device=device)[0], reduction="mean", dtype=torch.float32)


def test_nan_propagates(backend, device):
    x, t = _data((3, 30), torch.float32, device)
    x[1, 17] = float("nan")
    xa = leaf(x)
    out = vaekern.gaussian_nll(xa, t, 0.1, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(xa.grad[1, 17]) and torch.isfinite(xa.grad[0]).all()
    ls = torch.zeros(30, device=device)
    ls[3] = float("nan")
    assert torch.isnan(vaekern.gaussian_nll(x[[0]], t[[0]], ls, backend=backend))
    # "optimal": one NaN makes the batch's mse, and with it every row, NaN (as the oracle's).
    xa = leaf(x)
    out = vaekern.gaussian_nll(xa, t, "optimal", reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isnan(out).all() and torch.isnan(xa.grad[1, 17])


def test_extreme_values(backend, device):
    """Large residuals and scales: finite wherever float32 holds the value."""
    x = torch.tensor([[1e15, -1e15, 0.0, 3.0], [1e-30, 2.0, -7.0, 1e4]], device=device)
    t = torch.tensor([[0.0, 1e15, 1e-30, 3.0], [0.0, -2.0, 7.0, -1e4]], device=device)
    for ls in (-5.0, 30.0, 0.0, "optimal"):
        for reduction in REDUCTIONS:
            _check(backend, x, t, ls, reduction=reduction, dtype=torch.float32)


def test_float16_gradient_is_scaled_before_it_is_rounded(backend, device):
    """As the Bernoulli's (issue 16 item 1): (x - t) * exp(-2s) passes float16's 65504 at
    s = -5 for a residual of 3, which an upstream of 1/8 brings back into range."""
    x = torch.tensor([[3.0, 0.5, -1.0], [0.25, -3.0, 2.0]], dtype=torch.float16, device=device)
    t = torch.zeros(2, 3, dtype=torch.float16, device=device)
    xa, xr = leaf(x), leaf(x.double())
    (vaekern.gaussian_nll(xa, t, -5.0, reduction="sum", backend=backend) / 8).backward()
    (gaussian_nll_ref(xr, t, -5.0, reduction="sum") / 8).backward()
    want = xr.grad.to(torch.float16)
    assert want.isfinite().all() and want.abs().max() > 65504 / 8
    torch.testing.assert_close(xa.grad, want, rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    "log_scale, error, match",
    [
        (torch.zeros(4), ValueError, "log_scale of shape"),
        (torch.zeros(5, 7), ValueError, "log_scale of shape"),
        (torch.zeros(7, dtype=torch.int64), TypeError, "log_scale must be a floating"),
        (float("nan"), ValueError, "log_scale must be finite"),
        ("best", ValueError, "log_scale must be"),
        ([0.0], TypeError, "log_scale must be"),
    ],
)
def test_bad_log_scale_is_named(backend, device, log_scale, error, match):
    x, t = _data((3, 7), torch.float32, device)
    if isinstance(log_scale, torch.Tensor):
        log_scale = log_scale.to(device)
    with pytest.raises(error, match=match):
        vaekern.gaussian_nll(x, t, log_scale, backend=backend)


def test_double_backward(backend, device):
    x, t = _data((3, 7), torch.float64, device)
    x = leaf(x)
    if backend == "reference":
        fn = lambda v: vaekern.gaussian_nll(v, t, -0.2, backend=backend)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
        return
    out = vaekern.gaussian_nll(x, t, -0.2, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_opcheck(backend, device):
    ops = kernels_of(backend, device)
    x, t = _data((5, 13), torch.float32, device)
    for ls in (torch.tensor(0.3, device=device), torch.randn(13, device=device) * 0.3):
        for reduction in (0, 1, 2):
            torch.library.opcheck(ops.gaussian_nll, (x, t, ls, reduction, False))
            torch.library.opcheck(ops.gaussian_nll, (leaf(x), t, leaf(ls), reduction, True))
            torch.library.opcheck(ops.gaussian_nll, (leaf(x), t, ls, reduction, False))
        grad = torch.randn(5, 13, device=device)
        torch.library.opcheck(ops.gaussian_nll_backward_, (grad, torch.rand(5, device=device), x, t, ls, 0))


def test_compile_fullgraph(backend, device):
    x, t = _data((6, 2, 5), torch.float32, device)
    ls = torch.randn(2, 1, device=device) * 0.3
    one = torch.tensor(0.2, device=device)  # a learned 0-d scale: its gradient from the saved loss

    def step(x, s, s0):
        return (
            vaekern.gaussian_nll(x, t, s, backend=backend)
            + vaekern.gaussian_nll(x, t, "optimal", backend=backend)
            + vaekern.gaussian_nll(x, t, s0, reduction="none", backend=backend).sum()
        )

    assert_compiled_matches_eager(step, (x, ls, one))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_through_a_learned_scale(backend, device, reduction):
    """Second order through a learned 0-d log_scale, with the input needing no gradient:
    its gradient comes from the saved loss, which autograd differentiates again."""
    x, t = _data((3, 7), torch.float64, device)
    fn = lambda s: vaekern.gaussian_nll(x, t, s, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (leaf(torch.tensor(0.3, dtype=torch.float64, device=device)),), fast_mode=True)


def test_torch_func_per_sample_gradients(backend, device):
    x, t = _data((4, 6), torch.float32, device)
    ls = torch.randn(6, device=device) * 0.3

    def loss(xi, ti, s):
        return vaekern.gaussian_nll(xi[None], ti[None], s, backend=backend)

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 2)), in_dims=(0, 0, None))(x, t, ls)
    for i in range(4):
        xr, lr = leaf(x[i : i + 1].double()), leaf(ls.double())
        gaussian_nll_ref(xr, t[i : i + 1], lr).backward()
        torch.testing.assert_close(per_sample[0][i].double(), xr.grad[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(per_sample[1][i].double(), lr.grad, rtol=1e-5, atol=1e-6)


def test_pytorch_vae_mapping():
    """README: PyTorch-VAE's mse_loss + w * KL, times D/(2 sigma^2) with sigma^2 = D*w/2 (so
    times 1/w), is gaussian_nll + gaussian_kl up to the constant D * (log sigma + log(2 pi)/2)."""
    import torch.nn.functional as F

    B, D, w = 8, 48, 0.01
    recons, x = _data((B, D), torch.float64, "cpu")
    mu, lv = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 5, dtype=torch.float64)
    before = F.mse_loss(recons, x) + w * torch.mean(-0.5 * torch.sum(1 + lv - mu**2 - lv.exp(), dim=1), dim=0)
    log_scale = 0.5 * math.log(D * w / 2)
    after = vaekern.gaussian_nll(recons, x, log_scale) + vaekern.gaussian_kl(mu, lv)
    constant = D * (log_scale + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(after, before / w + constant, rtol=1e-12, atol=1e-12)


def test_sigma_vae_mapping():
    """README: the sigma-VAE's optimal-sigma reconstruction term (its soft clip at -6 idle)."""
    x_hat, x = _data((4, 3, 6, 6), torch.float64, "cpu")
    log_sigma = ((x - x_hat) ** 2).mean([0, 1, 2, 3], keepdim=True).sqrt().log()
    assert log_sigma.item() > -6
    theirs = (0.5 * ((x - x_hat) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(vaekern.gaussian_nll(x_hat, x, "optimal", reduction="sum"), theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_squared_error_log_scale_leaves_no_constant(backend, device, dtype):
    """"optimal" reads each row's squared error off the op at SQUARED_ERROR_LOG_SCALE, where
    every backend's s + 0.5 log(2 pi) is exactly 0: a perfect row's NLL is exactly 0 there
    (so near-perfect reconstructions do not lose their squared error to a cancellation),
    and any row's is pi times its squared error."""
    x, t = _data((3, 1100), dtype, device)
    s = SQUARED_ERROR_LOG_SCALE
    assert torch.equal(vaekern.gaussian_nll(x, x, s, reduction="none", backend=backend).cpu(), torch.zeros(3, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    want = math.pi * ((x.double() - t.double()) ** 2).sum(1)
    torch.testing.assert_close(vaekern.gaussian_nll(x, t, s, reduction="none", backend=backend).double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_optimal_scale_adds_no_rounding_of_its_own_where_the_loss_crosses_zero(backend, device, reduction):
    """A row's NLL at the optimal sigma, S_b / (2 sigma^2) + D/2 log(2 pi sigma^2), is two
    terms of about D/2 each, of opposite signs where the mse is 1/(2 pi e) (images in [0, 1]
    get there). From the op's own float32 rows (pi S_b), vaekern's loss is that formula in
    float64, rounded once: formed in float32 the mean of 4 x 3 x 64 x 64 lost about 3e-3 to
    the cancellation (review of the one-pass form). The rows' own float32 sums carry up to
    about D/2 * 2^-23 each, as a fixed scale's do: not this test's concern."""
    if backend == "reference":
        pytest.skip("the oracle has no float32 rows: it is float64 throughout")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64, generator=g)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=g)
    t = x + noise * math.sqrt(1 / (2 * math.pi * math.e) / noise.pow(2).mean())  # mse 1/(2 pi e)
    x, t = x.float().to(device), t.float().to(device)
    D = 3 * 64 * 64
    sq = vaekern.gaussian_nll(x, t, SQUARED_ERROR_LOG_SCALE, reduction="none", backend=backend).double()
    v = sq.mean() * 2 / D
    want = reference.reduce_rows(sq / v + D / 2 * torch.log(v), reduction)
    assert want.abs().max() < 0.02 * D  # at the crossing: the terms cancel to a few percent
    mu, logvar = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    for got in (
        vaekern.gaussian_nll(x, t, "optimal", reduction=reduction, backend=backend),
        vaekern.vae_loss(x, t, mu, logvar, likelihood="gaussian", log_scale="optimal", reduction=reduction, return_parts=True, backend=backend).recon,
    ):
        torch.testing.assert_close(got.double(), want, rtol=2**-23, atol=1e-6)


def test_optimal_scale_of_a_perfect_or_infinite_batch_is_the_oracles(backend, device):
    """sigma^2 = 0 (x == t everywhere) or inf (an infinite residual): the oracle's rows are
    NaN where 0 * inf meets them and inf elsewhere, so its mean and sum are NaN; so are
    vaekern's, not the closed form's limits -inf and +inf."""
    x = torch.randn(3, 5, device=device)
    t_inf = x.clone()
    t_inf[1, 2] = float("inf")
    mu, logvar = torch.randn(3, 2, device=device), torch.randn(3, 2, device=device)
    for t in (x, t_inf):
        for reduction in REDUCTIONS:
            want = gaussian_nll_ref(x.double(), t.double(), "optimal", reduction=reduction)
            assert torch.isnan(want).any()
            for got in (
                vaekern.gaussian_nll(x, t, "optimal", reduction=reduction, backend=backend),
                vaekern.vae_loss(x, t, mu, logvar, likelihood="gaussian", log_scale="optimal", reduction=reduction, return_parts=True, backend=backend).recon,
            ):
                torch.testing.assert_close(got.double().cpu(), want.cpu(), equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_optimal_scale_is_one_pass_over_the_image_each_way(backend, device, reduction):
    """Issue 13: "optimal" needs each row's squared error before any row's loss, and it gets
    them from the fused op itself (the Gaussian NLL at sigma = (2 pi)^-1/2 is pi times the
    squared error, with no constant): the forward is that one launch over the image, the
    closed form runs on B values, and the backward is the kernel's row scaling. No ATen op
    touches an image-sized tensor either way, "none" included, where the path through the
    mse is kept. test_matches_reference and test_gradcheck check the values."""
    if backend == "reference":
        pytest.skip("the oracle differentiates through the mse by plain autograd")
    x, t = _data((4, 30), torch.float32, device)
    mu, logvar = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    calls = (
        lambda xa: vaekern.gaussian_nll(xa, t, "optimal", reduction=reduction, backend=backend),
        lambda xa: vaekern.vae_loss(xa, t, mu, logvar, likelihood="gaussian", log_scale="optimal", reduction=reduction, backend=backend),
    )
    for call in calls:
        xa = leaf(x)
        with SizedOps(x.numel()) as mode:
            call(xa)
        assert not mode.ops, mode.ops
        # A forward of its own: under the mode the saved gradient gains a Python object,
        # and the C++ backward then scales a copy of it (csrc/autograd.cpp, scale_in_place).
        out = call(leaf(x))
        with SizedOps(x.numel()) as mode:
            out.backward(upstream(out))
        assert not mode.ops, mode.ops


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_learned_scalar_scale_backward_makes_no_pass_over_the_image(backend, device, reduction):
    """A learned 0-d log_scale (the sigma-VAE's learned sigma): its gradient comes from the
    loss the kernel already summed, sum_b w_b (D (1 + 2 (s + log(2 pi) / 2)) - 2 nll_b),
    not from another pass over input and target (which took about 5x a fixed scale's step).
    test_matches_reference and test_gradcheck check the value."""
    if backend == "reference":
        pytest.skip("the oracle differentiates the loss by plain autograd")
    x, t = _data((4, 30), torch.float32, device)
    mu, logvar = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    ls = leaf(torch.tensor(0.2, device=device))
    for out in (
        vaekern.gaussian_nll(leaf(x), t, ls, reduction=reduction, backend=backend),
        vaekern.vae_loss(leaf(x), t, mu, logvar, likelihood="gaussian", log_scale=ls, reduction=reduction, backend=backend),
    ):
        with SizedOps(x.numel()) as mode:
            out.backward(upstream(out))
        assert not mode.ops, mode.ops


def test_loss_changed_in_place_still_backpropagates(backend, device):
    """A loss output is saved for backward only where it is read, for a learned 0-d scale's
    gradient: elsewhere, changing the returned loss in place (``loss += c``, ``rows *= mask``)
    leaves backward working, as on the reference."""
    x, t = _data((4, 6), torch.float32, device)
    mu, logvar = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    calls = [
        lambda xa: vaekern.gaussian_nll(xa, t, 0.2, backend=backend),
        lambda xa: vaekern.gaussian_nll(xa, t, torch.tensor(0.2, device=device), reduction="none", backend=backend),
        lambda xa: vaekern.bernoulli_nll(xa, t.sigmoid(), backend=backend),
        lambda xa: vaekern.continuous_bernoulli_nll(xa, t.sigmoid(), reduction="none", backend=backend),
        lambda xa: vaekern.vae_loss(xa, t, mu, logvar, likelihood="gaussian", log_scale=-0.1, return_parts=True, backend=backend).recon,
        lambda xa: vaekern.vae_loss(xa, t.sigmoid(), mu, logvar, return_parts=True, backend=backend).recon,
    ]
    for call in calls:
        xa = leaf(x)
        out = call(xa)
        out *= 2.0
        out.sum().backward()
        assert torch.isfinite(xa.grad).all()
