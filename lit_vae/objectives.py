"""Training objectives: how the per-sample loss is made from ``k`` samples ``z ~ q(z|x)``.

An objective is called as ``objective(recon, penalty, q, p, z)`` with

* ``recon`` — ``−log p(x|z_s)`` for each sample, ``(samples, batch)``;
* ``penalty`` — the regularizer's :class:`~lit_vae.regularizers.Penalty` for the same samples;
* ``q``, ``p`` — posterior and prior; ``z`` — the samples, ``(samples, batch, latent)``;

and returns the loss per data point, ``(batch,)``; ``LitVAE`` takes its batch mean.

==========  ========================================================================================
name        loss per data point ``x``
==========  ========================================================================================
``elbo``    ``mean_s recon_s + penalty`` — the negative ELBO when the penalty is the KL
``iwae``    ``−log (1/k) Σ_s w_s``, ``log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x)``
            (Burda et al., 2016)
==========  ========================================================================================

Whatever the objective, ``LitVAE`` logs the true ELBO, ``−mean_s recon_s − KL``.

The ``iwae`` gradient is the standard reparameterized one, ``∇ log (1/k) Σ_s w_s`` through
``z_s = μ + σ ε_s``; the doubly reparameterized estimator (DReG, Tucker et al., 2019), which
fixes the vanishing signal-to-noise ratio of the encoder's gradient as ``k`` grows (Rainforth
et al., 2018), is not used.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution

from lit_vae.registry import Registry
from lit_vae.regularizers import Penalty

__all__ = [
    "OBJECTIVES",
    "ElboObjective",
    "IWAEObjective",
    "Objective",
    "build_objective",
    "log_weights",
]

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def log_weights(recon: Tensor, q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """``log w_s = −recon_s + log p(z_s) − log q(z_s|x)``, ``(samples, batch)``.

    Args:
        recon: ``−log p(x|z_s)``, ``(samples, batch)``.
        q: posterior, batch ``(batch,)``; p: prior.
        z: ``(samples, batch, latent)``.
    """
    return -recon + p.log_prob(z) - q.log_prob(z)


class Objective:
    """Base class: ``objective(recon, penalty, q, p, z) -> loss (batch,)``.

    Args:
        num_samples: ``k``, samples ``z ~ q(z|x)`` per data point (≥ 1).
    """

    #: Whether the loss uses the regularizer's penalty (if not, the regularizer must be the
    #: plain KL, checked when the model is built).
    uses_penalty: ClassVar[bool] = True

    def __init__(self, num_samples: int = 1) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"objective.num_samples={num_samples!r}: must be an integer >= 1")
        self.num_samples = num_samples

    def __call__(
        self, recon: Tensor, penalty: Penalty, q: Distribution, p: Distribution, z: Tensor
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={self.num_samples})"


@OBJECTIVES.register("elbo")
class ElboObjective(Objective):
    """``mean_s recon_s + penalty``: the negative ELBO (β-VAE, free bits, ... with a
    regularizer), the reconstruction averaged over ``num_samples`` samples (1 by default)."""

    def __call__(
        self, recon: Tensor, penalty: Penalty, q: Distribution, p: Distribution, z: Tensor
    ) -> Tensor:
        return recon.mean(0) + penalty.penalty


@OBJECTIVES.register("iwae")
class IWAEObjective(Objective):
    """The importance-weighted bound (Burda et al., 2016), negated:
    ``−(logsumexp_s log w_s − log k)``, ``k = num_samples`` (5 by default).

    With ``k = 1`` it is the single-sample ELBO with the Monte Carlo KL
    (``recon + log q(z|x) − log p(z)``), whose expectation is the ELBO. It has no separate KL
    term, so it needs ``regularizer=kl`` with ``beta: 1`` and the constant schedule.
    """

    uses_penalty = False

    def __init__(self, num_samples: int = 5) -> None:
        super().__init__(num_samples)

    def __call__(
        self, recon: Tensor, penalty: Penalty, q: Distribution, p: Distribution, z: Tensor
    ) -> Tensor:
        log_w = log_weights(recon, q, p, z)
        return -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def build_objective(config: Any) -> Objective:
    """An objective from ``{"name": ..., **options}`` (``None``: ``elbo``)."""
    objective: Objective = OBJECTIVES.from_config(config or {"name": "elbo"}, "objective")
    return objective
