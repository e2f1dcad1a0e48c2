"""The public functional API: argument checks, backend choice, and the reduction contract.

Every function sums over all dims but the first (dim 0 is the batch) and then reduces
over the batch with ``reduction``: ``"mean"`` (the default, the ELBO convention),
``"sum"``, or ``"none"`` (shape ``(B,)``). Losses come back in float32, or float64 when an
input is float64; gradients come back in each input's own dtype.

Shapes and dtypes are checked here, on the host, before any kernel runs; values are
never inspected (that would need a device sync), so a NaN in gives a NaN out.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from vaekern import reference
from vaekern._ops._common import (
    KL_COLUMNS,
    LIKELIHOODS,
    REDUCTIONS,
    SQUARED_ERROR_LOG_SCALE,
    acc_dtype,
    below_autograd,
)
from vaekern._ops.bernoulli_nll import BernoulliNLLFunction
from vaekern._ops.continuous_bernoulli_nll import ContinuousBernoulliNLLFunction
from vaekern._ops.gaussian_kl import GaussianKLFunction
from vaekern._ops.gaussian_nll import GaussianNLLFunction
from vaekern._ops.reparameterize import ReparameterizeFunction
from vaekern._ops.vae_loss import VAELossFunction
from vaekern.backends import resolve

__all__ = [
    "VAELossParts",
    "bernoulli_nll",
    "continuous_bernoulli_nll",
    "gaussian_kl",
    "gaussian_nll",
    "reparameterize",
    "vae_loss",
]

_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_TARGETS = _FLOATS | {torch.bool, torch.uint8}
# Seeds for the in-kernel Philox generator are drawn on the device from the torch
# generator, so torch.manual_seed reproduces them and CUDA-graph replays draw new ones.
_SEED_HIGH = 2**62


class VAELossParts(NamedTuple):
    """``vae_loss(..., return_parts=True)``: the negative ELBO and its two terms."""

    loss: Tensor
    recon: Tensor
    kl: Tensor


def _tensor(name: str, x, dtypes=_FLOATS) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dim (dim 0), got a 0-d tensor")
    return x


def _same_device(first: tuple[str, Tensor], *others: tuple[str, Tensor]) -> torch.device:
    name0, t0 = first
    for name, t in others:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}")
    return t0.device


def _same_shape(a: tuple[str, Tensor], b: tuple[str, Tensor]) -> None:
    if a[1].shape != b[1].shape:
        raise ValueError(f"{b[0]} has shape {tuple(b[1].shape)} but {a[0]} has shape {tuple(a[1].shape)}")


def _reduction(reduction) -> int:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, one of {tuple(REDUCTIONS)}, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_target(target: Tensor, input: Tensor) -> None:
    _tensor("target", target, _TARGETS)
    _same_shape(("input", input), ("target", target))
    if target.requires_grad:
        raise ValueError("target must not require grad: vaekern differentiates the reconstruction only")


def _check_latents(mu, logvar) -> None:
    _tensor("mu", mu)
    _tensor("logvar", logvar)
    _same_shape(("mu", mu), ("logvar", logvar))
    if mu.dtype != logvar.dtype:
        raise TypeError(f"logvar has dtype {logvar.dtype} but mu has dtype {mu.dtype}")


def _plainly_valid(recon, target, mu, logvar) -> bool:
    """vae_loss's checks in one expression, for the common case: a call costs tens of
    microseconds at small batch, and one function call per check is a visible share of it.
    False sends the caller through the per-argument checks, which raise the named error."""
    try:
        return (
            recon.dtype in _FLOATS
            and mu.dtype in _FLOATS
            and logvar.dtype is mu.dtype
            and target.dtype in _TARGETS
            and not target.requires_grad
            and recon.shape == target.shape
            and mu.shape == logvar.shape
            and mu.shape[0] == recon.shape[0]  # IndexError for a 0-d tensor
            and recon.device == target.device == mu.device == logvar.device
            and recon.layout is target.layout is mu.layout is logvar.layout is torch.strided
        )
    except (AttributeError, IndexError):
        return False


def _path(kernels, op: str, *differentiable: Tensor | None) -> str:
    """How kernel op ``op`` is called: "op", "function", "transform" or "kernel".

    * "op": the registered op with its own autograd: while torch.compile traces (its
      formula then scales out of place), and in eager mode where that autograd is C++ (the
      extension's, csrc/autograd.cpp, for the ops in ``kernels.native_autograd``), which
      runs the kernel alone when no gradient is needed;
    * "function": the lean ``torch.autograd.Function`` of vaekern._ops, when a gradient is
      needed in eager mode and the op's autograd is Python (Triton's kernels);
    * "transform": under a torch.func transform (``grad``, ``vjp``, ``jacrev``, ``vmap``,
      and ``jvp``, which it refuses) unless grad mode is off: the op's Function for
      functorch (``kernels.transforms``), out of place; functorch accepts neither the C++
      autograd nor the eager Functions;
    * "kernel": the Python-autograd kernel alone, below autograd, when no gradient is
      needed: 7 us less than the Python autograd's pass-through on 1x1 tensors.

    ``differentiable``: the tensors that a gradient could reach, and the other tensor
    arguments that a tangent could (target, beta, eps; None where absent). Dual tensors of
    ``torch.autograd.forward_ad`` among them raise: no kernel has a forward-mode formula,
    and every path here would drop the tangent.
    """
    # The level is -1 outside every forward_ad.dual_level(): one attribute read on the
    # common call, where unpacking each tensor would cost a microsecond.
    if _forward_ad._current_level >= 0:
        _refuse_dual(op, differentiable)
    if torch.compiler.is_compiling():
        return "op"
    if torch.is_grad_enabled():
        if torch._C._are_functorch_transforms_active():
            return "transform"  # with no input requiring grad too: jvp's tangents need none
        if op in kernels.native_autograd:
            return "op"
        for t in differentiable:
            if t is not None and t.requires_grad:
                return "function"
        return "kernel"
    return "op" if op in kernels.native_autograd else "kernel"


def _refuse_dual(op: str, tensors: tuple[Tensor | None, ...]) -> None:
    """Raise if any of ``tensors`` is a dual tensor: ``op``'s kernels would drop its tangent."""
    for t in tensors:
        if t is not None and _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"vaekern.{op}: forward-mode AD (dual tensors of torch.autograd.forward_ad) is not supported: "
                'the fused kernels have no forward-mode formula. Use reverse mode or backend="reference".'
            )


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def bernoulli_nll(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Negative log-likelihood of ``target`` under independent Bernoullis.

    Args:
        input: ``[B, ...]`` logits, or probabilities when ``from_logits=False``;
            float16, bfloat16, float32 or float64.
        target: ``[B, ...]``, same shape: float in [0, 1] (any float dtype), bool, or
            uint8 holding 0/1. Values are not checked.
        from_logits: whether ``input`` holds logits (stable softplus form) or
            probabilities (logs clamped at -100, as ``F.binary_cross_entropy``).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.

    Returns:
        The NLL summed over every dim but the first, reduced over the batch: shape ``()``,
        or ``(B,)`` for ``"none"``; float32 (float64 for float64 input).
    """
    _tensor("input", input)
    _check_target(target, input)
    device = _same_device(("input", input), ("target", target))
    red = _reduction(reduction)
    from_logits = _flag("from_logits", from_logits)
    kernels = resolve(backend, device)
    if kernels is None:
        rows = reference.bernoulli_nll_ref(input, target, from_logits=from_logits, reduction=reduction)
        return rows.to(acc_dtype(input))
    return _likelihood_nll(kernels, "bernoulli_nll", BernoulliNLLFunction, input, target, from_logits, red)


def _likelihood_nll(kernels, op: str, function, input: Tensor, target: Tensor, param, red: int) -> Tensor:
    """A likelihood op's loss through its kernel op ``op``, by the call path ``_path`` picks.

    ``param`` is the likelihood's own argument (from_logits, or the Gaussian's log_scale
    tensor, differentiated where it requires grad) and ``function`` its eager
    ``torch.autograd.Function`` (vaekern._ops)."""
    kernel = getattr(kernels, op)
    # target takes no gradient (refused), but a tangent could reach it.
    differentiable = (input, target, param) if isinstance(param, Tensor) else (input, target)
    match _path(kernels, op, *differentiable):
        case "op":
            return kernel(input, target, param, red, _needs_grad(input))[0]
        case "function":
            return function.apply(kernels, input, target, param, red)
        case "transform":
            return kernels.transforms[op].apply(input, target, param, red, True)[0]
    with below_autograd():
        return kernel(input, target, param, red, False)[0]


def continuous_bernoulli_nll(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Negative log-likelihood of ``target`` under independent continuous Bernoullis
    (Loaiza-Ganem & Cunningham 2019): the density on [0, 1] that the Bernoulli NLL of
    grey-level pixels silently assumes, with its normalizer.

    Args:
        input: ``[B, ...]`` logits, or probabilities when ``from_logits=False`` (their logs
            clamped at -100, as in :func:`bernoulli_nll`); float16, bfloat16, float32 or
            float64.
        target: ``[B, ...]``, same shape: values in [0, 1], any float dtype, bool or uint8.
        from_logits: whether ``input`` holds logits or probabilities.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        backend: as for :func:`bernoulli_nll`.

    Returns:
        :func:`bernoulli_nll` plus ``-log C`` per element, ``C(eta) = eta / tanh(eta / 2)``
        the normalizer at logit eta (see ``vaekern.reference``), summed over every dim but
        the first and reduced over the batch; float32 (float64 for float64 input).
    """
    _tensor("input", input)
    _check_target(target, input)
    device = _same_device(("input", input), ("target", target))
    red = _reduction(reduction)
    from_logits = _flag("from_logits", from_logits)
    kernels = resolve(backend, device)
    if kernels is None:
        rows = reference.continuous_bernoulli_nll_ref(input, target, from_logits=from_logits, reduction=reduction)
        return rows.to(acc_dtype(input))
    return _likelihood_nll(
        kernels, "continuous_bernoulli_nll", ContinuousBernoulliNLLFunction, input, target, from_logits, red
    )


def _log_scale(log_scale, input: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``gaussian_nll``'s log_scale as the kernels take it: a tensor in the loss dtype, 0-d
    or one value per column of the flattened row, differentiable where the user's is; None
    for ``"optimal"``, which the kernels do not take (``_optimal_nll``)."""
    if isinstance(log_scale, str):
        if log_scale != "optimal":
            raise ValueError(f'log_scale must be a float, a tensor or "optimal", got {log_scale!r}')
        return None
    if isinstance(log_scale, Tensor):
        if not log_scale.is_floating_point():
            raise TypeError(f"log_scale must be a floating tensor, got {log_scale.dtype}")
        if log_scale.layout != torch.strided:
            raise TypeError(f"log_scale must be a dense (strided) tensor, got layout {log_scale.layout}")
        if log_scale.device != input.device:
            raise ValueError(f"log_scale is on {log_scale.device} but input is on {input.device}")
        row = input.shape[1:]
        try:
            fits = torch.broadcast_shapes(log_scale.shape, row) == row
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"log_scale of shape {tuple(log_scale.shape)} does not broadcast to a row of input, {tuple(row)}: "
                "use a 0-d tensor, one per channel such as (C, 1, 1), or one per feature"
            )
        if log_scale.dim() == 0:
            return log_scale.to(dtype)
        return log_scale.to(dtype).expand(row).reshape(-1)
    if isinstance(log_scale, bool) or not isinstance(log_scale, (int, float)):
        raise TypeError(f'log_scale must be a float, a tensor or "optimal", got {type(log_scale).__name__}')
    if not math.isfinite(log_scale):
        raise ValueError(f"log_scale must be finite, got {log_scale}")
    return _constant(float(log_scale), dtype, input.device)


def gaussian_nll(
    input: Tensor,
    target: Tensor,
    log_scale: float | str | Tensor = 0.0,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Negative log-likelihood of ``target`` under independent Gaussians N(input, sigma^2),
    sigma = exp(log_scale): a true NLL in nats, with its 0.5 * log(2 pi) constant.

    Args:
        input: ``[B, ...]`` the decoder's means; float16, bfloat16, float32 or float64.
        target: ``[B, ...]``, same shape: any float dtype, bool or uint8.
        log_scale: the log standard deviation: a float (fixed); a tensor that broadcasts to
            ``input.shape[1:]`` (0-d for one scale, ``(C, 1, 1)`` per channel, a row's shape
            per feature), learned when it requires grad (its gradient is summed over the
            dims it broadcasts over); or ``"optimal"``, the sigma-VAE's analytic optimum:
            sigma^2 is the batch's mean squared error, on the device, and the gradient is
            the total one, through sigma^2 too (the mean-reduced loss is then
            D/2 * (log(2 pi mse) + 1), and its gradient that closed form's); still one
            pass over the image each way (``_optimal_nll``).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        backend: as for :func:`bernoulli_nll`.

    Returns:
        Shape ``()``, or ``(B,)`` for ``"none"``; float32 (float64 for float64 input).
    """
    _tensor("input", input)
    _check_target(target, input)
    device = _same_device(("input", input), ("target", target))
    red = _reduction(reduction)
    dtype = acc_dtype(input)
    ls = _log_scale(log_scale, input, dtype)  # also the checks, with their named errors
    kernels = resolve(backend, device)
    if kernels is None:
        return reference.gaussian_nll_ref(input, target, log_scale, reduction=reduction).to(dtype)
    if ls is None:
        sq = _likelihood_nll(
            kernels, "gaussian_nll", GaussianNLLFunction, input, target,
            _constant(SQUARED_ERROR_LOG_SCALE, dtype, device), REDUCTIONS["none"],
        )  # fmt: skip
        return _optimal_nll(sq, math.prod(input.shape[1:]), red).to(dtype)
    return _likelihood_nll(kernels, "gaussian_nll", GaussianNLLFunction, input, target, ls, red)


def _optimal_nll(sq: Tensor, D: int, red: int) -> Tensor:
    """The Gaussian NLL at the sigma-VAE's optimal sigma, sigma^2 = the batch's mean squared
    error, reduced by ``red``, in float64, from ``sq``: each row's NLL at log_scale
    ``SQUARED_ERROR_LOG_SCALE``, which is pi * S_b (S_b: row b's squared error; D elements
    per row).

    With v = 2 pi sigma^2 = 2 mean_b(sq_b) / D, row b's NLL S_b / (2 sigma^2) + D/2 log(2 pi
    sigma^2) is sq_b / v + D/2 log v. The batch's squared errors are needed before any row's
    loss, and this way they come from the fused op itself: the image is read once each way
    (the op's forward, and its backward's row scaling), and this runs on B values,
    differentiated by autograd through v as well, so the gradient is the total one. All on
    the device: no sync, CUDA-graph safe.

    Float64, because the two terms are about D/2 each and cancel where the mse is near
    1/(2 pi e): in float32 the mean of 4 x 3 x 64 x 64 rows lost 3e-3 there. Under mean and
    sum only the mean m = mean_b(sq_b) is taken over the B values (host time is the step at
    small sizes): the rows' mean is m / v + D/2 log v, its first term D/2, kept as m / v and
    not the closed form D/2 (1 + log v), because the oracle's rows are NaN where v is 0
    (x == t everywhere) or inf (an infinite residual), and so is m / v there."""
    if D == 0:  # rows of no element: their NLL is 0 (the kernels' sum), whatever sigma
        return _reduced64(sq, red)
    if red != REDUCTIONS["none"] and sq.shape[0] > 0:
        m = sq.mean(dtype=torch.float64)
        v = m * (2.0 / D)
        nll = m / v + (0.5 * D) * torch.log(v)
        return nll if red == REDUCTIONS["mean"] else nll * sq.shape[0]
    rows = sq.to(torch.float64)
    v = rows.mean() * (2.0 / D)
    return _reduced64(rows / v + (0.5 * D) * torch.log(v), red)


def _reduced64(rows: Tensor, red: int) -> Tensor:
    """Rows reduced by ``red``, accumulated and returned in float64."""
    if red == REDUCTIONS["none"]:
        return rows.to(torch.float64)
    return rows.mean(dtype=torch.float64) if red == REDUCTIONS["mean"] else rows.sum(dtype=torch.float64)


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    *,
    free_bits: float | Tensor = 0.0,
    reduction: str = "mean",
    return_per_dim: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Analytic KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), summed over every
    dim but the first.

    Args:
        mu: ``[B, ...]`` posterior means.
        logvar: ``[B, ...]`` posterior log-variances, same shape and dtype. The variance
            ratio is evaluated as ``exp(min(logvar - prior_logvar, 60))`` (see
            ``vaekern.reference``).
        prior_mu, prior_logvar: the prior's mean and log-variance, each a floating tensor
            that broadcasts to ``mu``'s shape: one per latent element (a learned prior,
            shape ``mu.shape[1:]``), one per sample (a hierarchical VAE's conditional
            prior, ``mu``'s shape), or 0-d. ``None`` is 0 (the standard normal prior).
            Each gets its gradient, reduced over the dims it broadcasts.
        free_bits: lambda >= 0 in nats per latent element: the KL term becomes
            ``sum_j max(lambda, kl_j)``, ``kl_j`` the batch mean of element j's KL, and an
            element whose batch mean is below lambda gets no gradient (Kingma et al. 2016).
            A batch quantity: ``"mean"`` gives that sum, ``"sum"`` B times it, and
            ``"none"`` is refused. 0 is the plain KL. A float, or a 0-d floating tensor
            on the latents' device, to anneal lambda in place without recompiling under
            torch.compile (as beta). A tensor is not inspected (a device sync): NaN gives
            NaN, a negative one is the plain KL.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        return_per_dim: also return the batch-mean KL of every latent element (the true
            KL, whatever free_bits), shaped like ``mu.shape[1:]``: from the same pass for
            ``"mean"`` and ``"sum"``; ``"none"``'s rows take a second launch.
        backend: as for :func:`bernoulli_nll`.

    Returns:
        Shape ``()``, or ``(B,)`` for ``"none"``; float32, or float64 when an input is
        float64. With ``return_per_dim``, ``(kl, kl_per_dim)``.
    """
    _check_latents(mu, logvar)
    device = _same_device(("mu", mu), ("logvar", logvar))
    prior_mu = _prior("prior_mu", prior_mu, mu)
    prior_logvar = _prior("prior_logvar", prior_logvar, mu)
    red = _reduction(reduction)
    free_bits = _free_bits(free_bits, red, device)
    return_per_dim = _flag("return_per_dim", return_per_dim)
    kernels = resolve(backend, device)
    if kernels is None:
        dtype = _kl_dtype(mu, prior_mu, prior_logvar)
        kl = reference.gaussian_kl_ref(
            mu, logvar, prior_mu, prior_logvar, free_bits=free_bits, reduction=reduction
        ).to(dtype)
        if return_per_dim:
            return kl, reference.gaussian_kl_per_dim_ref(mu, logvar, prior_mu, prior_logvar).to(dtype)
        return kl
    latents = _kl_operands(mu, logvar, prior_mu, prior_logvar)
    if not _binds(free_bits) and not return_per_dim:
        return _gaussian_kl(kernels, *latents, red)
    kl, per_dim = _free_bits_kl(kernels, *latents, free_bits, red)
    return (kl, per_dim) if return_per_dim else kl


def _gaussian_kl(kernels, mu: Tensor, logvar: Tensor, prior_mu, prior_logvar, red: int) -> Tensor:
    """The KL to the prior through the kernel op, by the call path ``_path`` picks."""
    latents = (mu, logvar, prior_mu, prior_logvar)
    match _path(kernels, "gaussian_kl", *latents):
        case "op":
            return kernels.gaussian_kl(*latents, red)
        case "function":
            return GaussianKLFunction.apply(kernels, *latents, red)
        case "transform":
            return kernels.transforms["gaussian_kl"].apply(*latents, red)
    with below_autograd():
        return kernels.gaussian_kl(*latents, red)


def _prior(name: str, prior, mu: Tensor) -> Tensor | None:
    if prior is None:
        return None
    if not isinstance(prior, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(prior).__name__}")
    if prior.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {prior.dtype}")
    if prior.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {prior.layout}")
    _same_device(("mu", mu), (name, prior))
    # Dim by dim from the right: torch.broadcast_shapes (its symbolic-shape guards) made a
    # no-grad vae_loss call with a prior 143 us instead of 119 on 128x784 CPU tensors, for its
    # two calls (one measurement, not committed; Intel Xeon, torch 2.14.1).
    fits = prior.dim() <= mu.dim() and all(p in (1, m) for p, m in zip(reversed(prior.shape), reversed(mu.shape)))
    if not fits:
        raise ValueError(
            f"{name} of shape {tuple(prior.shape)} does not broadcast to mu's shape {tuple(mu.shape)}: use one "
            "per latent element (mu.shape[1:]), one per sample (mu's shape), or a 0-d tensor"
        )
    return prior


def _free_bits(free_bits, red: int, device: torch.device | None = None) -> float | Tensor:
    """free_bits as given, checked: a float, or a 0-d tensor on ``device`` (not inspected:
    that would need a device sync; where it is checked, ``device`` is None)."""
    if isinstance(free_bits, Tensor):
        if free_bits.dim() != 0 or not free_bits.is_floating_point():
            raise TypeError(
                f"free_bits must be a float or a 0-d floating tensor, got shape {tuple(free_bits.shape)} {free_bits.dtype}"
            )
        if device is not None and free_bits.device != device:
            raise ValueError(f"free_bits is on {free_bits.device} but the latents are on {device}")
        if free_bits.requires_grad:
            raise ValueError("free_bits must not require grad: the free-bits term does not differentiate it")
        if red == REDUCTIONS["none"]:
            raise ValueError(
                "a tensor free_bits needs reduction='mean' or 'sum': free bits compare each latent element's KL, "
                "averaged over the batch, with the threshold, and a tensor's value is not read on the host"
            )
        return free_bits
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)):
        raise TypeError(
            f"free_bits must be a float or a 0-d floating tensor (nats per latent element), got {type(free_bits).__name__}"
        )
    try:
        value = float(free_bits)
    except OverflowError:
        raise ValueError("free_bits is beyond the range of float64 (about 1.8e308)") from None
    if not value >= 0.0 or value == float("inf"):  # NaN fails the first comparison
        raise ValueError(f"free_bits must be finite and >= 0, got {value}")
    if value > 0.0 and red == REDUCTIONS["none"]:
        raise ValueError(
            "free_bits > 0 needs reduction='mean' or 'sum': free bits compare each latent element's KL, "
            "averaged over the batch, with the threshold, so there is no per-sample value to return"
        )
    return value


def _binds(free_bits: float | Tensor) -> bool:
    """Whether the free-bits term replaces the plain KL: a float above 0, or any tensor
    (its value is not read on the host)."""
    return isinstance(free_bits, Tensor) or free_bits > 0.0


def _kl_dtype(*tensors: Tensor | None) -> torch.dtype:
    return acc_dtype(*(t for t in tensors if t is not None))


def _kl_operands(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None):
    """(mu, logvar, prior_mu, prior_logvar) as the kernel ops take them: each prior in the
    latents' math dtype (float32, float64 for float64 latents), which the kernels read in
    place at its broadcast strides and standardize the latents by on load. A float64 prior
    of lower-precision latents makes the math float64: the latents are widened (a
    latent-sized cast), as the oracle computes. Without a prior the latents pass
    unchanged."""
    if prior_mu is None and prior_logvar is None:
        return mu, logvar, None, None
    dtype = _kl_dtype(mu, prior_mu, prior_logvar)
    if dtype == torch.float64:  # a no-op for float64 latents
        mu, logvar = mu.to(dtype), logvar.to(dtype)
    return (
        mu, logvar, None if prior_mu is None else prior_mu.to(dtype),
        None if prior_logvar is None else prior_logvar.to(dtype),
    )  # fmt: skip


def _free_bits_kl(
    kernels, mu: Tensor, logvar: Tensor, prior_mu, prior_logvar, free_bits: float | Tensor, red: int
) -> tuple[Tensor, Tensor]:
    """(the KL term, the batch-mean KL per latent element) of the kernel ops' operands
    (``_kl_operands``).

    The per-element batch sums are the KL op's column reduction (``KL_COLUMNS``), in the
    latents' own layout: one fused pass, its backward scaling each element by the upstream
    gradient of its batch mean (0 below the free bits)."""
    B = mu.shape[0]
    sums = _gaussian_kl(kernels, mu, logvar, prior_mu, prior_logvar, KL_COLUMNS)
    per_dim = sums / B
    if _binds(free_bits):
        # where, not maximum: the gradient passes at equality, and a NaN stays NaN.
        kl = torch.where(per_dim < free_bits, free_bits, per_dim)
        if isinstance(free_bits, Tensor):  # a NaN threshold too (a float one is refused)
            kl = torch.where(free_bits.isnan(), free_bits, kl)
        kl = kl.sum()
        return (kl * B if red == REDUCTIONS["sum"] else kl), per_dim
    if red == REDUCTIONS["none"]:  # the rows are not in the column pass: a second launch
        return _gaussian_kl(kernels, mu, logvar, prior_mu, prior_logvar, red), per_dim
    # The sum from the sums, not B * the means: over an empty batch the means are 0/0.
    return (sums.sum() if red == REDUCTIONS["sum"] else per_dim.sum()), per_dim


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """Sample ``z = mu + exp(logvar / 2) * eps`` with gradients to ``mu`` and ``logvar``.

    Args:
        mu: ``[B, ...]`` posterior means.
        logvar: ``[B, ...]`` log-variances, same shape and dtype.
        eps: optional standard-normal noise of the same shape and dtype. When omitted it
            is drawn inside the op from a seed that ``generator`` (or the default
            generator of mu's device) supplies; the noise is regenerated in backward
            rather than saved.
        generator: a ``torch.Generator`` on mu's device; only used when ``eps`` is None.
            Each backend has its own generator of normals, so the same seed gives the
            same z on the same backend only.
        backend: as for :func:`bernoulli_nll`.

    Returns:
        ``z``, contiguous, with mu's shape and dtype.
    """
    _check_latents(mu, logvar)
    device = _same_device(("mu", mu), ("logvar", logvar))
    kernels = resolve(backend, device)
    seed = None
    if eps is not None:
        if generator is not None:
            raise ValueError("pass either eps or generator, not both")
        _tensor("eps", eps)
        if eps.requires_grad and torch.is_grad_enabled():
            # The fused backends would leave it without a gradient; refused everywhere alike.
            raise ValueError("eps must not require grad: reparameterize differentiates mu and logvar only")
        _same_shape(("mu", mu), ("eps", eps))
        _same_device(("mu", mu), ("eps", eps))
        if eps.dtype != mu.dtype:
            raise TypeError(f"eps has dtype {eps.dtype} but mu has dtype {mu.dtype}")
    else:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but mu is on {device}")
        if kernels is None:
            eps = torch.randn(mu.shape, dtype=acc_dtype(mu), device=device, generator=generator)
        else:
            seed = torch.randint(_SEED_HIGH, (1,), device=device, dtype=torch.int64, generator=generator)
    if kernels is None:
        return reference.reparameterize_ref(mu, logvar, eps).to(mu.dtype).contiguous()
    match _path(kernels, "reparameterize", mu, logvar, eps):  # eps: for its tangent (it takes no gradient)
        case "op":
            return kernels.reparameterize(mu, logvar, eps, seed)
        case "function":
            return ReparameterizeFunction.apply(kernels, mu, logvar, eps, seed)
        case "transform":
            return kernels.transforms["reparameterize"].apply(mu, logvar, eps, seed)[0]
    with below_autograd():
        return kernels.reparameterize(mu, logvar, eps, seed)


def _in_graph(device: torch.device) -> bool:
    """Whether tensors made now belong to a graph: traced by torch.compile (a constant of
    the graph) or captured in a CUDA graph (the graph's own fill, so that no replay reads a
    cached tensor that the cache may since have dropped). Float arguments are then made as
    tensors on each call instead of taken from the eager caches."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _beta(beta, dtype: torch.dtype, device: torch.device, in_graph: bool) -> Tensor:
    if isinstance(beta, Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise TypeError(f"beta must be a float or a 0-d floating tensor, got shape {tuple(beta.shape)} {beta.dtype}")
        if beta.device != device:
            raise ValueError(f"beta is on {beta.device} but recon is on {device}")
        if beta.requires_grad:
            raise ValueError("beta must not require grad: vae_loss does not differentiate it")
        return beta.to(dtype)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):  # before the cache: True == 1
        raise TypeError(f"beta must be a float or a 0-d floating tensor, got {type(beta).__name__}")
    if in_graph:
        return torch.full((), _checked_beta(beta, dtype), dtype=dtype, device=device)
    return _beta_tensor(beta, dtype, device)


def _checked_beta(beta, dtype: torch.dtype) -> float:
    value = float_beta(beta)
    if value > torch.finfo(dtype).max:
        raise ValueError(f"beta={value:g} overflows the loss dtype {dtype}; the largest is {torch.finfo(dtype).max:g}")
    return value


def float_beta(beta) -> float:
    """A Python beta as a float: finite, not negative and not NaN, or a named error.

    A tensor beta is not inspected: that would need a device sync."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float or a 0-d floating tensor, got {type(beta).__name__}")
    try:
        value = float(beta)
    except OverflowError:
        raise ValueError("beta is beyond the range of float64 (about 1.8e308)") from None
    if not value >= 0.0 or value == float("inf"):  # NaN fails the first comparison
        raise ValueError(f"beta must be finite and >= 0, got {value}")
    return value


@functools.lru_cache(maxsize=16)
def _beta_tensor(beta: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A float beta as the 0-d tensor the kernels read, checked and made once per value
    # instead of a fill and its range checks per call (1.7 us of the 12 us no-grad call on
    # 1x1 CPU tensors, Intel Xeon; a bad value raises, and errors are not cached). The
    # kernels only read it and it is never handed to the caller, so sharing it is safe. A
    # fill kernel, not a host-to-device copy: no sync.
    return torch.full((), _checked_beta(beta, dtype), dtype=dtype, device=device)


def vae_loss(
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
    return_parts: bool = False,
    backend: str = "auto",
) -> Tensor | VAELossParts:
    """The negative ELBO of a VAE with a diagonal Gaussian posterior: ``recon + beta * kl``.

    ``recon`` is the likelihood's NLL (:func:`bernoulli_nll`, :func:`gaussian_nll` or
    :func:`continuous_bernoulli_nll`) and ``kl`` is :func:`gaussian_kl`, each summed over its
    non-batch dims and reduced over the batch the same way, computed in one fused call.

    Args:
        recon: ``[B, ...]`` the decoder's output: logits (or probabilities with
            ``from_logits=False``) for the Bernoullis, means for the Gaussian.
        target: ``[B, ...]`` the data, same shape: float, bool or uint8.
        mu: ``[B, ...]`` posterior means, same batch size as ``recon``.
        logvar: ``[B, ...]`` posterior log-variances, same shape and dtype as ``mu``.
        beta: weight of the KL term: a Python float, or a 0-d tensor on the inputs'
            device (change it in place to anneal it without recompiling). Not
            differentiated.
        likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"continuous_bernoulli"``.
        log_scale: the Gaussian's log standard deviation, as for :func:`gaussian_nll` (a
            float, a tensor broadcasting to ``recon.shape[1:]``, learned if it requires
            grad, or ``"optimal"``); only with ``likelihood="gaussian"``.
        from_logits: whether ``recon`` holds logits; only for the Bernoullis.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        prior_mu, prior_logvar: the prior of the KL term, as for :func:`gaussian_kl`
            (``None``: the standard normal).
        free_bits: the KL term's free bits, as for :func:`gaussian_kl`; the ``kl`` of
            ``return_parts`` is then the free-bits term, as it enters the loss.
        return_parts: return ``VAELossParts(loss, recon, kl)`` instead of the loss alone.
        backend: as for :func:`bernoulli_nll`.

    Returns:
        The loss (shape ``()``, or ``(B,)`` for ``"none"``), or ``VAELossParts``. Float32,
        or float64 when an input is float64.
    """
    if not _plainly_valid(recon, target, mu, logvar):  # then find the argument to name
        _tensor("recon", recon)
        _check_target(target, recon)
        _check_latents(mu, logvar)
        _same_device(("recon", recon), ("target", target), ("mu", mu), ("logvar", logvar))
        if mu.shape[0] != recon.shape[0]:
            raise ValueError(f"mu has batch size {mu.shape[0]} but recon has batch size {recon.shape[0]}")
    device = recon.device
    red = _reduction(reduction)
    from_logits = _flag("from_logits", from_logits)
    return_parts = _flag("return_parts", return_parts)
    # The standard prior without free bits, the common call, skips their checks: each costs
    # about a microsecond on a call of about 15 (no grad, 1x1 CPU tensors, Intel Xeon).
    plain_kl = prior_mu is None and prior_logvar is None and type(free_bits) is float and free_bits == 0.0
    if plain_kl:
        dtype = torch.float64 if torch.float64 in (recon.dtype, mu.dtype) else torch.float32
    else:
        prior_mu = _prior("prior_mu", prior_mu, mu)
        prior_logvar = _prior("prior_logvar", prior_logvar, mu)
        free_bits = _free_bits(free_bits, red, device)
        dtype = _kl_dtype(recon, mu, prior_mu, prior_logvar)
    in_graph = _in_graph(device)
    beta_t = _beta(beta, dtype, device, in_graph)
    lik = _likelihood(likelihood, log_scale, from_logits)
    kernels = resolve(backend, device)
    optimal = isinstance(log_scale, str)
    if kernels is not None and optimal and not plain_kl and _binds(free_bits):
        # The optimal scale needs the rows' squared errors, the free bits a reduced KL: the
        # likelihood's fused op and the KL's, two launches each way. As in the fused op, the
        # free bits' column sums are in the latents' precision (README, Numerical conventions).
        rec = _recon_nll(recon, target, lik, log_scale, from_logits, reduction, backend).to(dtype)
        kl = _free_bits_kl(kernels, *_kl_operands(mu, logvar, prior_mu, prior_logvar), free_bits, red)[0].to(dtype)
        loss = rec + beta_t * kl
        return VAELossParts(loss, rec, kl) if return_parts else loss
    if lik == LIKELIHOODS["gaussian"]:
        ls = _log_scale(log_scale, recon, dtype)
    else:  # read by no Bernoulli: a 0-d placeholder of the schema
        ls = torch.zeros((), dtype=dtype, device=device) if in_graph else _cached_constant(0.0, dtype, device)
    if kernels is None:
        parts = reference.vae_loss_ref(
            recon, target, mu, logvar, beta=beta_t, likelihood=likelihood, log_scale=log_scale,
            from_logits=from_logits, reduction=reduction, prior_mu=prior_mu, prior_logvar=prior_logvar,
            free_bits=free_bits,
        )  # fmt: skip
        loss, rec, kl = (p.to(dtype) for p in parts)
    else:
        if plain_kl:
            latents, fb = (mu, logvar, None, None), None
        else:
            latents = _kl_operands(mu, logvar, prior_mu, prior_logvar)
            fb = _free_bits_operand(free_bits, device) if _binds(free_bits) else None
        if optimal:  # the rows' squared errors from the same launch (_optimal_nll)
            ls = _constant(SQUARED_ERROR_LOG_SCALE, dtype, device)
        args = (recon, target, *latents, fb, beta_t, ls, lik, from_logits, REDUCTIONS["none"] if optimal else red)
        # target, beta_t, fb: for a tangent
        match _path(kernels, "vae_loss", recon, *latents, ls, target, beta_t, fb):
            case "op":
                loss, rec, kl, _, _ = kernels.vae_loss(*args, _needs_grad(recon))
            case "function":
                loss, rec, kl = VAELossFunction.apply(kernels, *args)
            case "transform":
                loss, rec, kl, _, _ = kernels.transforms["vae_loss"].apply(*args, _needs_grad(recon))
            case _:
                with below_autograd():
                    loss, rec, kl, _, _ = kernels.vae_loss(*args, False)
        if optimal:  # the terms summed and combined in float64, as the kernels' finalize does
            rec, kl = _optimal_nll(rec, math.prod(recon.shape[1:]), red), _reduced64(kl, red)
            loss, rec, kl = (rec + beta_t * kl).to(dtype), rec.to(dtype), kl.to(dtype)
    if return_parts:
        return VAELossParts(loss, rec, kl)
    return loss


def _recon_nll(recon, target, lik: int, log_scale, from_logits: bool, reduction: str, backend: str) -> Tensor:
    """vae_loss's reconstruction term alone, by the likelihood's own op."""
    if lik == LIKELIHOODS["gaussian"]:
        return gaussian_nll(recon, target, log_scale, reduction=reduction, backend=backend)
    nll = bernoulli_nll if lik == LIKELIHOODS["bernoulli"] else continuous_bernoulli_nll
    return nll(recon, target, from_logits=from_logits, reduction=reduction, backend=backend)


def _likelihood(likelihood, log_scale, from_logits: bool) -> int:
    """vae_loss's likelihood as the kernels' code; an argument that the likelihood would
    ignore is refused by name instead."""
    if not isinstance(likelihood, str) or likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {tuple(LIKELIHOODS)}, got {likelihood!r}")
    if likelihood == "gaussian":
        if not from_logits:
            raise ValueError('from_logits=False applies to the Bernoulli likelihoods, not to likelihood="gaussian"')
    elif not (isinstance(log_scale, (int, float)) and not isinstance(log_scale, bool) and log_scale == 0.0):
        raise ValueError(f'log_scale applies to likelihood="gaussian" only, got it with likelihood={likelihood!r}')
    return LIKELIHOODS[likelihood]


def _free_bits_operand(free_bits: float | Tensor, device: torch.device) -> Tensor:
    """Binding free bits (``_binds``) as the 0-d tensor that the fused ``vae_loss`` reads as
    float64, as the oracle does: a tensor as it is (no cast, and so no op beside the fused
    one), a float as float64, made once per value (``_constant``)."""
    if isinstance(free_bits, Tensor):
        return free_bits
    return _constant(free_bits, torch.float64, device)


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A float argument as the 0-d tensor the kernels read: made once per value in eager
    mode, in the graph when traced or captured (_in_graph)."""
    if _in_graph(device):
        return torch.full((), value, dtype=dtype, device=device)
    return _cached_constant(value, dtype, device)


@functools.lru_cache(maxsize=16)
def _cached_constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Only read, never handed to the caller (see _beta_tensor).
    return torch.full((), value, dtype=dtype, device=device)
