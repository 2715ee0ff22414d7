"""Exact-likelihood checks on probabilistic PCA, where ``log p(x)`` and ``p(z|x)`` are known.

With a :class:`~lit_vae.nets.LinearDecoder` set to the generating ``W, b`` and a Gaussian
likelihood of the true noise ``σ``, the model's marginal is the data's, so the ELBO gap
``log p(x) − ELBO = KL(q(z|x) ‖ p(z|x))`` measures the posterior head alone. For Gaussian
``q = N(μ, S)`` the ELBO has a closed form (:func:`linear_gaussian_elbo`), free of Monte Carlo
noise. The best diagonal ``q`` (variances ``1/Λ_jj``, ``Λ`` the posterior precision) leaves
the gap ``½ Σ_j log(Σ_jj Λ_jj)`` (:func:`best_diagonal_gap`); full-covariance heads can reach 0.

Used by ``tests/test_ppca.py`` and ``scripts/ppca_gaps.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from lit_vae.distributions import diagonal_parts
from lit_vae.kl import kl_divergence
from lit_vae.likelihoods import GaussianLikelihood
from lit_vae.nets import LinearDecoder

if TYPE_CHECKING:
    from lit_vae.data import PPCADataModule
    from lit_vae.module import LitVAE

__all__ = ["best_diagonal_gap", "fit_posterior", "linear_gaussian_elbo", "load_true_decoder"]


def load_true_decoder(model: LitVAE, datamodule: PPCADataModule, trainable: bool = False) -> None:
    """Copy the generating ``W``, ``b`` into the model's linear decoder and set the Gaussian
    likelihood's scale to the true noise ``σ``; freeze the decoder unless ``trainable``."""
    decoder, likelihood = model.decoder, model.likelihood
    if not isinstance(decoder, LinearDecoder) or not isinstance(likelihood, GaussianLikelihood):
        raise ValueError("load_true_decoder needs model=linear and likelihood=gaussian")
    params = datamodule.true_params()
    with torch.no_grad():
        decoder.weight.copy_(params["weight"])
        decoder.bias.copy_(params["bias"])
        likelihood.log_scale.copy_(torch.tensor(math.log(params["noise_std"])))
    decoder.requires_grad_(trainable)


def linear_gaussian_elbo(model: LitVAE, x: Tensor) -> Tensor:
    """The exact ELBO of ``x (batch, D)``, ``(batch,)``, for a linear decoder and a Gaussian
    likelihood.

    ``E_q[log p(x|z)] = −½ (‖x − Wμ − b‖² + tr(W S Wᵀ)) / σ² − D log σ − D/2 log 2π`` for
    ``q = N(μ, S)``, minus the model's closed-form ``KL(q ‖ p)``.
    """
    decoder, likelihood = model.decoder, model.likelihood
    if not isinstance(decoder, LinearDecoder) or not isinstance(likelihood, GaussianLikelihood):
        raise ValueError("linear_gaussian_elbo needs model=linear and likelihood=gaussian")
    q = model.encode(x)
    if isinstance(q, (MultivariateNormal, LowRankMultivariateNormal)):
        covariance = q.covariance_matrix  # (batch, d, d)
    elif diagonal_parts(q) is not None:
        covariance = torch.diag_embed(q.variance)
    else:
        raise ValueError(f"linear_gaussian_elbo needs a Gaussian posterior, got {type(q).__name__}")
    weight = decoder.weight
    trace = torch.einsum("ij,bjk,ik->b", weight, covariance, weight)
    nll_at_mean = likelihood.nll(decoder(q.mean), x)
    expected_nll = nll_at_mean + 0.5 * trace / likelihood.scale.square()
    return -expected_nll - kl_divergence(q, model.prior())


def best_diagonal_gap(datamodule: PPCADataModule) -> float:
    """``min over diagonal q of KL(q ‖ p(z|x)) = ½ (Σ_j log Λ_jj − log det Λ)`` in nats, the
    same for every ``x`` (``Λ`` the posterior precision), reached at ``q_j = N(m_j, 1/Λ_jj)``
    with ``m`` the posterior mean.

    It is at most ``½ Σ_j log(Σ_jj Λ_jj)`` (``Σ = Λ⁻¹``), which adds the forward-KL
    counterpart ``min over diagonal q of KL(p(z|x) ‖ q) = ½ (Σ_j log Σ_jj − log det Σ)``.
    """
    x = torch.zeros(1, datamodule.data_dim, dtype=torch.float64)
    covariance = datamodule.true_posterior(x).covariance_matrix[0]
    precision = torch.linalg.inv(covariance)
    log_det_precision = torch.linalg.slogdet(precision).logabsdet
    return 0.5 * float(precision.diagonal().log().sum() - log_det_precision)


def fit_posterior(
    model: LitVAE,
    x: Tensor,
    steps: int = 1500,
    lr: float = 1e-2,
    batch_size: int = 500,
    seed: int = 0,
) -> list[float]:
    """Train the model's trainable parameters on ``x (n, D)`` with Adam on its own training loss
    (``elbo_terms(x).loss``, reparameterized), the learning rate decaying linearly to 0.
    Returns the loss every 100 steps."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        loss = model.elbo_terms(x[index]).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            losses.append(float(loss.detach()))
    model.eval()
    return losses
