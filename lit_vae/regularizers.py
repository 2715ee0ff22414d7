"""KL regularizers: the penalty on ``q(z|x)`` against ``p(z)`` that the training loss uses.

A regularizer is an ``nn.Module`` called as ``regularizer(q, p, z, step)``:

* ``q`` — posterior, ``batch_shape (batch,)``, ``event_shape (latent,)``;
* ``p`` — prior, broadcasting against ``q``;
* ``z`` — the reparameterized samples the loss uses, ``(samples, batch, latent)``;
* ``step`` — ``trainer.global_step``: whatever changes during training is a function of it,
  so a resumed run continues exactly.

It returns a :class:`Penalty`: the per-sample ``penalty (batch,)`` added to the reconstruction
term, the true ``kl (batch,)`` (for the ELBO, which is always logged with β = 1), and scalars to
log. ``REGULARIZERS`` holds them by name; one yaml each under ``conf/regularizer/``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor, nn
from torch.distributions import Distribution

from lit_vae.kl import kl_divergence
from lit_vae.registry import Registry

__all__ = ["REGULARIZERS", "KLRegularizer", "Penalty", "Regularizer"]

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


class Penalty(NamedTuple):
    """What a regularizer returns.

    Attributes:
        penalty: added to the reconstruction term in the loss, ``(batch,)``.
        kl: ``KL(q ‖ p)`` per sample, ``(batch,)`` (exact, or Monte Carlo over ``z``).
        logs: scalars to log under ``train/`` (``beta``, ``capacity``, ...).
    """

    penalty: Tensor
    kl: Tensor
    logs: dict[str, Tensor | float]


class Regularizer(nn.Module):
    """Base class: ``forward(q, p, z, step) -> Penalty``."""

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        raise NotImplementedError


@REGULARIZERS.register("kl")
class KLRegularizer(Regularizer):
    """``β · KL(q ‖ p)`` with a constant ``β ≥ 0`` (β = 1: the plain ELBO)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"regularizer.beta={beta!r}: must be a number >= 0")
        if not math.isfinite(beta):
            raise ValueError(f"regularizer.beta={beta!r}: must be finite")
        self.beta = float(beta)

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        kl = kl_divergence(q, p, z=z)
        return Penalty(self.beta * kl, kl, {"beta": self.beta})

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
