"""Input builders and comparisons shared by the per-op test files."""

from __future__ import annotations

import os

import torch

import pytest
from conftest import GRAD_TOL, LOSS_TOL

import vaekern
from vaekern import reference
from vaekern._ops._common import KL_COLUMNS


# Faults of Triton's interpreter (triton 3.8, triton/runtime/interpreter.py), not of the
# kernels: tests/test_triton_aot.py shows each one on a bare cast, and the compiled code's
# conversion instead.
INTERPRETER_BF16_SUBNORMAL = (
    "triton interpreter: bfloat16 subnormals widen to wrong float32 values (_convert_float renormalizes "
    "them and then clamps the exponent to 0 without shifting the significand back)"
)
INTERPRETER_F64_TO_BF16 = (
    "triton interpreter: float64 narrows to bfloat16 through numpy astype(uint16), the value's integer "
    "part taken as the bits (InterpreterBuilder.cast_impl)"
)


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs its kernels in Triton's interpreter here."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def xfail_in_interpreter(request, backend: str, reason: str) -> None:
    """Make the running test a strict xfail where ``backend`` runs in Triton's interpreter,
    whose fault ``reason`` names; everywhere else, a GPU included, it must pass."""
    if interpreted(backend):
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))


def logits(shape, dtype, device, scale=3.0) -> torch.Tensor:
    """Random logits with no zeros (a zero logit hides sign errors)."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
    return x.to(dtype=dtype, device=device)


def probs(shape, dtype, device) -> torch.Tensor:
    """Probabilities away from 0 and 1, representable in every dtype."""
    return (torch.rand(shape, dtype=torch.float64) * 0.96 + 0.02).to(dtype=dtype, device=device)


def target(shape, kind, device, dtype=torch.float32) -> torch.Tensor:
    """A target of the given kind: "float" in (0, 1), "bool", or "uint8" holding 0/1."""
    if kind == "float":
        return (torch.rand(shape, dtype=torch.float64) * 0.98 + 0.01).to(dtype=dtype, device=device)
    bits = torch.rand(shape) < 0.5
    return bits.to(device) if kind == "bool" else bits.to(torch.uint8).to(device)


def latents(shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    mu = (torch.randn(shape, dtype=torch.float64) * 1.5).to(dtype=dtype, device=device)
    # logvar within about +-4: fp16 gradients times an upstream 1024 must stay finite.
    logvar = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    return mu, logvar


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other column of a wider tensor."""
    wide = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.shape[-1] == 1
    return view


def assert_loss_close(actual, expected, dtype):
    atol, rtol = LOSS_TOL[dtype]
    # Losses are sums over a row: scale the absolute tolerance with the magnitude.
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def assert_grad_close(actual, expected, dtype):
    atol, rtol = GRAD_TOL[dtype]
    assert actual.dtype == dtype, f"gradient dtype {actual.dtype}, expected {dtype}"
    # sigmoid(x) - t cancels when sigmoid(x) is near t: its absolute error is an ulp of the
    # terms, not of the result, times the upstream gradient. Scale atol with the largest
    # gradient, which carries that upstream factor.
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol)


def upstream(out: torch.Tensor) -> torch.Tensor:
    """An upstream gradient other than 1: 1024 (as under GradScaler) or random per row."""
    if out.dim() == 0:
        return torch.full_like(out, 1024.0)
    return torch.rand_like(out) * 3 + 0.5


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def assert_compiled_matches_eager(fn, inputs) -> None:
    """torch.compile(fn, fullgraph=True) (no graph break) gives fn's outputs, and the same
    gradients of 3 x its output (its first, if it returns several) for fresh leaves of
    ``inputs``."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    eager_in, comp_in = [leaf(x) for x in inputs], [leaf(x) for x in inputs]
    e, c = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(e, c)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    (first(e) * 3).backward()
    (first(c) * 3).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(a.grad, b.grad)


class SizedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops outside vaekern's namespaces (one per backend) that take or make a
    tensor of at least ``numel`` elements (an image's, a batch of latents'), views (no pass
    over memory) aside: what a fused path must not run beside its kernels."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not func.namespace.startswith("vaekern") and not func.is_view and any(t.numel() >= self.numel for t in tensors):
            self.ops.append(str(func))
        return out


class KernelOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops of vaekern's namespaces that run: the fused launches of a call."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("vaekern"):
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


class ReferenceKernels:
    """The kernel ops' interface (the schemas of vaekern._ops), computed by vaekern.reference
    in float64 under plain autograd: the oracle for tests that call kernels directly."""

    _NAMES = {0: "none", 1: "mean", 2: "sum"}

    @staticmethod
    def _acc(*tensors):
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    def _grads(self, out, inputs, scale=None):
        """d(sum of out * scale)/d(inputs), each in float64."""
        return torch.autograd.grad(out, inputs, scale if scale is not None else torch.ones_like(out))

    def bernoulli_nll(self, input, target, from_logits, reduction, compute_grad):
        x = input.detach().double().requires_grad_()
        out = reference.bernoulli_nll_ref(x, target, from_logits=from_logits, reduction=self._NAMES[reduction])
        grad = self._grads(out, x)[0].to(input.dtype) if compute_grad else input.new_empty((0,))
        return out.detach().to(self._acc(input)), grad

    def bernoulli_nll_backward_(self, grad_input, grad_out, input, target, from_logits, reduction):
        # The definition, not the kernels' route: the float64 gradient times the upstream,
        # rounded once (the saved float16 gradient may have overflowed where this does not).
        x = input.detach().double().requires_grad_()
        out = reference.bernoulli_nll_ref(x, target, from_logits=from_logits, reduction=self._NAMES[reduction])
        scale = grad_out.double().reshape((-1,) + (1,) * (input.dim() - 1)) if grad_out.dim() else grad_out.double()
        grad_input.copy_(self._grads(out, x)[0] * scale)

    def gaussian_kl(self, mu, logvar, prior_mu, prior_logvar, reduction):
        kl = reference.gaussian_kl_ref(mu, logvar, prior_mu, prior_logvar, reduction=self._NAMES[reduction])
        return kl.to(self._acc(mu, logvar))

    def gaussian_kl_backward(self, grad_out, mu, logvar, prior_mu, prior_logvar, reduction):
        """The kernels' outputs: the priors' gradients per element (mu's shape), as each
        element's share of the reduced KL's gradient, or (0,) where a prior is absent."""
        m, lv = (x.detach().double().requires_grad_() for x in (mu, logvar))
        priors = [None if p is None else p.detach().double().expand(mu.shape).clone().requires_grad_() for p in (prior_mu, prior_logvar)]
        if reduction == KL_COLUMNS:  # each latent element's KL summed over the batch
            out = reference.gaussian_kl_per_dim_ref(m, lv, *priors) * mu.shape[0]
        else:
            out = reference.gaussian_kl_ref(m, lv, *priors, reduction=self._NAMES[reduction])
        present = [p for p in priors if p is not None]
        g_mu, g_lv, *g_priors = self._grads(out, (m, lv, *present), grad_out.double().expand_as(out))
        g_priors = iter(g_priors)
        prior_grads = [mu.new_empty((0,)) if p is None else next(g_priors).to(p.dtype) for p in (prior_mu, prior_logvar)]
        return g_mu.to(mu.dtype), g_lv.to(logvar.dtype), *prior_grads

    def reparameterize(self, mu, logvar, eps, seed):
        assert eps is not None, "the reference draws no noise of its own: pass eps"
        return reference.reparameterize_ref(mu, logvar, eps).to(mu.dtype)

    def reparameterize_backward(self, grad_z, mu, logvar, eps, seed):
        m, lv = (x.detach().double().requires_grad_() for x in (mu, logvar))
        g_mu, g_lv = self._grads(reference.reparameterize_ref(m, lv, eps), (m, lv), grad_z.double())
        return g_mu.to(mu.dtype), g_lv.to(logvar.dtype)

    _LIKELIHOODS = {0: "bernoulli", 1: "gaussian", 2: "continuous_bernoulli"}

    def _recon_grad(self, recon, target, log_scale, likelihood, from_logits, reduction):
        """The likelihood's d(reduced recon term)/d(recon) in float64, upstream 1."""
        x = recon.detach().double().requires_grad_()
        kw = dict(likelihood=self._LIKELIHOODS[likelihood], from_logits=from_logits, reduction=self._NAMES[reduction])
        if likelihood == 1:  # the kernels' one-per-column log_scale, as the row's shape
            kw["log_scale"] = log_scale.reshape(recon.shape[1:]) if log_scale.dim() else log_scale
        rec = reference.vae_loss_ref(x, target, x.new_zeros(x.shape[0], 1), x.new_zeros(x.shape[0], 1), **kw)[1]
        return self._grads(rec, x)[0]

    def vae_loss(
        self, recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, likelihood, from_logits,
        reduction, compute_grad,
    ):
        acc = self._acc(recon, mu, logvar)
        kw = dict(likelihood=self._LIKELIHOODS[likelihood], from_logits=from_logits, reduction=self._NAMES[reduction])
        kw.update(prior_mu=prior_mu, prior_logvar=prior_logvar)
        if likelihood == 1:
            kw["log_scale"] = log_scale.reshape(recon.shape[1:]) if log_scale.dim() else log_scale
        weight = mu.new_empty((0,), dtype=acc)
        if free_bits is not None:
            kw["free_bits"] = free_bits
            per_dim = reference.gaussian_kl_per_dim_ref(mu, logvar, prior_mu, prior_logvar)
            lam = free_bits.double()
            weight = ((per_dim >= lam) | per_dim.isnan()).logical_and(~lam.isnan()).to(acc)
        loss, rec, kl = reference.vae_loss_ref(recon, target, mu, logvar, beta=beta, **kw)
        grad = recon.new_empty((0,))
        if compute_grad:
            grad = self._recon_grad(recon, target, log_scale, likelihood, from_logits, reduction).to(recon.dtype)
        return loss.to(acc), rec.to(acc), kl.to(acc), grad, weight

    def vae_loss_backward_(
        self, grad_recon, grad_loss, grad_recon_term, grad_kl_term, recon, target, log_scale, mu, logvar, prior_mu,
        prior_logvar, kl_weight, beta, likelihood, from_logits, reduction,
    ):
        if grad_recon.numel():
            # The definition, as bernoulli_nll_backward_'s: the float64 gradient times the upstream.
            scale = (grad_loss + grad_recon_term).double()
            scale = scale.reshape((-1,) + (1,) * (recon.dim() - 1)) if scale.dim() else scale
            grad_recon.copy_(self._recon_grad(recon, target, log_scale, likelihood, from_logits, reduction) * scale)
        scale = grad_loss * beta + grad_kl_term
        if kl_weight is not None:  # the column reduction's upstream, one per latent element
            scale = (scale.double() / (mu.shape[0] if reduction == 1 else 1)).where(kl_weight != 0, 0.0)
            reduction = KL_COLUMNS
        return self.gaussian_kl_backward(scale, mu, logvar, prior_mu, prior_logvar, reduction)


reference_kernels = ReferenceKernels()


def _hiding(*names: str) -> str:
    """Python source that makes ``importlib.util.find_spec`` miss ``names``, as on an install
    without them; run it first in a fresh interpreter, before vaekern is imported."""
    return (
        "import importlib.util as _u\n"
        "_find = _u.find_spec\n"
        f"_u.find_spec = lambda name, *a: None if name in {names!r} else _find(name, *a)\n"
    )


HIDE_EXTENSION = _hiding("vaekern._C")
HIDE_TRITON_AND_EXTENSION = _hiding("vaekern._C", "triton")


def kernels_of(backend: str, device: torch.device):
    """The registered kernel ops that serve ``backend`` (``kernels.vae_loss`` is an
    OpOverload); skips for the reference, which is plain PyTorch with no ops of its own."""
    kernels = vaekern.backends.resolve(backend, device)
    if kernels is None:
        pytest.skip("the reference backend is plain PyTorch under autograd: no registered ops")
    return kernels
