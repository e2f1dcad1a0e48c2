"""The fused CPU kernels (csrc/cpu): registration, determinism, in-op noise, dispatch.

Values and gradients against the reference are checked by the per-op test files for
every backend; this file checks what is specific to the CPU kernels: that all eight ops
are registered for the CPU key, that results are bitwise independent of the thread count
(fixed chunking, fixed-order sums), that every instruction-set variant (AVX-512, AVX2,
the portable default) is correct, and the backend choice when the extension is missing.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compile_cache import capability_env
from conftest import LOSS_TOL
from helpers import HIDE_EXTENSION, latents, logits, probs, target

import vaekern
from vaekern import _extension, backends
from vaekern._ops import SCHEMAS
from vaekern._ops._common import KL_COLUMNS

pytestmark = pytest.mark.skipif(
    "cpu" not in vaekern.available_backends("cpu"), reason="vaekern._C is not built with the CPU kernels"
)

ops = torch.ops.vaekern

# (rows, cols): one chunk per row, several chunks per row (kChunk = 8192), a ragged tail.
DETERMINISM_SHAPES = ((64, 784), (3, 20001), (1, 70000), (257, 33))


@pytest.fixture
def threads():
    """Runs the test body at a given thread count, restoring the previous one."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _at_threads(set_threads, n, fn):
    set_threads(n)
    return fn()


def _bitwise_equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_bitwise_equal(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_all_ops_registered_for_cpu():
    for name in SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vaekern::{name}", "CPU"), name
    assert _extension.has_kernels("CPU")


def test_backend_cpu_is_the_extension():
    assert backends.resolve("cpu", torch.device("cpu")).namespace == "vaekern"
    assert backends.auto(torch.device("cpu")) == "cpu"


def test_cpu_unavailable_without_extension():
    """An install without vaekern._C: backend="cpu" raises, auto picks the reference."""
    code = HIDE_EXTENSION + (
        "import torch, pytest, vaekern\n"
        "from vaekern import backends\n"
        "with pytest.raises(vaekern.BackendUnavailableError, match='cpu.*not built'):\n"
        "    backends.resolve('cpu', torch.device('cpu'))\n"
        "assert backends.auto(torch.device('cpu')) == 'reference'\n"
        "assert backends.resolve('auto', torch.device('cpu')) is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shape", DETERMINISM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_bernoulli_nll_thread_count_invariant(threads, shape, dtype, from_logits):
    x = logits(shape, dtype, "cpu") if from_logits else probs(shape, dtype, "cpu")
    t = target(shape, "float", "cpu", dtype)
    for reduction in (0, 1, 2):
        run = lambda: ops.bernoulli_nll(x, t, from_logits, reduction, True)  # noqa: E731
        one, two = _at_threads(threads, 1, run), _at_threads(threads, 2, run)
        assert _bitwise_equal(one, two)


@pytest.mark.parametrize("shape", DETERMINISM_SHAPES, ids=str)
def test_vae_loss_thread_count_invariant(threads, shape):
    x = logits(shape, torch.float32, "cpu")
    t = target(shape, "bool", "cpu")
    mu, logvar = latents((shape[0], 37), torch.float32, "cpu")
    beta = torch.tensor(0.7)
    g = torch.randn(shape[0])

    def run():
        loss, rec, kl, grad, _ = ops.vae_loss(x, t, mu, logvar, None, None, None, beta, beta.new_zeros(()), 0, True, 0, True)
        g_mu, g_lv, _, _ = ops.vae_loss_backward_(grad, g, g * 0.5, g * 2.0, x, t, beta.new_zeros(()), mu, logvar, None, None, None, beta, 0, True, 0)
        return loss, rec, kl, grad, g_mu, g_lv

    assert _bitwise_equal(_at_threads(threads, 1, run), _at_threads(threads, 2, run))


def test_latent_ops_thread_count_invariant(threads):
    mu, logvar = latents((4099, 64), torch.float32, "cpu")
    seed = torch.tensor([123456789], dtype=torch.int64)
    g = torch.randn(4099, 64)
    prior_mu, prior_logvar = torch.randn(64) * 0.5, torch.randn(64) * 0.5

    def run():
        return (
            ops.gaussian_kl(mu, logvar, None, None, 1),
            *ops.gaussian_kl_backward(torch.tensor(3.0), mu, logvar, None, None, 1),
            # The column reduction (free bits) with a learned prior, its upstream per column.
            ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, KL_COLUMNS),
            *ops.gaussian_kl_backward(g[0], mu, logvar, prior_mu, prior_logvar, KL_COLUMNS),
            ops.reparameterize(mu, logvar, None, seed),
            *ops.reparameterize_backward(g, mu, logvar, None, seed),
        )

    assert _bitwise_equal(_at_threads(threads, 1, run), _at_threads(threads, 2, run))


def test_noise_depends_on_seed_and_index_only():
    seed = torch.tensor([2**61 + 12345], dtype=torch.int64)
    zeros = torch.zeros(5001, dtype=torch.float64)
    eps = ops.reparameterize(zeros, zeros, None, seed)
    # A shorter tensor, or another shape, sees the same noise at the same flat index.
    assert torch.equal(ops.reparameterize(zeros[:1234], zeros[:1234], None, seed), eps[:1234])
    z2 = torch.zeros(3, 1667)
    assert torch.equal(ops.reparameterize(z2, z2, None, seed).reshape(-1), eps[:5001].float())
    assert not torch.equal(ops.reparameterize(zeros, zeros, None, seed + 1), eps)


def test_noise_is_standard_normal():
    zeros = torch.zeros(1_000_000)
    eps = ops.reparameterize(zeros, zeros, None, torch.tensor([7], dtype=torch.int64)).double()
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.std().item() - 1.0) < 5e-3
    assert abs((eps.abs() < 1).double().mean().item() - 0.682689) < 3e-3
    assert eps.isfinite().all()


def test_seeded_backward_regenerates_the_forward_noise():
    mu, logvar = latents((9, 21), torch.float32, "cpu")
    seed = torch.tensor([99], dtype=torch.int64)
    zeros = torch.zeros_like(mu)
    eps = ops.reparameterize(zeros, zeros, None, seed)
    assert torch.equal(ops.reparameterize(mu, logvar, None, seed), ops.reparameterize(mu, logvar, eps, None))
    g = torch.randn_like(mu)
    assert _bitwise_equal(
        ops.reparameterize_backward(g, mu, logvar, None, seed), ops.reparameterize_backward(g, mu, logvar, eps, None)
    )


def test_manual_seed_reproduces_sample():
    mu, logvar = latents((8, 16), torch.float32, "cpu")
    torch.manual_seed(3)
    a = vaekern.reparameterize(mu, logvar, backend="cpu")
    b = vaekern.reparameterize(mu, logvar, backend="cpu")
    torch.manual_seed(3)
    assert torch.equal(vaekern.reparameterize(mu, logvar, backend="cpu"), a)
    assert not torch.equal(a, b)


def test_backward_skips_rows_scaled_by_exactly_one():
    x = logits((4, 50), torch.float32, "cpu")
    t = target((4, 50), "float", "cpu")
    _, grad = ops.bernoulli_nll(x, t, True, 0, True)
    saved = grad.clone()
    ops.bernoulli_nll_backward_(grad, torch.tensor([1.0, 2.0, float("nan"), 1.0]), x, t, True, 0)
    assert torch.equal(grad[0], saved[0]) and torch.equal(grad[3], saved[3])
    assert torch.equal(grad[1], saved[1] * 2)
    assert grad[2].isnan().all()


def test_large_gradient_buffer():
    """Gradients of 4 MiB and more come from the huge-page allocator; they must behave."""
    x = logits((512, 3072), torch.float32, "cpu").requires_grad_()
    t = target((512, 3072), "float", "cpu")
    loss = vaekern.bernoulli_nll(x, t, backend="cpu")
    loss.backward()
    expected = (torch.sigmoid(x.detach().double()) - t.double()) / 512
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-9, rtol=1e-5)
    x.grad.add_(1.0).resize_(3072, 512)  # an ordinary, resizable tensor
    del x, loss


_CAPABILITY_CHECK = textwrap.dedent(
    """
    import torch, vaekern
    from vaekern.reference import bernoulli_nll_ref, gaussian_kl_ref
    torch.manual_seed(0)
    x = torch.randn(37, 1000) * 3; t = torch.rand(37, 1000)
    p = torch.rand(37, 1000) * 0.96 + 0.02
    mu = torch.randn(37, 20); lv = torch.randn(37, 20)
    for inp, fl in ((x, True), (p, False)):
        for dt in (torch.float32, torch.float64):
            a = vaekern.bernoulli_nll(inp.to(dt), t, from_logits=fl, reduction="none", backend="cpu")
            r = bernoulli_nll_ref(inp.to(dt), t, from_logits=fl, reduction="none")
            torch.testing.assert_close(a.double(), r, atol={atol}, rtol={rtol})
    torch.testing.assert_close(vaekern.gaussian_kl(mu, lv, reduction="none", backend="cpu").double(),
                               gaussian_kl_ref(mu, lv, reduction="none"), atol={atol}, rtol={rtol})
    z = torch.ops.vaekern.reparameterize(torch.zeros(100000), torch.zeros(100000), None, torch.tensor([5]))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert cache_dir().endswith(".capability-{capability}"), cache_dir()
    print("ok")
    """
)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_capabilities(capability):
    """ATEN_CPU_CAPABILITY selects the kernels' instruction set as it does PyTorch's."""
    atol, rtol = LOSS_TOL[torch.float32]
    env = capability_env(capability)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(vaekern.__file__)), env.get("PYTHONPATH", "")])
    code = _CAPABILITY_CHECK.format(atol=atol, rtol=rtol, capability=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_lowered_capability_gets_its_own_compile_cache(monkeypatch, tmp_path):
    """torch.compile's caches ignore ATEN_CPU_CAPABILITY: a process that lowers it must not
    share the compile cache of this one, nor of another capability, even after this process
    has compiled (Inductor then writes its cache dir into os.environ)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    for parent in (None, str(tmp_path / "inductor")):
        if parent is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", parent)
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
        own = os.path.abspath(parent or default_cache_dir())
        envs = {cap: capability_env(cap) for cap in ("default", "avx2", "avx512")}
        dirs = {cap: env["TORCHINDUCTOR_CACHE_DIR"] for cap, env in envs.items()}
        assert len({own, *dirs.values()}) == 4, dirs
        assert len({env["TRITON_CACHE_DIR"] for env in envs.values()}) == 3
        for cap, env in envs.items():
            assert env["ATEN_CPU_CAPABILITY"] == cap
            assert not env["TRITON_CACHE_DIR"].startswith(own + os.sep)
            # A lowered process's own child is keyed on the child's capability alone.
            assert capability_env("avx2", env)["TORCHINDUCTOR_CACHE_DIR"] == dirs["avx2"]


@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
def test_float32_loss_within_two_ulp(t):
    """The inline vectorized exp/log keep each element's NLL within 2 ulp of float64."""
    from vaekern.reference import bernoulli_nll_ref

    x = (torch.rand(200_000, 1, dtype=torch.float64) * 60 - 30).float()  # one element per row
    tt = torch.full_like(x, t)
    out = vaekern.bernoulli_nll(x, tt, reduction="none", backend="cpu").double()
    ref = bernoulli_nll_ref(x, tt, reduction="none")
    mag = ref.float().abs()
    ulp = (torch.nextafter(mag, torch.tensor(float("inf"))) - mag).double()
    assert ((out - ref).abs() / ulp).max() <= 2.0
