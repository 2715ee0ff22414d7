"""KL regularizers: the penalty on ``q(z|x)`` against ``p(z)`` that the training loss uses.

A regularizer is an ``nn.Module`` called as ``regularizer(q, p, z, step)``:

* ``q`` — posterior, ``batch_shape (batch,)``, ``event_shape (latent,)``;
* ``p`` — prior, broadcasting against ``q``;
* ``z`` — the reparameterized samples the loss uses, ``(samples, batch, latent)``;
* ``step`` — ``trainer.global_step``: whatever changes during training (β, the capacity) is a
  pure function of it, so a resumed run continues exactly.

It returns a :class:`Penalty`: the per-sample ``penalty (batch,)`` added to the reconstruction
term, the true ``kl (batch,)`` (for the ELBO, which is always logged with β = 1 and no free
bits), and scalars to log under ``train/<name>``. ``REGULARIZERS`` holds them by name; one yaml
each under ``conf/regularizer/``.

==============  ===================================================================================
name            training penalty (its batch mean; ``KL`` per sample, ``K̄`` its batch mean)
==============  ===================================================================================
``kl``          ``β(step) · KL`` with ``β(step)`` from a schedule (:mod:`lit_vae.schedules`)
``free_bits``   ``Σ_g max(λ, K̄_g)`` over groups ``g`` of latent dims (Kingma et al., 2016)
``capacity``    ``γ · |K̄ − C(step)|``, ``C = min(C_max, C_max · step / T)`` (Burgess et al., 2018)
``beta_tc``     ``α · MI + β · TC + γ · dim-KL`` by minibatch-weighted sampling (Chen et al., 2018)
==============  ===================================================================================

``free_bits`` and ``capacity`` are batch-level objectives. They are returned as ``(batch,)``
tensors whose batch mean *is* the objective and whose gradient is the objective's gradient, so
``LitVAE`` can keep reducing every loss by a mean over the batch (under DDP: over each rank's
batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from lit_vae.distributions import diagonal_parts
from lit_vae.kl import kl_divergence, kl_per_dim
from lit_vae.registry import Registry
from lit_vae.schedules import LinearSchedule, Schedule, build_schedule

__all__ = [
    "REGULARIZERS",
    "BetaTCRegularizer",
    "CapacityRegularizer",
    "FreeBitsRegularizer",
    "KLRegularizer",
    "Penalty",
    "Regularizer",
    "TCTerms",
    "minibatch_weighted_terms",
]

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")

_LOG_2PI = math.log(2.0 * math.pi)


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


def _number(key: str, value: Any, minimum: float, *, strict: bool = False) -> float:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (value <= minimum if strict else value < minimum)
    ):
        raise ValueError(f"{key}={value!r}: must be a finite number {bound}")
    return float(value)


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


class Regularizer(nn.Module):
    """Base class: ``forward(q, p, z, step) -> Penalty``."""

    #: True when the penalty needs the KL per latent dim (a diagonal posterior and a
    #: factorized prior); ``LitVAE`` checks it when the model is built.
    requires_factorized: ClassVar[bool] = False

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        raise NotImplementedError

    def is_elbo(self) -> bool:
        """Whether the penalty is exactly ``KL(q ‖ p)`` at every step (the plain ELBO)."""
        return False

    def set_dataset_size(self, dataset_size: int) -> None:
        """Told the number of training samples by ``LitVAE.setup``; unused by default."""


@REGULARIZERS.register("kl")
class KLRegularizer(Regularizer):
    """``β(step) · KL(q ‖ p)``; β = 1 with the constant schedule is the plain ELBO.

    Args:
        beta: the target ``β ≥ 0``.
        schedule: how β moves towards ``beta``: ``None`` or ``{"name": "constant"}`` keeps it
            fixed; ``linear``, ``cyclical``, ``sigmoid`` from :data:`~lit_vae.schedules.SCHEDULES`.

    Logs ``beta``.
    """

    def __init__(self, beta: float = 1.0, schedule: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.beta = _number("regularizer.beta", beta, 0.0)
        self.schedule: Schedule = build_schedule(schedule, self.beta, "regularizer.schedule")

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        kl = kl_divergence(q, p, z=z)
        beta = self.schedule(step)
        return Penalty(beta * kl, kl, {"beta": beta})

    def is_elbo(self) -> bool:
        return self.schedule.is_constant() and self.schedule(0) == 1.0

    def extra_repr(self) -> str:
        return f"beta={self.beta}, schedule={self.schedule!r}"


def _per_dim(q: Distribution, p: Distribution, name: str) -> Tensor:
    try:
        return kl_per_dim(q, p)
    except ValueError as err:
        raise ValueError(f"regularizer.name={name}: {err}") from None


@REGULARIZERS.register("free_bits")
class FreeBitsRegularizer(Regularizer):
    """Free bits (Kingma et al., 2016): ``Σ_g max(λ, K̄_g)``.

    ``K̄_g`` is the batch mean of the KL of group ``g`` of latent dims (``group_size``
    consecutive dims; with the default 1, every dim is its own group; the last group keeps the
    remainder when ``group_size`` does not divide ``d``). A group whose mean KL is below ``λ``
    costs ``λ`` and gets no gradient, so the encoder is free to use ``λ`` nats in it.

    The objective is a batch-level quantity. It is returned per sample as

        ``penalty_b = Σ_g (KL_bg if K̄_g > λ else λ)``        ``(batch,)``

    whose batch mean is exactly ``Σ_g max(λ, K̄_g)`` and whose gradient is the objective's
    gradient (zero for the groups at ``λ``). Which groups are at ``λ`` is decided on the batch
    the penalty sees (each rank's batch under DDP).

    Only defined where the KL splits by latent dim: a diagonal head (``log_var``, ``log_std``,
    ``std``, ``var``) with a factorized prior (``standard_normal``, ``learned_diagonal``). With a
    full-covariance head (``cholesky``, ``low_rank``) or a ``mixture``/``vamp`` prior the
    per-dim KL is undefined and building the model raises ``ValueError``; there is no silent
    fallback to the whole KL.

    Args:
        threshold: ``λ`` in nats per group (≥ 0; 0.25 by default).
        group_size: latent dims per group (≥ 1).

    Logs ``free_bits_clamped``: the fraction of groups at ``λ``.
    """

    requires_factorized = True

    def __init__(self, threshold: float = 0.25, group_size: int = 1) -> None:
        super().__init__()
        self.threshold = _number("regularizer.threshold", threshold, 0.0)
        self.group_size = _integer("regularizer.group_size", group_size, 1)

    def group_kl(self, q: Distribution, p: Distribution) -> Tensor:
        """KL per sample and group, ``(batch, groups)``."""
        per_dim = _per_dim(q, p, "free_bits")
        return torch.stack([g.sum(-1) for g in per_dim.split(self.group_size, dim=-1)], dim=-1)

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        group_kl = self.group_kl(q, p)
        above = group_kl.detach().mean(0) > self.threshold
        penalty = torch.where(above, group_kl, torch.full_like(group_kl, self.threshold))
        clamped = 1.0 - above.to(group_kl.dtype).mean()
        return Penalty(penalty.sum(-1), group_kl.sum(-1), {"free_bits_clamped": clamped})

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, group_size={self.group_size}"


@REGULARIZERS.register("capacity")
class CapacityRegularizer(Regularizer):
    """Controlled capacity increase (Burgess et al., 2018): ``γ · |K̄ − C(step)|``.

    ``C(step) = min(C_max, C_max · step / T)`` grows linearly from 0 to ``C_max`` nats over
    ``T = capacity_steps`` steps. As in disentanglement_lib's ``AnnealedVAE``, the absolute value
    applies to the batch-mean KL ``K̄``, not per sample. Per sample the penalty is

        ``penalty_b = γ · sign(K̄ − C) · (KL_b − C)``        ``(batch,)``

    whose batch mean is ``γ · |K̄ − C|`` and whose gradient is that of ``γ · |K̄ − C|``
    (the sign is taken from the detached batch mean).

    Args:
        gamma: ``γ ≥ 0`` (1000 by default).
        capacity_max: ``C_max ≥ 0`` in nats (25 by default).
        capacity_steps: ``T ≥ 1`` (100000 by default).

    Logs ``capacity`` (``C`` at this step).
    """

    def __init__(
        self, gamma: float = 1000.0, capacity_max: float = 25.0, capacity_steps: int = 100000
    ) -> None:
        super().__init__()
        self.gamma = _number("regularizer.gamma", gamma, 0.0)
        self.capacity_max = _number("regularizer.capacity_max", capacity_max, 0.0)
        self.capacity_steps = _integer("regularizer.capacity_steps", capacity_steps, 1)
        self.capacity = LinearSchedule(
            self.capacity_max,
            start=0.0,
            steps=self.capacity_steps,
            config_key="regularizer.capacity",
        )

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        kl = kl_divergence(q, p, z=z)
        capacity = self.capacity(step)
        sign = torch.sign(kl.detach().mean() - capacity)
        return Penalty(self.gamma * sign * (kl - capacity), kl, {"capacity": capacity})

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, capacity_max={self.capacity_max}, "
            f"capacity_steps={self.capacity_steps}"
        )


class TCTerms(NamedTuple):
    """The β-TC decomposition of the Monte Carlo KL, each per sample ``(batch,)``.

    ``mi + tc + dim_kl == log q(z|x) − log p(z)`` (mean over the samples ``z``).

    Attributes:
        mi: index-code mutual information, ``log q(z|x) − log q(z)``.
        tc: total correlation, ``log q(z) − Σ_k log q(z_k)``.
        dim_kl: dimension-wise KL, ``Σ_k log q(z_k) − log p(z_k)``.
    """

    mi: Tensor
    tc: Tensor
    dim_kl: Tensor


def minibatch_weighted_terms(
    q: Distribution, p: Distribution, z: Tensor, dataset_size: int
) -> TCTerms:
    """MI, TC and dimension-wise KL by minibatch-weighted sampling (Chen et al., 2018, §C.1).

    For a batch of ``M`` inputs from a dataset of ``N`` and ``z_i ~ q(z|x_i)``, the aggregate
    posterior and its marginals are estimated as

        ``log q(z_i)   ≈ log Σ_j q(z_i | x_j) − log(N M)``
        ``log q(z_ik)  ≈ log Σ_j q(z_ik | x_j) − log(N M)``

    Args:
        q: diagonal Gaussian posterior, batch ``(M,)``, event ``(d,)``.
        p: factorized prior.
        z: samples of ``q``, ``(samples, M, d)``.
        dataset_size: ``N``.

    Returns:
        :class:`TCTerms`, each ``(M,)``, averaged over the samples. They sum to the Monte
        Carlo KL ``mean_s [log q(z_s|x) − log p(z_s)]`` exactly, whatever ``N``.
    """
    parts = diagonal_parts(q)
    if parts is None:
        raise ValueError(
            f"regularizer.name=beta_tc: needs a diagonal posterior (log_var, log_std, std or "
            f"var head), got {type(q).__name__}"
        )
    loc, scale, log_scale = parts
    batch = loc.shape[0]
    # log q(z_ik | x_j): (samples, i, j, d)
    standardized = (z.unsqueeze(-2) - loc) / scale
    log_density = -0.5 * standardized.square() - log_scale - 0.5 * _LOG_2PI
    log_nm = math.log(dataset_size * batch)
    log_q_zx = log_density.diagonal(dim1=-3, dim2=-2).sum(-2)  # (samples, M)
    log_q_z = torch.logsumexp(log_density.sum(-1), dim=-1) - log_nm
    log_q_zk = (torch.logsumexp(log_density, dim=-2) - log_nm).sum(-1)
    log_p_z = p.log_prob(z)
    return TCTerms(
        mi=(log_q_zx - log_q_z).mean(0),
        tc=(log_q_z - log_q_zk).mean(0),
        dim_kl=(log_q_zk - log_p_z).mean(0),
    )


@REGULARIZERS.register("beta_tc")
class BetaTCRegularizer(Regularizer):
    """β-TCVAE (Chen et al., 2018): ``α · MI + β · TC + γ · dim-KL``.

    The three terms come from :func:`minibatch_weighted_terms` (minibatch-weighted sampling,
    MWS). They sum to the Monte Carlo KL with the same samples, so ``α = β = γ = 1`` is the
    ELBO's KL in expectation; ``Penalty.kl`` stays the closed-form KL.

    MWS needs ``N``, the training set size. Give it as ``dataset_size``, or leave it ``null``
    and ``LitVAE.setup`` fills it from the datamodule's ``num_train`` when fitting starts; the
    first step without it raises ``ValueError``. The estimator uses each rank's batch under
    DDP, and the training ``N`` also during validation.

    Needs a diagonal head and a factorized prior (checked when the model is built).

    Args:
        beta: weight of the total correlation (≥ 0; 6 by default).
        alpha: weight of the index-code mutual information (≥ 0; 1 by default).
        gamma: weight of the dimension-wise KL (≥ 0; 1 by default).
        dataset_size: ``N ≥ 1`` or ``None``.

    Logs ``mi``, ``tc``, ``dim_kl`` (batch means) and ``beta``.
    """

    requires_factorized = True

    def __init__(
        self,
        beta: float = 6.0,
        alpha: float = 1.0,
        gamma: float = 1.0,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        self.beta = _number("regularizer.beta", beta, 0.0)
        self.alpha = _number("regularizer.alpha", alpha, 0.0)
        self.gamma = _number("regularizer.gamma", gamma, 0.0)
        self.dataset_size = (
            None if dataset_size is None else _integer("regularizer.dataset_size", dataset_size, 1)
        )
        self._given_dataset_size = self.dataset_size is not None

    def set_dataset_size(self, dataset_size: int) -> None:
        if not self._given_dataset_size:
            self.dataset_size = _integer("regularizer.dataset_size", dataset_size, 1)

    def forward(self, q: Distribution, p: Distribution, z: Tensor, step: int) -> Penalty:
        if self.dataset_size is None:
            raise ValueError(
                "regularizer.dataset_size=None: beta_tc's minibatch-weighted sampling needs the "
                "training set size; set it, or fit with a datamodule that has num_train"
            )
        _per_dim(q, p, "beta_tc")  # the prior must factorize for the dimension-wise KL
        terms = minibatch_weighted_terms(q, p, z, self.dataset_size)
        penalty = self.alpha * terms.mi + self.beta * terms.tc + self.gamma * terms.dim_kl
        logs: dict[str, Tensor | float] = {
            "mi": terms.mi.detach().mean(),
            "tc": terms.tc.detach().mean(),
            "dim_kl": terms.dim_kl.detach().mean(),
            "beta": self.beta,
        }
        return Penalty(penalty, kl_divergence(q, p, z=z), logs)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, alpha={self.alpha}, gamma={self.gamma}, "
            f"dataset_size={self.dataset_size}"
        )
