"""gaussian_kl on every backend: values, gradients, double backward, registration, edges."""

import pytest
import torch
from conftest import DTYPES, REDUCTIONS, SHAPES
from helpers import (
    SizedOps,
    assert_compiled_matches_eager,
    assert_grad_close,
    assert_loss_close,
    kernels_of,
    latents,
    leaf,
    noncontiguous,
    upstream,
)

import vaekern
from vaekern import reference
from vaekern._ops._common import KL_COLUMNS
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
        grad_out = torch.rand(5, device=device) if reduction == 0 else torch.tensor(2.5, device=device)
        # No prior; a learned one (per latent) with a per-sample log-variance; a 0-d mean alone.
        pm, plv = torch.randn(13, device=device) * 0.3, torch.randn(5, 1, device=device) * 0.3
        for prior in ((None, None), (pm, plv), (pm[0], None)):
            torch.library.opcheck(ops.gaussian_kl, (leaf(mu), leaf(logvar), *(p if p is None else leaf(p) for p in prior), reduction))
            torch.library.opcheck(ops.gaussian_kl_backward, (grad_out, mu, logvar, *prior, reduction))
    # The column reduction (free bits): one sum per latent element, its upstream per element too.
    for prior in ((None, None), (pm, plv)):
        torch.library.opcheck(ops.gaussian_kl, (leaf(mu), leaf(logvar), *(p if p is None else leaf(p) for p in prior), KL_COLUMNS))
        torch.library.opcheck(ops.gaussian_kl_backward, (torch.rand(13, device=device), mu, logvar, *prior, KL_COLUMNS))


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


# --- Priors, free bits and the per-element KL (issue 14) --------------------------------

# Prior shapes for (B, Z) = (5, 7) latents: learned per element, per sample (hierarchical),
# 0-d, and one per latent broadcast over a trailing dim of 3-d latents below.
PRIOR_SHAPES = ((7,), (5, 7), ())


def _prior(shape, dtype, device, scale):
    return (torch.randn(shape, dtype=torch.float64) * scale + 0.1).to(dtype=dtype, device=device)


def _normal_kl(mu, logvar, pm, plv):
    """The per-element KL by torch.distributions, float64: an independent formula."""
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(pm.expand_as(mu), torch.exp(0.5 * plv).expand_as(mu))
    return torch.distributions.kl_divergence(q, p)


def _free_bits_formula(kl_elements, lam, reduction):
    """Free bits written out in plain PyTorch (IAF): sum_j max(lambda, batch-mean KL_j)."""
    per_dim = kl_elements.mean(dim=0)
    term = torch.where(per_dim < lam, torch.full_like(per_dim, lam), per_dim).sum()
    return term * kl_elements.shape[0] if reduction == "sum" else term


@pytest.mark.parametrize("prior_shape", PRIOR_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prior_matches_torch_distributions(backend, device, prior_shape, reduction):
    """KL to N(prior_mu, exp(prior_logvar)) against kl_divergence(Normal, Normal): the
    value and all four gradients (the priors' reduced over their broadcast dims), with an
    upstream gradient other than 1."""
    mu, logvar = latents((5, 7), torch.float64, device)
    pm, plv = _prior(prior_shape, torch.float64, device, 1.0), _prior(prior_shape, torch.float64, device, 0.7)
    got_in = [leaf(x) for x in (mu, logvar, pm, plv)]
    want_in = [leaf(x) for x in (mu, logvar, pm, plv)]
    out = vaekern.gaussian_kl(*got_in, reduction=reduction, backend=backend)
    rows = _normal_kl(*want_in).sum(dim=1)
    want = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    torch.testing.assert_close(out, want)
    g = upstream(out)
    out.backward(g)
    want.backward(g)
    for a, b in zip(got_in, want_in):
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prior_matches_reference_in_every_dtype(backend, device, dtype):
    """Latents and priors in each dtype, 3-d latents with a per-channel prior, against the
    float64 oracle; every gradient in its input's dtype."""
    mu, logvar = latents((6, 3, 5), dtype, device)
    pm, plv = _prior((3, 1), dtype, device, 0.8), _prior((6, 3, 5), dtype, device, 0.5)
    for reduction in REDUCTIONS:
        got_in = [leaf(x) for x in (mu, logvar, pm, plv)]
        want_in = [leaf(x.double()) for x in (mu, logvar, pm, plv)]
        out = vaekern.gaussian_kl(*got_in, reduction=reduction, backend=backend)
        ref = gaussian_kl_ref(*want_in, reduction=reduction)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_loss_close(out, ref, dtype)
        g = upstream(out)
        out.backward(g)
        ref.backward(g.double())
        for a, b in zip(got_in, want_in):
            assert_grad_close(a.grad, b.grad, dtype)


def _prior_layouts(B, Z, dtype, device):
    """(name, prior_mu, prior_logvar): priors in the layouts the kernels read in place at
    their broadcast strides, and one they copy."""
    return (
        ("per latent", _prior((Z,), dtype, device, 0.8), _prior((1, Z), dtype, device, 0.5)),
        ("per sample, transposed", _prior((Z, B), dtype, device, 0.8).t(), _prior((B, Z), dtype, device, 0.5).t().contiguous().t()),
        ("every other element", noncontiguous(_prior((Z,), dtype, device, 0.8)), noncontiguous(_prior((B, Z), dtype, device, 0.5))),
        ("one per sample", _prior((B, 1), dtype, device, 0.8), _prior((B, 1), dtype, device, 0.5)),
        ("0-d", _prior((), dtype, device, 0.8), _prior((), dtype, device, 0.5)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prior_in_every_layout(backend, device, dtype):
    """The kernels read a prior at its broadcast strides (0 along a broadcast dim, any other
    stride gathered): every layout gives the oracle's value and all four gradients, over
    latents longer than a vector and a tile (37 columns, odd rows)."""
    B, Z = 5, 37
    mu, logvar = latents((B, Z), dtype, device)
    # A learned prior is a float32 parameter beside float16/bfloat16 latents (autocast).
    for name, pm, plv in _prior_layouts(B, Z, torch.float64 if dtype == torch.float64 else torch.float32, device):
        for reduction in REDUCTIONS:
            got_in = [leaf(x) for x in (mu, logvar, pm, plv)]
            want_in = [leaf(x.double()) for x in (mu, logvar, pm, plv)]
            out = vaekern.gaussian_kl(*got_in, reduction=reduction, backend=backend)
            ref = gaussian_kl_ref(*want_in, reduction=reduction)
            assert_loss_close(out, ref, dtype)
            g = upstream(out)
            out.backward(g)
            ref.backward(g.double())
            for a, b in zip(got_in, want_in):
                assert a.grad.shape == a.shape, name
                assert_grad_close(a.grad, b.grad, a.dtype)  # the inputs are exact: each output's own rounding


def test_prior_of_another_precision(backend, device):
    """A float64 prior of float32 latents computes in float64, as the oracle (the latents
    widened); a float16 prior of float16 latents in float32; gradients in each input's dtype."""
    for lat, pri in ((torch.float32, torch.float64), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        mu, logvar = latents((4, 9), lat, device)
        pm, plv = _prior((9,), pri, device, 0.8), _prior((4, 9), pri, device, 0.5)
        got_in = [leaf(x) for x in (mu, logvar, pm, plv)]
        want_in = [leaf(x.double()) for x in (mu, logvar, pm, plv)]
        out = vaekern.gaussian_kl(*got_in, reduction="sum", backend=backend)
        ref = gaussian_kl_ref(*want_in, reduction="sum")
        assert out.dtype == (torch.float64 if torch.float64 in (lat, pri) else torch.float32)
        assert_loss_close(out, ref, lat)
        out.backward(torch.tensor(1.5, dtype=out.dtype, device=device))
        ref.backward(torch.tensor(1.5, dtype=torch.float64, device=device))
        for a, b in zip(got_in, want_in):
            assert a.grad.dtype == a.dtype
            assert_grad_close(a.grad, b.grad, a.dtype)  # the inputs are exact: each output's own rounding


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prior_makes_no_latent_sized_pass_beside_the_kernels(backend, device, reduction):
    """The prior is read by the kernels (issue 14): forward runs no op beside the fused one
    on a latent-sized tensor, and backward only the sum of a broadcast prior's gradient over
    its broadcast dims (none for a per-sample prior). It took about ten such ops each way,
    the prior's affine map and its backward, before."""
    if backend == "reference":
        pytest.skip("the oracle differentiates the KL by plain autograd")
    mu, logvar = latents((6, 7), torch.float32, device)
    recon, t = torch.randn(6, 50, device=device), torch.rand(6, 50, device=device)
    for pm, plv, backward_ops in (
        (_prior((7,), torch.float32, device, 0.8), _prior((7,), torch.float32, device, 0.5), ["aten.sum.dim_IntList"] * 2),
        (_prior((6, 7), torch.float32, device, 0.8), _prior((6, 7), torch.float32, device, 0.5), []),
    ):
        calls = (
            lambda x, m, lv, p, q: vaekern.gaussian_kl(m, lv, p, q, reduction=reduction, backend=backend),
            lambda x, m, lv, p, q: vaekern.vae_loss(
                x, t, m, lv, prior_mu=p, prior_logvar=q, reduction=reduction, backend=backend
            ),
        )
        for call in calls:
            inputs = [leaf(x) for x in (recon, mu, logvar, pm, plv)]
            with SizedOps(mu.numel()) as mode:
                call(*inputs)
            assert not mode.ops, mode.ops
            # A forward of its own: under the mode the saved gradient gains a Python object,
            # and the C++ backward then scales a copy of it (csrc/autograd.cpp, scale_in_place).
            inputs = [leaf(x) for x in (recon, mu, logvar, pm, plv)]
            out = call(*inputs)
            with SizedOps(mu.numel()) as mode:
                out.backward(upstream(out))
            assert sorted(mode.ops) == backward_ops, mode.ops
            assert all(x.grad is not None for x in inputs[1:])


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_free_bits_make_no_latent_sized_pass_beside_the_kernel(backend, device, reduction):
    """Free bits and the per-element KL take the KL op's column reduction in the latents' own
    layout: no transposed copy and no other latent-sized op beside the fused one, forward or
    backward, with or without a per-sample prior (it copied both latents each way before)."""
    if backend == "reference":
        pytest.skip("the oracle differentiates the KL by plain autograd")
    mu, logvar = latents((6, 7), torch.float32, device)
    for prior in ((None, None), (_prior((6, 7), torch.float32, device, 0.3), _prior((6, 7), torch.float32, device, 0.3))):
        for kw in ({"free_bits": 0.1}, {"return_per_dim": True}):
            inputs = [None if x is None else leaf(x) for x in (mu, logvar, *prior)]
            with SizedOps(mu.numel()) as mode:
                out = vaekern.gaussian_kl(*inputs, reduction=reduction, backend=backend, **kw)
            assert not mode.ops, mode.ops
            kl = out[0] if isinstance(out, tuple) else out
            with SizedOps(mu.numel()) as mode:
                kl.backward(upstream(kl))
            assert not mode.ops, mode.ops


def test_one_prior_argument_alone(backend, device):
    """prior_mu alone keeps the unit variance; prior_logvar alone the zero mean."""
    mu, logvar = latents((4, 6), torch.float64, device)
    pm, plv = _prior((6,), torch.float64, device, 1.0), _prior((6,), torch.float64, device, 0.5)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    for kw, p in (({"prior_mu": pm}, (pm, zero)), ({"prior_logvar": plv}, (zero, plv))):
        out = vaekern.gaussian_kl(mu, logvar, reduction="none", backend=backend, **kw)
        torch.testing.assert_close(out, _normal_kl(mu, logvar, *p).sum(dim=1))


def test_standard_prior_given_explicitly_is_the_default(backend, device):
    mu, logvar = latents((5, 9), torch.float32, device)
    zeros = torch.zeros(9, device=device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            vaekern.gaussian_kl(mu, logvar, zeros, zeros, reduction=reduction, backend=backend),
            vaekern.gaussian_kl(mu, logvar, reduction=reduction, backend=backend),
        )


def _collapsing_latents(device, dtype=torch.float64):
    """(6, 5) latents whose per-element batch-mean KLs straddle 0.1: columns 0 and 3 nearly
    match the prior (KL ~ 1e-3), the others carry information (KL ~ 1)."""
    mu, logvar = latents((6, 5), torch.float64, "cpu")
    mu[:, [0, 3]] *= 0.03
    logvar[:, [0, 3]] *= 0.03
    return mu.to(dtype=dtype, device=device), logvar.to(dtype=dtype, device=device)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("with_prior", (False, True))
def test_free_bits_match_the_formula(backend, device, reduction, with_prior):
    """Free bits against the formula in plain PyTorch: the value, and gradients that are
    exactly 0 for the elements below lambda and the KL's own elsewhere."""
    lam = 0.1
    mu, logvar = _collapsing_latents(device)
    pm, plv = (_prior((5,), torch.float64, device, 0.05), _prior((5,), torch.float64, device, 0.05)) if with_prior else (None, None)
    prior_in = [leaf(x) for x in (pm, plv)] if with_prior else [None, None]
    got_in = [leaf(mu), leaf(logvar), *prior_in]
    want_in = [leaf(mu), leaf(logvar)] + ([leaf(x) for x in (pm, plv)] if with_prior else [])
    out = vaekern.gaussian_kl(*got_in, free_bits=lam, reduction=reduction, backend=backend)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    elements = _normal_kl(*want_in[:2], *(want_in[2:] if with_prior else (zero, zero)))
    per_dim = elements.detach().mean(dim=0)
    assert ((per_dim < lam).sum() == 2) and (per_dim[[0, 3]] < lam).all(), "the fixture must straddle lambda"
    want = _free_bits_formula(elements, lam, reduction)
    torch.testing.assert_close(out, want)
    out.backward(torch.tensor(2.5, dtype=torch.float64, device=device))
    want.backward(torch.tensor(2.5, dtype=torch.float64, device=device))
    for a, b in zip([x for x in got_in if x is not None], want_in):
        torch.testing.assert_close(a.grad, b.grad)
    assert (got_in[0].grad[:, [0, 3]] == 0).all() and (got_in[1].grad[:, [0, 3]] == 0).all()
    assert (got_in[0].grad[:, [1, 2, 4]] != 0).all()


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_free_bits_as_a_tensor_are_the_float_and_anneal_in_place(backend, device, reduction):
    """A 0-d tensor free_bits (on the latents' device) gives the float's loss and gradients;
    changed in place, it moves the loss without a recompile under torch.compile (a float is
    a constant of the compiled graph). Not inspected (no sync): a NaN threshold gives NaN."""
    mu, logvar = _collapsing_latents(device)
    lam = torch.tensor(0.1, device=device)
    pm = _prior((5,), torch.float64, device, 0.05)
    for got_lam in (lam, lam.double(), lam.half()):
        got_in, want_in = [leaf(mu), leaf(logvar), leaf(pm)], [leaf(mu), leaf(logvar), leaf(pm)]
        got = vaekern.gaussian_kl(*got_in, free_bits=got_lam, reduction=reduction, backend=backend)
        want = vaekern.gaussian_kl(*want_in, free_bits=got_lam.item(), reduction=reduction, backend=backend)
        torch.testing.assert_close(got, want)
        got.backward(torch.tensor(1.5, dtype=got.dtype, device=device))
        want.backward(torch.tensor(1.5, dtype=want.dtype, device=device))
        for a, b in zip(got_in, want_in):
            torch.testing.assert_close(a.grad, b.grad)
    assert torch.isnan(vaekern.gaussian_kl(mu, logvar, free_bits=torch.tensor(float("nan"), device=device), backend=backend))
    if backend not in ("reference", "cpu"):
        return  # the compile check needs one fused backend: cpu's
    fn = torch.compile(lambda m, lv, fb: vaekern.gaussian_kl(m, lv, free_bits=fb, reduction=reduction, backend=backend), fullgraph=True)
    schedule = torch.zeros((), device=device)
    fn(mu, logvar, schedule)  # the compile (for this test's reduction: a recompile of the lambda)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.0, 0.1, 0.5):
            schedule.fill_(value)
            torch.testing.assert_close(
                fn(mu, logvar, schedule), vaekern.gaussian_kl(mu, logvar, free_bits=value, reduction=reduction, backend=backend)
            )


def test_free_bits_below_every_element_is_the_plain_kl(backend, device):
    mu, logvar = latents((4, 6), torch.float64, device)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            vaekern.gaussian_kl(mu, logvar, free_bits=1e-9, reduction=reduction, backend=backend),
            vaekern.gaussian_kl(mu, logvar, reduction=reduction, backend=backend),
        )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_per_dim_kl_from_the_same_call(backend, device, dtype):
    """return_per_dim: the batch-mean KL of every element, shaped like mu.shape[1:], the
    true KL whatever the free bits; the loss is unchanged by asking for it."""
    mu, logvar = latents((5, 2, 3), dtype, device)
    plv = _prior((2, 1), dtype, device, 0.4)
    want = reference.gaussian_kl_per_dim_ref(mu, logvar, None, plv)
    for reduction, free_bits in (("mean", 0.0), ("sum", 0.0), ("none", 0.0), ("mean", 0.5)):
        kl, per_dim = vaekern.gaussian_kl(
            mu, logvar, None, plv, free_bits=free_bits, reduction=reduction, return_per_dim=True, backend=backend
        )
        assert per_dim.shape == (2, 3) and per_dim.dtype == torch.float32
        assert_loss_close(per_dim, want, dtype)
        assert_loss_close(kl, gaussian_kl_ref(mu, logvar, None, plv, free_bits=free_bits, reduction=reduction), dtype)


def test_per_dim_kl_sums_to_the_mean_kl(backend, device):
    mu, logvar = latents((7, 11), torch.float64, device)
    kl, per_dim = vaekern.gaussian_kl(mu, logvar, return_per_dim=True, backend=backend)
    torch.testing.assert_close(per_dim.sum(), kl)
    assert per_dim.shape == (11,)


def test_prior_and_free_bits_nan_propagates(backend, device):
    """A NaN in a prior is a NaN in the loss and in that element's gradients; under free
    bits the NaN element's batch mean is NaN, and so is the term."""
    mu, logvar = latents((3, 4), torch.float32, device)
    plv = torch.zeros(3, 4, device=device)
    plv[1, 2] = float("nan")
    ma, la, pa = leaf(mu), leaf(logvar), leaf(plv)
    out = vaekern.gaussian_kl(ma, la, None, pa, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(pa.grad[1, 2]) and torch.isnan(la.grad[1, 2]) and torch.isfinite(la.grad[[0, 2]]).all()
    ma, la, pa = leaf(mu), leaf(logvar), leaf(plv)
    kl, per_dim = vaekern.gaussian_kl(ma, la, None, pa, free_bits=0.25, return_per_dim=True, backend=backend)
    kl.backward()
    assert torch.isnan(kl) and torch.isnan(per_dim[2]) and torch.isfinite(per_dim[[0, 1, 3]]).all()
    assert torch.isnan(la.grad[:, 2]).any() and torch.isfinite(la.grad[:, [0, 1, 3]]).all()


def test_extreme_variance_ratio_is_straight_through(backend, device):
    """The clamp at 60 bounds the log variance ratio: a posterior 80 nats wider than its
    prior still gets a gradient that pushes logvar down and the prior's up."""
    logvar = torch.tensor([[-30.0, 0.5, 70.0, 100.0]], device=device).repeat(2, 1)
    plv = torch.tensor([-20.0, 2.0, 10.0, 20.0], device=device)
    mu = torch.full_like(logvar, 0.25)
    la, pa = leaf(logvar), leaf(plv)
    out = vaekern.gaussian_kl(mu, la, None, pa, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(la.grad).all() and torch.isfinite(pa.grad).all()
    lr, pr = leaf(logvar.double()), leaf(plv.double())
    gaussian_kl_ref(mu.double(), lr, None, pr, reduction="none").sum().backward()
    torch.testing.assert_close(out.double(), gaussian_kl_ref(mu, logvar, None, plv, reduction="none"), rtol=1e-5, atol=0)
    torch.testing.assert_close(la.grad.double(), lr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa.grad.double(), pr.grad, rtol=1e-5, atol=1e-6)
    assert (la.grad[:, 2:] > 0).all() and (pa.grad[2:] < 0).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(free_bits=0.1, reduction="none"), ValueError, "free_bits > 0 needs reduction='mean' or 'sum'.*batch"),
        (dict(free_bits=-0.1), ValueError, "free_bits must be finite and >= 0"),
        (dict(free_bits=float("nan")), ValueError, "free_bits must be finite"),
        (dict(free_bits=True), TypeError, "free_bits must be a float"),
        (dict(free_bits=torch.tensor([0.1])), TypeError, "free_bits must be a float or a 0-d floating tensor"),
        (dict(free_bits=torch.tensor(1)), TypeError, "free_bits must be a float or a 0-d floating tensor"),
        (dict(free_bits=torch.tensor(0.1, requires_grad=True)), ValueError, "free_bits must not require grad"),
        (dict(free_bits=torch.tensor(0.0), reduction="none"), ValueError, "a tensor free_bits needs reduction='mean' or 'sum'"),
        (dict(prior_mu=torch.zeros(3)), ValueError, r"prior_mu of shape \(3,\) does not broadcast to mu's shape \(4, 5\)"),
        (dict(prior_logvar=torch.zeros(2, 4, 5)), ValueError, "prior_logvar of shape .* does not broadcast"),
        (dict(prior_mu=torch.zeros(5, dtype=torch.int64)), TypeError, "prior_mu must be a floating tensor"),
        (dict(prior_logvar=[0.0] * 5), TypeError, "prior_logvar must be a torch.Tensor or None"),
        (dict(return_per_dim=1), TypeError, "return_per_dim must be a bool"),
    ],
)
def test_bad_prior_and_free_bits_arguments_are_named(backend, device, kwargs, error, match):
    mu, logvar = latents((4, 5), torch.float32, device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        vaekern.gaussian_kl(mu, logvar, backend=backend, **kwargs)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_prior_and_free_bits_gradcheck(backend, device, reduction):
    """float64 gradcheck through all four tensors with free bits binding on some elements
    (away from the threshold, where the term is smooth), and gradgradcheck with priors."""
    mu, logvar = _collapsing_latents(device)
    pm, plv = _prior((5,), torch.float64, device, 0.05), _prior((6, 5), torch.float64, device, 0.05)
    fn = lambda m, lv, p, q: vaekern.gaussian_kl(m, lv, p, q, free_bits=0.1, reduction=reduction, backend=backend)  # noqa: E731
    inputs = tuple(leaf(x) for x in (mu, logvar, pm, plv))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    plain = lambda m, lv, p, q: vaekern.gaussian_kl(m, lv, p, q, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(plain, inputs, fast_mode=True)


def test_prior_and_free_bits_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) of the KL with a learned prior, free bits and the
    per-element KL: no graph break, the eager values and gradients."""
    if backend not in ("reference", "cpu"):
        pytest.skip("the traced path (the priors' reduction, free bits) is the op layer's, shared by every namespace: compiled once on cpu")
    mu, logvar = _collapsing_latents(device, torch.float32)
    pm, plv = _prior((5,), torch.float32, device, 0.05), _prior((5,), torch.float32, device, 0.05)

    def fn(m, lv, p, q):
        return vaekern.gaussian_kl(m, lv, p, q, free_bits=0.1, return_per_dim=True, backend=backend)

    assert_compiled_matches_eager(fn, (mu, logvar, pm, plv))


def test_prior_under_torch_func(backend, device):
    """torch.func.grad with respect to a learned prior, and per-sample gradients (vmap) of
    the posterior under a per-sample prior, as the reference gives them."""
    from torch.func import grad, vmap

    mu, logvar = latents((4, 3), torch.float64, device)
    pm, plv = _prior((3,), torch.float64, device, 0.5), _prior((4, 3), torch.float64, device, 0.3)

    def kl(b, mu, logvar, pm, plv):
        return vaekern.gaussian_kl(mu, logvar, pm, plv, backend=b) * 3

    for argnums in (3, 4):
        torch.testing.assert_close(grad(kl, argnums)(backend, mu, logvar, pm, plv), grad(kl, argnums)("reference", mu, logvar, pm, plv))
    per_sample = vmap(grad(lambda b, m, lv, q: kl(b, m[None], lv[None], pm, q[None]), argnums=(1, 3)), in_dims=(None, 0, 0, 0))
    for got, want in zip(per_sample(backend, mu, logvar, plv), per_sample("reference", mu, logvar, plv)):
        torch.testing.assert_close(got, want)


def test_empty_batch_sum_is_zero_with_or_without_per_dim(backend, device):
    """A sum over no rows is 0, and asking for the per-element KL must not change it (the
    per-element means of no rows are NaN: 0/0)."""
    mu, logvar = latents((0, 4), torch.float32, device)
    plain = vaekern.gaussian_kl(mu, logvar, reduction="sum", backend=backend)
    kl, per_dim = vaekern.gaussian_kl(mu, logvar, reduction="sum", return_per_dim=True, backend=backend)
    assert plain.item() == 0.0 and kl.item() == 0.0
    assert per_dim.shape == (4,) and per_dim.isnan().all()


def test_free_bits_too_large_for_a_float_is_named(backend, device):
    mu, logvar = latents((2, 3), torch.float32, device)
    with pytest.raises(ValueError, match="free_bits"):
        vaekern.gaussian_kl(mu, logvar, free_bits=10**400, backend=backend)
