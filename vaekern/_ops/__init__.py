"""The operator layer: one module per op, each holding that op's schemas, fakes and autograd.

Every fused backend owns one ``torch.library`` namespace with the same schemas (the
kernels' interface), defined here in Python so that vaekern works without the compiled
extension; a backend only adds implementations (``TORCH_LIBRARY_IMPL`` in csrc/, ``lib.impl``
in ``vaekern._triton``). ``define(ns)`` creates one such namespace; ``vaekern.backends``
decides which namespace serves which (backend, device).

Each op has two autograd paths over the same kernels (see each module's header): a lean
``torch.autograd.Function`` for eager mode, which scales the forward's gradient in place,
and a ``register_autograd`` formula on the registered op, out of place, for tracing
(``torch.compile``, ``opcheck``). ``vaekern.functional`` picks between them.

The reference backend is not here: it is ``vaekern.reference`` under plain autograd.
"""

from __future__ import annotations

import torch

from vaekern._ops import (
    bernoulli_nll,
    continuous_bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    reparameterize,
    vae_loss,
)
from vaekern._ops._common import has_native_autograd

OPS = (bernoulli_nll, continuous_bernoulli_nll, gaussian_nll, gaussian_kl, reparameterize, vae_loss)
SCHEMAS = {name: schema for op in OPS for name, schema in op.SCHEMAS.items()}
# The ops with an autograd formula; the others are their backward kernels.
DIFFERENTIABLE = (
    "bernoulli_nll", "continuous_bernoulli_nll", "gaussian_nll", "gaussian_kl", "reparameterize", "vae_loss",
)  # fmt: skip


class Kernels:
    """The kernels of one namespace as ``OpOverload`` attributes (``kernels.vae_loss(...)``).

    Looked up once: resolving ``torch.ops.<ns>.<op>`` on every call costs microseconds,
    which at small batch is a visible share of a training step."""

    def __init__(self, namespace: str, native_autograd: frozenset[str]) -> None:
        self.namespace = namespace
        # The ops whose autograd is in C++ (the extension's, csrc/autograd.cpp): they are
        # called directly; the others go through vaekern._ops' Python autograd.
        self.native_autograd = native_autograd
        # Op name -> its autograd.Function for torch.func transforms (see transform_function).
        self.transforms: dict[str, type[torch.autograd.Function]] = {}

    def bind(self) -> None:
        packet = getattr(torch.ops, self.namespace)
        for name in SCHEMAS:
            setattr(self, name, getattr(packet, name).default)

    def __repr__(self) -> str:
        return f"Kernels({self.namespace!r})"


_DEFINED: dict[str, tuple[torch.library.Library, Kernels]] = {}


def define(namespace: str) -> Kernels:
    """Define every schema, fake and traced autograd in ``namespace`` (once); its kernels."""
    if namespace not in _DEFINED:
        lib = torch.library.Library(namespace, "DEF")
        native = frozenset(name for name in DIFFERENTIABLE if has_native_autograd(f"{namespace}::{name}"))
        kernels = Kernels(namespace, native)
        for op in OPS:
            op.register(lib, kernels)
        kernels.bind()
        _DEFINED[namespace] = (lib, kernels)
    return _DEFINED[namespace][1]
