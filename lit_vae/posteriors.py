"""Posterior heads: the encoder's raw output ``h`` → ``q(z|x)``, a torch ``Distribution``.

The head decides what the encoder's numbers *mean*. The KL to a unit Gaussian is one quantity,
``−log σ + (σ² + μ²)/2 − ½`` per latent dim, but written in the head's raw output it has a
different shape for each head, and so do its gradients (``docs/kl_heads.md``):

============  ==============================  ============================================
name          raw output per latent dim       q(z|x)
============  ==============================  ============================================
``log_var``   μ, s = log σ²                   ``DiagonalNormal(μ, exp(s/2))``
``log_std``   μ, s = log σ                    ``DiagonalNormal(μ, exp(s))``
``std``       μ, r; σ = softplus(r+c) + ε     ``DiagonalNormal(μ, σ)``
``var``       μ, r; σ² = softplus(r+c) + ε    ``DiagonalNormal(μ, σ)``
``cholesky``  μ, d(d+1)/2 entries of L        ``MultivariateNormal(μ, scale_tril=L)``
``low_rank``  μ, d·r factor, d diagonal       ``LowRankMultivariateNormal``
============  ==============================  ============================================

``c = log(e − 1)`` makes ``softplus(c) = 1``, so every head gives ``σ ≈ 1`` at zero raw output.

Usage::

    head = POSTERIORS.build("log_var", latent_dim=16)
    q = head(h)            # h: (batch, head.num_params) -> batch_shape (batch,), event (16,)
    z = q.rsample()        # (batch, 16)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, LowRankMultivariateNormal, MultivariateNormal

from lit_vae.distributions import DiagonalNormal
from lit_vae.registry import Registry

__all__ = [
    "POSTERIORS",
    "CholeskyHead",
    "DiagonalHead",
    "LogStdHead",
    "LogVarHead",
    "LowRankHead",
    "PosteriorHead",
    "StdHead",
    "VarHead",
]

POSTERIORS: Registry[type[PosteriorHead]] = Registry("posterior")

#: ``softplus(SOFTPLUS_ONE) == 1``: the offset that puts σ ≈ 1 at zero raw output.
SOFTPLUS_ONE = math.log(math.e - 1.0)


def _check_positive(name: str, value: float, *, strict: bool = True) -> None:
    if not (value > 0 if strict else value >= 0) or not math.isfinite(value):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"posterior.{name}={value!r}: must be a finite number {bound}")


class PosteriorHead(nn.Module):
    """Base class: maps ``h`` of shape ``(batch, num_params)`` to ``q(z|x)``.

    Subclasses set :attr:`num_params` and implement :meth:`forward`. The returned distribution
    has ``batch_shape == h.shape[:-1]`` and ``event_shape == (latent_dim,)``.

    Args:
        latent_dim: ``d``, the number of latent dimensions (≥ 1).
    """

    #: True when ``q`` factorizes over latent dims (per-dimension KL is defined).
    factorized: ClassVar[bool] = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"posterior.latent_dim={latent_dim!r}: must be an integer >= 1")
        self.latent_dim = latent_dim

    @property
    def num_params(self) -> int:
        """Width of ``h``: how many numbers the encoder outputs per sample."""
        raise NotImplementedError

    def forward(self, h: Tensor) -> Distribution:
        """``h`` of shape ``(*batch, num_params)`` → ``q(z|x)`` with event shape ``(latent,)``."""
        raise NotImplementedError

    def _check_width(self, h: Tensor) -> None:
        if h.shape[-1] != self.num_params:
            raise ValueError(
                f"{type(self).__name__} expects the encoder to output {self.num_params} numbers "
                f"per sample (last dim), got shape {tuple(h.shape)}"
            )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_params={self.num_params}"


class DiagonalHead(PosteriorHead):
    """Diagonal heads: ``h = [loc, raw]``, each ``(*batch, latent)``; subclasses map raw → σ."""

    @property
    def num_params(self) -> int:
        return 2 * self.latent_dim

    def forward(self, h: Tensor) -> DiagonalNormal:
        self._check_width(h)
        loc, raw = h.split(self.latent_dim, dim=-1)
        scale, log_scale = self.scale_from_raw(raw)
        return DiagonalNormal(loc, scale, log_scale)

    def scale_from_raw(self, raw: Tensor) -> tuple[Tensor, Tensor | None]:
        """``raw (*batch, latent)`` → ``(σ, log σ or None)``."""
        raise NotImplementedError


class _LogScaleHead(DiagonalHead):
    """``raw`` is ``log σ^power``; clamped to ``[min_raw, max_raw]``, untouched inside."""

    power: ClassVar[float]

    def __init__(self, latent_dim: int, min_raw: float = -30.0, max_raw: float = 30.0) -> None:
        super().__init__(latent_dim)
        # σ² = exp(2·raw/power) stays a normal float32 (exp(±80) ≈ 5.5e34, 1.8e−35)
        limit = 40.0 * self.power
        for key, value in (("min_raw", min_raw), ("max_raw", max_raw)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"posterior.{key}={value!r}: must be a number")
            if not -limit <= value <= limit:
                raise ValueError(
                    f"posterior.{key}={value!r}: must be in [{-limit:g}, {limit:g}], where "
                    "σ² stays a finite, non-zero float32"
                )
        if not min_raw < max_raw:
            raise ValueError(f"posterior.min_raw={min_raw!r} must be below max_raw={max_raw!r}")
        self.min_raw = float(min_raw)
        self.max_raw = float(max_raw)

    def scale_from_raw(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = raw.clamp(self.min_raw, self.max_raw) / self.power
        return log_scale.exp(), log_scale


@POSTERIORS.register("log_var")
class LogVarHead(_LogScaleHead):
    """Keras' ``z_log_var``: ``s = log σ²``, ``σ = exp(s/2)``.

    KL to ``N(0, I)`` in the raw output: ``−½ Σ (1 + s − μ² − eˢ)``.
    Numerical floor: ``s`` is clamped to ``[min_raw, max_raw] = [−30, 30]`` (σ from 3.1e−7 to
    3.3e6); no clamping inside, the gradient is zero outside.
    """

    power = 2.0


@POSTERIORS.register("log_std")
class LogStdHead(_LogScaleHead):
    """``s = log σ``, ``σ = exp(s)``.

    KL to ``N(0, I)`` in the raw output: ``Σ (−s + (e^{2s} + μ²)/2 − ½)``.
    Numerical floor: ``s`` is clamped to ``[min_raw, max_raw] = [−30, 30]`` (σ from 9.4e−14 to
    1.1e13); no clamping inside, the gradient is zero outside.
    """

    power = 1.0


@POSTERIORS.register("std")
class StdHead(DiagonalHead):
    """``σ = softplus(raw + log(e−1)) + min_scale``: linear growth for large raw, no overflow.

    Numerical floor: ``σ ≥ min_scale`` (default 1e−4).
    """

    def __init__(self, latent_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__(latent_dim)
        _check_positive("min_scale", min_scale, strict=False)
        self.min_scale = float(min_scale)

    def scale_from_raw(self, raw: Tensor) -> tuple[Tensor, None]:
        return F.softplus(raw + SOFTPLUS_ONE) + self.min_scale, None


@POSTERIORS.register("var")
class VarHead(DiagonalHead):
    """``σ² = softplus(raw + log(e−1)) + min_var``.

    Numerical floor: ``σ² ≥ min_var`` (default 1e−8, i.e. σ ≥ 1e−4).
    """

    def __init__(self, latent_dim: int, min_var: float = 1e-8) -> None:
        super().__init__(latent_dim)
        _check_positive("min_var", min_var, strict=False)
        self.min_var = float(min_var)

    def scale_from_raw(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        var = F.softplus(raw + SOFTPLUS_ONE) + self.min_var
        log_var = var.log()
        return (0.5 * log_var).exp(), 0.5 * log_var


_DIAGONAL_ACTIVATIONS = ("softplus", "exp")


def _positive_diagonal(raw: Tensor, activation: str, min_scale: float) -> Tensor:
    """Raw diagonal → positive, ``1`` at zero raw output; ``exp`` is clamped at ``±30``."""
    if activation == "softplus":
        return F.softplus(raw + SOFTPLUS_ONE) + min_scale
    return raw.clamp(-30.0, 30.0).exp() + min_scale


def _check_activation(activation: str) -> None:
    if activation not in _DIAGONAL_ACTIVATIONS:
        raise ValueError(
            f"posterior.diag_activation={activation!r}: allowed: {', '.join(_DIAGONAL_ACTIVATIONS)}"
        )


@POSTERIORS.register("cholesky")
class CholeskyHead(PosteriorHead):
    """Full covariance ``Σ = L Lᵀ`` from a lower-triangular ``L`` with a positive diagonal.

    ``h = [loc (d), tril (d(d+1)/2)]``; the off-diagonal entries are taken as they are, the
    diagonal goes through ``diag_activation`` (``softplus`` with the ``log(e−1)`` offset, or
    ``exp``), both giving ``L = I`` at zero raw output.
    Numerical floor: ``L_ii ≥ min_scale`` (default 1e−4); ``exp`` clamps its input to ``±30``.
    """

    factorized = False
    _tril_rows: Tensor
    _tril_cols: Tensor
    _is_diag: Tensor

    def __init__(
        self, latent_dim: int, diag_activation: str = "softplus", min_scale: float = 1e-4
    ) -> None:
        super().__init__(latent_dim)
        _check_activation(diag_activation)
        _check_positive("min_scale", min_scale, strict=False)
        self.diag_activation = diag_activation
        self.min_scale = float(min_scale)
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        self.register_buffer("_tril_rows", rows, persistent=False)
        self.register_buffer("_tril_cols", cols, persistent=False)
        self.register_buffer("_is_diag", rows == cols, persistent=False)

    @property
    def num_params(self) -> int:
        d = self.latent_dim
        return d + d * (d + 1) // 2

    def scale_tril(self, tril_raw: Tensor) -> Tensor:
        """``(*batch, d(d+1)/2)`` raw entries (row-major lower triangle) → ``L (*batch, d, d)``."""
        d = self.latent_dim
        diag = _positive_diagonal(tril_raw, self.diag_activation, self.min_scale)
        entries = torch.where(self._is_diag, diag, tril_raw)
        scale_tril = tril_raw.new_zeros(*tril_raw.shape[:-1], d, d)
        scale_tril[..., self._tril_rows, self._tril_cols] = entries
        return scale_tril

    def forward(self, h: Tensor) -> MultivariateNormal:
        self._check_width(h)
        loc, tril_raw = h.split([self.latent_dim, self.num_params - self.latent_dim], dim=-1)
        return MultivariateNormal(loc, scale_tril=self.scale_tril(tril_raw), validate_args=False)


@POSTERIORS.register("low_rank")
class LowRankHead(PosteriorHead):
    """``Σ = W Wᵀ + diag(D)`` with ``W`` of shape ``(d, rank)``.

    ``h = [loc (d), cov_factor (d·rank), raw diagonal (d)]``;
    ``D = softplus(raw + log(e−1)) + min_var`` (``exp`` available as ``diag_activation``), so
    ``Σ = I`` at zero raw output. Numerical floor: ``D ≥ min_var`` (default 1e−8). The factor is
    not bounded: columns that are parallel and far larger than ``√D`` make torch's capacitance
    matrix ``I + Wᵀ D⁻¹ W`` singular in float32, and its Cholesky factorization fails; a larger
    ``min_var`` bounds that matrix's condition number.
    """

    factorized = False

    def __init__(
        self,
        latent_dim: int,
        rank: int = 2,
        diag_activation: str = "softplus",
        min_var: float = 1e-8,
    ) -> None:
        super().__init__(latent_dim)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"posterior.rank={rank!r}: must be an integer >= 1")
        _check_activation(diag_activation)
        _check_positive("min_var", min_var, strict=False)
        self.rank = rank
        self.diag_activation = diag_activation
        self.min_var = float(min_var)

    @property
    def num_params(self) -> int:
        return self.latent_dim * (self.rank + 2)

    def forward(self, h: Tensor) -> LowRankMultivariateNormal:
        self._check_width(h)
        d = self.latent_dim
        loc, factor, diag_raw = h.split([d, d * self.rank, d], dim=-1)
        cov_factor = factor.unflatten(-1, (d, self.rank))
        cov_diag = _positive_diagonal(diag_raw, self.diag_activation, self.min_var)
        return LowRankMultivariateNormal(loc, cov_factor, cov_diag, validate_args=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
