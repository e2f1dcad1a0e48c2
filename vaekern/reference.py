"""Reference implementations: the readable oracle that defines correctness.

Plain PyTorch, differentiable by autograd, evaluated in float64 so that every fused
kernel can be compared against an answer that is exact to the kernel's precision.

Conventions shared by every backend (the kernels implement exactly these):

* Dim 0 is the batch. Every term is summed over all other dims into one value per
  row; ``reduction`` then takes the mean over rows (the ELBO convention), their sum,
  or returns the rows (``"none"``).
* Bernoulli NLL with logits ``l`` and target ``t`` uses the softplus form,
  ``max(l, 0) - l*t + log1p(exp(-|l|))``, which never overflows (logits of +-1e4 are
  fine), and adds softplus to -l*t without cancellation. Its gradient is
  ``sigmoid(l) - t``, which autograd gets through that form everywhere but at l = 0, where
  ``logaddexp(l, 0) - l*t`` stands in.
* Bernoulli NLL with probabilities ``p`` clamps each log at -100 (``BCE_LOG_MIN``), and its
  gradient is ``(p - t) / max(p*(1-p), 1e-12)`` (``BCE_GRAD_EPS``), finite at p = 0 or 1:
  exactly ``torch.nn.functional.binary_cross_entropy``'s value and gradient (which cannot
  serve here: it checks values on the host and raises on NaN). Autograd through the
  clamped logs would give 0 or NaN at p = 0 and 1, so the value is joined, straight
  through, to a function whose derivative is that gradient.
* Gaussian KL to N(0, I): ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``. The variance is
  evaluated as ``exp(min(logvar, LOGVAR_MAX))`` so that float32 cannot overflow for any
  logvar (``exp(88.7)`` already does). The clamp is straight-through: the gradient keeps
  the sign and size of the clamped variance, ``0.5 * (exp(min(logvar, LOGVAR_MAX)) - 1)``,
  instead of the ``-0.5`` that a plain clamp would give, which would push an exploding
  logvar further up. No realistic encoder reaches logvar = 60 (a std of 1e13). The value
  is exact for every logvar, infinities included (KL = +inf at -inf, -inf at +inf), and so
  is the gradient for every finite logvar; at logvar = +inf exactly it is -0.5, because an
  infinite value carries no straight-through gradient under autograd.
* Reparameterization: ``z = mu + exp(logvar / 2) * eps``; exact, no clamp (it cannot
  overflow float32 for logvar below 177).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOGVAR_MAX",
    "BCE_LOG_MIN",
    "BCE_GRAD_EPS",
    "bernoulli_nll_ref",
    "gaussian_kl_ref",
    "reparameterize_ref",
    "vae_loss_ref",
    "reduce_rows",
]

LOGVAR_MAX = 60.0
BCE_LOG_MIN = -100.0
# The floor of p*(1-p) in the probability gradient: aten's binary_cross_entropy_backward's EPSILON.
BCE_GRAD_EPS = 1e-12


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    """Reduce per-row values of shape (B,) as the public ``reduction`` argument says."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.mean()


def _row_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).sum(dim=1)


def bernoulli_nll_ref(
    input: Tensor, target: Tensor, *, from_logits: bool = True, reduction: str = "mean"
) -> Tensor:
    """-log p(target | input), summed over every dim but the first."""
    x = input.double()
    t = target.double()
    if from_logits:
        nll = x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
        # At l = 0 exactly, max and abs hand autograd the subgradient 1 - t; the softplus's
        # is 1/2 - t, which logaddexp gives. That branch reads l only where l = 0, so that
        # its unused gradient stays finite elsewhere (logaddexp's is NaN at l = +inf).
        at_zero = torch.where(x == 0, x, 0.0)
        nll = torch.where(x == 0, torch.logaddexp(at_zero, torch.zeros_like(x)) - at_zero * t, nll)
    else:
        value = -(t * torch.log(x).clamp(min=BCE_LOG_MIN) + (1 - t) * torch.log1p(-x).clamp(min=BCE_LOG_MIN))
        nll = value.detach() + _through(_bce_antiderivative(x, t))
    return reduce_rows(_row_sum(nll), reduction)


def _bce_antiderivative(p: Tensor, t: Tensor) -> Tensor:
    """A function of p whose derivative is (p - t) / max(p*(1-p), BCE_GRAD_EPS).

    Where p(1-p) >= eps it is the unclamped NLL; below, where the floor holds, the
    quadratic (p - t)^2 / (2 eps), whose gradient autograd forms from p - t itself
    ((p^2/2 - t*p) / eps gives p/eps - t/eps, which cancels: at p = 1 - 2^-53, t = 1 it
    was 10% off). The log branch reads p = 1/2 where it is not taken, so that its unused
    gradient is finite (0 * inf would be NaN)."""
    inside = p * (1 - p) >= BCE_GRAD_EPS
    p_in = torch.where(inside, p, 0.5)
    logs = -(t * torch.log(p_in) + (1 - t) * torch.log1p(-p_in))
    d = p - t
    return torch.where(inside, logs, d * d / (2 * BCE_GRAD_EPS))


def _through(f: Tensor) -> Tensor:
    """Zero in value, f's gradient: f - f.detach() is exactly 0 wherever f is finite, as
    _bce_antiderivative is for every p in [0, 1] (a NaN keeps it: NaN in, NaN out)."""
    return f - f.detach()


def _clamped_logvar(logvar: Tensor) -> Tensor:
    # Straight-through clamp: the value of min(logvar, LOGVAR_MAX), the gradient of logvar.
    # lv - lv.detach() is exactly 0 for finite lv, so the value is the clamp's, unrounded
    # (lv - (lv - min(lv, 60)) loses the 60 above about 1e17); at +-inf it is NaN, so there
    # it is left out (a NaN logvar keeps it: NaN in, NaN value and gradient out).
    through = torch.where(logvar.isinf(), 0.0, logvar - logvar.detach())
    return logvar.clamp(max=LOGVAR_MAX).detach() + through


def gaussian_kl_ref(mu: Tensor, logvar: Tensor, *, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over every dim but the first."""
    m = mu.double()
    lv = logvar.double()
    kl = 0.5 * (m * m + torch.exp(_clamped_logvar(lv)) - 1.0 - lv)
    return reduce_rows(_row_sum(kl), reduction)


def reparameterize_ref(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, in float64."""
    return mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()


def vae_loss_ref(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    beta: float | Tensor = 1.0,
    from_logits: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """Negative ELBO: (recon + beta * kl, recon, kl), each reduced over the batch."""
    rec = bernoulli_nll_ref(recon, target, from_logits=from_logits, reduction=reduction)
    kl = gaussian_kl_ref(mu, logvar, reduction=reduction)
    b = beta.double() if isinstance(beta, Tensor) else float(beta)
    return rec + b * kl, rec, kl
