"""``vae_loss``: schema, fake, and its two autograd paths.

Math (``vaekern.reference``): ``loss = recon + beta * kl``, where ``recon`` is the
likelihood's NLL (``bernoulli_nll``, ``gaussian_nll`` or ``continuous_bernoulli_nll``, by
``likelihood``) and ``kl`` is ``gaussian_kl``, each summed per row and reduced over rows
the same way. Upstream gradients ``g_loss``, ``g_recon``, ``g_kl`` (one per output) reach
the inputs as ``d/drecon = (g_loss + g_recon) * the likelihood's gradient``,
``d/dlog_scale`` = the Gaussian's (``gaussian_nll.log_scale_grad``) for the upstream
``g_loss + g_recon``, and ``d/dlatents = gaussian_kl's gradient with upstream
g_loss * beta + g_kl``.

Kernels:

* ``vae_loss(recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale,
  likelihood, from_logits, reduction, compute_grad) -> (loss, recon_term, kl_term, grad,
  kl_weight)``: the priors as in ``gaussian_kl`` (read in place, each None for 0); ``grad``
  as in the likelihood ops (``_likelihood``); ``likelihood`` is ``LIKELIHOODS``' code,
  ``log_scale`` the Gaussian's (0-d or one per column, loss dtype; read by the Gaussian
  only) and ``from_logits`` the Bernoullis' (ignored by the Gaussian). ``free_bits`` (0-d,
  any float dtype, read as float64; mean or sum only, None for none) makes the KL term the free-bits term of
  ``vaekern.reference``: with ``S_j`` latent element j's KL summed over the batch (the
  ``KL_COLUMNS`` sums, in the latents' math dtype), ``sum_j where(S_j / B < lambda, lambda,
  S_j / B)`` (NaN for a NaN lambda), B times it for sum; ``kl_weight`` (``mu.shape[1:]``,
  loss dtype; ``(0,)`` without free bits) is then 1 where element j's gradient passes, 0
  where it is held at lambda (or lambda is NaN); lambda and the means are compared in float64.
* ``vae_loss_backward_(grad, g_loss, g_recon, g_kl, recon, target, log_scale, mu, logvar,
  prior_mu, prior_logvar, kl_weight, beta, likelihood, from_logits, reduction) ->
  (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar)``: scales ``grad`` in place per
  row by ``g_loss + g_recon`` as the likelihood's ``*_backward_`` does (skipping rows where
  that is exactly 1, recomputing float16 elements outside float16's normal range from
  ``recon`` and ``target``, and doing nothing when ``grad`` is empty) and returns the
  latents' and the priors' gradients as ``gaussian_kl_backward`` does, in one launch; with
  the forward's ``kl_weight`` (free bits) element j of every row takes the scale
  ``g_loss * beta + g_kl`` (/ B for mean) where ``kl_weight[j]`` is not 0, else 0 (whatever
  the scale, as the oracle's where).

Autograd, as in the likelihood ops: eager (:class:`VAELossFunction`) scales the forward's
gradient in place; traced (registered) scales the saved output out of place. The recon
term is saved too where a learned 0-d Gaussian log_scale's gradient reads it
(``_rec_read``), and only then: a saved output cannot be changed in place. Outputs that
took no part in the loss get a zero upstream gradient. Double backward
(``create_graph=True``) works where recon needs no gradient: the latents' gradient is then
``gaussian_kl``'s differentiable form (``kl_grads``); through recon it raises, since the
saved reconstruction gradient has no graph (under torch.func only where a second order
through recon is actually taken, see ``first_order_only``). Under free bits the forward's
``kl_weight`` is saved (it takes no gradient) and the latents' gradient is the column
reduction's, one upstream per latent element (``_kl_upstream``), on every path.
torch.func: ``transform_function`` over the traced path's formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaekern._ops._common import (
    KL_COLUMNS,
    LIKELIHOODS,
    acc_dtype,
    below_autograd,
    first_order_only,
    grad_like,
    kl_grads,
    loss_like,
    loss_read_by_backward,
    no_double_backward,
    prior_grad_like,
    reduced_prior_grads,
    register_op,
    scaled_rows,
    take_saved_grad,
)
from vaekern._ops.gaussian_nll import log_scale_grad

SCHEMAS = {
    "vae_loss": "(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, Tensor? free_bits, Tensor beta, Tensor log_scale, int likelihood, bool from_logits, int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "vae_loss_backward_": "(Tensor(a!) grad_recon, Tensor grad_loss, Tensor grad_recon_term, Tensor grad_kl_term, Tensor recon, Tensor target, Tensor log_scale, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, Tensor? kl_weight, Tensor beta, int likelihood, bool from_logits, int reduction) -> (Tensor, Tensor, Tensor, Tensor)",
}
GAUSSIAN = LIKELIHOODS["gaussian"]


def _recon_backward(kernels, likelihood: int, log_scale, from_logits: bool):
    """The likelihood's in-place backward kernel and its own argument, for the traced path."""
    if likelihood == GAUSSIAN:
        return kernels.gaussian_nll_backward_, log_scale
    name = "bernoulli_nll_backward_" if likelihood == LIKELIHOODS["bernoulli"] else "continuous_bernoulli_nll_backward_"
    return getattr(kernels, name), from_logits


def vae_loss_fake(
    recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, likelihood, from_logits, reduction,
    compute_grad,
):
    dtype = acc_dtype(recon, mu, logvar)
    loss = loss_like(recon, reduction, dtype)
    weight = mu.new_empty(mu.shape[1:] if free_bits is not None else (0,), dtype=dtype)
    return loss, torch.empty_like(loss), torch.empty_like(loss), grad_like(recon, compute_grad), weight


def vae_loss_backward_fake(
    grad_recon, grad_loss, grad_recon_term, grad_kl_term, recon, target, log_scale, mu, logvar, prior_mu,
    prior_logvar, kl_weight, beta, likelihood, from_logits, reduction,
):
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
        prior_grad_like(prior_mu, mu),
        prior_grad_like(prior_logvar, mu),
    )


def _kl_upstream(scale: Tensor, kl_weight: Tensor | None, mu: Tensor, reduction: int) -> tuple[Tensor, int]:
    """The KL backward's (upstream, reduction) for the loss's KL scale ``g_loss * beta +
    g_kl``: as it is, or under free bits one per latent element for the column reduction,
    the scale (/ B for mean) where ``kl_weight`` is not 0, else 0 (a where: an element held
    at lambda gets 0 even from an infinite scale, as in the oracle)."""
    if kl_weight is None:
        return scale, reduction
    scale = scale / mu.shape[0] if reduction == 1 else scale
    return torch.where(kl_weight != 0, scale, torch.zeros_like(scale)), KL_COLUMNS


def _rec_read(likelihood: int, log_scale: Tensor, rec: Tensor) -> Tensor | None:
    """The recon term to save: read by a learned 0-d Gaussian log_scale's gradient only."""
    return loss_read_by_backward(log_scale, rec) if likelihood == GAUSSIAN else None


def _materialized(grads):
    """The three upstream gradients, a None (an output outside the loss) made zero; None if all are."""
    present = next((g for g in grads if g is not None), None)
    if present is None:
        return None
    zero = None
    if any(g is None for g in grads):
        zero = torch.zeros_like(present)
    return tuple(zero if g is None else g for g in grads)


def _setup_context(ctx, inputs, output):
    recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, likelihood, from_logits, reduction, _ = inputs
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)
    ctx.args = (likelihood, from_logits, reduction)
    ctx.save_for_backward(
        recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, output[3],
        _rec_read(likelihood, log_scale, output[1]), None if free_bits is None else output[4],
    )  # fmt: skip


def _traced_backward(kernels, ctx, grad_loss, grad_recon_term, grad_kl_term, _, __):
    """Also the backward of the torch.func path (``transform_function``)."""
    grads = _materialized((grad_loss, grad_recon_term, grad_kl_term))
    if grads is None:
        return (None,) * 13
    grad_loss, grad_recon_term, grad_kl_term = grads
    recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, grad, rec, weight = ctx.saved_tensors
    likelihood, from_logits, reduction = ctx.args
    g_recon = g_scale = None
    if ctx.needs_input_grad[0]:
        if grad.numel() != recon.numel():  # the forward was asked for no gradient
            with below_autograd():
                grad = kernels.vae_loss(
                    recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, *ctx.args, True
                )[3]
        backward_, param = _recon_backward(kernels, likelihood, log_scale, from_logits)
        g_recon = scaled_rows(
            backward_, first_order_only(grad, recon, "vae_loss"), grad_loss + grad_recon_term,
            recon, target, param, reduction,
        )  # fmt: skip
    if ctx.needs_input_grad[8]:
        g_scale = log_scale_grad(grad_loss + grad_recon_term, recon, target, log_scale, reduction, rec)
    upstream, kl_reduction = _kl_upstream(grad_loss * beta + grad_kl_term, weight, mu, reduction)
    g_kl = kl_grads(kernels, upstream, mu, logvar, prior_mu, prior_logvar, kl_reduction, ctx.needs_input_grad[4:6])
    return g_recon, None, *g_kl, None, None, g_scale, None, None, None, None


class VAELossFunction(torch.autograd.Function):
    """The eager path: ``apply(kernels, recon, target, mu, logvar, prior_mu, prior_logvar,
    free_bits, beta, log_scale, likelihood, from_logits, reduction) -> (loss, recon_term,
    kl_term)``."""

    @staticmethod
    def forward(
        ctx, kernels, recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, likelihood,
        from_logits, reduction,
    ):  # fmt: skip
        args = (likelihood, from_logits, reduction)
        latents = (mu, logvar, prior_mu, prior_logvar)
        with below_autograd():
            loss, rec, kl, grad, weight = kernels.vae_loss(
                recon, target, *latents, free_bits, beta, log_scale, *args, recon.requires_grad
            )
        ctx.set_materialize_grads(False)
        ctx.kernels, ctx.args, ctx.saved_grad = kernels, args, grad
        ctx.save_for_backward(
            recon, target, *latents, free_bits, beta, log_scale, _rec_read(likelihood, log_scale, rec),
            None if free_bits is None else weight,
        )  # fmt: skip
        return loss, rec, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_recon_term, grad_kl_term):
        grads = _materialized((grad_loss, grad_recon_term, grad_kl_term))
        if grads is None:
            return (None,) * 13
        recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, rec, weight = ctx.saved_tensors
        latents = (mu, logvar, prior_mu, prior_logvar)
        likelihood, from_logits, reduction = ctx.args
        grad_loss, grad_recon_term, grad_kl_term = grads
        g_scale = None
        if ctx.needs_input_grad[9]:
            g_scale = log_scale_grad(grad_loss + grad_recon_term, recon, target, log_scale, reduction, rec)
        if torch.is_grad_enabled():  # create_graph=True: through the latents (and log_scale) only
            if ctx.needs_input_grad[1]:
                no_double_backward("vae_loss")
            upstream, kl_reduction = _kl_upstream(grad_loss * beta + grad_kl_term, weight, mu, reduction)
            g_kl = kl_grads(ctx.kernels, upstream, *latents, kl_reduction, ctx.needs_input_grad[5:7])
            return None, None, None, *g_kl, None, None, g_scale, None, None, None
        grad = take_saved_grad(ctx)
        if grad is None:  # a second backward through the same graph
            grad = ctx.kernels.vae_loss(
                recon, target, *latents, free_bits, beta, log_scale, *ctx.args, ctx.needs_input_grad[1]
            )[3]
        g_kl = reduced_prior_grads(
            ctx.kernels.vae_loss_backward_(
                grad, *grads, recon, target, log_scale, *latents, weight, beta, likelihood, from_logits, reduction
            ),
            prior_mu, prior_logvar, ctx.needs_input_grad[5:7],
        )  # fmt: skip
        g_recon = grad if ctx.needs_input_grad[1] else None
        return None, g_recon, None, *g_kl, None, None, g_scale, None, None, None


def register(lib: torch.library.Library, kernels) -> None:
    """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
    namespace has its own (the extension's, in C++), the autograd of both paths."""
    register_op(
        lib, kernels, SCHEMAS,
        {"vae_loss": vae_loss_fake, "vae_loss_backward_": vae_loss_backward_fake},
        _setup_context, _traced_backward,
    )  # fmt: skip
