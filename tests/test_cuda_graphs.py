"""CUDA-graph safety of every loss with its options (issues 13 and 14), on the fused GPU backends.

A training step (zero the gradients, the loss, backward) is captured once and replayed with
new values copied into the same input tensors. Capture fails on any host sync (a ``.item()``,
a value check, a host-to-device copy of a Python float), so a capture that succeeds shows
that none is left in the path; each replay is then checked against the reference backend
run eagerly on the replay's inputs, loss and every gradient. The options that need a batch
reduction before the loss (``log_scale="optimal"``, free bits) and the constants made per call
(beta, a float log_scale, the Bernoulli's placeholder) are the ones at risk.

The scenarios also run without a graph on the cpu backend, so the checks themselves are
exercised where there is no GPU, and on every fused backend under a dispatch mode that
catches any op reading a value on the host (what a capture would refuse, short of the ops
inside a kernel op); capture and replay need a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vaekern

B, D, Z = 16, 3 * 5 * 7, 6
SHAPE = (B, 3, 5, 7)


@dataclasses.dataclass
class Scenario:
    """``loss(backend, inputs)``, and which inputs are learned (their gradients checked)."""

    loss: Callable[[str, dict[str, torch.Tensor]], torch.Tensor]
    learned: tuple[str, ...] = ("recon", "mu", "logvar")
    # Extra inputs beyond recon, target, mu, logvar: name -> shape.
    extra: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _vae(**options):
    def loss(backend, x):
        priors = {k: x[k] for k in ("prior_mu", "prior_logvar", "free_bits", "beta") if k in x}
        ls = {"log_scale": x["log_scale"]} if "log_scale" in x else {}
        # Probabilities for from_logits=False: the inputs are drawn around 0.
        recon = x["recon"] if options.get("from_logits", True) else torch.sigmoid(x["recon"])
        return vaekern.vae_loss(recon, x["target"], x["mu"], x["logvar"], **priors, **ls, **options, backend=backend)

    return loss


def _weighted_rows(**options):
    # reduction="none" under an upstream gradient that weighs the rows apart: for "optimal"
    # the path through sigma^2 then adds to the gradient (under mean it sums to 0).
    def loss(backend, x):
        rows = vaekern.vae_loss(x["recon"], x["target"], x["mu"], x["logvar"], reduction="none", **options, backend=backend)
        return (rows * torch.linspace(0.5, 2.0, rows.shape[0], device=rows.device, dtype=rows.dtype)).sum()

    return loss


def _nll(name: str, **options):
    # A likelihood op alone, its rows weighed apart; a learned log_scale where x has one.
    def loss(backend, x):
        recon = x["recon"] if options.get("from_logits", True) else torch.sigmoid(x["recon"])
        args = (x["log_scale"],) if "log_scale" in x else ()
        rows = getattr(vaekern, name)(recon, x["target"], *args, reduction="none", **options, backend=backend)
        return (rows * torch.linspace(0.5, 2.0, rows.shape[0], device=rows.device, dtype=rows.dtype)).sum()

    return loss


def _kl(**options):
    def loss(backend, x):
        kl, per_dim = vaekern.gaussian_kl(
            x["mu"], x["logvar"], x["prior_mu"], x["prior_logvar"], **options, return_per_dim=True, backend=backend
        )
        return kl + 0.1 * per_dim.sum()

    return loss


SCENARIOS = {
    "bernoulli": Scenario(_vae(beta=0.7)),
    "bernoulli probs": Scenario(_vae(from_logits=False)),
    "continuous_bernoulli": Scenario(_vae(likelihood="continuous_bernoulli")),
    "gaussian float scale": Scenario(_vae(likelihood="gaussian", log_scale=-0.3)),
    "gaussian optimal": Scenario(_vae(likelihood="gaussian", log_scale="optimal")),
    "gaussian optimal rows": Scenario(_weighted_rows(likelihood="gaussian", log_scale="optimal")),
    "gaussian optimal sum, annealed beta": Scenario(
        _vae(likelihood="gaussian", log_scale="optimal", reduction="sum"), extra={"beta": ()}
    ),
    "gaussian learned scale": Scenario(
        _vae(likelihood="gaussian"), learned=("recon", "mu", "logvar", "log_scale"), extra={"log_scale": ()}
    ),
    "gaussian channel scale": Scenario(
        _vae(likelihood="gaussian", reduction="sum"),
        learned=("recon", "mu", "logvar", "log_scale"),
        extra={"log_scale": (3, 1, 1)},
    ),
    "bernoulli_nll": Scenario(_nll("bernoulli_nll"), learned=("recon",)),
    "continuous_bernoulli_nll probs": Scenario(_nll("continuous_bernoulli_nll", from_logits=False), learned=("recon",)),
    "gaussian_nll learned scale": Scenario(
        _nll("gaussian_nll"), learned=("recon", "log_scale"), extra={"log_scale": ()}
    ),
    "learned prior": Scenario(
        _vae(), learned=("recon", "mu", "logvar", "prior_mu", "prior_logvar"),
        extra={"prior_mu": (Z,), "prior_logvar": (Z,)},
    ),
    "prior and free bits": Scenario(
        _vae(free_bits=0.2, likelihood="gaussian", log_scale="optimal"),
        learned=("recon", "mu", "logvar", "prior_mu", "prior_logvar"),
        extra={"prior_mu": (B, Z), "prior_logvar": (Z,)},
    ),
    "annealed free bits": Scenario(
        _vae(), learned=("recon", "mu", "logvar", "prior_mu"),
        extra={"prior_mu": (Z,), "free_bits": ()},
    ),
    "kl free bits per dim": Scenario(
        _kl(free_bits=0.3), learned=("mu", "logvar", "prior_mu", "prior_logvar"),
        extra={"prior_mu": (Z,), "prior_logvar": ()},
    ),
}


def _inputs(scenario: Scenario, device) -> dict[str, torch.Tensor]:
    x = {
        "recon": torch.empty(SHAPE, device=device),
        "target": torch.empty(SHAPE, device=device),
        "mu": torch.empty(B, Z, device=device),
        "logvar": torch.empty(B, Z, device=device),
        **{k: torch.empty(shape, device=device) for k, shape in scenario.extra.items()},
    }
    _refill(x, torch.Generator().manual_seed(0))
    for k in scenario.learned:
        x[k].requires_grad_()
    return x


def _refill(x: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """New values in the same tensors: targets, free bits and beta in [0, 1], the rest near 0."""
    with torch.no_grad():
        for k, t in x.items():
            uniform = k in ("target", "free_bits", "beta")
            values = torch.rand(t.shape, generator=gen) if uniform else torch.randn(t.shape, generator=gen) * 0.5
            t.copy_(values)


def _step(scenario: Scenario, backend: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    for k in scenario.learned:
        x[k].grad = None
    loss = scenario.loss(backend, x)
    loss.backward()
    return loss


def _check_against_reference(scenario: Scenario, x: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    ref_x = {k: t.detach().double().requires_grad_(k in scenario.learned) for k, t in x.items()}
    want = _step(scenario, "reference", ref_x)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-5)
    for k in scenario.learned:
        torch.testing.assert_close(x[k].grad.double(), ref_x[k].grad, rtol=2e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _replays(scenario: Scenario, backend: str, device: torch.device, graphed: bool) -> None:
    x = _inputs(scenario, device)
    gen = torch.Generator().manual_seed(1)
    if not graphed:
        for _ in range(2):
            _refill(x, gen)
            _check_against_reference(scenario, x, _step(scenario, backend, x))
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, caches fill, outside the capture
        for _ in range(3):
            _step(scenario, backend, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(scenario, backend, x)
    for _ in range(3):
        _refill(x, gen)
        graph.replay()
        torch.cuda.synchronize()
        _check_against_reference(scenario, x, static_loss)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenarios_run_eagerly_on_cpu(name):
    """The scenarios and their checks, without a graph: proves them where there is no GPU."""
    if "cpu" not in vaekern.available_backends("cpu"):
        pytest.skip("vaekern._C is not built")
    _replays(SCENARIOS[name], "cpu", torch.device("cpu"), graphed=False)


# The ops that read a tensor's value on the host: each syncs with a GPU, and fails a capture.
_HOST_READS = {
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::nonzero",
    "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
}  # fmt: skip


class _HostReads(TorchDispatchMode):
    """Records the ops that read a value on the host, and counts every op it sees."""

    def __init__(self):
        super().__init__()
        self.ops, self.seen = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        name, kwargs = func._schema.name, kwargs or {}
        if (
            name in _HOST_READS
            # Values decide the output's size: a boolean mask, repeats without output_size.
            or (name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
                and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]))
            or (func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        ):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", SCENARIOS)
def test_steps_read_no_value_on_the_host(backend, device, name):
    """What a capture checks on a GPU, checked on every fused backend where there is none: a
    step (loss and backward) reads no tensor's value on the host: no ``.item()``, no bool
    of a tensor, no op whose output size depends on values (nonzero, a boolean mask).
    Unseen here: the ops that a kernel op runs inside itself (the kernels take every value
    as a device pointer), and ``.tolist()``, ``.numpy()`` and ``.cpu()``, which dispatch
    nothing on a CPU tensor."""
    if backend == "reference":
        pytest.skip("the oracle is plain PyTorch, for correctness, not for graphs")
    scenario = SCENARIOS[name]
    x = _inputs(scenario, device)
    with _HostReads() as mode:
        _step(scenario, backend, x)
    assert mode.seen > 0  # the mode sees the step's ops
    assert not mode.ops, mode.ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_captured_step_replays_like_the_reference(backend, name):
    if backend not in vaekern.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")
    _replays(SCENARIOS[name], backend, torch.device("cuda"), graphed=True)
