"""Diagonal Gaussian distributions that remember the log-scale they were built from.

Both classes are ``Independent(Normal(loc, scale), 1)``: torch's ``log_prob``, ``rsample``,
``entropy`` and ``torch.distributions.kl_divergence`` work on them unchanged. They add

* ``log_scale`` — ``log σ`` as the head computed it, so the KL needs no ``log(exp(s))`` round
  trip (exact for ``log_var``/``log_std`` heads, also where ``σ`` underflows);
* a type that :mod:`lit_vae.kl` dispatches on, with :class:`StandardNormal` marking ``N(0, I)``
  so its KL takes the shortest closed form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import Independent, Normal

__all__ = ["DiagonalNormal", "StandardNormal", "diagonal_parts"]


class DiagonalNormal(Independent):
    """``N(loc, diag(scale²))`` with event shape ``(latent,)``.

    Args:
        loc: mean, ``(*batch, latent)``.
        scale: standard deviation, ``(*batch, latent)``, positive.
        log_scale: ``log(scale)`` when the caller has it exactly; computed lazily otherwise.
    """

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        log_scale: Tensor | None = None,
        validate_args: bool | None = False,
    ) -> None:
        super().__init__(Normal(loc, scale, validate_args=validate_args), 1, validate_args)
        self._log_scale = log_scale

    @property
    def loc(self) -> Tensor:
        """Mean, ``(*batch, latent)``."""
        return self.base_dist.loc

    @property
    def scale(self) -> Tensor:
        """Standard deviation, ``(*batch, latent)``."""
        return self.base_dist.scale

    @property
    def log_scale(self) -> Tensor:
        """``log σ``, ``(*batch, latent)``."""
        if self._log_scale is None:
            self._log_scale = self.scale.log()
        return self._log_scale

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: Any = None
    ) -> DiagonalNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        log_scale = None if self._log_scale is None else self._log_scale.expand(shape)
        return type(self)(self.loc.expand(shape), self.scale.expand(shape), log_scale)


class StandardNormal(DiagonalNormal):
    """``N(0, I)`` over ``(latent,)``, with ``batch_shape == ()``; broadcasts in KL and log_prob.

    Args:
        loc: zeros ``(latent,)``; taken as an argument so the prior's buffer sets the device.
        scale: ones ``(latent,)``.
    """

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = False) -> None:
        super().__init__(loc, scale, torch.zeros_like(scale), validate_args)

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: Any = None
    ) -> StandardNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return StandardNormal(self.loc.expand(shape), self.scale.expand(shape))


def diagonal_parts(dist: object) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(loc, scale, log_scale)`` of a diagonal Gaussian with event shape ``(latent,)``.

    Accepts :class:`DiagonalNormal` and any ``Independent(Normal, 1)``; ``None`` for anything else.
    """
    if isinstance(dist, DiagonalNormal):
        return dist.loc, dist.scale, dist.log_scale
    if (
        isinstance(dist, Independent)
        and isinstance(dist.base_dist, Normal)
        and dist.reinterpreted_batch_ndims == 1
    ):
        base = dist.base_dist
        return base.loc, base.scale, base.scale.log()
    return None
