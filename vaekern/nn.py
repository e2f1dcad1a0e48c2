"""``nn.Module`` form of :func:`vaekern.vae_loss`, with the same defaults."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaekern.functional import VAELossParts, _flag, _free_bits, _likelihood, _reduction, float_beta, vae_loss


class VAELoss(nn.Module):
    """The negative ELBO, ``recon + beta * kl``, as a module.

    Args:
        beta: KL weight: a float, or a 0-d tensor (kept as a buffer, so ``.to(device)``
            moves it and ``loss_fn.beta.fill_(b)`` anneals it without recompiling; a
            dtype cast of the module leaves its dtype as it is).
        likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"continuous_bernoulli"``.
        log_scale: the Gaussian's log standard deviation, as for ``vaekern.gaussian_nll``:
            a float, ``"optimal"``, or a tensor (a learned one stays the caller's parameter:
            register it on the model, not here).
        from_logits: whether the reconstruction holds logits (the Bernoullis).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``.
        return_parts: return ``VAELossParts(loss, recon, kl)``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        free_bits: the KL term's free bits in nats per latent element, as for
            ``vaekern.gaussian_kl`` (0: none): a float, or a 0-d tensor, kept as a buffer
            as beta is (``loss_fn.free_bits.fill_(l)`` anneals it without recompiling).
            Last, so that the arguments before it keep their positions.

    ``forward(recon, target, mu, logvar, prior_mu=None, prior_logvar=None)``: the prior
    is an argument of the call, since it is usually computed (a hierarchical VAE's
    conditional prior) or a parameter of the model (a learned prior), not of the loss.
    """

    def __init__(
        self,
        beta: float | Tensor = 1.0,
        likelihood: str = "bernoulli",
        log_scale: float | str | Tensor = 0.0,
        from_logits: bool = True,
        reduction: str = "mean",
        return_parts: bool = False,
        backend: str = "auto",
        free_bits: float | Tensor = 0.0,
    ) -> None:
        super().__init__()
        # Checked here too, so that a bad setting fails where it is made; beta's range in
        # the loss dtype (and a tensor beta's device) can only be checked on the call.
        free_bits = _free_bits(free_bits, _reduction(reduction))
        _flag("from_logits", from_logits)
        _flag("return_parts", return_parts)
        _likelihood(likelihood, log_scale, from_logits)
        if not isinstance(beta, Tensor):
            float_beta(beta)
        # Tensors as buffers: they move with the module (.to(device)).
        for name, value in (("beta", beta), ("free_bits", free_bits)):
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        self.likelihood = likelihood
        self.log_scale = log_scale
        self.from_logits = from_logits
        self.reduction = reduction
        self.return_parts = return_parts
        self.backend = backend

    def _apply(self, fn, recurse=True):
        # A tensor beta (or free_bits) moves with the module (.to(device)) but keeps its own
        # dtype: the loss is float32 or float64 whatever the model's dtype, and a beta cast
        # with the model by .half() or .to(torch.bfloat16) would be rounded (0.1 to
        # 0.10009765625 in bfloat16) and stall an in-place annealing (beta += 1e-4 stops
        # near 0.05 in bfloat16).
        before = {name: self._buffers.get(name) for name in ("beta", "free_bits")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            if old is not None and self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(device=self._buffers[name].device)
        return self

    def forward(
        self,
        recon: Tensor,
        target: Tensor,
        mu: Tensor,
        logvar: Tensor,
        prior_mu: Tensor | None = None,
        prior_logvar: Tensor | None = None,
    ) -> Tensor | VAELossParts:
        return vae_loss(
            recon,
            target,
            mu,
            logvar,
            beta=self.beta,
            likelihood=self.likelihood,
            log_scale=self.log_scale,
            from_logits=self.from_logits,
            reduction=self.reduction,
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            free_bits=self.free_bits,
            return_parts=self.return_parts,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        beta = self.beta.item() if isinstance(self.beta, torch.Tensor) else self.beta
        fb = self.free_bits.item() if isinstance(self.free_bits, torch.Tensor) else self.free_bits
        free_bits = f", free_bits={fb:g}" if isinstance(self.free_bits, torch.Tensor) or fb else ""
        return (
            f"beta={beta}, from_logits={self.from_logits}, reduction={self.reduction!r}{free_bits}, "
            f"backend={self.backend!r}"
        )
