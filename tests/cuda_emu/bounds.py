"""Every op of csrc/cuda, under the emulation built with AddressSanitizer, over the layouts
its kernels special-case: a read or write outside any tensor aborts the process with
ASan's report. Run by tests/test_cuda_emulation.py in a subprocess that preloads libasan.

Each tensor is its own allocation that ends where its data ends, so ASan's redzone sits
right after the last element; misaligned inputs are views one element into such an
allocation, which sends the kernels down their scalar paths.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_emu import build  # noqa: E402

# (B, D, Z, dtypes): one element, odd rows, one tile per row, many tiles per row, latents
# wider than a group, in every dtype. Then the paths of huge inputs, per variant: with
# csrc/cuda's own constants, over 256 tiles a row (stage 2 a block per row) and 20 000 rows
# (one flat pre-pass of stage 2), in float32 only, the slowest calls of the sweep; with the
# small constants (build.VARIANTS), the same paths and several pre-passes at a few hundred
# rows, in float32 and float64 (the other widths take the same paths with other vector
# widths, covered by the shapes of every dtype).
ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = [(1, 1, 1, ALL), (3, 7, 5, ALL), (7, 784, 20, ALL), (9, 1271, 33, ALL), (4, 130, 200, ALL)]
HUGE = {"asan": [(2, 33_000, 64, ALL[:1]), (20_000, 3, 1, ALL[:1])],
        "asan_small": [(2, 33_000, 64, ALL[::3]), (301, 3, 1, ALL[::3])]}  # fmt: skip


def exact(t: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """A copy of t in an allocation that ends with it (and starts one element early)."""
    if not misaligned:
        return t.clone()
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def check_guarded() -> None:
    """ASan must see torch's CPU allocations, or this script proves nothing."""
    poisoned = ctypes.CDLL(None).__asan_address_is_poisoned
    t = torch.empty(37)
    assert poisoned(ctypes.c_void_p(t.data_ptr() + t.nbytes)) == 1, "torch's allocations are not guarded by ASan"
    assert poisoned(ctypes.c_void_p(t.data_ptr() + t.nbytes - 1)) == 0


def run(variant: str) -> int:
    """Every op over SHAPES on one ASan build; returns the number of calls."""
    with build.emulated_cuda_backend(variant) as ns:
        return _run(getattr(torch.ops, ns), SHAPES + HUGE[variant])


def _run(ops, shapes) -> int:
    torch.manual_seed(0)
    calls = 0
    for B, D, Z, dtypes in shapes:
        for dtype in dtypes:
            for misaligned in (False, True):
                x = exact((torch.randn(B, D) * 3).to(dtype), misaligned)
                p = exact(torch.rand(B, D).to(dtype), misaligned)
                mu = exact(torch.randn(B, Z).to(dtype), misaligned)
                lv = exact(torch.randn(B, Z).to(dtype), misaligned)
                eps = exact(torch.randn(B, Z).to(dtype), misaligned)
                beta = torch.full((), 0.5)
                # The Gaussian's log_scale, in the accumulation dtype: one for every column,
                # and one per column (ASan's redzone right after column D - 1).
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                log_scales = (torch.full((), 0.3, dtype=acc), exact(torch.randn(D, dtype=acc) * 0.5, misaligned))
                # A prior: one mean per latent (read at row stride 0, ASan's redzone after
                # latent Z - 1) and one log-variance per element.
                prior = (exact(torch.randn(Z, dtype=acc), misaligned), exact(torch.randn(B, Z, dtype=acc), misaligned))
                # A float target with aligned inputs, a bool one (one byte) with misaligned.
                t = exact(torch.rand(B, D) > 0.5 if misaligned else torch.rand(B, D), misaligned)
                # none (per-row outputs) and mean: sum takes mean's memory paths (only the
                # scale differs), and leaving it out keeps CI within its budget.
                for r in (0, 1):
                    scale = torch.rand(B) + 0.5 if r == 0 else torch.full((), 0.7)
                    for inp, logits, kl_prior in ((x, True, prior), (p, False, (None, None))):
                        _, grad = ops.bernoulli_nll(inp, t, logits, r, True)
                        ops.bernoulli_nll_backward_(grad, scale, inp, t, logits, r)
                        # Free bits with the logits' mean: the KL by columns, and its weights.
                        fb = torch.full((), 0.3, dtype=acc) if r and logits else None
                        *_, g, w = ops.vae_loss(inp, t, mu, lv, *kl_prior, fb, beta, beta.new_zeros(()), 0, logits, r, True)
                        ops.vae_loss_backward_(
                            g, scale, scale, scale, inp, t, beta.new_zeros(()), mu, lv, *kl_prior,
                            None if fb is None else w, beta, 0, logits, r,
                        )  # fmt: skip
                        calls += 4
                        # The continuous Bernoulli runs the Bernoulli's tiling and loads as they
                        # are: once per width (4 and 2 bytes) covers its own code.
                        if dtype in (torch.float32, torch.float16):
                            _, grad = ops.continuous_bernoulli_nll(inp, t, logits, r, True)
                            ops.continuous_bernoulli_nll_backward_(grad, scale, inp, t, logits, r)
                            calls += 2
                    for log_scale in log_scales:
                        _, grad = ops.gaussian_nll(x, t, log_scale, r, True)
                        ops.gaussian_nll_backward_(grad, scale, x, t, log_scale, r)
                        calls += 2
                    for kl_prior in ((None, None), prior):
                        ops.gaussian_kl(mu, lv, *kl_prior, r)
                        ops.gaussian_kl_backward(scale, mu, lv, *kl_prior, r)
                        calls += 2
                # The column reduction of free bits (vaekern._ops._common.KL_COLUMNS).
                ops.gaussian_kl(mu, lv, *prior, 3)
                ops.gaussian_kl_backward(exact(torch.rand(Z) + 0.5, misaligned), mu, lv, *prior, 3)
                calls += 2
                seed = torch.tensor([7])
                for e, s in ((eps, None), (None, seed)):
                    z = ops.reparameterize(mu, lv, e, s)
                    ops.reparameterize_backward(exact(z, misaligned), mu, lv, e, s)
                    calls += 2
    return calls


def main() -> None:
    check_guarded()
    # libasan is preloaded into this process; the compiler and ninja that build the
    # variants need none of it.
    os.environ.pop("LD_PRELOAD", None)
    for variant in ("asan", "asan_small"):
        print(f"{variant}: {run(variant)} calls in bounds", flush=True)


if __name__ == "__main__":
    main()
