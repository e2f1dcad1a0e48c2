"""bernoulli_nll on every backend: values, gradients, registration, dtypes, edge cases."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, REDUCTIONS, SHAPES
from helpers import (
    INTERPRETER_BF16_SUBNORMAL,
    assert_grad_close,
    assert_loss_close,
    kernels_of,
    leaf,
    logits,
    noncontiguous,
    probs,
    target,
    upstream,
    xfail_in_interpreter,
)

import vaekern
from vaekern.reference import bernoulli_nll_ref


def _check(backend, x, t, *, from_logits, reduction, dtype):
    """Loss and gradient (upstream != 1) against autograd through the float64 reference."""
    xa = leaf(x)
    out = vaekern.bernoulli_nll(xa, t, from_logits=from_logits, reduction=reduction, backend=backend)
    xr = leaf(x.double())
    ref = bernoulli_nll_ref(xr, t, from_logits=from_logits, reduction=reduction)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == ref.shape
    assert_loss_close(out, ref, dtype)
    g = upstream(out)
    out.backward(g)
    ref.backward(g.double())
    assert_grad_close(xa.grad, xr.grad, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_matches_reference(backend, device, shape, dtype, from_logits):
    x = logits(shape, dtype, device) if from_logits else probs(shape, dtype, device)
    t = target(shape, "float", device, dtype)
    for reduction in REDUCTIONS:
        _check(backend, x, t, from_logits=from_logits, reduction=reduction, dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "uint8"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_binary_targets(backend, device, kind, from_logits):
    shape = (6, 37)
    x = logits(shape, torch.float32, device) if from_logits else probs(shape, torch.float32, device)
    _check(backend, x, target(shape, kind, device), from_logits=from_logits, reduction="mean", dtype=torch.float32)


def test_float_target_of_other_dtype(backend, device):
    x = logits((4, 33), torch.float16, device)
    t = target((4, 33), "float", device, torch.float32)
    _check(backend, x, t, from_logits=True, reduction="sum", dtype=torch.float16)


def test_noncontiguous(backend, device):
    x = logits((7, 300), torch.float32, device)
    t = target((7, 300), "float", device)
    xn, tn = noncontiguous(x), noncontiguous(t)
    _check(backend, xn, tn, from_logits=True, reduction="none", dtype=torch.float32)
    # A transposed view is non-contiguous in another way.
    xt = logits((300, 7), torch.float32, device).t()
    _check(backend, xt, t, from_logits=True, reduction="mean", dtype=torch.float32)


def test_independent_formulas(backend, device):
    """Against PyTorch's own BCE and torch.distributions, not just our reference."""
    x = logits((9, 3, 5), torch.float64, device)
    t = target((9, 3, 5), "bool", device)
    rows = vaekern.bernoulli_nll(x, t, reduction="none", backend=backend)
    bce = F.binary_cross_entropy_with_logits(x, t.double(), reduction="none").sum(dim=(1, 2))
    log_prob = torch.distributions.Bernoulli(logits=x).log_prob(t.double()).sum(dim=(1, 2))
    torch.testing.assert_close(rows, bce)
    torch.testing.assert_close(rows, -log_prob)
    p = probs((9, 15), torch.float64, device)
    tp = target((9, 15), "float", device, torch.float64)
    rows = vaekern.bernoulli_nll(p, tp, from_logits=False, reduction="sum", backend=backend)
    torch.testing.assert_close(rows, F.binary_cross_entropy(p, tp, reduction="sum"))


def test_extreme_logits(backend, device):
    x = torch.tensor([[1e4, -1e4, 80.0, -80.0, 0.5]], device=device).repeat(3, 1)
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.3]], device=device).repeat(3, 1)
    xa = leaf(x)
    out = vaekern.bernoulli_nll(xa, t, reduction="none", backend=backend)
    out.backward(torch.full_like(out, 1024.0))
    expected = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none").sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-3)
    xr = leaf(x.double())
    F.binary_cross_entropy_with_logits(xr, t.double(), reduction="sum").mul(1024.0).backward()
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(out).all() and torch.isfinite(xa.grad).all()


def test_probabilities_at_zero_and_one(backend, device):
    """Logs clamp at -100 and the gradient stays finite, as F.binary_cross_entropy does."""
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.4]], device=device).repeat(2, 1)
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], device=device).repeat(2, 1)
    pa, pr = leaf(p), leaf(p)
    out = vaekern.bernoulli_nll(pa, t, from_logits=False, reduction="sum", backend=backend)
    ref = F.binary_cross_entropy(pr, t, reduction="sum")
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(pa.grad, pr.grad)


def test_nan_propagates(backend, device):
    x = logits((3, 40), torch.float32, device)
    x[1, 17] = float("nan")
    t = target((3, 40), "float", device)
    for from_logits in (True, False):
        xi = x if from_logits else torch.sigmoid(x)
        xa = leaf(xi)
        out = vaekern.bernoulli_nll(xa, t, from_logits=from_logits, reduction="none", backend=backend)
        out.sum().backward()
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
        assert torch.isnan(xa.grad[1, 17]) and torch.isfinite(xa.grad[0]).all()


def test_deterministic(backend, device):
    x = logits((33, 517), torch.float32, device)
    t = target((33, 517), "float", device)
    a = vaekern.bernoulli_nll(x, t, backend=backend)
    b = vaekern.bernoulli_nll(x, t, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_gradcheck(backend, device, reduction, from_logits):
    x = logits((3, 7), torch.float64, device) if from_logits else probs((3, 7), torch.float64, device)
    t = target((3, 7), "float", device, torch.float64)
    fn = lambda x: vaekern.bernoulli_nll(x, t, from_logits=from_logits, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaf(x),), fast_mode=True)


def test_double_backward(backend, device):
    """Works on the reference (plain autograd), raises a clear error on the fused backends."""
    x = leaf(logits((3, 7), torch.float64, device))
    t = target((3, 7), "float", device, torch.float64)
    if backend == "reference":
        for from_logits, inp in ((True, x), (False, leaf(probs((3, 7), torch.float64, device)))):
            fn = lambda v: vaekern.bernoulli_nll(v, t, from_logits=from_logits, backend=backend)  # noqa: E731
            assert torch.autograd.gradgradcheck(fn, (inp,), fast_mode=True)
        return
    out = vaekern.bernoulli_nll(x, t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_second_backward_does_not_scale_twice(backend, device):
    x = leaf(logits((3, 7), torch.float32, device))
    out = vaekern.bernoulli_nll(x, target((3, 7), "float", device), reduction="none", backend=backend)
    g1, g2 = torch.rand(3, device=device) + 0.5, torch.rand(3, device=device) + 0.5
    (first,) = torch.autograd.grad(out, x, g1, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(out, x, g2)
    torch.testing.assert_close(second, first * (g2 / g1)[:, None])


def test_no_grad_path_writes_no_gradient(backend, device):
    x = logits((4, 9), torch.float32, device)
    with torch.no_grad():
        out = vaekern.bernoulli_nll(leaf(x), target((4, 9), "float", device), backend=backend)
    assert out.grad_fn is None


def test_opcheck(backend, device):
    ops = kernels_of(backend, device)
    x = logits((5, 13), torch.float32, device)
    t = target((5, 13), "uint8", device)
    for reduction in (0, 1, 2):
        torch.library.opcheck(ops.bernoulli_nll, (x, t, True, reduction, False))
        # The registered op's autograd (the traced path) scales the saved gradient out of
        # place, so every opcheck test applies, eager-versus-AOT gradients included.
        torch.library.opcheck(ops.bernoulli_nll, (leaf(x), t, True, reduction, True))
        torch.library.opcheck(ops.bernoulli_nll, (leaf(probs((5, 13), torch.float32, device)), t, False, reduction, True))
        # Asked for no gradient while the input needs one: backward recomputes it.
        torch.library.opcheck(ops.bernoulli_nll, (leaf(x), t, True, reduction, False))
    grad = torch.randn(5, 13, device=device)
    torch.library.opcheck(ops.bernoulli_nll_backward_, (grad, torch.rand(5, device=device), x, t, True, 0))
    torch.library.opcheck(ops.bernoulli_nll_backward_, (grad, torch.tensor(3.0, device=device), x, t, True, 1))


def test_backward_leaves_rows_scaled_by_one_untouched(backend, device):
    """The in-place backward skips rows whose scale is exactly 1: it moves no bytes there.

    A signalling NaN detects a write: multiplying it by 1 returns a quiet NaN, other bits.
    """
    ops = kernels_of(backend, device)
    grad = torch.full((4, 300), 0x7F800001, dtype=torch.int32).view(torch.float32).to(device)
    bits = grad.view(torch.int32).clone()
    x = t = torch.zeros_like(grad)  # read only for float16
    ops.bernoulli_nll_backward_(grad, torch.tensor([1.0, 2.0, 1.0, 3.0], device=device), x, t, True, 0)
    after = grad.view(torch.int32)
    assert torch.equal(after[[0, 2]], bits[[0, 2]])
    assert not torch.equal(after[[1, 3]], bits[[1, 3]])
    g = grad.clone()
    ops.bernoulli_nll_backward_(g, torch.tensor(1.0, device=device), x, t, True, 2)
    assert torch.equal(g.view(torch.int32), grad.view(torch.int32))


def test_float64_probability_gradient_floor_is_float64(backend, device):
    """At p = 0 or 1 the gradient divides by the floor 1e-12 of p(1-p), in float64 for
    float64 input: a float32 floor (9.99999996e-13) is off by 4e-9 relative."""
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 0.3, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.25, 0.75], [0.0, 1.0, 0.5, 0.125, 1.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([0.75, 3.0], dtype=torch.float64)
    pa = leaf(p.to(device))
    out = vaekern.bernoulli_nll(pa, t.to(device), from_logits=False, reduction="none", backend=backend)
    out.backward(g.to(device))
    expected = g[:, None] * ((p - t) / torch.clamp(p * (1 - p), min=1e-12))
    assert expected.abs().max() > 1e11  # the floor is reached
    torch.testing.assert_close(pa.grad.cpu(), expected, rtol=1e-15, atol=0.0)


def test_bfloat16_subnormal_probabilities(backend, device, request):
    """bfloat16 subnormal probabilities are read exactly: -log(9.18e-41) is 92.19, not the
    clamp's 100 (issue 16 item 7: 188.32 where the sum is 181.98). In Triton's interpreter
    the bfloat16 to float32 cast itself is wrong (tests/test_triton_aot.py)."""
    xfail_in_interpreter(request, backend, INTERPRETER_BF16_SUBNORMAL)
    p = torch.tensor([[9.18e-41, 1.01e-39, 5.9e-39, 0.5], [1.0e-39, 0.25, 1.16e-38, 0.875]], dtype=torch.bfloat16)
    assert (p[:, 0] < torch.finfo(torch.bfloat16).tiny).all()
    t = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 1.0]])
    _check(backend, p.to(device), t.to(device), from_logits=False, reduction="none", dtype=torch.bfloat16)


def test_backward_adopts_the_forward_gradient_in_place(backend, device):
    """As in test_vae_loss.py: with the C++ autograd, recon.grad is the forward's own buffer."""
    ops = kernels_of(backend, device)
    if "bernoulli_nll" not in ops.native_autograd:
        pytest.skip("the Python autograd's buffer is internal to its Function")
    x, t = leaf(logits((4, 30), torch.float32, device)), target((4, 30), "float", device)
    out, grad = ops.bernoulli_nll(x, t, True, 0, True)
    ptr = grad.data_ptr()
    del grad
    out.backward(torch.rand_like(out) + 0.5)
    assert x.grad.data_ptr() == ptr


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_torch_func_grad_and_per_sample_gradients(backend, device, from_logits):
    """Issue 16, item 10: torch.func.grad, and vmap over it (per-sample gradients), on every
    backend, as the reference gives them; forward mode and a second order raise by name."""
    from torch.func import grad, jvp, vmap

    x = logits((5, 9), torch.float64, device) if from_logits else probs((5, 9), torch.float64, device)
    t = target((5, 9), "float", device, torch.float64)

    def loss(b, x, t):
        return vaekern.bernoulli_nll(x, t, from_logits=from_logits, reduction="sum", backend=b) * 3

    torch.testing.assert_close(grad(loss, argnums=1)(backend, x, t), grad(loss, argnums=1)("reference", x, t))
    per_sample = vmap(grad(lambda b, x, t: loss(b, x[None], t[None]), argnums=1), in_dims=(None, 0, 0))
    torch.testing.assert_close(per_sample(backend, x, t), per_sample("reference", x, t))
    if backend == "reference":
        return
    with pytest.raises(NotImplementedError, match="forward-mode"):
        jvp(lambda x: loss(backend, x, t), (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda x: grad(loss, argnums=1)(backend, x, t).sum())(x)


def _float16_overflow_case(device):
    """Probabilities whose gradient for an upstream of 1 is beyond float16's 65504 (p = 1e-5
    and 5e-6 with target 1: -1e5 and -2e5), beside ordinary ones, and weights that bring it
    back into range (0.25) or zero a row (0, which must give 0, not 0 * inf = NaN)."""
    p = torch.tensor([[1e-5, 0.5, 0.3], [5e-6, 0.25, 0.5], [1e-5, 0.4, 0.9]], dtype=torch.float16, device=device)
    t = torch.ones(3, 3, dtype=torch.float16, device=device)
    w = torch.tensor([0.25, 0.0, 0.125], device=device)
    return p, t, w


def _reference_grad(p, t, w, reduction):
    pr = leaf(p.double())
    out = bernoulli_nll_ref(pr, t, from_logits=False, reduction=reduction)
    (out * w.double() if reduction == "none" else out * w.double()[0]).sum().backward()
    return pr.grad.to(torch.float16)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float16_probability_gradient_is_scaled_before_it_is_rounded(backend, device, reduction):
    """Issue 16 item 1: the saved float16 gradient used to overflow to inf (and a zero row
    weight gave NaN) where the upstream gradient brings it back into float16's range."""
    p, t, w = _float16_overflow_case(device)
    want = _reference_grad(p, t, w, reduction)
    assert want.isfinite().all()
    x = leaf(p)
    out = vaekern.bernoulli_nll(x, t, from_logits=False, reduction=reduction, backend=backend)
    (out * w if reduction == "none" else out * w[0]).sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, want, rtol=2e-3, atol=0)
    x.grad = None  # a second backward recomputes the forward's gradient first
    (out * w if reduction == "none" else out * w[0]).sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=2e-3, atol=0)


def test_float16_probability_gradient_out_of_place(backend, device):
    """The out-of-place scaling (a caller that holds the kernel's gradient output, as the
    traced path and opcheck do) recomputes the overflowed elements too."""
    p, t, w = _float16_overflow_case(device)
    ops = kernels_of(backend, device)
    _, grad = ops.bernoulli_nll(p, t, False, 0, True)
    assert grad.isinf().any()  # what forward stores for an upstream of 1
    kept = grad.clone()
    ops.bernoulli_nll_backward_(grad, w, p, t, False, 0)
    torch.testing.assert_close(grad, _reference_grad(p, t, w, "none"), rtol=2e-3, atol=0)
    ops.bernoulli_nll_backward_(kept, torch.ones(3, device=device), p, t, False, 0)
    assert kept.isinf().any()  # an upstream of exactly 1 leaves the true, overflowing, gradient
