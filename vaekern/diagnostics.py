"""Diagnostics of posterior collapse, for logging during training.

``active_units`` follows Burda, Grosse & Salakhutdinov (2016, "Importance Weighted
Autoencoders", section 5.2): latent unit j is active when its posterior mean moves with
the data, ``Cov_x(E_q(z|x)[z_j]) > threshold``. A collapsed unit has q(z_j|x) equal to the
prior for every x, so its mean is constant and its variance over the data is 0. For the
per-unit KL (the rate each unit carries), see ``gaussian_kl(..., return_per_dim=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["active_units"]


def active_units(mu: Tensor, threshold: float = 0.01) -> Tensor:
    """Which latent units are active over a set of data points.

    Args:
        mu: ``[N, ...]`` posterior means E_q(z|x)[z] of N data points (dim 0), for example
            the encoder's means over a held-out set, concatenated over batches.
        threshold: a unit is active where the variance of its mean over the N points
            exceeds this (0.01 in Burda et al.).

    Returns:
        A bool tensor shaped like ``mu.shape[1:]``; ``.sum()`` is the number of active
        units. The variance is the population one (divided by N) in float64, and is not
        differentiated. A NaN in a unit's means makes that unit inactive here: check
        ``mu.isnan().any()`` separately if NaN may occur.
    """
    if not isinstance(mu, Tensor):
        raise TypeError(f"mu must be a torch.Tensor, got {type(mu).__name__}")
    if mu.layout != torch.strided:
        raise TypeError(f"mu must be a dense (strided) tensor, got layout {mu.layout}")
    if not mu.is_floating_point():
        raise TypeError(f"mu must be a floating tensor, got {mu.dtype}")
    if mu.dim() < 1 or mu.shape[0] < 2:
        raise ValueError(f"mu must hold at least 2 data points along dim 0, got shape {tuple(mu.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if not 0 <= threshold < float("inf"):  # NaN fails too
        raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
    with torch.no_grad():
        return mu.double().var(dim=0, correction=0) > threshold
