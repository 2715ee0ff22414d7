"""Observation models ``p(x | z)``, registered by name.

A likelihood turns the decoder output ``params`` of shape ``(*batch, *data_shape)`` into a
distribution over ``x`` with ``event_shape == data_shape``:

>>> lik = LIKELIHOODS.build("bernoulli", data_shape=(1, 28, 28))
>>> logits = torch.zeros(4, 1, 28, 28)
>>> lik(logits).event_shape
torch.Size([1, 28, 28])
>>> lik.nll(logits, torch.ones(4, 1, 28, 28)).shape
torch.Size([4])

:meth:`Likelihood.nll` is the training path: ``-log p(x | z)`` summed over the data dimensions,
computed by fused elementwise formulas in float32 even under autocast (float64 stays float64),
broadcasting ``params`` of shape ``(samples, batch, *data_shape)`` against ``x`` of shape
``(batch, *data_shape)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import torch
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Normal,
)
from torch.nn import functional as F

from lit_vae.registry import Registry

__all__ = [
    "LIKELIHOODS",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "continuous_bernoulli_log_norm",
    "continuous_bernoulli_mean",
]

LIKELIHOODS: Registry[Callable[..., Likelihood]] = Registry("likelihood")

_LOG_2PI = math.log(2.0 * math.pi)
_MEAN_CLAMP = 1e-3


class Likelihood(nn.Module):
    """Base class: a conditional distribution over ``x`` parameterised by the decoder output.

    Subclasses implement :meth:`base_distribution` (the elementwise distribution),
    :meth:`elementwise_nll`, :meth:`mean` and, where it makes sense, :meth:`output_bias_for`.

    Args:
        data_shape: the shape of one example, e.g. ``(1, 28, 28)`` or ``(D,)``.

    Attributes:
        data_shape: as given, a tuple of ints.
        event_dims: ``len(data_shape)``, the number of trailing dimensions summed over.
    """

    def __init__(self, data_shape: Sequence[int]) -> None:
        super().__init__()
        if (
            isinstance(data_shape, (str, bytes))
            or not isinstance(data_shape, Sequence)
            or len(data_shape) == 0
            or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in data_shape)
        ):
            raise ValueError(
                f"data_shape must be a non-empty sequence of integers >= 1, got {data_shape!r}"
            )
        self.data_shape: tuple[int, ...] = tuple(int(s) for s in data_shape)
        self.event_dims = len(self.data_shape)

    # -- to implement -------------------------------------------------------------------------

    def base_distribution(self, params: Tensor) -> Distribution:
        """The elementwise distribution, batch shape ``params.shape``."""
        raise NotImplementedError

    def elementwise_nll(self, params: Tensor, x: Tensor) -> Tensor:
        """``-log p(x_i | params_i)`` per element; both inputs already broadcast and float."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """The mean of ``p(x | z)`` in data space, same shape as ``params``."""
        raise NotImplementedError

    def output_bias_for(self, train_mean: Tensor) -> Tensor | None:
        """The decoder output whose :meth:`mean` is ``train_mean`` (``None``: no such choice)."""
        return None

    # -- shared -------------------------------------------------------------------------------

    def _check(self, name: str, t: Tensor) -> None:
        n = self.event_dims
        if t.dim() < n or tuple(t.shape[t.dim() - n :]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__}: {name} must have shape (*batch, "
                f"{', '.join(map(str, self.data_shape))}), got {tuple(t.shape)}"
            )

    def forward(self, params: Tensor) -> Distribution:
        """``p(x | z)`` with batch shape ``params.shape[:-len(data_shape)]`` and event shape
        ``data_shape``. Arguments are not validated (fractional Bernoulli pixels are allowed)."""
        self._check("params", params)
        return Independent(self.base_distribution(params), self.event_dims, validate_args=False)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """``-log p(x | z)`` summed over the data dimensions.

        Computed with autocast disabled, in float32 (float64 when ``params`` are float64);
        ``x`` is cast to that precision.

        Args:
            params: decoder output, ``(*batch, *data_shape)``, e.g. ``(samples, batch, ...)``.
            x: data, ``(*batch', *data_shape)`` with ``batch'`` broadcastable against ``batch``.

        Returns:
            ``(*broadcast(batch, batch'),)``.
        """
        self._check("params", params)
        self._check("x", x)
        dtype = torch.promote_types(params.dtype, torch.float32)
        with torch.autocast(device_type=params.device.type, enabled=False):
            p, v = torch.broadcast_tensors(params.to(dtype), x.to(dtype))
            per_element = self.elementwise_nll(p, v)
            return per_element.flatten(start_dim=per_element.dim() - self.event_dims).sum(-1)

    def sample(self, params: Tensor) -> Tensor:
        """A draw ``x ~ p(x | z)``, same shape as ``params`` (no gradient)."""
        return self(params).sample()


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels; ``params`` are logits.

    ``nll`` is the binary cross-entropy with logits, which also accepts fractional ``x`` in
    ``[0, 1]`` (the usual treatment of grey-level MNIST).

    Args:
        data_shape: the shape of one example.
    """

    def base_distribution(self, params: Tensor) -> Distribution:
        return Bernoulli(logits=params, validate_args=False)

    def elementwise_nll(self, params: Tensor, x: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(params, x, reduction="none")

    def mean(self, params: Tensor) -> Tensor:
        """Pixel probabilities ``sigmoid(params)``."""
        return torch.sigmoid(params)

    def output_bias_for(self, train_mean: Tensor) -> Tensor:
        """``logit(clamp(train_mean, 1e-3, 1 - 1e-3))``, as in Burda et al. (2016)."""
        return torch.logit(train_mean.clamp(_MEAN_CLAMP, 1.0 - _MEAN_CLAMP))


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(Likelihood):
    """Independent Gaussians with a shared standard deviation; ``params`` are the means.

    ``nll = 0.5 * ((x - mu) / scale)**2 + log(scale) + 0.5 * log(2 pi)`` per element, so it is
    the negative log of a true density.

    Args:
        data_shape: the shape of one example.
        scale: the standard deviation (> 0), or its initial value when learned.
        learn_scale: learn the standard deviation through a scalar parameter ``log_scale``
            (initialised at ``log(scale)``); otherwise ``log_scale`` is a fixed buffer.
    """

    log_scale: Tensor
    learn_scale: bool

    def __init__(
        self, data_shape: Sequence[int], scale: float = 1.0, learn_scale: bool = False
    ) -> None:
        super().__init__(data_shape)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, Real)
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if not isinstance(learn_scale, bool):
            raise ValueError(f"learn_scale must be true or false, got {learn_scale!r}")
        self.learn_scale = learn_scale
        log_scale = torch.tensor(math.log(float(scale)))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> Tensor:
        """The standard deviation, a scalar tensor."""
        return self.log_scale.exp()

    def base_distribution(self, params: Tensor) -> Distribution:
        scale = self.log_scale.to(params.dtype).exp().expand_as(params)
        return Normal(params, scale, validate_args=False)

    def elementwise_nll(self, params: Tensor, x: Tensor) -> Tensor:
        log_scale = self.log_scale.to(params.dtype)
        z = (x - params) * torch.exp(-log_scale)
        return 0.5 * z.square() + log_scale + 0.5 * _LOG_2PI

    def mean(self, params: Tensor) -> Tensor:
        """The means, ``params`` itself."""
        return params

    def output_bias_for(self, train_mean: Tensor) -> Tensor:
        """The training mean itself."""
        return train_mean.clone()

    def extra_repr(self) -> str:
        return f"data_shape={self.data_shape}, learn_scale={self.learn_scale}"


def _polynomial(s: Tensor, coefficients: Sequence[float]) -> Tensor:
    """``sum_k coefficients[k] * s**k`` by Horner's rule."""
    out = torch.full_like(s, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * s + c
    return out


# log(l / tanh(l / 2)) = log 2 + sum_k c_k l^(2k) and 1 / (1 - exp(-l)) - 1 / l - 1/2
# = l * sum_k d_k l^(2k): the Taylor series used for small |l|, truncated where the next term is
# below float64 resolution on the interval where they are used.
_LOG_NORM_SERIES = (math.log(2.0), 1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400)
_LOG_NORM_TAYLOR_BELOW = 0.1
_MEAN_SERIES = (
    1 / 12,
    -1 / 720,
    1 / 30240,
    -1 / 1209600,
    1 / 47900160,
    -691 / 1307674368000,
    1 / 74724249600,
)
_MEAN_TAYLOR_BELOW = 0.5


def continuous_bernoulli_log_norm(logits: Tensor) -> Tensor:
    """The log normalising constant ``log C(l)`` of the continuous Bernoulli, from logits.

    With ``lambda = sigmoid(l)``, ``C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) = l / tanh(l / 2)``
    (Loaiza-Ganem & Cunningham, 2019), which is even in ``l`` with ``C(0) = 2``. Below
    ``|l| = 0.1`` its Taylor series is used; values and gradients are finite for every finite
    ``l``, including ``l = 0``.
    """
    a = logits.abs()
    small = a < _LOG_NORM_TAYLOR_BELOW
    a_big = torch.where(small, torch.ones_like(a), a)
    direct = torch.log(a_big / torch.tanh(0.5 * a_big))
    taylor = _polynomial(torch.where(small, a, torch.zeros_like(a)).square(), _LOG_NORM_SERIES)
    return torch.where(small, taylor, direct)


def continuous_bernoulli_mean(logits: Tensor) -> Tensor:
    """The mean of the continuous Bernoulli, ``1 / (1 - exp(-l)) - 1 / l``, from logits.

    Equal to ``lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda))`` with
    ``lambda = sigmoid(l)``. Evaluated through ``exp(-|l|)`` so that nothing overflows, and by its
    Taylor series around ``mean(0) = 1/2`` below ``|l| = 0.5``; values and gradients are finite
    for every finite ``l``.
    """
    a = logits.abs()
    small = a < _MEAN_TAYLOR_BELOW
    a_big = torch.where(small, torch.ones_like(a), a)
    em1 = torch.expm1(-a_big)  # in (-1, 0)
    positive = -1.0 / em1 - 1.0 / a_big  # mean(|l|)
    negative = 1.0 / a_big + torch.exp(-a_big) / em1  # mean(-|l|) = 1 - mean(|l|)
    direct = torch.where(logits > 0, positive, negative)
    l_small = torch.where(small, logits, torch.zeros_like(logits))
    taylor = 0.5 + l_small * _polynomial(l_small.square(), _MEAN_SERIES)
    return torch.where(small, taylor, direct)


@LIKELIHOODS.register("continuous_bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    """Independent continuous Bernoulli pixels on ``[0, 1]`` (Loaiza-Ganem & Cunningham, 2019);
    ``params`` are logits.

    ``nll = BCE_with_logits(l, x) - log C(l)``, the properly normalised density; it matches
    ``-ContinuousBernoulli(logits=l).log_prob(x)`` and stays accurate near ``l = 0`` and for
    large ``|l|``.

    Args:
        data_shape: the shape of one example.
    """

    def base_distribution(self, params: Tensor) -> Distribution:
        return ContinuousBernoulli(logits=params, validate_args=False)

    def elementwise_nll(self, params: Tensor, x: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return bce - continuous_bernoulli_log_norm(params)

    def mean(self, params: Tensor) -> Tensor:
        """The distribution's mean (not ``sigmoid(params)``), see
        :func:`continuous_bernoulli_mean`."""
        return continuous_bernoulli_mean(params)

    def output_bias_for(self, train_mean: Tensor) -> Tensor:
        """The logits whose continuous-Bernoulli mean is ``clamp(train_mean, 1e-3, 1 - 1e-3)``.

        The mean is increasing in the logit, so it is inverted by bisection in float64. (The
        plain ``logit(train_mean)`` would give a mean pulled towards 1/2.)
        """
        target = train_mean.detach().to(torch.float64).clamp(_MEAN_CLAMP, 1.0 - _MEAN_CLAMP)
        bound = 1.1 / _MEAN_CLAMP  # mean(-bound) < 1e-3 and mean(bound) > 1 - 1e-3
        lo = torch.full_like(target, -bound)
        hi = torch.full_like(target, bound)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = continuous_bernoulli_mean(mid) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(train_mean.dtype)
