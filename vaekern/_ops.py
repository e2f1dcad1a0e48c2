"""Operator schemas, fake (shape-only) kernels and autograd, shared by every backend.

Each backend owns one ``torch.library`` namespace holding the same eight schemas:

=================  =========================================================
``vaekern_ref``    the reference backend, plain PyTorch (``_reference_backend.py``)
``vaekern_triton`` the Triton backend (``_triton/``)
``vaekern``        the compiled extension ``vaekern._C``: ``csrc/cuda`` for the CUDA
                   dispatch key, ``csrc/cpu`` for the CPU key
=================  =========================================================

The schemas are defined here, in Python, so that vaekern works without the extension;
the extension only adds implementations with ``TORCH_LIBRARY_IMPL(vaekern, ...)``.

``reduction`` is an int as in ``at::Reduction``: 0 none (one value per row, shape (B,)),
1 mean over rows, 2 sum over rows. Loss outputs are float32, or float64 when an input
is float64: an fp16 sum over a 784-pixel row would lose the digits that matter.

Gradient computed in the forward pass
-------------------------------------
``bernoulli_nll`` and ``vae_loss`` return, next to the loss, the gradient of the reduced
loss with respect to the reconstruction for an upstream gradient of 1 (for ``mean`` the
1/B is already folded in). Backward only has to scale it by ``grad_output``:

* in eager mode it does so in place with ``<op>_backward_`` on the device; every kernel
  returns early for a row whose scale is exactly 1, so the usual ``loss.backward()`` moves
  no image-sized bytes in backward at all. No host sync decides anything.
* while AOTAutograd traces (``torch.compile``, ``opcheck``) the tensors are fake or
  functional, and its partitioner cannot handle an in-place update of a saved forward
  output, so the same scale is written out of place and Inductor fuses it.
* the gradient is our own output buffer, never an input. Only the first backward through
  a graph consumes it; a later one (``retain_graph=True``, gradcheck) recomputes it from
  the inputs, which are kept by reference for that purpose, so nothing is scaled twice.
* double backward (``create_graph=True``) through the reconstruction term raises a clear
  error: the saved gradient has no graph of its own. ``gaussian_kl`` and
  ``reparameterize`` recompute their latent-sized gradients with differentiable PyTorch
  ops in that case, so they support it.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAMESPACES = ("vaekern_ref", "vaekern_triton", "vaekern")

SCHEMAS = {
    "bernoulli_nll": "(Tensor input, Tensor target, bool from_logits, int reduction, bool compute_grad) -> (Tensor, Tensor)",
    "bernoulli_nll_backward_": "(Tensor(a!) grad_input, Tensor grad_out) -> ()",
    "gaussian_kl": "(Tensor mu, Tensor logvar, int reduction) -> Tensor",
    "gaussian_kl_backward": "(Tensor grad_out, Tensor mu, Tensor logvar, int reduction) -> (Tensor, Tensor)",
    "reparameterize": "(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed) -> Tensor",
    "reparameterize_backward": "(Tensor grad_z, Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed) -> (Tensor, Tensor)",
    "vae_loss": "(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor beta, bool from_logits, int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    "vae_loss_backward_": "(Tensor(a!) grad_recon, Tensor grad_loss, Tensor grad_recon_term, Tensor grad_kl_term, Tensor mu, Tensor logvar, Tensor beta, int reduction) -> (Tensor, Tensor)",
}

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype of losses and partials."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _loss_like(x: Tensor, reduction: int, dtype: torch.dtype) -> Tensor:
    shape = (x.shape[0],) if reduction == 0 else ()
    return x.new_empty(shape, dtype=dtype)


def _grad_like(x: Tensor, compute_grad: bool) -> Tensor:
    # Kernels write the saved gradient contiguous, whatever the input's strides.
    if compute_grad:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return x.new_empty((0,))


def row_scale(grad_out: Tensor, reduction: int, batch: int, ndim: int) -> Tensor:
    """The per-row factor d(reduced loss)/d(row value) * grad_out, shaped to broadcast over a row.

    For ``mean`` this includes the 1/B; used only where the 1/B was not folded in already.
    """
    if reduction == 0:
        scale = grad_out
    elif reduction == 1:
        scale = (grad_out / batch).expand(batch)
    else:
        scale = grad_out.expand(batch)
    return scale.reshape((batch,) + (1,) * (ndim - 1))


def _is_plain(*tensors: Tensor) -> bool:
    # Fake and functional tensors (AOTAutograd tracing) are subclasses; eager tensors are not.
    return all(type(t) is torch.Tensor for t in tensors)


def _no_double_backward(op: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"vaekern.{op}: double backward (create_graph=True) is not supported, because the "
            "reconstruction gradient is computed in the forward pass and has no graph of its own. "
            "Use the plain PyTorch formulas in vaekern.reference for higher-order gradients."
        )


def _scaled_saved_grad(saved: Tensor, scale: Tensor) -> Tensor:
    """Out-of-place ``saved * scale`` per row, in saved's dtype (the traced path)."""
    return (saved * scale.reshape((saved.shape[0],) + (1,) * (saved.dim() - 1))).to(saved.dtype)


def _register(ns: str, lib: torch.library.Library) -> None:
    ops = getattr(torch.ops, ns)

    for name, schema in SCHEMAS.items():
        lib.define(name + schema)

    # ---- fakes -------------------------------------------------------------------------
    @torch.library.register_fake(f"{ns}::bernoulli_nll", lib=lib)
    def _(input, target, from_logits, reduction, compute_grad):
        return _loss_like(input, reduction, acc_dtype(input)), _grad_like(input, compute_grad)

    @torch.library.register_fake(f"{ns}::bernoulli_nll_backward_", lib=lib)
    def _(grad_input, grad_out):
        return None

    @torch.library.register_fake(f"{ns}::gaussian_kl", lib=lib)
    def _(mu, logvar, reduction):
        return _loss_like(mu, reduction, acc_dtype(mu, logvar))

    @torch.library.register_fake(f"{ns}::gaussian_kl_backward", lib=lib)
    def _(grad_out, mu, logvar, reduction):
        return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
            logvar, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake(f"{ns}::reparameterize", lib=lib)
    def _(mu, logvar, eps, seed):
        return torch.empty_like(mu, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::reparameterize_backward", lib=lib)
    def _(grad_z, mu, logvar, eps, seed):
        return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
            logvar, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake(f"{ns}::vae_loss", lib=lib)
    def _(recon, target, mu, logvar, beta, from_logits, reduction, compute_grad):
        dt = acc_dtype(recon, mu, logvar)
        return (
            _loss_like(recon, reduction, dt),
            _loss_like(recon, reduction, dt),
            _loss_like(recon, reduction, dt),
            _grad_like(recon, compute_grad),
        )

    @torch.library.register_fake(f"{ns}::vae_loss_backward_", lib=lib)
    def _(grad_recon, grad_loss, grad_recon_term, grad_kl_term, mu, logvar, beta, reduction):
        return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
            logvar, memory_format=torch.contiguous_format
        )

    # ---- autograd ------------------------------------------------------------------------
    def bernoulli_nll_setup(ctx, inputs, output):
        input, target, from_logits, reduction, compute_grad = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.args = (from_logits, reduction)
        # The forward's gradient, handed to the first backward. The inputs are kept (by
        # reference, not copied) only so that a later backward can recompute it.
        ctx.fresh = output[1]
        ctx.save_for_backward(input, target)

    def bernoulli_nll_bwd(ctx, grad_out, _):
        _no_double_backward("bernoulli_nll")
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad, ctx.fresh = ctx.fresh, None
        if grad is None:  # a second backward through the same graph: recompute
            input, target = ctx.saved_tensors
            _, grad = ops.bernoulli_nll(input, target, *ctx.args, True)
        if _is_plain(grad, grad_out):
            ops.bernoulli_nll_backward_(grad, grad_out)
            return grad, None, None, None, None
        scale = grad_out.expand(grad.shape[0]) if grad_out.dim() == 0 else grad_out
        return _scaled_saved_grad(grad, scale), None, None, None, None

    torch.library.register_autograd(
        f"{ns}::bernoulli_nll", bernoulli_nll_bwd, setup_context=bernoulli_nll_setup, lib=lib
    )

    def gaussian_kl_setup(ctx, inputs, output):
        mu, logvar, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(mu, logvar)

    def gaussian_kl_bwd(ctx, grad_out):
        mu, logvar = ctx.saved_tensors
        if torch.is_grad_enabled():
            from vaekern._reference_backend import gaussian_kl_grads

            g_mu, g_lv = gaussian_kl_grads(grad_out, mu, logvar, ctx.reduction)
        else:
            g_mu, g_lv = ops.gaussian_kl_backward(grad_out, mu, logvar, ctx.reduction)
        return g_mu, g_lv, None

    torch.library.register_autograd(
        f"{ns}::gaussian_kl", gaussian_kl_bwd, setup_context=gaussian_kl_setup, lib=lib
    )

    def reparameterize_setup(ctx, inputs, output):
        mu, logvar, eps, seed = inputs
        ctx.save_for_backward(mu, logvar, eps, seed)

    def reparameterize_bwd(ctx, grad_z):
        mu, logvar, eps, seed = ctx.saved_tensors
        if torch.is_grad_enabled():
            if eps is None:
                # The kernel's own noise, regenerated from the seed: z(0, 0) = eps exactly.
                zeros = torch.zeros_like(mu)
                eps = ops.reparameterize(zeros, zeros, None, seed)
            half_std = 0.5 * torch.exp(0.5 * logvar)
            return grad_z, grad_z * half_std * eps, None, None
        g_mu, g_lv = ops.reparameterize_backward(grad_z, mu, logvar, eps, seed)
        return g_mu, g_lv, None, None

    torch.library.register_autograd(
        f"{ns}::reparameterize", reparameterize_bwd, setup_context=reparameterize_setup, lib=lib
    )

    def vae_loss_setup(ctx, inputs, output):
        recon, target, mu, logvar, beta, from_logits, reduction, compute_grad = inputs
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)
        ctx.args = (from_logits, reduction)
        ctx.fresh = output[3]  # as in bernoulli_nll_setup
        ctx.save_for_backward(recon, target, mu, logvar, beta)

    def vae_loss_bwd(ctx, grad_loss, grad_recon_term, grad_kl_term, _):
        _no_double_backward("vae_loss")
        recon, target, mu, logvar, beta = ctx.saved_tensors
        from_logits, reduction = ctx.args
        grads = (grad_loss, grad_recon_term, grad_kl_term)
        if all(g is None for g in grads):
            return (None,) * 8
        if any(g is None for g in grads):  # outputs that took no part in the loss
            zero = torch.zeros_like(next(g for g in grads if g is not None))
            grad_loss, grad_recon_term, grad_kl_term = (zero if g is None else g for g in grads)
        grad, ctx.fresh = ctx.fresh, None
        if not ctx.needs_input_grad[0]:
            grad = recon.new_empty((0,))
        elif grad is None:  # a second backward through the same graph: recompute
            grad = ops.vae_loss(recon, target, mu, logvar, beta, from_logits, reduction, True)[3]
        if _is_plain(grad, grad_loss, grad_recon_term, grad_kl_term):
            g_mu, g_lv = ops.vae_loss_backward_(
                grad, grad_loss, grad_recon_term, grad_kl_term, mu, logvar, beta, reduction
            )
        else:
            if ctx.needs_input_grad[0]:
                scale = grad_loss + grad_recon_term
                grad = _scaled_saved_grad(grad, scale.expand(mu.shape[0]) if scale.dim() == 0 else scale)
            g_mu, g_lv = ops.gaussian_kl_backward(grad_loss * beta + grad_kl_term, mu, logvar, reduction)
        g_recon = grad if ctx.needs_input_grad[0] else None
        return g_recon, None, g_mu, g_lv, None, None, None, None

    torch.library.register_autograd(
        f"{ns}::vae_loss", vae_loss_bwd, setup_context=vae_loss_setup, lib=lib
    )


_LIBS = {}
for _ns in NAMESPACES:
    _LIBS[_ns] = torch.library.Library(_ns, "DEF")
    _register(_ns, _LIBS[_ns])

# The reference backend is plain PyTorch and always present; register it with the schemas.
from vaekern import _reference_backend  # noqa: E402

_reference_backend.register(_LIBS["vaekern_ref"])
