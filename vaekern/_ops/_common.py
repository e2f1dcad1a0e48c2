"""What every op module of ``vaekern._ops`` shares: the reduction code, output dtypes,
fake-output shapes and the per-row scaling of a saved gradient.

A leaf: it imports nothing from vaekern, so every op module, the Triton launchers and the
backend registry can import it without a circle.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ``reduction`` as the kernels take it, an int as in ``at::Reduction``: 0 none (one value
# per row, shape (B,)), 1 mean over rows, 2 sum over rows.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


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


def scaled_rows(saved: Tensor, scale: Tensor) -> Tensor:
    """``saved * scale`` per row, out of place, in saved's dtype.

    The traced path's backward: AOTAutograd's partitioner cannot take an in-place update
    of a saved forward output, and Inductor fuses this multiply into its consumer."""
    return (saved * per_row(scale, saved.shape[0], saved.dim())).to(saved.dtype)


# Calls a kernel op below the Autograd dispatch key. The eager path calls the kernels from
# inside its own autograd.Function (or with no gradient needed at all), where the op's
# registered autograd would only check grad mode and redispatch: in Python, about 7 us a
# call on 1x1 tensors against 1 us for this guard (2 EPYC cores, torch 2.14.1), which at
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


def no_double_backward(op: str) -> None:
    """Raise if backward is asked to build a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"vaekern.{op}: double backward (create_graph=True) is not supported, because the "
            "reconstruction gradient is computed in the forward pass and has no graph of its own. "
            'Use backend="reference" (plain PyTorch autograd) for higher-order gradients.'
        )


def take_saved_grad(ctx) -> Tensor | None:
    """The gradient that the forward computed, for the first backward only; None after.

    The eager backward scales it in place, so a second backward through the same graph
    (``retain_graph=True``) must recompute it instead. Dropping ctx's reference also lets
    AccumulateGrad adopt the buffer as ``.grad`` without a copy."""
    grad, ctx.saved_grad = ctx.saved_grad, None
    return grad
