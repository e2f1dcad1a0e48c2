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
* Gaussian KL to a diagonal Gaussian prior N(pm, exp(plv)) (``prior_mu``, ``prior_logvar``,
  each broadcasting to mu; None is 0): with the log-variance ratio ``r = lv - plv``,
  ``0.5 * ((mu - pm)^2 * exp(-plv) + exp(min(r, LOGVAR_MAX)) - 1 - r)``, straight-through
  as above: the clamp bounds the variance *ratio*, which is the variance itself for the
  standard prior. No clamp on plv: a prior log-variance below about -88 overflows
  ``exp(-plv)`` in float32.
* Free bits (Kingma et al. 2016, IAF): with ``kl_j`` the batch mean of latent element j's
  KL, the KL term is ``sum_j max(free_bits, kl_j)`` for ``reduction="mean"`` (B times it
  for ``"sum"``); an element whose batch mean is below free_bits gets no gradient (at
  equality it does: ``where(kl_j < free_bits, free_bits, kl_j)``, which also keeps a NaN).
  ``free_bits=0`` is the plain KL. It is a batch quantity: there is no per-row form. A 0-d
  tensor free_bits is read as float64, and a NaN one gives NaN.
* Reparameterization: ``z = mu + exp(logvar / 2) * eps``; exact, no clamp (it cannot
  overflow float32 for logvar below 177).
* Gaussian NLL with log-scale ``s`` (sigma = exp(s)): ``0.5 * (x - t)^2 * exp(-2s) + s +
  0.5 * log(2 pi)``, a true NLL in nats. ``s`` is a float, a tensor that broadcasts to each
  row's shape (one per channel, per feature, or 0-d), or ``"optimal"``: sigma^2 is the
  batch's mean squared error (the sigma-VAE's analytic optimum), differentiated through, so
  that the mean-reduced loss is ``D/2 * (log(2 pi mse) + 1)``. No clamp: a scale below
  about 1e-19 overflows exp(-2s) in float32.
* Continuous Bernoulli NLL (Loaiza-Ganem & Cunningham 2019): the Bernoulli NLL of the same
  input plus ``L(eta) = -log C(eta)``, with ``C(eta) = eta / tanh(eta / 2)`` the normalizer
  in logit space (2 at eta = 0). ``L`` is a series in eta^2 for ``|eta| < 1e-2``, where the
  closed form cancels, and ``-log|eta| + log1p(-e) - log1p(e)`` with ``e = exp(-|eta|)``
  elsewhere, which never overflows. Probabilities enter through their clamped logs:
  ``eta = max(log p, -100) - max(log1p(-p), -100)``, finite at p = 0 and 1, and the
  gradient is the Bernoulli's plus ``L'(eta) / max(p(1-p), 1e-12)``, with
  ``L'(eta) = 1/sinh(eta) - 1/eta``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOGVAR_MAX",
    "BCE_LOG_MIN",
    "BCE_GRAD_EPS",
    "CB_SERIES_MAX",
    "HALF_LOG_2PI",
    "bernoulli_nll_ref",
    "continuous_bernoulli_nll_ref",
    "gaussian_kl_ref",
    "gaussian_kl_per_dim_ref",
    "gaussian_nll_ref",
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


# 0.5 * log(2 pi), correctly rounded: 0.5 * math.log(2 * math.pi) is one ulp below it.
HALF_LOG_2PI = 0.91893853320467274178


def gaussian_nll_ref(
    input: Tensor, target: Tensor, log_scale: float | str | Tensor = 0.0, *, reduction: str = "mean"
) -> Tensor:
    """-log N(target | input, exp(log_scale)^2), summed over every dim but the first."""
    r = input.double() - target.double()
    if isinstance(log_scale, str):  # "optimal": sigma^2 = the batch's mean squared error
        s = 0.5 * torch.log((r * r).mean())
    else:
        s = torch.as_tensor(log_scale, dtype=torch.float64, device=r.device)
    nll = 0.5 * r * r * torch.exp(-2 * s) + s + HALF_LOG_2PI
    return reduce_rows(_row_sum(nll.expand_as(r)), reduction)


# |eta| below which L(eta) comes from its series: above it the closed form loses about
# 6/eta^2 ulps, below it the series (to eta^6) is exact in float64.
CB_SERIES_MAX = 1e-2


def _cb_log_norm(eta: Tensor) -> Tensor:
    """L(eta) = -log(eta / tanh(eta / 2)), float64, differentiable by autograd."""
    small = eta.abs() < CB_SERIES_MAX
    e2 = torch.where(small, eta, 0.0) ** 2  # each branch reads a harmless value where unused
    series = -math.log(2) + e2 * (-1 / 12 + e2 * (7 / 1440 + e2 * (-31 / 90720)))
    a = torch.where(small, 1.0, eta.abs())
    e = torch.exp(-a)
    return torch.where(small, series, -torch.log(a) + torch.log1p(-e) - torch.log1p(e))


def continuous_bernoulli_nll_ref(
    input: Tensor, target: Tensor, *, from_logits: bool = True, reduction: str = "mean"
) -> Tensor:
    """-log CB(target | input), summed over every dim but the first."""
    x = input.double()  # once: two casts would round the two halves of the gradient apart
    bernoulli = bernoulli_nll_ref(x, target, from_logits=from_logits, reduction="none")
    if from_logits:
        norm = _cb_log_norm(x)
    else:
        log_p = torch.log(x).clamp(min=BCE_LOG_MIN)
        log_q = torch.log1p(-x).clamp(min=BCE_LOG_MIN)
        eta = log_p - log_q
        # Through the clamped logs autograd would give L'(eta) / (p(1-p)) unfloored, and 0
        # where a log is clamped; the convention is L'(eta) / max(p(1-p), 1e-12), joined
        # straight through as the Bernoulli's gradient is (first order).
        slope = _cb_log_norm_slope(eta) / (x * (1 - x)).clamp(min=BCE_GRAD_EPS)
        norm = _cb_log_norm(eta).detach() + _through(slope.detach() * x)
    return reduce_rows(bernoulli + _row_sum(norm), reduction)


def _cb_log_norm_slope(eta: Tensor) -> Tensor:
    """L'(eta) = 1/sinh(eta) - 1/eta, by autograd through ``_cb_log_norm``."""
    eta = eta.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(_cb_log_norm(eta).sum(), eta)[0]


def _clamped_logvar(logvar: Tensor) -> Tensor:
    # Straight-through clamp: the value of min(logvar, LOGVAR_MAX), the gradient of logvar.
    # lv - lv.detach() is exactly 0 for finite lv, so the value is the clamp's, unrounded
    # (lv - (lv - min(lv, 60)) loses the 60 above about 1e17); at +-inf it is NaN, so there
    # it is left out (a NaN logvar keeps it: NaN in, NaN value and gradient out).
    through = torch.where(logvar.isinf(), 0.0, logvar - logvar.detach())
    return logvar.clamp(max=LOGVAR_MAX).detach() + through


def _kl_elements(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None) -> Tensor:
    """The KL of every latent element, float64, shaped like the broadcast of the inputs."""
    d = mu.double() - (0.0 if prior_mu is None else prior_mu.double())
    lv = logvar.double()
    if prior_logvar is None:
        return 0.5 * (d * d + torch.exp(_clamped_logvar(lv)) - 1.0 - lv)
    plv = prior_logvar.double()
    r = lv - plv
    return 0.5 * (d * d * torch.exp(-plv) + torch.exp(_clamped_logvar(r)) - 1.0 - r)


def gaussian_kl_ref(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    *,
    free_bits: float | Tensor = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), summed over every dim but
    the first; with free_bits > 0, the free-bits term (mean or sum only)."""
    kl = _kl_elements(mu, logvar, prior_mu, prior_logvar).expand(mu.shape)
    if isinstance(free_bits, Tensor) or free_bits > 0:
        if reduction == "none":
            raise ValueError("free bits are a batch quantity: reduction='none' has no free-bits form")
        per_dim = kl.mean(dim=0)
        lam = free_bits.double() if isinstance(free_bits, Tensor) else free_bits
        term = torch.where(per_dim < lam, lam, per_dim)
        if isinstance(free_bits, Tensor):  # a NaN threshold gives NaN
            term = torch.where(lam.isnan(), lam, term)
        term = term.sum()
        return term * mu.shape[0] if reduction == "sum" else term
    return reduce_rows(_row_sum(kl), reduction)


def gaussian_kl_per_dim_ref(
    mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None
) -> Tensor:
    """The batch mean of every latent element's KL, shaped like ``mu.shape[1:]``."""
    return _kl_elements(mu, logvar, prior_mu, prior_logvar).expand(mu.shape).mean(dim=0)


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
    likelihood: str = "bernoulli",
    log_scale: float | str | Tensor = 0.0,
    from_logits: bool = True,
    reduction: str = "mean",
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    free_bits: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Negative ELBO: (recon + beta * kl, recon, kl), each reduced over the batch; kl is
    the free-bits term when free_bits > 0."""
    if likelihood == "gaussian":
        rec = gaussian_nll_ref(recon, target, log_scale, reduction=reduction)
    elif likelihood == "continuous_bernoulli":
        rec = continuous_bernoulli_nll_ref(recon, target, from_logits=from_logits, reduction=reduction)
    else:
        rec = bernoulli_nll_ref(recon, target, from_logits=from_logits, reduction=reduction)
    kl = gaussian_kl_ref(mu, logvar, prior_mu, prior_logvar, free_bits=free_bits, reduction=reduction)
    b = beta.double() if isinstance(beta, Tensor) else float(beta)
    return rec + b * kl, rec, kl
