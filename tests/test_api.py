"""The public contract: argument checks that name the argument, backend choice, imports."""

import subprocess
import sys

import pytest
import torch

import vaekern
from helpers import HIDE_TRITON_AND_EXTENSION

from vaekern import BackendUnavailableError


def _inputs(b=4, d=10, z=3):
    return torch.randn(b, d), torch.rand(b, d), torch.randn(b, z), torch.randn(b, z)


BAD_CALLS = [
    # (description, call, exception, the words the message must contain)
    ("mismatched target shape", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t[:, :5]), ValueError, "target"),
    ("int logits", lambda r, t, m, lv: vaekern.bernoulli_nll(r.long(), t), TypeError, "input"),
    ("int target", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t.long()), TypeError, "target"),
    ("0-d input", lambda r, t, m, lv: vaekern.bernoulli_nll(r[0, 0], t[0, 0]), ValueError, "input"),
    ("list input", lambda r, t, m, lv: vaekern.bernoulli_nll(r.tolist(), t), TypeError, "input"),
    ("unknown reduction", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t, reduction="avg"), ValueError, "reduction"),
    ("unknown backend", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t, backend="tpu"), ValueError, "backend"),
    ("from_logits not bool", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t, from_logits=1), TypeError, "from_logits"),
    ("target needs grad", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t.requires_grad_()), ValueError, "target"),
    ("logvar shape", lambda r, t, m, lv: vaekern.gaussian_kl(m, lv[:, :2]), ValueError, "logvar"),
    ("logvar dtype", lambda r, t, m, lv: vaekern.gaussian_kl(m, lv.double()), TypeError, "logvar"),
    ("kl reduction", lambda r, t, m, lv: vaekern.gaussian_kl(m, lv, reduction="batchmean"), ValueError, "reduction"),
    ("eps shape", lambda r, t, m, lv: vaekern.reparameterize(m, lv, eps=torch.randn(4, 2)), ValueError, "eps"),
    ("eps dtype", lambda r, t, m, lv: vaekern.reparameterize(m, lv, eps=torch.randn(4, 3).double()), TypeError, "eps"),
    (
        "eps and generator",
        lambda r, t, m, lv: vaekern.reparameterize(m, lv, eps=torch.randn(4, 3), generator=torch.Generator()),
        ValueError,
        "generator",
    ),
    ("batch mismatch", lambda r, t, m, lv: vaekern.vae_loss(r, t, m[:3], lv[:3]), ValueError, "batch size"),
    ("beta vector", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=torch.ones(2)), TypeError, "beta"),
    ("beta string", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta="1"), TypeError, "beta"),
    ("beta bool", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=True), TypeError, "beta"),
    (
        "beta needs grad",
        lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=torch.tensor(1.0, requires_grad=True)),
        ValueError,
        "beta",
    ),
    ("vae reduction", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, reduction="batch"), ValueError, "reduction"),
    ("vae backend", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, backend="Triton"), ValueError, "backend"),
    ("vae mu dtype", lambda r, t, m, lv: vaekern.vae_loss(r, t, m.int(), lv), TypeError, "mu"),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call(*_inputs())


def test_mismatched_devices_name_the_argument():
    r, t, m, lv = _inputs()
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="logvar is on meta"):
        vaekern.gaussian_kl(m, meta)
    with pytest.raises(ValueError, match="mu is on meta"):
        vaekern.vae_loss(r, t, meta, meta)
    with pytest.raises(ValueError, match="target is on meta"):
        vaekern.bernoulli_nll(r, torch.empty(4, 10, device="meta"))


def test_requested_backend_that_cannot_serve_raises():
    r, t, m, lv = _inputs()
    with pytest.raises(BackendUnavailableError, match="backend='cuda'.*CUDA tensors"):
        vaekern.vae_loss(r, t, m, lv, backend="cuda")


def test_available_backends():
    cpu = vaekern.available_backends("cpu")
    assert "reference" in cpu and "cpu" in cpu and "cuda" not in cpu
    if not torch.cuda.is_available():
        assert vaekern.available_backends() == cpu


def test_auto_picks_by_device():
    assert vaekern.backends.auto(torch.device("cpu")) == "cpu"
    assert vaekern.backends.auto(torch.device("meta")) == "reference"


def test_import_imports_no_triton():
    """Triton's launchers are registered at import, but triton loads on the first launch."""
    code = "import sys, vaekern; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})


def test_import_needs_no_gpu_triton_or_extension():
    """Without triton and vaekern._C, vaekern imports and serves the reference backend."""
    code = HIDE_TRITON_AND_EXTENSION + (
        "import sys, torch, vaekern\n"
        "assert 'triton' not in sys.modules and 'vaekern._C' not in sys.modules\n"
        "assert vaekern.available_backends('cpu') == ['reference'], vaekern.available_backends('cpu')\n"
        "x = torch.randn(2, 3, requires_grad=True)\n"
        "vaekern.vae_loss(x, torch.rand(2, 3), torch.randn(2, 1), torch.randn(2, 1)).backward()\n"
        "assert x.grad is not None\n"
        "for name in ('cpu', 'triton'):\n"
        "    try:\n"
        "        vaekern.bernoulli_nll(x, torch.rand(2, 3), backend=name)\n"
        "    except vaekern.BackendUnavailableError as e:\n"
        "        assert name in str(e)\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_dims(backend):
    """No pixels or latents: zero rows. No rows: an empty "none", sum 0, mean NaN (0/0)."""
    rows = vaekern.gaussian_kl(torch.empty(3, 0), torch.empty(3, 0), reduction="none", backend=backend)
    assert torch.equal(rows, torch.zeros(3))
    r, t = torch.empty(0, 5), torch.empty(0, 5)
    assert vaekern.bernoulli_nll(r, t, reduction="none", backend=backend).shape == (0,)
    assert vaekern.bernoulli_nll(r, t, reduction="sum", backend=backend) == 0
    assert vaekern.bernoulli_nll(r, t, backend=backend).isnan()
    # "optimal" too, though its sigma is then 0/0: no row and no element reads it.
    assert vaekern.gaussian_nll(r, t, "optimal", reduction="none", backend=backend).shape == (0,)
    assert vaekern.gaussian_nll(r, t, "optimal", reduction="sum", backend=backend) == 0
    assert vaekern.gaussian_nll(r, t, "optimal", backend=backend).isnan()
    assert torch.equal(vaekern.gaussian_nll(torch.empty(3, 0), torch.empty(3, 0), "optimal", reduction="none", backend=backend), torch.zeros(3))
    assert vaekern.gaussian_nll(torch.empty(3, 0), torch.empty(3, 0), "optimal", backend=backend) == 0


# Issue 16, item 8: each of these used to raise an error that named nothing (or nothing at all).
UNCLEAR_CALLS = [
    ("beta overflows float32", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=1e39), ValueError, "beta"),
    ("beta beyond float64", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=2**1030), ValueError, "beta"),
    ("beta inf", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=float("inf")), ValueError, "beta"),
    ("beta negative", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=-0.5), ValueError, "beta"),
    ("beta nan", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, beta=float("nan")), ValueError, "beta"),
    ("generator int", lambda r, t, m, lv: vaekern.reparameterize(m, lv, generator=42), TypeError, "generator"),
    ("generator str", lambda r, t, m, lv: vaekern.reparameterize(m, lv, generator="cpu"), TypeError, "generator"),
    ("bnll reduction list", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t, reduction=["mean"]), TypeError, "reduction"),
    ("kl reduction list", lambda r, t, m, lv: vaekern.gaussian_kl(m, lv, reduction=["mean"]), TypeError, "reduction"),
    ("vae reduction list", lambda r, t, m, lv: vaekern.vae_loss(r, t, m, lv, reduction=["mean"]), TypeError, "reduction"),
    ("bnll sparse input", lambda r, t, m, lv: vaekern.bernoulli_nll(r.to_sparse(), t), TypeError, "input"),
    ("bnll sparse target", lambda r, t, m, lv: vaekern.bernoulli_nll(r, t.to_sparse()), TypeError, "target"),
    ("kl sparse mu", lambda r, t, m, lv: vaekern.gaussian_kl(m.to_sparse(), lv), TypeError, "mu"),
    ("kl csr logvar", lambda r, t, m, lv: vaekern.gaussian_kl(m, lv.to_sparse_csr()), TypeError, "logvar"),
    ("rep sparse mu", lambda r, t, m, lv: vaekern.reparameterize(m.to_sparse(), lv), TypeError, "mu"),
    ("rep sparse eps", lambda r, t, m, lv: vaekern.reparameterize(m, lv, eps=torch.randn(4, 3).to_sparse()), TypeError, "eps"),
    ("vae sparse recon", lambda r, t, m, lv: vaekern.vae_loss(r.to_sparse(), t, m, lv), TypeError, "recon"),
    ("vae sparse mu", lambda r, t, m, lv: vaekern.vae_loss(r, t, m.to_sparse(), lv), TypeError, "mu"),
    ("module beta negative", lambda r, t, m, lv: vaekern.nn.VAELoss(beta=-1.0)(r, t, m, lv), ValueError, "beta"),
    ("module beta nan", lambda r, t, m, lv: vaekern.nn.VAELoss(beta=float("nan"))(r, t, m, lv), ValueError, "beta"),
    ("module beta overflow", lambda r, t, m, lv: vaekern.nn.VAELoss(beta=1e39)(r, t, m, lv), ValueError, "beta"),
    ("module beta huge int", lambda r, t, m, lv: vaekern.nn.VAELoss(beta=2**1030)(r, t, m, lv), ValueError, "beta"),
    ("module reduction list", lambda r, t, m, lv: vaekern.nn.VAELoss(reduction=["mean"])(r, t, m, lv), TypeError, "reduction"),
    ("module sparse mu", lambda r, t, m, lv: vaekern.nn.VAELoss()(r, t, m.to_sparse(), lv), TypeError, "mu"),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in UNCLEAR_CALLS], ids=[c[0] for c in UNCLEAR_CALLS])
def test_unclear_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call(*_inputs())


def test_float_beta_in_range_of_the_loss_dtype_is_accepted():
    """1e39 overflows a float32 loss but not a float64 one; 0 (no KL) is a valid weight."""
    r, t, m, lv = (x.double() for x in _inputs())
    assert torch.isfinite(vaekern.vae_loss(r, t, m, lv, beta=1e39, backend="reference"))
    r, t, m, lv = _inputs()
    torch.testing.assert_close(vaekern.vae_loss(r, t, m, lv, beta=0), vaekern.bernoulli_nll(r, t))
    # A tensor beta is not inspected (that would need a device sync): NaN in, NaN out.
    assert vaekern.vae_loss(r, t, m, lv, beta=torch.tensor(float("nan"))).isnan()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_eps_that_requires_grad_is_refused(backend):
    """Issue 16, item 2: eps would get no gradient on the fused backends; it is refused by
    name on every backend, as target is."""
    if backend not in vaekern.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    m, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    eps = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="eps must not require grad"):
        vaekern.reparameterize(m, lv, eps=eps, backend=backend)
    with torch.no_grad():  # no graph is built: nothing to refuse
        vaekern.reparameterize(m, lv, eps=eps, backend=backend)
    vaekern.reparameterize(m, lv, eps=eps.detach(), backend=backend).sum().backward()
    assert m.grad is not None and eps.grad is None


# (name, call, the argument that carries the tangent): each call takes (x, r, t, m, lv, backend),
# x being that argument's dual tensor. Every tensor argument of every public op that a tangent
# could reach, as an input or as a parameter (beta, eps, target, log_scale, the priors).
DUAL_CALLS = [
    ("bernoulli_nll", lambda x, r, t, m, lv, b: vaekern.bernoulli_nll(x, t, backend=b), "r"),
    ("bernoulli_nll target", lambda x, r, t, m, lv, b: vaekern.bernoulli_nll(r, x, backend=b), "t"),
    ("continuous_bernoulli_nll", lambda x, r, t, m, lv, b: vaekern.continuous_bernoulli_nll(x, t, backend=b), "r"),
    ("gaussian_nll", lambda x, r, t, m, lv, b: vaekern.gaussian_nll(x, t, 0.3, backend=b), "r"),
    ("gaussian_nll log_scale", lambda x, r, t, m, lv, b: vaekern.gaussian_nll(r, t, x, backend=b), "scalar"),
    ("gaussian_kl", lambda x, r, t, m, lv, b: vaekern.gaussian_kl(x, lv, backend=b), "m"),
    ("gaussian_kl prior_mu", lambda x, r, t, m, lv, b: vaekern.gaussian_kl(m, lv, x[0], backend=b), "m"),
    ("reparameterize", lambda x, r, t, m, lv, b: vaekern.reparameterize(x, lv, eps=torch.randn_like(m), backend=b), "m"),
    ("reparameterize eps", lambda x, r, t, m, lv, b: vaekern.reparameterize(m, lv, eps=x, backend=b), "eps"),
    ("vae_loss", lambda x, r, t, m, lv, b: vaekern.vae_loss(r, t, m, x, backend=b), "lv"),
    ("vae_loss recon", lambda x, r, t, m, lv, b: vaekern.vae_loss(x, t, m, lv, backend=b), "r"),
    ("vae_loss target", lambda x, r, t, m, lv, b: vaekern.vae_loss(r, x, m, lv, backend=b), "t"),
    ("vae_loss beta", lambda x, r, t, m, lv, b: vaekern.vae_loss(r, t, m, lv, beta=x, backend=b), "scalar"),
    ("vae_loss free_bits", lambda x, r, t, m, lv, b: vaekern.vae_loss(r, t, m, lv, free_bits=x, backend=b), "scalar"),
    (
        "vae_loss log_scale",
        lambda x, r, t, m, lv, b: vaekern.vae_loss(r, t, m, lv, likelihood="gaussian", log_scale=x, backend=b),
        "scalar",
    ),
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("call,arg", [c[1:] for c in DUAL_CALLS], ids=[c[0] for c in DUAL_CALLS])
def test_forward_mode_ad_is_refused_by_name_not_dropped(backend, device, call, arg, grad_mode):
    """Dual tensors (torch.autograd.forward_ad) that need no reverse-mode gradient, with grad
    mode on and off (off, the C++ autograd kernels call the kernel directly): the fused
    kernels have no forward-mode formula, so they raise, where they once returned a result
    without a tangent. The reference differentiates them."""
    import torch.autograd.forward_ad as fwAD

    r, t, m, lv = (x.to(device) for x in _inputs())
    primal = {"r": r, "t": t, "m": m, "lv": lv, "scalar": torch.tensor(0.5, device=device), "eps": torch.randn_like(m)}[arg]
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = fwAD.make_dual(primal, torch.ones_like(primal))
        if backend != "reference":
            with pytest.raises(NotImplementedError, match="forward-mode"):
                call(dual, r, t, m, lv, backend)
            return
        tangent = fwAD.unpack_dual(call(dual, r, t, m, lv, backend)).tangent
    assert tangent is not None and torch.isfinite(tangent).all()


def test_direct_op_call_with_a_dual_tensor_raises():
    """The extension's ops called directly (torch.ops.vaekern): a dual input goes through the
    C++ autograd Function, which refuses it, also where no graph is built."""
    import torch.autograd.forward_ad as fwAD

    if "cpu" not in vaekern.available_backends("cpu"):
        pytest.skip("the extension is not built")
    r, t, m, lv = _inputs()
    with fwAD.dual_level(), torch.no_grad():
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.vaekern.gaussian_kl(fwAD.make_dual(m, torch.ones_like(m)), lv, None, None, 1)
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.vaekern.bernoulli_nll(fwAD.make_dual(r, torch.ones_like(r)), t, True, 1, False)
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.vaekern.continuous_bernoulli_nll(fwAD.make_dual(r, torch.ones_like(r)), t, True, 1, False)
        scale = torch.tensor(0.3)
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.vaekern.gaussian_nll(r, t, fwAD.make_dual(scale, torch.ones_like(scale)), 1, False)
        lam, beta = torch.tensor(0.1), torch.tensor(0.5)
        with pytest.raises(RuntimeError, match="jvp"):  # free bits too, though they take no gradient
            torch.ops.vaekern.vae_loss(
                r, t, m, lv, None, None, fwAD.make_dual(lam, torch.ones_like(lam)), beta, torch.zeros(()), 0, True, 1, False
            )
