"""The compiled CUDA kernels of csrc/cuda: registration, register use, and their special cases.

The shared, backend-parametrized tests (tests/test_<op>.py) check every op of the ``cuda``
backend against the reference, on a GPU or under the CPU emulation of tests/cuda_emu.
This file adds what is specific to the extension:

* that vaekern._C registers every op for the CUDA dispatch key (no GPU needed);
* that every kernel compiles for sm_80 and sm_90 without register spills (needs nvcc only);
* on a GPU or under the emulation (the ``kernels`` fixture): bitwise determinism, the
  layouts and dtype mixes the kernels special-case (row strides, misaligned rows, many
  tiles per row, many rows), NaN and extreme values, empty batches, and the in-kernel
  Philox noise number by number against known answers;
* on a GPU only: CUDA-graph capture and replay, and agreement with the Triton backend.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import vaekern
from cuda_emu.build import emulated_cuda_backend
from helpers import reference_kernels
from vaekern import _extension, reference
from vaekern._ops import SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _has_cuda_kernels() -> bool:
    return _extension.load() and _extension.has_kernels("CUDA")


needs_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available() or not _has_cuda_kernels(),
    reason="needs a CUDA GPU and vaekern._C built with CUDA kernels",
)


# ---- registration (no GPU) -----------------------------------------------------------------
def test_extension_registers_every_op_for_cuda():
    if not _extension.load():
        pytest.skip("vaekern._C is not built (VAEKERN_BUILD_EXT=0, or no compiler)")
    registered = {
        name: torch._C._dispatch_has_kernel_for_dispatch_key(f"vaekern::{name}", "CUDA") for name in SCHEMAS
    }
    if not any(registered.values()):
        pytest.skip("vaekern._C was built without CUDA kernels (no CUDA toolkit or a CPU-only torch)")
    missing = [name for name, ok in registered.items() if not ok]
    assert not missing, f"ops without a CUDA kernel: {missing}"


# ---- registers and spills (nvcc, no GPU) ---------------------------------------------------
def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> list[dict]:
    """One dict per kernel (entry function) in `nvcc -Xptxas -v` output."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill": 0}
            kernels.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current["spill"] += int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
            current = None  # "Used N registers" closes an entry's report
    return kernels


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    """'void vaekern::cuda::(anonymous namespace)::k<true, c10::Half, float>(args)' -> 'k<true, Half, float>'."""
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0 and name[i - 1] != ":":  # not "::(anonymous namespace)"
            name = name[:i]
            break
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    return name.replace("vaekern::cuda::", "").replace("c10::", "")


def _compile(source: Path, arch: str, nvcc: str) -> tuple[Path, str, str, int]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    include = Path(torch.__file__).parent / "include"
    cmd = [
        nvcc, "-cubin", "-o", os.devnull, f"-arch={arch}", "-std=c++20", "-O3", "-Xptxas", "-v",
        *COMMON_NVCC_FLAGS, f"-I{include}", f"-I{ROOT / 'csrc'}", str(source),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, proc.stdout + proc.stderr, proc.returncode


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no csrc/cuda/*.cu sources")
def test_kernels_do_not_spill():
    """Device-only compiles (-cubin) of every .cu for sm_80 and sm_90, in parallel."""
    nvcc = _nvcc()
    jobs = [(src, arch) for src in CUDA_SOURCES for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda job: _compile(*job, nvcc), jobs))

    rows = []
    for source, arch, text, rc in results:
        assert rc == 0, f"nvcc failed on {source.name} for {arch}:\n{text[-4000:]}"
        kernels = parse_ptxas(text)
        assert kernels, f"no kernels reported for {source.name} ({arch})"
        names = _demangle([k["kernel"] for k in kernels])
        for k, name in zip(kernels, names):
            rows.append((source.name, arch, _short(name), k["registers"], k["spill"]))

    width = max(len(r[2]) for r in rows)
    print(f"\n{'file':<20} {'arch':<6} {'kernel':<{width}} {'regs':>4} {'spill B':>7}")
    for file, arch, name, regs, spill in rows:
        print(f"{file:<20} {arch:<6} {name:<{width}} {regs:>4} {spill:>7}")
    spilled = [r for r in rows if r[4]]
    assert not spilled, f"kernels that spill registers: {spilled}"


def test_parse_ptxas():
    text = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    16 bytes stack frame, 12 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z1jv' for 'sm_80'
ptxas info    : Function properties for _Z1jv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
"""
    assert parse_ptxas(text) == [
        {"kernel": "_Z1kv", "arch": "sm_90", "registers": 64, "spill": 40},
        {"kernel": "_Z1jv", "arch": "sm_80", "registers": 30, "spill": 0},
    ]


# ---- the kernels' special cases: on a GPU, or under the CPU emulation -------------------------
@pytest.fixture(params=[None] if torch.cuda.is_available() else ["", "small"],
                ids=lambda v: "gpu" if v is None else "_".join(filter(None, ("emulated", v))))  # fmt: skip
def kernels(request):
    """(ops, device) of csrc/cuda's kernels: on the GPU where there is one, else the same
    sources under the CPU emulation of tests/cuda_emu (as built, and with tiny tiling
    constants), on CPU tensors."""
    if request.param is None:
        if not _has_cuda_kernels():
            pytest.skip("vaekern._C was built without CUDA kernels")
        yield torch.ops.vaekern, torch.device("cuda")
        return
    with emulated_cuda_backend(request.param) as ns:
        yield getattr(torch.ops, ns), torch.device("cpu")


def _close(actual, expected, dtype=torch.float32, atol=None, rtol=None):
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 2e-5), torch.float16: (1e-3, 1e-4),
           torch.bfloat16: (1e-3, 1e-4)}[dtype]  # fmt: skip
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol[0] if atol is None else atol, rtol=tol[1] if rtol is None else rtol
    )


@needs_cuda_backend
def test_cuda_graph_vae_loss_forward_backward():
    dev = torch.device("cuda")
    B, D, Z = 64, 784, 20
    recon = torch.randn(B, D, device=dev, requires_grad=True)
    target = torch.rand(B, D, device=dev)
    mu = torch.randn(B, Z, device=dev, requires_grad=True)
    logvar = torch.randn(B, Z, device=dev, requires_grad=True)
    beta = torch.full((), 0.5, device=dev)

    def step():
        for t in (recon, mu, logvar):
            t.grad = None
        loss = vaekern.vae_loss(recon, target, mu, logvar, beta=beta, backend="cuda")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(3):
        with torch.no_grad():
            recon.copy_(torch.randn_like(recon))
            mu.copy_(torch.randn_like(mu))
            beta.fill_(float(torch.rand(())))  # annealing beta in place needs no recapture
        graph.replay()
        torch.cuda.synchronize()
        r = recon.detach().clone().requires_grad_()
        m = mu.detach().clone().requires_grad_()
        lv = logvar.detach().clone().requires_grad_()
        expected = reference.vae_loss_ref(r, target, m, lv, beta=beta)[0]
        expected.backward()
        _close(static_loss, expected)
        _close(recon.grad, r.grad, atol=1e-6, rtol=1e-5)
        _close(mu.grad, m.grad, atol=1e-6, rtol=1e-5)
        _close(logvar.grad, lv.grad, atol=1e-6, rtol=1e-5)


@needs_cuda_backend
def test_cuda_graph_reparameterize_fresh_noise_per_replay():
    dev = torch.device("cuda")
    mu = torch.zeros(256, 64, device=dev)
    logvar = torch.zeros(256, 64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vaekern.reparameterize(mu, logvar, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = vaekern.reparameterize(mu, logvar, backend="cuda")
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z), "a replay reused the captured seed"
    for sample in (first, z):
        assert abs(sample.mean().item()) < 0.05
        assert abs(sample.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_reparameterize_seed_noise_is_regenerated_in_backward(dtype, kernels):
    ops, dev = kernels
    mu = torch.randn(33, 17, device=dev, dtype=dtype)
    logvar = torch.randn(33, 17, device=dev, dtype=dtype)
    seed = torch.randint(2**62, (1,), device=dev, dtype=torch.int64)
    zeros = torch.zeros_like(mu)
    eps = ops.reparameterize(zeros, zeros, None, seed)
    assert torch.equal(eps, ops.reparameterize(zeros, zeros, None, seed))  # same seed, same noise
    z_seed = ops.reparameterize(mu, logvar, None, seed)
    z_eps = ops.reparameterize(mu, logvar, eps, None)
    if dtype in (torch.float32, torch.float64):
        _close(z_seed, z_eps, dtype)
    grad_z = torch.randn_like(mu)
    g_mu, g_lv = ops.reparameterize_backward(grad_z, mu, logvar, None, seed)
    assert torch.equal(g_mu, grad_z)
    expected = grad_z.double() * 0.5 * torch.exp(0.5 * logvar.double()) * eps.double()
    torch.testing.assert_close(g_lv.double(), expected, atol=2e-3, rtol=2e-2)


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) in numpy, on arrays of uint32 words."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(w, dtype=np.uint64) for w in counter]
    k0, k1 = (np.uint64(w) for w in key)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return c


def test_philox_reference_matches_the_random123_known_answers():
    known = [  # (counter, key) -> output, from Random123's kat_vectors
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for counter, key, expected in known:
        assert tuple(int(w) for w in _philox4x32_10(counter, key)) == expected


def test_in_kernel_noise_is_philox_and_box_muller(kernels):
    """eps of element 4k + j is normal j of Philox4x32-10(counter (k, 0), key seed) under
    Box-Muller, as reparameterize.cu's header says: checked number by number, with an
    odd tail."""
    ops, dev = kernels
    seed = 0x1234_5678_9ABC_DEF0
    zeros = torch.zeros(7, 573, device=dev)  # 4011 elements: 1002 full groups and 3 more
    eps = ops.reparameterize(zeros, zeros, None, torch.tensor([seed], device=dev)).flatten().double().cpu()
    k = np.arange((eps.numel() + 3) // 4, dtype=np.uint64)
    words = _philox4x32_10((k & np.uint64(0xFFFFFFFF), k >> np.uint64(32), 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    # A uint32 as a float in (0, 1], in float32 as the kernel does it.
    u = [w.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33) for w in words]
    r0, r1 = (np.sqrt(-2.0 * np.log(x.astype(np.float64))) for x in (u[0], u[2]))
    a0, a1 = (2.0 * np.pi * x.astype(np.float64) for x in (u[1], u[3]))
    expected = np.stack([r0 * np.cos(a0), r0 * np.sin(a0), r1 * np.cos(a1), r1 * np.sin(a1)], axis=1).reshape(-1)
    # The device's logf and sincospif are within a few ulp; an fma in the kernel's (0, 1]
    # mapping moves u by an ulp, which near u = 1 moves small normals by up to ~1e-4.
    torch.testing.assert_close(eps, torch.from_numpy(expected[: eps.numel()]), atol=1e-3, rtol=1e-5)


def test_reparameterize_noise_is_standard_normal(kernels):
    ops, dev = kernels
    zeros = torch.zeros(1 << 20, device=dev)
    seed = torch.tensor([12345], device=dev)
    eps = ops.reparameterize(zeros, zeros, None, seed).double()
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.var().item() - 1.0) < 5e-3
    assert abs((eps**4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    assert torch.isfinite(eps).all()


def test_forward_is_bitwise_deterministic(kernels, monkeypatch):
    """The same bits on every run. Under the emulation, whose runs are deterministic by
    construction, each repeat takes another order of blocks, threads and warps (the GPU
    ignores VKEMU_SCHEDULE and schedules as it likes)."""
    ops, dev = kernels
    recon = torch.randn(513, 3 * 32 * 32, device=dev)
    target = torch.rand_like(recon)
    mu, logvar = torch.randn(513, 64, device=dev), torch.randn(513, 64, device=dev)
    beta = torch.ones((), device=dev)
    first = ops.vae_loss(recon, target, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, 1, True)
    for schedule in ("reverse", "shuffled:1", "greedy", "shuffled:2", "forward"):
        monkeypatch.setenv("VKEMU_SCHEDULE", schedule)
        again = ops.vae_loss(recon, target, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, 1, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# (B, D): one tile per row, many tiles per row (stage 2 per row), many rows (flat pre-pass),
# an odd row length (misaligned rows, scalar path), one element per row.
LAYOUT_SHAPES = [(7, 784), (3, 300_001), (70_000, 3), (41, 1271), (1000, 1)]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_bernoulli_nll_layouts(shape, from_logits, reduction, kernels):
    ops, dev = kernels
    x = torch.randn(shape, device=dev) * 4
    if not from_logits:
        x = torch.sigmoid(x)
    t = torch.rand(shape, device=dev)
    out, grad = ops.bernoulli_nll(x, t, from_logits, reduction, True)
    ref_out, ref_grad = reference_kernels.bernoulli_nll(x, t, from_logits, reduction, True)
    _close(out, ref_out, rtol=1e-5)
    _close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_bernoulli_nll_target_dtypes(dtype, target_dtype, kernels):
    ops, dev = kernels
    x = (torch.randn(9, 3, 16, 16, device=dev) * 3).to(dtype)
    t = (torch.rand(x.shape, device=dev) > 0.5).to(target_dtype)
    out, grad = ops.bernoulli_nll(x, t, True, 0, True)
    ref_out, ref_grad = reference_kernels.bernoulli_nll(x, t, True, 0, True)
    _close(out, ref_out, dtype)
    _close(grad, ref_grad, atol=1e-3 if dtype != torch.float64 else 1e-10, rtol=1e-2 if dtype == torch.float16 else 1e-5)


def test_row_strided_and_non_contiguous_inputs(kernels):
    ops, dev = kernels
    base = torch.randn(16, 2, 28, 28, device=dev)
    x = base[:, 0]  # rows 1568 apart: read in place with a row stride
    t = torch.rand(16, 28, 28, device=dev).transpose(1, 2)  # not row-contiguous: copied
    for impl in (ops, reference_kernels):
        assert impl.bernoulli_nll(x, t, True, 0, False)[0].shape == (16,)
    out, grad = ops.bernoulli_nll(x, t, True, 2, True)
    ref_out, ref_grad = reference_kernels.bernoulli_nll(x, t, True, 2, True)
    _close(out, ref_out)
    _close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert grad.is_contiguous()
    mu, logvar = torch.randn(16, 8, 3, device=dev)[:, :, 1], torch.randn(16, 8, device=dev)
    _close(ops.gaussian_kl(mu, logvar, None, None, 0), reference_kernels.gaussian_kl(mu, logvar, None, None, 0))


@pytest.mark.parametrize("recon_dtype,latent_dtype", [(torch.float16, torch.float64), (torch.float64, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])  # fmt: skip
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_vae_loss_mixed_dtypes(recon_dtype, latent_dtype, reduction, kernels):
    ops, dev = kernels
    recon = torch.randn(12, 1, 28, 28, device=dev).to(recon_dtype)
    target = torch.rand(12, 1, 28, 28, device=dev)
    mu = torch.randn(12, 20, device=dev).to(latent_dtype)
    logvar = torch.randn(12, 20, device=dev).to(latent_dtype)
    acc = torch.float64 if torch.float64 in (recon_dtype, latent_dtype) else torch.float32
    beta = torch.full((), 0.7, device=dev, dtype=acc)
    got = ops.vae_loss(recon, target, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, reduction, True)
    ref = reference_kernels.vae_loss(recon, target, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, reduction, True)
    for g, r in zip(got[:3], ref[:3]):
        assert g.dtype == r.dtype == acc
        _close(g, r, rtol=1e-5)
    _close(got[3], ref[3], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_vae_loss_backward_scales(reduction, kernels):
    ops, dev = kernels
    B = 10
    recon, target = torch.randn(B, 50, device=dev), torch.rand(B, 50, device=dev)
    mu, logvar = torch.randn(B, 6, device=dev), torch.randn(B, 6, device=dev)
    beta = torch.full((), 0.3, device=dev)
    shape = (B,) if reduction == 0 else ()
    grads = [torch.randn(shape, device=dev) for _ in range(3)]
    outs = {}
    for name, impl in (("cuda", ops), ("reference", reference_kernels)):
        saved = impl.vae_loss(recon, target, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, reduction, True)[3]
        g_mu, g_lv, _, _ = impl.vae_loss_backward_(saved, *grads, recon, target, beta.new_zeros(()), mu, logvar, None, None, None, beta, 0, True, reduction)
        outs[name] = (saved, g_mu, g_lv)
    for a, b in zip(outs["cuda"], outs["reference"]):
        _close(a, b, atol=1e-6, rtol=1e-5)


def test_backward_with_unit_scale_keeps_the_gradient_and_nan_propagates(kernels):
    ops, dev = kernels
    x, t = torch.randn(4, 100, device=dev), torch.rand(4, 100, device=dev)
    _, grad = ops.bernoulli_nll(x, t, True, 0, True)
    before = grad.clone()
    ops.bernoulli_nll_backward_(grad, torch.ones(4, device=dev), x, t, True, 0)
    assert torch.equal(grad, before)
    ops.bernoulli_nll_backward_(grad, torch.tensor([1.0, float("nan"), 2.0, 1.0], device=dev), x, t, True, 0)
    assert torch.equal(grad[0], before[0]) and torch.equal(grad[3], before[3])
    assert grad[1].isnan().all()
    torch.testing.assert_close(grad[2], 2 * before[2])


def test_nan_in_nan_out_and_extreme_values(kernels):
    ops, dev = kernels
    x = torch.tensor([[1e4, -1e4, 0.0], [float("nan"), 0.5, 0.5]], device=dev)
    t = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], device=dev)
    out, grad = ops.bernoulli_nll(x, t, True, 0, True)
    assert torch.isfinite(out[0]) and out[1].isnan()
    assert torch.isfinite(grad[0]).all() and grad[1, 0].isnan()
    p = torch.tensor([[0.0, 1.0, float("nan")]], device=dev)
    out, grad = ops.bernoulli_nll(p, torch.tensor([[1.0, 0.0, 1.0]], device=dev), False, 0, True)
    assert out.isnan().all() and torch.isfinite(grad[0, :2]).all() and grad[0, 2].isnan()
    out, _ = ops.bernoulli_nll(p[:, :2], torch.tensor([[1.0, 0.0]], device=dev), False, 0, False)
    _close(out, torch.tensor([200.0], device=dev))  # both logs clamped at -100
    mu = torch.tensor([[0.0, 0.0, float("nan")]], device=dev)
    lv = torch.tensor([[100.0, -100.0, 0.0]], device=dev)
    kl = ops.gaussian_kl(mu[:, :2], lv[:, :2], None, None, 0)
    assert torch.isfinite(kl).all()
    _close(kl, reference_kernels.gaussian_kl(mu[:, :2], lv[:, :2], None, None, 0))
    assert ops.gaussian_kl(mu, lv, None, None, 2).isnan()
    assert ops.gaussian_kl(lv, mu, None, None, 2).isnan()


def test_empty_batch(kernels):
    ops, dev = kernels
    x = torch.randn(0, 5, device=dev)
    for red in (0, 1, 2):
        got = ops.bernoulli_nll(x, x, True, red, True)
        ref = reference_kernels.bernoulli_nll(x, x, True, red, True)
        torch.testing.assert_close(got[0], ref[0], equal_nan=True)
        assert got[1].shape == ref[1].shape
        mu = torch.randn(0, 3, device=dev)
        torch.testing.assert_close(
            ops.gaussian_kl(mu, mu, None, None, red), reference_kernels.gaussian_kl(mu, mu, None, None, red), equal_nan=True
        )
        # The KL stream of an empty batch has no storage: stage 2 must still write kl and loss.
        beta = torch.full((), 0.5, device=dev)
        got = ops.vae_loss(x, x, mu, mu, None, None, None, beta, beta.new_zeros(()), 0, True, red, True)
        ref = reference_kernels.vae_loss(x, x, mu, mu, None, None, None, beta, beta.new_zeros(()), 0, True, red, True)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
        for g, r in zip(got[:3], ref[:3]):
            torch.testing.assert_close(g, r, equal_nan=True)


def test_loss_does_not_depend_on_compute_grad(kernels):
    """Rows 16-byte aligned in the inputs but not in the contiguous gradient (D = 30 in rows
    of 32): the loss is the same bits with and without the gradient written."""
    ops, dev = kernels
    x = torch.randn(64, 32, device=dev)[:, :30]
    t = torch.rand(64, 32, device=dev)[:, :30]
    for reduction in (0, 1, 2):
        with_grad = ops.bernoulli_nll(x, t, True, reduction, True)[0]
        without = ops.bernoulli_nll(x, t, True, reduction, False)[0]
        assert torch.equal(with_grad, without)


@needs_cuda_backend
@pytest.mark.skipif(
    not torch.cuda.is_available() or "triton" not in vaekern.available_backends("cuda"),
    reason="needs a CUDA GPU and the triton backend",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_agrees_with_triton(dtype, reduction):
    dev = torch.device("cuda")
    recon = torch.randn(64, 1, 28, 28, device=dev, dtype=dtype)
    target = torch.rand(64, 1, 28, 28, device=dev)
    mu, logvar = torch.randn(64, 20, device=dev, dtype=dtype), torch.randn(64, 20, device=dev, dtype=dtype)
    got = vaekern.vae_loss(recon, target, mu, logvar, reduction=reduction, return_parts=True, backend="cuda")
    want = vaekern.vae_loss(recon, target, mu, logvar, reduction=reduction, return_parts=True, backend="triton")
    for a, b in zip(got, want):
        _close(a, b, dtype)
