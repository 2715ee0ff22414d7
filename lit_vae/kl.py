"""``KL(q ‖ p)`` per sample, in nats, summed over latent dims: closed form where one exists.

:func:`kl_divergence` tries, in order,

1. lit-vae's closed forms for Gaussian pairs (``diag`` = ``Independent(Normal, 1)``,
   ``full`` = ``MultivariateNormal``, ``low_rank`` = ``LowRankMultivariateNormal``):

   ===================  ===========================================================  =========
   q ‖ p                form                                                         cost
   ===================  ===========================================================  =========
   diag ‖ diag          Σ log σp − log σq + (σq² + (μq − μp)²) / 2σp² − ½               O(d)
   full ‖ diag          ½ (‖L / σp‖²_F + ‖(μq − μp) / σp‖² − d) + Σ log σp − Σ log L_ii  O(d²)
   diag ‖ full          ½ (Σ σq² (Σp⁻¹)_jj + ‖Lp⁻¹(μq − μp)‖² − d) + log|Lp| − Σ log σq  O(d²)+
   low_rank ‖ diag      trace and determinant lemma through the rank×rank capacitance  O(d r²)
   ===================  ===========================================================  =========

   With ``p = N(0, I)`` the full ‖ diag row is ``½(‖L‖²_F + ‖μ‖² − d) − Σ log L_ii``: no
   triangular solves, against torch's O(d³) ``MultivariateNormal`` pair. torch has no
   full ‖ diag and diag ‖ full pairs at all.
2. torch's own ``torch.distributions.kl_divergence`` registry (so user registrations work);
3. Monte Carlo, ``mean_s [log q(z_s) − log p(z_s)]``, with the caller's samples ``z`` or
   ``num_samples`` fresh reparameterized ones.

Shapes: ``q`` has ``batch_shape (batch,)`` and ``event_shape (d,)``; ``p`` broadcasts against
it (a prior has ``batch_shape ()``); the result is ``(batch,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    LowRankMultivariateNormal,
    MultivariateNormal,
)
from torch.distributions import kl as torch_kl

from lit_vae.distributions import StandardNormal, diagonal_parts

__all__ = ["has_closed_form", "kl_divergence", "kl_per_dim"]

_ClosedForm = Callable[[Distribution, Distribution], Tensor]
_CLOSED_FORMS: dict[tuple[str, str], _ClosedForm] = {}


def _form(dist: Distribution) -> str | None:
    """The Gaussian family of ``dist`` as the closed forms know it, or ``None``."""
    if isinstance(dist, StandardNormal):
        return "standard"
    if diagonal_parts(dist) is not None:
        return "diag"
    if isinstance(dist, MultivariateNormal):
        return "full"
    if isinstance(dist, LowRankMultivariateNormal):
        return "low_rank"
    return None


def _closed_form(q: Distribution, p: Distribution) -> _ClosedForm | None:
    form_q, form_p = _form(q), _form(p)
    if form_q is None or form_p is None:
        return None
    form_q = "diag" if form_q == "standard" else form_q
    return _CLOSED_FORMS.get((form_q, form_p)) or _CLOSED_FORMS.get(
        (form_q, "diag" if form_p == "standard" else form_p)
    )


def _register(form_q: str, form_p: str) -> Callable[[_ClosedForm], _ClosedForm]:
    def decorator(fn: _ClosedForm) -> _ClosedForm:
        _CLOSED_FORMS[(form_q, form_p)] = fn
        return fn

    return decorator


def _diag(dist: Distribution) -> tuple[Tensor, Tensor, Tensor]:
    parts = diagonal_parts(dist)
    assert parts is not None
    return parts


# ---------------------------------------------------------------- diagonal posteriors


def _kl_diag_standard_per_dim(q: Distribution) -> Tensor:
    loc, scale, log_scale = _diag(q)
    return 0.5 * (scale.square() + loc.square() - 1.0) - log_scale


def _kl_diag_diag_per_dim(q: Distribution, p: Distribution) -> Tensor:
    loc_q, scale_q, log_scale_q = _diag(q)
    loc_p, scale_p, log_scale_p = _diag(p)
    var_ratio = (scale_q / scale_p).square()
    mahalanobis = ((loc_q - loc_p) / scale_p).square()
    return 0.5 * (var_ratio + mahalanobis - 1.0) + (log_scale_p - log_scale_q)


class _DiagStandardKL(torch.autograd.Function):
    """``Σ_j ½ (σ_j² + μ_j² − 1) − log σ_j`` with a hand-written backward.

    Autograd would keep and replay seven elementwise ops of shape ``(batch, d)``; here the
    forward is four in-place ops and a sum, the backward two products, ``∂/∂μ = g μ``,
    ``∂/∂σ = g σ``, and ``∂/∂log σ = −g`` (a broadcast view). Once differentiable.
    """

    @staticmethod
    def forward(ctx: Any, loc: Tensor, scale: Tensor, log_scale: Tensor) -> Tensor:
        ctx.save_for_backward(loc, scale)
        ctx.log_scale_shape = log_scale.shape
        twice = torch.addcmul(loc * loc, scale, scale).sub_(log_scale, alpha=2.0).sub_(1.0)
        return twice.sum(-1).mul_(0.5)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        loc, scale = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_loc = grad * loc if ctx.needs_input_grad[0] else None
        grad_scale = grad * scale if ctx.needs_input_grad[1] else None
        grad_log_scale = (-grad).expand(ctx.log_scale_shape) if ctx.needs_input_grad[2] else None
        return grad_loc, grad_scale, grad_log_scale


@_register("diag", "standard")
def _kl_diag_standard(q: Distribution, p: Distribution) -> Tensor:
    loc, scale, log_scale = _diag(q)
    if loc.shape != scale.shape or scale.shape != log_scale.shape:
        loc, scale, log_scale = torch.broadcast_tensors(loc, scale, log_scale)
    kl: Tensor = _DiagStandardKL.apply(loc, scale, log_scale)
    return kl


@_register("diag", "diag")
def _kl_diag_diag(q: Distribution, p: Distribution) -> Tensor:
    return _kl_diag_diag_per_dim(q, p).sum(-1)


@_register("diag", "full")
def _kl_diag_full(q: Distribution, p: Distribution) -> Tensor:
    assert isinstance(p, MultivariateNormal)
    loc_q, scale_q, log_scale_q = _diag(q)
    scale_tril_p = p.scale_tril
    eye = torch.eye(q.event_shape[-1], dtype=loc_q.dtype, device=loc_q.device)
    inverse_tril_p = torch.linalg.solve_triangular(scale_tril_p, eye, upper=False)
    precision_diag = inverse_tril_p.square().sum(-2)
    whitened = (inverse_tril_p @ (loc_q - p.loc).unsqueeze(-1)).squeeze(-1)
    log_det_p = scale_tril_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    trace = (scale_q.square() * precision_diag).sum(-1)
    dim = loc_q.shape[-1]
    return 0.5 * (trace + whitened.square().sum(-1) - dim) + log_det_p - log_scale_q.sum(-1)


# ---------------------------------------------------------------- full covariance posteriors


class _FullStandardKL(torch.autograd.Function):
    """``½ (‖L‖²_F + ‖μ‖² − d) − Σ_i log L_ii`` with a hand-written backward.

    ``L`` is ``(batch, d, d)``: autograd would allocate three ``(batch, d, d)`` tensors in the
    backward (the Frobenius term's gradient, the log-diagonal's scattered into zeros, their sum);
    here the forward is a fused norm and the backward one, ``∂/∂L = g L`` with ``g / L_ii``
    subtracted on its diagonal in place. Once differentiable.
    """

    @staticmethod
    def forward(ctx: Any, loc: Tensor, scale_tril: Tensor) -> Tensor:
        ctx.save_for_backward(loc, scale_tril)
        diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
        # per row i: ‖L_i‖² − 1 − 2 log L_ii, small when L ≈ I; the row norms are as accurate
        # as a plain sum of squares and need no (batch, d, d) temporary
        rows = torch.linalg.vector_norm(scale_tril, dim=-1).square_().sub_(1.0)
        rows.sub_(diagonal.log(), alpha=2.0)
        return 0.5 * (rows.sum(-1) + torch.linalg.vecdot(loc, loc))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        loc, scale_tril = ctx.saved_tensors
        grad_loc = grad.unsqueeze(-1) * loc if ctx.needs_input_grad[0] else None
        grad_tril = None
        if ctx.needs_input_grad[1]:
            grad_tril = scale_tril * grad[..., None, None]
            diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
            grad_tril.diagonal(dim1=-2, dim2=-1).sub_(grad.unsqueeze(-1) / diagonal)
        return grad_loc, grad_tril


@_register("full", "standard")
def _kl_full_standard(q: Distribution, p: Distribution) -> Tensor:
    assert isinstance(q, MultivariateNormal)
    scale_tril = q.scale_tril
    loc = q.loc
    if loc.shape[:-1] != scale_tril.shape[:-2]:
        batch = torch.broadcast_shapes(loc.shape[:-1], scale_tril.shape[:-2])
        loc = loc.expand(*batch, loc.shape[-1])
        scale_tril = scale_tril.expand(*batch, *scale_tril.shape[-2:])
    kl: Tensor = _FullStandardKL.apply(loc, scale_tril)
    return kl


@_register("full", "diag")
def _kl_full_diag(q: Distribution, p: Distribution) -> Tensor:
    assert isinstance(q, MultivariateNormal)
    loc_p, scale_p, log_scale_p = _diag(p)
    scale_tril = q.scale_tril
    dim = scale_tril.shape[-1]
    trace = (scale_tril / scale_p.unsqueeze(-1)).square().sum((-2, -1))
    mahalanobis = ((q.loc - loc_p) / scale_p).square().sum(-1)
    log_det_q = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - dim) + log_scale_p.sum(-1) - log_det_q


# ---------------------------------------------------------------- low-rank posteriors


@_register("low_rank", "diag")
def _kl_low_rank_diag(q: Distribution, p: Distribution) -> Tensor:
    assert isinstance(q, LowRankMultivariateNormal)
    loc_p, scale_p, log_scale_p = _diag(p)
    cov_factor, cov_diag = q.cov_factor, q.cov_diag
    var_p = scale_p.square()
    trace = ((cov_factor.square().sum(-1) + cov_diag) / var_p).sum(-1)
    mahalanobis = ((q.loc - loc_p).square() / var_p).sum(-1)
    capacitance_tril = getattr(q, "_capacitance_tril", None)
    if capacitance_tril is None:
        rank = cov_factor.shape[-1]
        capacitance = (cov_factor / cov_diag.unsqueeze(-1)).mT @ cov_factor
        capacitance = capacitance + torch.eye(
            rank, dtype=capacitance.dtype, device=capacitance.device
        )
        capacitance_tril = torch.linalg.cholesky(capacitance)
    log_det_q = 2.0 * capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(
        -1
    ) + cov_diag.log().sum(-1)
    dim = cov_diag.shape[-1]
    return 0.5 * (trace + mahalanobis - dim + 2.0 * log_scale_p.sum(-1) - log_det_q)


# ---------------------------------------------------------------- public API


def _torch_closed_form(q: Distribution, p: Distribution) -> bool:
    return torch_kl._dispatch_kl(type(q), type(p)) is not NotImplemented


def has_closed_form(q: Distribution, p: Distribution) -> bool:
    """Whether ``KL(q ‖ p)`` is computed exactly (by lit-vae or by torch's registry)."""
    return _closed_form(q, p) is not None or _torch_closed_form(q, p)


def kl_divergence(
    q: Distribution, p: Distribution, num_samples: int = 0, z: Tensor | None = None
) -> Tensor:
    """``KL(q ‖ p)`` in nats per sample, summed over latent dims.

    Args:
        q: posterior, ``batch_shape (batch,)``, ``event_shape (d,)``.
        p: prior or any distribution that broadcasts against ``q``.
        num_samples: Monte Carlo samples to draw when no closed form exists.
        z: samples of ``q`` to use instead, ``(num_samples, batch, d)``; taken as they are
            (no gradient is stopped), so reparameterized samples give a pathwise gradient.

    Returns:
        ``(batch,)`` — exact where a closed form exists, else the Monte Carlo estimate.

    Raises:
        ValueError: no closed form and neither ``num_samples`` nor ``z`` given.
    """
    closed_form = _closed_form(q, p)
    if closed_form is not None:
        return closed_form(q, p)
    if _torch_closed_form(q, p):
        try:
            return torch_kl.kl_divergence(q, p)
        except NotImplementedError:
            pass
    if z is None and num_samples > 0:
        z = q.rsample((num_samples,))
    if z is None:
        raise ValueError(
            f"no closed-form KL({type(q).__name__} ‖ {type(p).__name__}); pass num_samples > 0 "
            "or samples z of shape (num_samples, batch, d) for a Monte Carlo estimate"
        )
    return (q.log_prob(z) - p.log_prob(z)).mean(0)


def kl_per_dim(q: Distribution, p: Distribution) -> Tensor:
    """``KL(q_j ‖ p_j)`` for each latent dim ``j``: ``(batch, d)``; sums to :func:`kl_divergence`.

    Defined for factorized pairs only (diagonal ``q`` and ``p``).

    Raises:
        ValueError: ``q`` or ``p`` is not a diagonal Gaussian (the KL does not split by dim).
    """
    form_q, form_p = _form(q), _form(p)
    if form_q in ("diag", "standard") and form_p == "standard":
        return _kl_diag_standard_per_dim(q)
    if form_q in ("diag", "standard") and form_p == "diag":
        return _kl_diag_diag_per_dim(q, p)
    raise ValueError(
        f"per-dimension KL is undefined for KL({type(q).__name__} ‖ {type(p).__name__}): "
        "it needs a diagonal Gaussian posterior and prior (log_var, log_std, std or var head "
        "with standard_normal or learned_diagonal prior)"
    )
