"""The end-to-end case: one training step of the pytorch/examples MLP VAE, with each loss.

``python -m benchmarks --ops e2e``; ``pytest benchmarks/bench_e2e.py``.

The model is ``VAE`` of pytorch/examples ``vae/main.py``: a 784-400-20 encoder (``fc1``, then
``fc21`` for mu and ``fc22`` for logvar), a 20-400-784 decoder (``fc3``, ``fc4``), ReLU, and
the reparameterization drawn inside ``forward``. The one change: the decoder returns logits
(no sigmoid), which every provider's loss takes. One step is that script's loop body without
its ``loss.item()`` (a host sync that is no part of the loss):

    optimizer.zero_grad()
    recon, mu, logvar = model(x)
    loss = loss_fn(recon, x, mu, logvar)
    loss.backward()
    optimizer.step()

Batch 128, float32, ``torch.optim.Adam(lr=1e-3)`` (lr 0 for the null steps, below) with
torch's default implementation for the device. The data are fixed and random: ``N_BATCHES`` batches of pixels uniform in [0, 1] from
a seeded generator, rotated as a data loader would (no dataset, no network). Every provider
starts from the same weights.

Providers
---------
``eager``          the pytorch/examples loss on logits, divided by B (cases.py's ``eager``).
``compile``        the model and that loss as one function under ``torch.compile(dynamic=False)``
                   (so the backward is AOTAutograd's); zero_grad, the backward call and Adam stay
                   eager, as in every other provider.
``reference``, ``triton``, ``cuda``, ``cpu``
                   ``vaekern.vae_loss(recon, x, mu, logvar, backend=name)`` on the eager model.
``null``           the eager model with ``NullLoss``, a loss that costs almost nothing;
``compile-null``   the compiled model with ``NullLoss``. The baselines of the loss's share.

The loss's share
----------------
``loss ms = step ms - null step ms`` of the same model (``compile-null`` for ``compile``,
``null`` for the others), and ``loss share = loss ms / step ms``: what the step would save if
its loss were free. Only whole steps are timed, so nothing inside the step is split,
reordered or synchronized to time its parts. The price is the noise of a difference, which
the timing keeps down: run.py times every provider's steps in turn, in blocks, round after
round (``timing.LoopTimer``), and ``loss ms`` is the median over rounds of a provider's block
minus the null step's block of the same round, so a change in the machine's load during the
run cancels; its p20-p80 is reported too.

``NullLoss`` returns a 0-d zero and, in backward, gradients stored in advance: those of the
``eager`` loss at the first step. The null steps' Adam has lr 0: it runs every one of its ops
(none is skipped for lr 0), but the weights stay where they started. So the model's backward
and Adam run the same ops on values of the same kind as with a real loss. Each part matters,
measured here (1 thread, Xeon, torch 2.14.1): zero gradients made Adam's ``torch.sqrt`` of its
all-zero second moments 8x slower (``sqrt`` of zeros takes 25x as long as of ones, of
denormals 50x), so that null step took 2 ms more than a real one; and stored gradients at lr
1e-3, fixed or with their sign flipped every step, drove the model away within a thousand
steps (logvar at -5e5, logits at 1e30). The null step's own cost, a Python
``torch.autograd.Function``, stays in it, so ``loss ms`` underestimates each loss by that much
(tens of µs on a CPU). For ``compile`` the difference is what the loss costs inside the
compiled graph, fusions included.

The check
---------
Before it is timed, each provider's forward (model and loss, as its step runs them: compiled
for ``compile``) returns its loss together with the model outputs it was computed on, and that
loss is compared with ``vaekern.reference.vae_loss_ref`` of those outputs, in float64, within
``cases.CHECK_RTOL``. The outputs so returned are tensors that the compiled graph computes
anyway (what returning them costs there was not measured separately). The null providers
have no loss to check.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import cases
from vaekern import reference

OP = "e2e"
MODE = "step"
# pytorch/examples vae/main.py: MNIST images of 28x28, batch 128, 400 hidden units, 20 latents.
BATCH, PIXELS, HIDDEN, LATENT = 128, 784, 400, 20
SIZE = f"{BATCH}x{PIXELS}:{LATENT}"
LR = 1e-3
N_BATCHES = 8
SEED = 0
NULL_PROVIDERS = ("null", "compile-null")
# Each group's null step first, so that it is timed next to the steps it is subtracted from.
PROVIDERS = ("null", "eager", *cases.VAEKERN_PROVIDERS, "compile-null", "compile")


class VAE(nn.Module):
    """pytorch/examples' MLP VAE, with a decoder that returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, LATENT)
        self.fc22 = nn.Linear(HIDDEN, LATENT)
        self.fc3 = nn.Linear(LATENT, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, PIXELS)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return self.fc4(h3)

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, PIXELS))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class NullLoss(torch.autograd.Function):
    """A loss that costs almost nothing: 0, with gradients given in advance (module docstring)."""

    @staticmethod
    def forward(ctx, recon, mu, logvar, grads):
        ctx.grads = grads
        return recon.new_zeros(())

    @staticmethod
    def backward(ctx, grad_loss):
        # grad_loss is 1 (loss.backward()); scaling by it would cost three more ops.
        return (*ctx.grads, None)


def null_baseline(provider: str) -> str:
    """The null step that ``provider``'s loss time is measured against (module docstring)."""
    return "compile-null" if provider.startswith("compile") else "null"


def skip_reason(provider: str, device: torch.device) -> str | None:
    """None if ``provider`` applies to the e2e case on ``device``, else why it does not."""
    if provider not in PROVIDERS:
        return "the e2e case compares the pytorch/examples loss (eager, compile) with vaekern's"
    if provider in cases.VAEKERN_PROVIDERS:
        return cases.skip_reason(provider, "vae_loss", device)
    return None


def make_batches(device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.rand(BATCH, PIXELS, generator=g).to(device) for _ in range(N_BATCHES)]


def make_model(device: torch.device) -> VAE:
    """The same initial weights on every call, without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return VAE().to(device)


class TrainStep:
    """One training step of ``provider`` (module docstring): call it to run one.

    ``forward(x)`` is the model and loss as the step runs them, returning
    ``(loss, recon, mu, logvar)``. ``compile_backend`` is torch.compile's backend, as in
    ``cases.forward_fn``.
    """

    def __init__(self, provider: str, device: torch.device, compile_backend: str = "inductor"):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        self.provider = provider
        self.device = device
        self.batches = make_batches(device)
        self._next = itertools.cycle(range(len(self.batches)))
        self.model = make_model(device)
        # lr 0 for the null steps: the same ops, with weights that stay put (module docstring).
        lr = 0.0 if provider in NULL_PROVIDERS else LR
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        model = self.model
        if provider in NULL_PROVIDERS:
            grads = self._eager_loss_grads()
            if provider == "compile-null":
                model = torch.compile(model, backend=compile_backend, dynamic=False)

            def forward(x):
                recon, mu, logvar = model(x)
                return NullLoss.apply(recon, mu, logvar, grads), recon, mu, logvar
        else:
            # The compiled function is the eager loss's; compile wraps model and loss together.
            loss_fn = cases.forward_fn("eager" if provider == "compile" else provider, "vae_loss")

            def forward(x):
                recon, mu, logvar = model(x)
                return loss_fn(recon, x, mu, logvar), recon, mu, logvar

            if provider == "compile":
                forward = torch.compile(forward, backend=compile_backend, dynamic=False)
        self.forward = forward

    def _eager_loss_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The eager loss's gradients at the first step, for NullLoss to hand back.
        loss_fn = cases.forward_fn("eager", "vae_loss")
        x = self.batches[0]
        outs = self.model(x)
        grads = torch.autograd.grad(loss_fn(outs[0], x, *outs[1:]), outs)
        return tuple(g.detach() for g in grads)

    def __call__(self) -> torch.Tensor:
        x = self.batches[next(self._next)]
        self.optimizer.zero_grad()
        loss = self.forward(x)[0]
        loss.backward()
        self.optimizer.step()
        return loss


def check(step: TrainStep) -> float | None:
    """The relative error of ``step``'s loss against the float64 reference on the same model
    outputs (module docstring); None for the null providers. Run it before the first step."""
    if step.provider in NULL_PROVIDERS:
        return None
    x = step.batches[0]
    loss, recon, mu, logvar = step.forward(x)
    with torch.no_grad():
        ref = reference.vae_loss_ref(recon, x, mu, logvar)[0].item()
        got = loss.double().item()
    return abs(got - ref) / max(abs(ref), 1e-30)


def check_ok(err: float | None) -> bool | None:
    if err is None:
        return None
    return math.isfinite(err) and err <= cases.CHECK_RTOL[torch.float32]
