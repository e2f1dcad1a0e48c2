"""What every op module of ``vaekern._ops`` shares: the reduction code, output dtypes,
fake-output shapes, the per-row scaling of a saved gradient, and the KL's gradient (of
gaussian_kl and of vae_loss's latents).

A leaf: it imports nothing from vaekern, so every op module, the Triton launchers and the
backend registry can import it without a circle.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# ``reduction`` as the kernels take it, an int as in ``at::Reduction``: 0 none (one value
# per row, shape (B,)), 1 mean over rows, 2 sum over rows.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# gaussian_kl's own reduction code beside those: the KL of each latent element summed over
# the batch, shape mu.shape[1:] (the free bits' batch means and the per-element KL are these
# over B: functional._free_bits_kl); its backward's upstream has that shape too.
KL_COLUMNS = 3
# ``likelihood`` of vae_loss as the kernels take it.
LIKELIHOODS = {"bernoulli": 0, "gaussian": 1, "continuous_bernoulli": 2}
# The Gaussian NLL's constant, 0.5 * log(2 pi), correctly rounded (tests/test_limits.py).
HALF_LOG_2PI = 0.91893853320467274178
# The log_scale at which the Gaussian NLL of an element is pi * (x - t)^2 with no constant:
# every backend forms s + 0.5 * log(2 pi) in the math dtype, exactly 0 here, so each row's
# NLL is pi times its squared error, which the optimal scale is made from
# (functional._optimal_nll; tests/test_gaussian_nll.py ties the exact 0).
SQUARED_ERROR_LOG_SCALE = -HALF_LOG_2PI


def loss_read_by_backward(log_scale: Tensor | None, loss: Tensor) -> Tensor | None:
    """The loss output to save for backward: only where backward reads it, for a learned
    0-d Gaussian log_scale's gradient (``gaussian_nll.log_scale_grad``). A saved output
    makes an in-place change to it an error at backward (``loss += c``), as for any op
    that saves its result, so nothing else saves it."""
    if log_scale is not None and log_scale.dim() == 0 and log_scale.requires_grad:
        return loss
    return None


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype of losses and partials.

    An fp16 sum over a 784-pixel row would lose the digits that matter, so low-precision
    inputs still get float32 losses."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def loss_like(x: Tensor, reduction: int, dtype: torch.dtype) -> Tensor:
    """An empty loss output: (B,) for reduction none, else 0-d."""
    shape = (x.shape[0],) if reduction == 0 else ()
    return x.new_empty(shape, dtype=dtype)


def grad_like(x: Tensor, compute_grad: bool) -> Tensor:
    """An empty saved-gradient output: contiguous in x's shape and dtype, or (0,) when not asked."""
    if compute_grad:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return x.new_empty((0,))


def per_row(scale: Tensor, batch: int, ndim: int) -> Tensor:
    """A () or (B,) upstream gradient shaped to broadcast over rows of an ndim tensor."""
    return scale.expand(batch).reshape((batch,) + (1,) * (ndim - 1))


def scaled_rows(backward_, saved: Tensor, scale: Tensor, *operands) -> Tensor:
    """``saved * scale`` per row, out of place, in saved's dtype: the traced path's backward
    of a saved likelihood gradient, whose in-place kernel is ``backward_(grad, scale,
    *operands)`` (``<likelihood>_backward_``, operands the likelihood's inputs).

    AOTAutograd's partitioner cannot take an in-place update of a saved forward output, and
    Inductor fuses this multiply into its consumer. A float16 gradient is scaled by the
    backward kernel instead, on a copy: it recomputes the elements that overflowed or lost
    bits in float16 in forward."""
    if saved.dtype == torch.float16:
        out = saved.clone()
        backward_(out, scale, *operands)
        return out
    return (saved * per_row(scale, saved.shape[0], saved.dim())).to(saved.dtype)


# Calls a kernel op below the Autograd dispatch key. The eager path calls the kernels from
# inside its own autograd.Function (or with no gradient needed at all), where the op's
# registered autograd would only check grad mode and redispatch: in Python, about 7 us a
# call on 1x1 tensors against 1 us for this guard (Intel Xeon, torch 2.14.1), which at
# small batch is a visible share of a training step. The same guard torch.library uses
# itself when it redispatches.
below_autograd = torch._C._AutoDispatchBelowAutograd


def has_native_autograd(qualname: str) -> bool:
    """True if ``ns::op`` has a kernel at the Autograd key before vaekern defines it: the
    extension registers its ops' autograd in C++ (csrc/autograd.cpp), and then no Python
    formula is added. Asked before the schema exists (kernels may precede it)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")
    except RuntimeError:  # no kernel of any kind registered for it
        return False


def kl_grads(kernels, grad_out, mu, logvar, prior_mu, prior_logvar, reduction: int, wanted=(True, True)):
    """gaussian_kl's backward (and vae_loss's for the latents): ``(d/dmu, d/dlogvar,
    d/dprior_mu, d/dprior_logvar)``, each prior's reduced to its shape (None where it is
    absent or not ``wanted``): the kernel, or the differentiable form when backward builds
    a graph (double backward)."""
    if torch.is_grad_enabled():
        grads = differentiable_kl_grads(grad_out, mu, logvar, prior_mu, prior_logvar, reduction)
    else:
        grads = kernels.gaussian_kl_backward(grad_out, mu, logvar, prior_mu, prior_logvar, reduction)
    return reduced_prior_grads(grads, prior_mu, prior_logvar, wanted)


def reduced_prior_grads(grads, prior_mu: Tensor | None, prior_logvar: Tensor | None, wanted=(True, True)):
    """A KL backward's ``(d/dmu, d/dlogvar, d/dprior_mu, d/dprior_logvar)`` with each prior's
    gradient, which the kernels write per latent element (mu's shape), summed over the dims
    the prior broadcasts (the one ATen op of the prior's backward); None where a prior is
    absent or not ``wanted``."""
    g_mu, g_lv, *g_priors = grads
    reduced = [
        None if p is None or not want else (g if g.shape == p.shape else g.sum_to_size(p.shape))
        for g, p, want in zip(g_priors, (prior_mu, prior_logvar), wanted)
    ]
    return g_mu, g_lv, *reduced


def prior_grad_like(prior: Tensor | None, mu: Tensor) -> Tensor:
    """An empty per-element prior-gradient output of the KL kernels (their fakes' and the
    Triton launchers'): mu's shape in the prior's dtype, or (0,) without the prior."""
    if prior is None:
        return mu.new_empty((0,))
    return torch.empty(mu.shape, dtype=prior.dtype, device=mu.device)


# The variance's exponent clamp of the differentiable KL gradient (double backward), as in the
# kernels; tests/test_limits.py ties it to the reference.
LOGVAR_MAX = 60.0


def differentiable_kl_grads(grad_out, mu, logvar, prior_mu, prior_logvar, reduction: int):
    """(d/dmu, d/dlogvar, d/dprior_mu, d/dprior_logvar) of the reduced KL times grad_out,
    with ops autograd can differentiate; the priors' per element, as the kernels write them
    (None where absent).

    The kernels' math (``gaussian_kl``'s header): the KL of m = (mu - pm) * exp(-plv / 2)
    and l = logvar - plv to N(0, I), whose gradients g_m = s * m and g_l = s * 0.5 *
    expm1(min(l, 60)) reach the inputs as d/dmu = g_m * exp(-plv / 2), d/dlogvar = g_l,
    d/dpm = -d/dmu and d/dplv = -g_l - 0.5 * g_m * m. Evaluated in the accumulation dtype
    and rounded once, as the kernels do: expm1 of a float16 logvar in float16 is inf above
    11.09 where s * 0.5 * expm1 is finite (636 at logvar 12 with s = 1/128), and in
    bfloat16 it would round twice."""
    acc = torch.promote_types(acc_dtype(mu, logvar), grad_out.dtype)
    if reduction == KL_COLUMNS:  # one upstream per latent element, for every row
        s = grad_out.to(acc).reshape((1,) + tuple(mu.shape[1:]))
    else:
        s = per_row((grad_out / mu.shape[0] if reduction == 1 else grad_out).to(acc), mu.shape[0], mu.dim())
    m, lv = mu.to(acc), logvar.to(acc)
    if prior_mu is not None:
        m = m - prior_mu.to(acc)
    if prior_logvar is not None:
        e = torch.exp(-0.5 * prior_logvar.to(acc))
        m, lv = m * e, lv - prior_logvar.to(acc)
    g_m = s * m
    g_lv = s * 0.5 * torch.expm1(lv.clamp(max=LOGVAR_MAX))
    g_mu = g_m * e if prior_logvar is not None else g_m
    g_pm = None if prior_mu is None else (-g_mu).to(prior_mu.dtype)
    g_plv = None if prior_logvar is None else (-g_lv - 0.5 * g_m * m).to(prior_logvar.dtype)
    return g_mu.to(mu.dtype), g_lv.to(logvar.dtype), g_pm, g_plv


def double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"vaekern.{op}: double backward (create_graph=True) is not supported, because the "
        "reconstruction gradient is computed in the forward pass and has no graph of its own. "
        'Use backend="reference" (plain PyTorch autograd) for higher-order gradients.'
    )


def no_double_backward(op: str) -> None:
    """Raise if backward is asked to build a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise double_backward_error(op)


class _FirstOrderOnly(torch.autograd.Function):
    """A gradient that a kernel computed, passed on unchanged, whose own derivative raises.

    ``torch.func.grad`` always runs backward with ``create_graph=True``, so a backward that
    refused a graph outright would refuse every ``torch.func.grad``. This lets the first
    order through and raises only where a second one is actually taken."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, input, op):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[2]

    @staticmethod
    def backward(ctx, _):
        raise double_backward_error(ctx.op)


def first_order_only(grad: Tensor, input: Tensor, op: str) -> Tensor:
    """``grad`` (a kernel's d/d``input``) for a backward. Where it builds a graph: under a
    torch.func transform, ``grad`` that raises if differentiated again; otherwise the
    clear error right away (``create_graph=True``), as the eager and C++ paths give."""
    if not torch.is_grad_enabled():
        return grad
    if not torch._C._are_functorch_transforms_active():
        raise double_backward_error(op)
    return _FirstOrderOnly.apply(grad, input, op)


def transform_function(name: str, kernels, setup_context, backward, forward=None) -> type[torch.autograd.Function]:
    """Kernel op ``name`` of ``kernels`` as an autograd.Function that torch.func transforms.

    The path of ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap`` (per-sample
    gradients): functorch needs a Python Function with a separate ``setup_context``, which
    neither the eager Functions (state on ctx, in-place scaling) nor the C++ autograd
    (refused by functorch outright) are. It reuses the traced path's ``setup_context`` and
    out-of-place backward; vmap runs them per sample (``generate_vmap_rule``), and the
    kernels have no batching rule, so PyTorch loops over the samples. Forward-mode AD
    (``jvp``, ``jacfwd``, ``hessian``) has no formula and raises. ``forward(kernels, *args)``,
    where given, replaces the kernel call (it runs below autograd)."""

    def kernel_forward(*args):
        with below_autograd():
            return forward(kernels, *args) if forward is not None else getattr(kernels, name)(*args)

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"vaekern.{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported: the "
            'fused kernels have no forward-mode formula. Use reverse mode (torch.func.grad, vjp, jacrev) or backend="reference".'
        )

    return type(
        f"{name}_transform",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(kernel_forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(lambda ctx, *grads: backward(kernels, ctx, *grads)),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    )


def take_saved_grad(ctx) -> Tensor | None:
    """The gradient that the forward computed, for the first backward only; None after.

    The eager backward scales it in place, so a second backward through the same graph
    (``retain_graph=True``) must recompute it instead. Dropping ctx's reference also lets
    AccumulateGrad adopt the buffer as ``.grad`` without a copy."""
    grad, ctx.saved_grad = ctx.saved_grad, None
    return grad


def register_op(lib: torch.library.Library, kernels, schemas: dict, fakes: dict, setup_context, traced_backward,
                transform=None) -> None:
    """Define one op module's kernel schemas in ``lib``'s namespace with their ``fakes``; its
    torch.func Function (``transform``, or one from the traced path); and, unless the
    namespace has its own autograd (the extension's, in C++), the traced path's autograd of
    its differentiable op, the first schema."""
    ns = lib.ns
    for name, schema in schemas.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{ns}::{name}", fakes[name], lib=lib)
    op = next(iter(schemas))
    kernels.transforms[op] = transform or transform_function(op, kernels, setup_context, traced_backward)
    if op not in kernels.native_autograd:
        torch.library.register_autograd(
            f"{ns}::{op}", functools.partial(traced_backward, kernels), setup_context=setup_context, lib=lib
        )
