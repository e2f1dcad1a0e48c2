"""continuous_bernoulli_nll on every backend: values and gradients against the float64
oracle and torch.distributions, accuracy near lambda = 1/2 where torch's float32 is not,
dtypes, layouts, extremes, NaN, registration and transforms."""

import pytest
import torch
from conftest import DTYPES, REDUCTIONS
from helpers import assert_grad_close, assert_loss_close, kernels_of, leaf, logits, noncontiguous, probs, target, upstream

import vaekern
from vaekern.reference import continuous_bernoulli_nll_ref

SHAPES = ((1, 1), (3, 7), (5, 1, 28, 28), (3, 9000))


def _check(backend, x, t, *, from_logits, reduction, dtype):
    xa, xr = leaf(x), leaf(x.double())
    out = vaekern.continuous_bernoulli_nll(xa, t, from_logits=from_logits, reduction=reduction, backend=backend)
    ref = continuous_bernoulli_nll_ref(xr, t, from_logits=from_logits, reduction=reduction)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == ref.shape
    assert_loss_close(out, ref, dtype)
    g = upstream(out)
    out.backward(g)
    ref.backward(g.double())
    assert_grad_close(xa.grad, xr.grad, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_matches_reference(backend, device, shape, dtype, from_logits):
    if backend == "triton" and shape == SHAPES[-1] and dtype != torch.float32:
        pytest.skip("the interpreter is slow: the long row runs in float32 only")
    x = logits(shape, dtype, device) if from_logits else probs(shape, dtype, device)
    t = target(shape, "float", device, dtype)
    for reduction in REDUCTIONS:
        _check(backend, x, t, from_logits=from_logits, reduction=reduction, dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "uint8"])
def test_binary_targets(backend, device, kind):
    x = logits((4, 33), torch.float32, device)
    _check(backend, x, target((4, 33), kind, device), from_logits=True, reduction="mean", dtype=torch.float32)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_matches_torch_distributions(backend, device, from_logits):
    """In float64, -ContinuousBernoulli(...).log_prob(target) summed per row, away from
    lambda = 1/2 (where torch switches to its own Taylor expansion, see below)."""
    x = logits((4, 50), torch.float64, device)
    x = torch.where(x.abs() < 0.1, x + 0.5, x)
    t = target((4, 50), "float", device, torch.float64)
    dist = torch.distributions.ContinuousBernoulli(logits=x) if from_logits else None
    inp = x if from_logits else torch.sigmoid(x)
    if not from_logits:
        dist = torch.distributions.ContinuousBernoulli(probs=inp)
    got = vaekern.continuous_bernoulli_nll(inp, t, from_logits=from_logits, reduction="none", backend=backend)
    torch.testing.assert_close(got, -dist.log_prob(t).sum(1), rtol=1e-10, atol=1e-10)


def test_more_accurate_than_torch_near_one_half(backend, device):
    """Near lambda = 1/2 (logits within 1e-2 of 0) torch's float32 log normalizer cancels
    (log of a ratio of two differences) or falls back to a short Taylor expansion; the
    kernels' series keeps float32 accuracy. Both against float64."""
    eta = torch.tensor([[1e-7, -3e-6, 1e-4, -2e-3, 7e-3, 0.03, -0.2, 0.45]], device=device)
    t = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4]], device=device)
    exact = continuous_bernoulli_nll_ref(eta.double(), t.double(), reduction="none")
    ours = vaekern.continuous_bernoulli_nll(eta, t, reduction="none", backend=backend).double()
    theirs = -torch.distributions.ContinuousBernoulli(logits=eta).log_prob(t).sum(1).double()
    err_ours, err_theirs = (ours - exact).abs().item(), (theirs - exact).abs().item()
    assert err_ours <= 1e-6 * exact.abs().item() + 1e-6, (err_ours, err_theirs)
    assert err_ours <= err_theirs, (err_ours, err_theirs)


def test_extreme_values(backend, device):
    """Logits of +-1e4, 0 exactly and tiny; probabilities at 0 and 1: finite where the oracle is."""
    x = torch.tensor([[1e4, -1e4, 0.0, 1e-30, -1e-12, 80.0, -90.0, 0.5]], device=device)
    t = torch.tensor([[0.3, 0.7, 0.5, 1.0, 0.0, 0.9, 0.1, 0.5]], device=device)
    _check(backend, x, t, from_logits=True, reduction="none", dtype=torch.float32)
    p = torch.tensor([[0.0, 1.0, 0.5, 1e-30, 1 - 2**-24, 0.25]], device=device)
    tp = torch.tensor([[0.2, 0.8, 0.5, 0.0, 1.0, 0.25]], device=device)
    _check(backend, p, tp, from_logits=False, reduction="none", dtype=torch.float32)


def test_nan_propagates(backend, device):
    x = logits((3, 40), torch.float32, device)
    t = target((3, 40), "float", device)
    x[1, 17] = float("nan")
    for from_logits in (True, False):
        xa = leaf(x if from_logits else torch.sigmoid(x))
        out = vaekern.continuous_bernoulli_nll(xa, t, from_logits=from_logits, reduction="none", backend=backend)
        out.sum().backward()
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
        assert torch.isnan(xa.grad[1, 17]) and torch.isfinite(xa.grad[0]).all()


def test_noncontiguous(backend, device):
    x, t = logits((6, 40), torch.float32, device), target((6, 40), "float", device)
    for xi, ti in ((noncontiguous(x), t), (x, noncontiguous(t))):
        _check(backend, xi, ti, from_logits=True, reduction="none", dtype=torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_gradcheck(backend, device, reduction, from_logits):
    x = logits((3, 7), torch.float64, device) if from_logits else probs((3, 7), torch.float64, device)
    if from_logits:
        x[0, :3] = torch.tensor([1e-3, -5e-3, 2e-2])  # across the series threshold
    t = target((3, 7), "float", device, torch.float64)
    fn = lambda x: vaekern.continuous_bernoulli_nll(x, t, from_logits=from_logits, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaf(x),), fast_mode=True)


def test_float16_probability_gradient_is_scaled_before_it_is_rounded(backend, device):
    """As the Bernoulli's (issue 16 item 1): below p = 1.5e-5 the gradient for an upstream of
    1 passes float16's range; a loss weight of 1/4 brings it back."""
    p = torch.tensor([[1e-5, 0.5, 0.3], [5e-6, 0.25, 0.5]], dtype=torch.float16, device=device)
    t = torch.ones(2, 3, dtype=torch.float16, device=device)
    xa, xr = leaf(p), leaf(p.double())
    (vaekern.continuous_bernoulli_nll(xa, t, from_logits=False, reduction="sum", backend=backend) / 4).backward()
    (continuous_bernoulli_nll_ref(xr, t, from_logits=False, reduction="sum") / 4).backward()
    want = xr.grad.to(torch.float16)
    assert want.isfinite().all()
    torch.testing.assert_close(xa.grad, want, rtol=2e-3, atol=0)


def test_opcheck(backend, device):
    ops = kernels_of(backend, device)
    x, t = logits((5, 13), torch.float32, device), target((5, 13), "uint8", device)
    for reduction in (0, 1, 2):
        torch.library.opcheck(ops.continuous_bernoulli_nll, (x, t, True, reduction, False))
        torch.library.opcheck(ops.continuous_bernoulli_nll, (leaf(x), t, True, reduction, True))
        p = probs((5, 13), torch.float32, device)
        torch.library.opcheck(ops.continuous_bernoulli_nll, (leaf(p), t, False, reduction, True))
    grad = torch.randn(5, 13, device=device)
    torch.library.opcheck(ops.continuous_bernoulli_nll_backward_, (grad, torch.rand(5, device=device), x, t, True, 0))


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    x, t = logits((6, 50), torch.float32, device), target((6, 50), "float", device)

    def step(x):
        return vaekern.continuous_bernoulli_nll(x, t, backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    xe, xc = leaf(x), leaf(x)
    e, c = step(xe), compiled(xc)
    torch.testing.assert_close(e, c)
    (e * 3).backward()
    (c * 3).backward()
    torch.testing.assert_close(xe.grad, xc.grad)


def test_double_backward(backend, device):
    x = leaf(logits((3, 7), torch.float64, device))
    t = target((3, 7), "float", device, torch.float64)
    if backend == "reference":
        fn = lambda v: vaekern.continuous_bernoulli_nll(v, t, backend=backend)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
        return
    out = vaekern.continuous_bernoulli_nll(x, t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)
