import math

import pytest
import torch
from torch.distributions import Distribution

from lit_vae.distributions import DiagonalNormal
from lit_vae.posteriors import POSTERIORS

from .reference import reference_covariance

LATENT = 4
DIAGONAL = ["log_var", "log_std", "std", "var"]
ALL_HEADS = [*DIAGONAL, "cholesky", "low_rank"]
EXPECTED_WIDTH = {
    "log_var": 2 * LATENT,
    "log_std": 2 * LATENT,
    "std": 2 * LATENT,
    "var": 2 * LATENT,
    "cholesky": LATENT + LATENT * (LATENT + 1) // 2,
    "low_rank": LATENT * (2 + 2),
}


def test_registry_holds_exactly_the_documented_heads() -> None:
    assert POSTERIORS.names() == sorted(ALL_HEADS)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_head_interface(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT)
    assert head.num_params == EXPECTED_WIDTH[name]
    h = torch.randn(7, head.num_params, requires_grad=True)
    q = head(h)
    assert isinstance(q, Distribution)
    assert q.batch_shape == (7,)
    assert q.event_shape == (LATENT,)
    z = q.rsample()
    assert z.shape == (7, LATENT)
    assert q.rsample((3,)).shape == (3, 7, LATENT)
    assert q.log_prob(z).shape == (7,)
    assert q.mean.shape == (7, LATENT)
    assert q.variance.shape == (7, LATENT)
    assert head.factorized == (name in DIAGONAL)
    if not head.factorized:
        assert q.covariance_matrix.shape == (7, LATENT, LATENT)
    z.square().sum().backward()  # rsample is reparameterized: gradients reach h
    assert h.grad is not None
    assert (h.grad != 0).any(dim=0).all()


@pytest.mark.parametrize("name", ALL_HEADS)
def test_distribution_matches_reference_parameterization(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT).double()
    h = torch.randn(5, head.num_params, dtype=torch.float64)
    loc, covariance = reference_covariance(name, h, LATENT)
    q = head(h)
    torch.testing.assert_close(q.mean, loc)
    if name in DIAGONAL:
        torch.testing.assert_close(torch.diag_embed(q.variance), covariance)
    else:
        torch.testing.assert_close(q.covariance_matrix, covariance)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_unit_scale_at_zero_raw_output(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT)
    q = head(torch.zeros(2, head.num_params))
    covariance = torch.diag_embed(q.variance) if name in DIAGONAL else q.covariance_matrix
    torch.testing.assert_close(covariance, torch.eye(LATENT).expand(2, -1, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize(("name", "power"), [("log_var", 2.0), ("log_std", 1.0)])
def test_log_scale_heads_do_not_clamp_inside_plus_minus_30(name: str, power: float) -> None:
    head = POSTERIORS.build(name, latent_dim=61).double()
    s = torch.linspace(-30.0, 30.0, 61, dtype=torch.float64)
    h = torch.cat([torch.zeros(61, dtype=torch.float64), s]).unsqueeze(0)
    q = head(h)
    assert isinstance(q, DiagonalNormal)
    torch.testing.assert_close(q.log_scale[0], s / power, rtol=0, atol=0)
    torch.testing.assert_close(q.scale[0], (s / power).exp(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_rsample_moments_match_the_distribution(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=3).double()
    h = 0.5 * torch.randn(1, head.num_params, dtype=torch.float64)
    q = head(h)
    n = 200_000
    z = q.rsample((n,))[:, 0]
    covariance = q.covariance_matrix[0] if not head.factorized else torch.diag(q.variance[0])
    empirical_cov = torch.cov(z.T)
    # standard errors of the sample mean and covariance of a Gaussian
    mean_se = (covariance.diagonal() / n).sqrt()
    assert ((z.mean(0) - q.mean[0]).abs() < 5 * mean_se).all()
    var = covariance.diagonal()
    cov_se = ((var[:, None] * var[None, :] + covariance.square()) / n).sqrt()
    assert ((empirical_cov - covariance).abs() < 5 * cov_se).all()


@pytest.mark.parametrize("name", ALL_HEADS)
def test_extreme_raw_outputs_give_finite_distributions_and_gradients(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT)
    h = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4]).repeat(head.num_params)[: 3 * head.num_params]
    h = h.reshape(3, head.num_params).requires_grad_()
    q = head(h)
    z = q.rsample()
    loss = -q.log_prob(z.detach()).sum() + z.square().sum()
    loss.backward()
    assert torch.isfinite(q.variance).all()
    assert (q.variance > 0).all()
    assert h.grad is not None
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("log_var", {"latent_dim": 0}, r"posterior.latent_dim=0: must be an integer >= 1"),
        ("std", {"latent_dim": 2, "min_scale": -1.0}, r"posterior.min_scale=-1.0"),
        ("var", {"latent_dim": 2, "min_var": float("nan")}, r"posterior.min_var=nan"),
        ("cholesky", {"latent_dim": 2, "diag_activation": "relu"}, r"allowed: softplus, exp"),
        ("low_rank", {"latent_dim": 2, "rank": 0}, r"posterior.rank=0: must be an integer >= 1"),
        ("log_std", {"latent_dim": 2, "min_raw": 1.0, "max_raw": 0.0}, r"must be below"),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        POSTERIORS.build(name, **options)


def test_wrong_encoder_width_is_explained() -> None:
    head = POSTERIORS.build("cholesky", latent_dim=3)
    with pytest.raises(ValueError, match="expects the encoder to output 9 numbers"):
        head(torch.zeros(2, 6))


def test_cholesky_exp_activation_gives_exp_diagonal() -> None:
    head = POSTERIORS.build("cholesky", latent_dim=2, diag_activation="exp", min_scale=0.0)
    h = torch.tensor([[0.0, 0.0, math.log(2.0), 0.5, math.log(3.0)]])
    scale_tril = head(h).scale_tril[0]
    torch.testing.assert_close(scale_tril, torch.tensor([[2.0, 0.0], [0.5, 3.0]]))
