"""Priors ``p(z)``: ``nn.Module`` s whose ``forward()`` returns a torch ``Distribution``.

``PRIORS.build(name, latent_dim=d, ...)`` builds one; ``prior()`` has ``event_shape == (d,)``
and ``batch_shape == ()``, so it broadcasts against a posterior of any batch shape.

============================  =============================================================
``standard_normal``           ``N(0, I)``; the KL to it takes the shortest closed forms
``learned_diagonal``          ``N(m, diag(exp(2 log_s)))`` with trainable ``m``, ``log_s``
``mixture``                   K-component diagonal Gaussian mixture, all parameters trainable
``vamp``                      VampPrior (Tomczak & Welling 2018): the posterior at K trainable
                              pseudo-inputs, mixed uniformly; needs the encoder (``bind``)
============================  =============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, MixtureSameFamily

from lit_vae.distributions import DiagonalNormal, StandardNormal
from lit_vae.registry import Registry

__all__ = [
    "PRIORS",
    "LearnedDiagonalPrior",
    "MixturePrior",
    "Prior",
    "StandardNormalPrior",
    "VampPrior",
]

PRIORS: Registry[type[Prior]] = Registry("prior")


def _check_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"prior.{key}={value!r}: must be an integer >= {minimum}")
    return value


class Prior(nn.Module):
    """Base class. ``forward()`` → ``p(z)`` with ``event_shape == (latent_dim,)``.

    Args:
        latent_dim: ``d`` (≥ 1).
    """

    #: True when ``p`` factorizes over latent dims (per-dimension KL is defined).
    factorized: ClassVar[bool] = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = _check_int("latent_dim", latent_dim, 1)

    def forward(self) -> Distribution:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """``N(0, I)``. No parameters; buffers follow the module's device and dtype."""

    loc: Tensor
    scale: Tensor

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self) -> StandardNormal:
        return StandardNormal(self.loc, self.scale)


@PRIORS.register("learned_diagonal")
class LearnedDiagonalPrior(Prior):
    """``N(loc, diag(exp(log_scale)²))``, initialised at ``N(0, I)``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> DiagonalNormal:
        return DiagonalNormal(self.loc, self.log_scale.exp(), self.log_scale)


@PRIORS.register("mixture")
class MixturePrior(Prior):
    """``Σ_k π_k N(loc_k, diag(scale_k²))`` with trainable logits, means and log-scales.

    Args:
        num_components: ``K`` (≥ 1).
        init_spread: std of the random initial means (seeded by the global RNG).
    """

    factorized = False

    def __init__(self, latent_dim: int, num_components: int = 10, init_spread: float = 1.0) -> None:
        super().__init__(latent_dim)
        k = _check_int("num_components", num_components, 1)
        if (
            isinstance(init_spread, bool)
            or not isinstance(init_spread, int | float)
            or not 0 <= init_spread < float("inf")
        ):
            raise ValueError(f"prior.init_spread={init_spread!r}: must be a finite number >= 0")
        self.num_components = k
        self.logits = nn.Parameter(torch.zeros(k))
        self.loc = nn.Parameter(init_spread * torch.randn(k, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(k, latent_dim))

    def forward(self) -> MixtureSameFamily:
        components = DiagonalNormal(self.loc, self.log_scale.exp(), self.log_scale)
        return MixtureSameFamily(
            Categorical(logits=self.logits, validate_args=False), components, validate_args=False
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_components={self.num_components}"


@PRIORS.register("vamp")
class VampPrior(Prior):
    """VampPrior: ``p(z) = (1/K) Σ_k q(z | u_k)`` at ``K`` trainable pseudo-inputs ``u_k``.

    The prior needs the encoder and head that make ``q``; the model hands them over with
    :meth:`bind` (called by ``LitVAE``), without registering them as submodules here, so their
    parameters live in the model once. Pseudo-inputs are stored as unconstrained
    ``pseudo_inputs (K, *input_shape)`` and passed through ``input_activation``
    (``sigmoid`` for data in [0, 1], ``identity`` otherwise).

    Args:
        input_shape: the shape of one data sample, e.g. ``(1, 28, 28)``.
        num_components: ``K`` (≥ 1; 500 in the paper).
        input_activation: ``sigmoid`` or ``identity``.
    """

    factorized = False
    _ACTIVATIONS: ClassVar[dict[str, Callable[[Tensor], Tensor]]] = {
        "sigmoid": torch.sigmoid,
        "identity": lambda u: u,
    }

    def __init__(
        self,
        latent_dim: int,
        input_shape: Sequence[int],
        num_components: int = 500,
        input_activation: str = "sigmoid",
    ) -> None:
        super().__init__(latent_dim)
        k = _check_int("num_components", num_components, 1)
        if input_activation not in self._ACTIVATIONS:
            raise ValueError(
                f"prior.input_activation={input_activation!r}: allowed: "
                f"{', '.join(self._ACTIVATIONS)}"
            )
        self.num_components = k
        self.input_activation = input_activation
        self.input_shape = tuple(int(s) for s in input_shape)
        self.pseudo_inputs = nn.Parameter(0.1 * torch.randn(k, *self.input_shape))
        self._posterior: Callable[[Tensor], Distribution] | None = None

    def bind(self, posterior: Callable[[Tensor], Distribution]) -> None:
        """Give the prior ``x ↦ q(z|x)`` (the model's encoder followed by its head)."""
        object.__setattr__(self, "_posterior", posterior)

    def forward(self) -> MixtureSameFamily:
        if self._posterior is None:
            raise RuntimeError("VampPrior needs the encoder: call prior.bind(model.encode) first")
        pseudo = self._ACTIVATIONS[self.input_activation](self.pseudo_inputs)
        components = self._posterior(pseudo)
        mixing = Categorical(logits=pseudo.new_zeros(self.num_components), validate_args=False)
        return MixtureSameFamily(mixing, components, validate_args=False)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_components={self.num_components}, "
            f"input_shape={self.input_shape}"
        )
