"""Input builders and comparisons shared by the per-op test files."""

from __future__ import annotations

import torch

from conftest import GRAD_TOL, LOSS_TOL


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
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def upstream(out: torch.Tensor) -> torch.Tensor:
    """An upstream gradient other than 1: 1024 (as under GradScaler) or random per row."""
    if out.dim() == 0:
        return torch.full_like(out, 1024.0)
    return torch.rand_like(out) * 3 + 0.5


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)
