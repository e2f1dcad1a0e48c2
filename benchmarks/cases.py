"""What the benchmarks measure: ops, sizes, providers, inputs, floor bytes, and one timed step.

Shared by ``python -m benchmarks`` (run.py) and the pytest-benchmark files (bench_<op>.py), so
the two cannot drift apart.

Providers
---------
``eager``          the pytorch/examples VAE loss as users write it, on logits:
                   ``F.binary_cross_entropy_with_logits(recon, x, reduction="sum")`` plus
                   ``KLD = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))``, divided by B for the mean;
                   for ``gaussian_nll`` (sigma = 1) the summed squared error over 2 plus the
                   constant, over B; for ``continuous_bernoulli_nll``
                   ``-ContinuousBernoulli(logits=...).log_prob(x).sum() / B``.
                   For ``gaussian_nll_optimal`` (``log_scale="optimal"``) the sigma-VAE's
                   code: log sigma = log sqrt(mse), then the Gaussian NLL written out, summed,
                   over B; for ``gaussian_nll_learned`` (a learned 0-d log_scale) the same
                   NLL with the learned log sigma. For ``gaussian_kl_free_bits`` (a learned per-latent prior, free bits of
                   ``FREE_BITS`` nats): the per-element KL to the prior written out, its batch
                   mean clamped at the free bits and summed. For ``vae_loss_gaussian`` and
                   ``vae_loss_continuous_bernoulli`` (``vae_loss`` with that likelihood):
                   the likelihood's eager form above plus the pytorch/examples KL. For
                   ``vae_loss_prior`` (``vae_loss`` with a learned per-latent prior): the
                   pytorch/examples BCE plus the KL to the prior written out;
                   ``vae_loss_prior_free_bits`` (and free bits): the same BCE plus
                   ``gaussian_kl_free_bits``'s eager form.
``eager-keras``    the Keras example's formula: the mean per-pixel BCE times the pixel count,
                   plus the mean over rows of the per-row KL.
``compile``        ``eager`` under ``torch.compile(dynamic=False)``; compile time is kept out of
``compile-keras``  the timings (the first calls are warm-up) and reported separately.
``floor``          the overhead case only: one ATen op with C++ autograd over the same three
                   inputs, ``torch.addcmul(recon, mu, logvar)`` (1x1, so its output is a
                   scalar). No call of a loss over these tensors can take less host time;
                   it computes another value, so it is not checked.
``reference``, ``triton``, ``cuda``, ``cpu``
                   ``vaekern.<op>(..., backend=name)``, where ``vaekern.available_backends``
                   lists it for the device. ``triton`` runs only on a real GPU, never in
                   Triton's interpreter: interpreted timings mean nothing.

Every provider computes the same number (the batch mean of the per-row value); the runner
checks that against the float64 reference before it times anything.

Modes
-----
``fwd``      the forward alone, with inputs that require grad, as in a training step. vaekern
             computes the reconstruction gradient in this forward, so its ``fwd`` is heavier
             and its ``bwd`` nearly free: compare designs on ``fwd+bwd``.
``bwd``      ``torch.autograd.grad`` of an output whose forward ran untimed just before.
``fwd+bwd``  forward and gradients, as ``loss.backward()`` in a training step (``.grad`` is not
             accumulated: ``torch.autograd.grad`` returns fresh gradients each time).
``nograd``   the forward under ``torch.no_grad()`` (evaluation); the overhead case only.

The overhead case
-----------------
``python -m benchmarks --ops overhead``: ``vae_loss`` in ``fwd+bwd`` and ``nograd`` on 1x1
float32 tensors (B = D = Z = 1), with the providers of ``OVERHEAD_PROVIDERS``. The kernels
have nothing to do there, so the time per call is the host's: Python, dispatch and autograd.
On a GPU at small batch that is the whole step. It uses the same Step and check as the ops;
run.py times the providers of a mode in turn, in blocks (timing.LoopTimer), on any device.

Floor bytes
-----------
The least traffic any implementation needs, each tensor in its own dtype: the image-sized
reads (reconstruction and target) and the gradient write, plus the latent tensors. A
standalone backward must read what it differentiates, so ``bwd`` and ``fwd+bwd`` have the same
floor; ``fwd`` only reads. Scalar outputs are left out.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os

import torch
import torch.nn.functional as F

import vaekern
from vaekern import reference

OPS = (
    "vae_loss", "vae_loss_gaussian", "vae_loss_continuous_bernoulli", "bernoulli_nll", "gaussian_nll",
    "gaussian_nll_optimal", "gaussian_nll_learned", "continuous_bernoulli_nll", "gaussian_kl", "gaussian_kl_free_bits", "reparameterize",
    "vae_loss_prior", "vae_loss_prior_free_bits",
)  # fmt: skip
# vae_loss_prior, gaussian_kl_free_bits and vae_loss_prior_free_bits: a learned prior (one
# mean and log-variance per latent), the last two with these free bits, in nats per latent
# element.
FREE_BITS = 0.1
# Cases that call a vaekern function with options: case name -> (function name, options).
VARIANTS = {
    "vae_loss_gaussian": ("vae_loss", {"likelihood": "gaussian"}),
    "vae_loss_continuous_bernoulli": ("vae_loss", {"likelihood": "continuous_bernoulli"}),
    "gaussian_nll_optimal": ("gaussian_nll", {"log_scale": "optimal"}),
    "gaussian_nll_learned": ("gaussian_nll", {}),
    "gaussian_kl_free_bits": ("gaussian_kl", {"free_bits": FREE_BITS}),
    "vae_loss_prior": ("vae_loss", {}),
    "vae_loss_prior_free_bits": ("vae_loss", {"free_bits": FREE_BITS}),
}
# Arguments that a case passes by keyword (vae_loss takes its prior so), after the positional ones.
KEYWORD_ARGS = {"vae_loss_prior": ("prior_mu", "prior_logvar"), "vae_loss_prior_free_bits": ("prior_mu", "prior_logvar")}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "eager-keras", "compile", "compile-keras", "reference", "triton", "cuda", "cpu")
VAEKERN_PROVIDERS = ("reference", "triton", "cuda", "cpu")
# The speed-up columns compare every row with these two providers of the same case.
BASELINES = ("eager", "compile")
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
TARGET_DTYPES = {**DTYPES, "uint8": torch.uint8, "bool": torch.bool}
# The sizes: MNIST-like, a CIFAR-sized batch, and a large one.
GPU_SIZES = ("128x784:20", "4096x3072:64", "65536x3072:64")
CPU_SIZES = ("128x784:20", "4096x3072:64")
# The value check before timing: relative error of the reduced loss against float64.
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# reparameterize draws its own noise: the check is that (z - mu) / std looks standard normal.
CHECK_NOISE_TOL = 0.15
# The overhead case (module docstring): the pytorch/examples formula, compiled or not, and vaekern.
OVERHEAD = "overhead"
OVERHEAD_SIZE = "1x1:1"
OVERHEAD_MODES = ("fwd+bwd", "nograd")
FLOOR = "floor"
OVERHEAD_PROVIDERS = ("eager", "compile", FLOOR, *VAEKERN_PROVIDERS)


@dataclasses.dataclass(frozen=True, order=True)
class Size:
    """``B`` rows of ``D`` pixels, with a latent of ``Z`` dims per row."""

    batch: int
    dim: int
    latent: int

    @classmethod
    def parse(cls, text: str) -> "Size":
        """``"128x784:20"``; the latent defaults to 20 (``"128x784"``)."""
        image, _, latent = text.strip().partition(":")
        b, _, d = image.partition("x")
        try:
            size = cls(int(b), int(d), int(latent or 20))
        except ValueError:
            raise ValueError(f"a size is BxD or BxD:Z, e.g. 128x784:20, got {text!r}") from None
        if min(size.batch, size.dim, size.latent) < 1:
            raise ValueError(f"sizes must be positive, got {text!r}")
        return size

    def __str__(self) -> str:
        return f"{self.batch}x{self.dim}:{self.latent}"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    size: Size
    dtype: torch.dtype
    target_dtype: torch.dtype
    mode: str
    device: torch.device


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- floor bytes -----------------------------------------------------------------------------


def floor_bytes(case: Case) -> int:
    """The minimum bytes moved for ``case``: see the module docstring."""
    b, d, z = case.size.batch, case.size.dim, case.size.latent
    e = case.dtype.itemsize
    image_in = b * d * (e + case.target_dtype.itemsize)  # reconstruction + target
    image_grad = b * d * e
    latent = b * z * e  # one latent-sized tensor: mu, logvar, z or one of their gradients
    fwd = case.mode in ("fwd", "nograd")
    match case.op:
        case "vae_loss" | "vae_loss_gaussian" | "vae_loss_continuous_bernoulli":
            return image_in + 2 * latent + (0 if fwd else image_grad + 2 * latent)
        case "bernoulli_nll" | "gaussian_nll" | "gaussian_nll_optimal" | "gaussian_nll_learned" \
                | "continuous_bernoulli_nll":
            # A fixed log_scale (the benchmarks' 0.0) is a scalar: no bytes. "optimal" moves
            # the same: its mse comes from the rows of the one pass (README, gaussian_nll).
            return image_in + (0 if fwd else image_grad)
        case "gaussian_kl":
            return 2 * latent + (0 if fwd else 2 * latent)
        case "gaussian_kl_free_bits":
            prior = 2 * z * e  # the prior's mean and log-variance, or their gradients
            return 2 * latent + prior + (0 if fwd else 2 * latent + prior)
        case "vae_loss_prior" | "vae_loss_prior_free_bits":
            prior = 2 * z * e
            return image_in + 2 * latent + prior + (0 if fwd else image_grad + 2 * latent + prior)
        case "reparameterize":
            # fwd: read mu, logvar, write z (the noise is drawn in the kernel).
            # bwd: read grad_z, logvar (noise regenerated), write grad_mu, grad_logvar.
            return {"fwd": 3, "nograd": 3, "bwd": 4, "fwd+bwd": 6}[case.mode] * latent
    raise AssertionError(case.op)


# ---- providers -------------------------------------------------------------------------------


def _examples_vae_loss(recon, target, mu, logvar):
    # pytorch/examples vae/main.py loss_function, on logits, divided by B for the batch mean.
    bce = F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / recon.shape[0]


def _keras_vae_loss(recon, target, mu, logvar):
    # The Keras VAE example: original_dim * mean BCE, plus the mean of the per-row KL.
    xent = recon[0].numel() * F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype))
    kl = -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp(), dim=-1)
    return xent + kl.mean()


def _examples_bernoulli_nll(recon, target):
    return F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype), reduction="sum") / recon.shape[0]


def _keras_bernoulli_nll(recon, target):
    return recon[0].numel() * F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype))


def _eager_gaussian_nll(recon, target):
    # A unit-variance Gaussian decoder as users write it: the summed squared error over 2,
    # plus the constant, over B (F.gaussian_nll_loss with var = 1 and full=True, summed).
    const = recon[0].numel() * 0.5 * math.log(2 * math.pi)
    return 0.5 * F.mse_loss(recon, target.to(recon.dtype), reduction="sum") / recon.shape[0] + const


def _eager_gaussian_nll_optimal(recon, target):
    # The sigma-VAE (orybkin/sigma-vae-pytorch) with its optimal sigma, its soft clip left
    # out (idle at these residuals), over B.
    log_sigma = ((target.to(recon.dtype) - recon) ** 2).mean().sqrt().log()
    return _eager_gaussian_nll_learned(recon, target, log_sigma)


def _eager_gaussian_nll_learned(recon, target, log_scale):
    # A learned sigma as the sigma-VAE's code writes the NLL, over B.
    x = target.to(recon.dtype)
    nll = 0.5 * torch.pow((x - recon) / log_scale.exp(), 2) + log_scale + 0.5 * math.log(2 * math.pi)
    return nll.sum() / recon.shape[0]


def _eager_continuous_bernoulli_nll(recon, target):
    # torch.distributions, as a user reaching for the continuous Bernoulli writes it.
    return -torch.distributions.ContinuousBernoulli(logits=recon).log_prob(target.to(recon.dtype)).sum() / recon.shape[0]


def _examples_gaussian_kl(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]


def _keras_gaussian_kl(mu, logvar):
    return (-0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp(), dim=-1)).mean()


def _eager_prior_kl(mu, logvar, prior_mu, prior_logvar):
    # KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per element.
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1)


def _eager_gaussian_kl_free_bits(mu, logvar, prior_mu, prior_logvar):
    # The KL to the prior per element, then IAF's free bits.
    return _eager_prior_kl(mu, logvar, prior_mu, prior_logvar).mean(dim=0).clamp(min=FREE_BITS).sum()


def _eager_vae_loss_prior(recon, target, mu, logvar, prior_mu, prior_logvar):
    bce = F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype), reduction="sum")
    return (bce + _eager_prior_kl(mu, logvar, prior_mu, prior_logvar).sum()) / recon.shape[0]


def _eager_vae_loss_prior_free_bits(recon, target, mu, logvar, prior_mu, prior_logvar):
    bce = F.binary_cross_entropy_with_logits(recon, target.to(recon.dtype), reduction="sum") / recon.shape[0]
    return bce + _eager_gaussian_kl_free_bits(mu, logvar, prior_mu, prior_logvar)


def _eager_vae_loss_gaussian(recon, target, mu, logvar):
    return _eager_gaussian_nll(recon, target) + _examples_gaussian_kl(mu, logvar)


def _eager_vae_loss_continuous_bernoulli(recon, target, mu, logvar):
    return _eager_continuous_bernoulli_nll(recon, target) + _examples_gaussian_kl(mu, logvar)


def _examples_reparameterize(mu, logvar):
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


_EAGER = {
    "vae_loss": (_examples_vae_loss, _keras_vae_loss),
    "vae_loss_gaussian": (_eager_vae_loss_gaussian, None),
    "vae_loss_continuous_bernoulli": (_eager_vae_loss_continuous_bernoulli, None),
    "bernoulli_nll": (_examples_bernoulli_nll, _keras_bernoulli_nll),
    # No pytorch/examples or Keras formula: one eager form each.
    "gaussian_nll": (_eager_gaussian_nll, None),
    "gaussian_nll_optimal": (_eager_gaussian_nll_optimal, None),
    "gaussian_nll_learned": (_eager_gaussian_nll_learned, None),
    "continuous_bernoulli_nll": (_eager_continuous_bernoulli_nll, None),
    "gaussian_kl": (_examples_gaussian_kl, _keras_gaussian_kl),
    "gaussian_kl_free_bits": (_eager_gaussian_kl_free_bits, None),
    "vae_loss_prior": (_eager_vae_loss_prior, None),
    "vae_loss_prior_free_bits": (_eager_vae_loss_prior_free_bits, None),
    # Keras samples exactly as pytorch/examples does: there is no second formula.
    "reparameterize": (_examples_reparameterize, None),
}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def skip_reason(provider: str, op: str, device: torch.device) -> str | None:
    """None if ``provider`` applies to ``op`` on ``device``, else why it does not."""
    if provider == FLOOR:
        return None
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider.endswith("-keras") and _EAGER[op][1] is None:
        return f"{op} has no separate Keras formula"
    if provider in VAEKERN_PROVIDERS:
        if provider == "triton" and (device.type != "cuda" or triton_interpreted()):
            return "triton is benchmarked on a GPU only, never in the interpreter"
        if provider not in vaekern.available_backends(device):
            return f"vaekern backend {provider!r} is not available on {device.type} in this install"
    return None


def _limit_recompiles() -> None:
    # One compiled function serves every size and dtype of a run, each a static recompile.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _floor(recon, target, mu, logvar):
    # One differentiable ATen op over vae_loss's three differentiable inputs (the floor provider).
    return torch.addcmul(recon, mu, logvar)


@functools.cache
def forward_fn(provider: str, op: str, compile_backend: str = "inductor"):
    """The forward of ``op`` for ``provider``: a callable taking the op's tensors.

    ``compile_backend`` is torch.compile's backend for the compile providers: Inductor for
    every timing; the smoke tests may ask for ``"aot_eager"`` (see conftest.py).
    """
    if provider == FLOOR:
        return _floor
    if provider in VAEKERN_PROVIDERS:
        name, options = VARIANTS.get(op, (op, {}))
        return functools.partial(getattr(vaekern, name), backend=provider, **options)
    fn = _EAGER[op][provider.endswith("-keras")]
    if provider.startswith("compile"):
        _limit_recompiles()
        # Cached per (provider, op), so fwd, bwd and fwd+bwd of one shape share one compile.
        fn = torch.compile(fn, backend=compile_backend, dynamic=False)
    return fn


# ---- inputs ----------------------------------------------------------------------------------

ARGS = {
    "vae_loss": ("recon", "target", "mu", "logvar"),
    "vae_loss_gaussian": ("recon", "target", "mu", "logvar"),
    "vae_loss_continuous_bernoulli": ("recon", "target", "mu", "logvar"),
    "bernoulli_nll": ("recon", "target"),
    "gaussian_nll": ("recon", "target"),
    "gaussian_nll_optimal": ("recon", "target"),
    "gaussian_nll_learned": ("recon", "target", "log_scale"),
    "continuous_bernoulli_nll": ("recon", "target"),
    "gaussian_kl": ("mu", "logvar"),
    "gaussian_kl_free_bits": ("mu", "logvar", "prior_mu", "prior_logvar"),
    "reparameterize": ("mu", "logvar"),
    "vae_loss_prior": ("recon", "target", "mu", "logvar", "prior_mu", "prior_logvar"),
    "vae_loss_prior_free_bits": ("recon", "target", "mu", "logvar", "prior_mu", "prior_logvar"),
}
DIFF_ARGS = {
    "vae_loss": ("recon", "mu", "logvar"),
    "vae_loss_gaussian": ("recon", "mu", "logvar"),
    "vae_loss_continuous_bernoulli": ("recon", "mu", "logvar"),
    "bernoulli_nll": ("recon",),
    "gaussian_nll": ("recon",),
    "gaussian_nll_optimal": ("recon",),
    "gaussian_nll_learned": ("recon", "log_scale"),
    "continuous_bernoulli_nll": ("recon",),
    "gaussian_kl": ("mu", "logvar"),
    "gaussian_kl_free_bits": ("mu", "logvar", "prior_mu", "prior_logvar"),
    "reparameterize": ("mu", "logvar"),
    "vae_loss_prior": ("recon", "mu", "logvar", "prior_mu", "prior_logvar"),
    "vae_loss_prior_free_bits": ("recon", "mu", "logvar", "prior_mu", "prior_logvar"),
}


def call_args(op: str, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``op``'s arguments from an input set: positional, then those it takes by keyword."""
    keywords = KEYWORD_ARGS.get(op, ())
    return [inputs[a] for a in ARGS[op] if a not in keywords], {a: inputs[a] for a in keywords}


def set_bytes(case: Case) -> int:
    """Bytes of one input set (what rotating sets must spread beyond the cache)."""
    b, d, z = case.size.batch, case.size.dim, case.size.latent
    n = 0
    if "recon" in ARGS[case.op]:
        n += b * d * (case.dtype.itemsize + case.target_dtype.itemsize)
    n += 2 * b * z * case.dtype.itemsize
    return n


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """One input set: logits ~ N(0, 1), a binary target, mu ~ N(0, 1), logvar ~ N(0, 0.25)."""
    b, d, z = case.size.batch, case.size.dim, case.size.latent
    dev = case.device
    out = {}
    if "recon" in ARGS[case.op]:
        out["recon"] = torch.randn(b, d, device=dev, dtype=case.dtype)
        out["target"] = (torch.rand(b, d, device=dev) < 0.5).to(case.target_dtype)
    out["mu"] = torch.randn(b, z, device=dev, dtype=case.dtype)
    out["logvar"] = 0.5 * torch.randn(b, z, device=dev, dtype=case.dtype)
    if "log_scale" in ARGS[case.op]:  # a learned sigma near the residuals' (about 1.4)
        out["log_scale"] = torch.full((), 0.3, device=dev, dtype=case.dtype)
    if "prior_mu" in ARGS[case.op]:
        out["prior_mu"] = 0.5 * torch.randn(z, device=dev, dtype=case.dtype)
        out["prior_logvar"] = 0.5 * torch.randn(z, device=dev, dtype=case.dtype)
    if case.op == "reparameterize" and case.mode not in ("fwd", "nograd"):
        out["grad_z"] = torch.randn(b, z, device=dev, dtype=case.dtype)
    for name in DIFF_ARGS[case.op]:
        out[name].requires_grad_(True)
    return out


def n_sets(case: Case, cache_bytes: int, cap: int = 64) -> int:
    """How many input sets to rotate so that together they are 4x the last-level cache."""
    return max(2, min(cap, math.ceil(4 * cache_bytes / max(1, set_bytes(case)))))


# ---- one step ----------------------------------------------------------------------------------


class Step:
    """One timed call of ``provider`` on ``case``, rotating through input sets.

    For ``fwd``, ``fwd+bwd`` and ``nograd`` call the step itself. For ``bwd`` call ``setup()``
    untimed (it runs the forward on the next set) and time ``backward(state)``.
    """

    def __init__(self, case: Case, provider: str, sets: list[dict[str, torch.Tensor]],
                 compile_backend: str = "inductor"):
        self.case = case
        self.provider = provider
        self.forward = forward_fn(provider, case.op, compile_backend)
        self._sets = sets
        self._next = itertools.cycle(range(len(sets)))

    def _call(self, inputs):
        args, kwargs = call_args(self.case.op, inputs)
        return self.forward(*args, **kwargs)

    def _grad(self, out, inputs):
        grad_out = inputs.get("grad_z")  # None: a scalar loss, as loss.backward()
        return torch.autograd.grad(out, [inputs[a] for a in DIFF_ARGS[self.case.op]], grad_out)

    def __call__(self):
        inputs = self._sets[next(self._next)]
        if self.case.mode == "nograd":
            with torch.no_grad():
                return self._call(inputs)
        out = self._call(inputs)
        if self.case.mode == "fwd+bwd":
            return self._grad(out, inputs)
        if self.case.mode == "bwd":
            raise RuntimeError("bwd mode: time backward(setup()), not the step itself")
        return out

    def setup(self):
        inputs = self._sets[next(self._next)]
        return self._call(inputs), inputs

    def backward(self, state):
        return self._grad(*state)

    def run_once(self):
        """One untimed call in whatever mode (warm-up, smoke tests)."""
        return self.backward(self.setup()) if self.case.mode == "bwd" else self()


def check(
    case: Case, provider: str, inputs: dict[str, torch.Tensor], compile_backend: str = "inductor"
) -> float | None:
    """The error of one forward against the float64 reference: relative for the losses, the
    distance from N(0, 1) of the implied noise for ``reparameterize``. NaN or inf when the
    provider's result is not finite (an fp16 sum that overflows, say); None for the floor
    provider, which computes another value."""
    if provider == FLOOR:
        return None
    # Grad mode as in the timed calls: torch.compile recompiles when it changes, and vaekern
    # takes another path (no gradient computed in the forward) under no_grad.
    args, kwargs = call_args(case.op, inputs)
    with torch.set_grad_enabled(case.mode != "nograd"):
        out = forward_fn(provider, case.op, compile_backend)(*args, **kwargs)
    out = out.detach()
    with torch.no_grad():
        if case.op == "reparameterize":
            mu, logvar = inputs["mu"].double(), inputs["logvar"].double()
            eps = (out.double() - mu) / torch.exp(0.5 * logvar)
            if not bool(torch.isfinite(eps).all()):
                return math.inf
            return max(abs(eps.mean().item()), abs(eps.std().item() - 1.0))
        name, options = VARIANTS.get(case.op, (case.op, {}))
        ref = getattr(reference, f"{name}_ref")(*args, **kwargs, **options)
        if name == "vae_loss":
            ref = ref[0]
        got = out.double().item()
        return abs(got - ref.item()) / max(abs(ref.item()), 1e-30)


def overhead_case(mode: str, device: torch.device) -> Case:
    """The overhead case in ``mode`` (module docstring): ``vae_loss`` on 1x1 float32 tensors."""
    if mode not in OVERHEAD_MODES:
        raise ValueError(f"the overhead case's modes are {OVERHEAD_MODES}, got {mode!r}")
    return Case("vae_loss", Size.parse(OVERHEAD_SIZE), torch.float32, torch.float32, mode, device)


def check_ok(case: Case, err: float) -> bool:
    tol = CHECK_NOISE_TOL if case.op == "reparameterize" else CHECK_RTOL[case.dtype]
    return math.isfinite(err) and err <= tol
