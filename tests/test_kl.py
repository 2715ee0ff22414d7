import math

import pytest
import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)
from torch.distributions import kl_divergence as torch_kl_divergence

from lit_vae.distributions import DiagonalNormal, StandardNormal
from lit_vae.kl import has_closed_form, kl_divergence, kl_per_dim
from lit_vae.posteriors import POSTERIORS
from lit_vae.priors import PRIORS

from .reference import reference_distribution

LATENT = 5
BATCH = 6
ALL_HEADS = ["log_var", "log_std", "std", "var", "cholesky", "low_rank"]
DIAGONAL = ["log_var", "log_std", "std", "var"]
PRIOR_NAMES = ["standard_normal", "learned_diagonal"]


def _prior(name: str) -> torch.nn.Module:
    prior = PRIORS.build(name, latent_dim=LATENT).double()
    if name == "learned_diagonal":
        with torch.no_grad():
            prior.loc.copy_(torch.randn(LATENT, dtype=torch.float64))
            prior.log_scale.copy_(0.5 * torch.randn(LATENT, dtype=torch.float64))
    return prior


def _reference_prior(prior: torch.nn.Module) -> MultivariateNormal:
    p = prior()
    return MultivariateNormal(p.mean, covariance_matrix=torch.diag(p.variance))


def _raw(name: str, scale: float = 0.7) -> torch.Tensor:
    head = POSTERIORS.build(name, latent_dim=LATENT)
    return (scale * torch.randn(BATCH, head.num_params, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("prior_name", PRIOR_NAMES)
@pytest.mark.parametrize("name", ALL_HEADS)
def test_closed_form_equals_float64_reference_and_its_gradient(name: str, prior_name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT).double()
    prior = _prior(prior_name)
    h = _raw(name)
    ours = kl_divergence(head(h), prior())
    assert ours.shape == (BATCH,)
    assert has_closed_form(head(h), prior())

    h_ref = h.detach().clone().requires_grad_()
    reference = torch_kl_divergence(
        reference_distribution(name, h_ref, LATENT), _reference_prior(prior)
    )
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)

    weights = torch.rand(BATCH, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((weights * ours).sum(), h)
    (grad_ref,) = torch.autograd.grad((weights * reference).sum(), h_ref)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("prior_name", PRIOR_NAMES)
@pytest.mark.parametrize("name", ALL_HEADS)
def test_float32_closed_form_is_close_to_float64(name: str, prior_name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT).double()
    prior = _prior(prior_name)
    h = _raw(name).detach()
    exact = kl_divergence(head(h), prior())
    single = kl_divergence(head.float()(h.float()), prior.float()())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("prior_name", [*PRIOR_NAMES, "mixture"])
@pytest.mark.parametrize("name", ALL_HEADS)
def test_closed_form_within_four_standard_errors_of_monte_carlo(name: str, prior_name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT).double()
    prior = (
        _prior(prior_name)
        if prior_name != "mixture"
        else PRIORS.build("mixture", latent_dim=LATENT, num_components=3).double()
    )
    with torch.no_grad():
        q = head(_raw(name))
        p = prior()
        z = q.sample((40_000,))
        log_ratio = q.log_prob(z) - p.log_prob(z)
        estimate = log_ratio.mean(0)
        standard_error = log_ratio.std(0) / math.sqrt(z.shape[0])
        if prior_name == "mixture":
            assert not has_closed_form(q, p)
            fresh = kl_divergence(q, p, num_samples=40_000)
            assert (fresh - estimate).abs().max() < 6 * standard_error.max()
            torch.testing.assert_close(kl_divergence(q, p, z=z), estimate)
        else:
            closed = kl_divergence(q, p)
            assert ((closed - estimate).abs() < 4 * standard_error).all()


def test_log_var_head_gives_keras_formula() -> None:
    head = POSTERIORS.build("log_var", latent_dim=LATENT).double()
    h = _raw("log_var", scale=3.0).detach()
    mean, s = h[:, :LATENT], h[:, LATENT:]
    keras = -0.5 * (1 + s - mean.square() - s.exp()).sum(-1)
    torch.testing.assert_close(
        kl_divergence(head(h), PRIORS.build("standard_normal", latent_dim=LATENT).double()()),
        keras,
        rtol=1e-12,
        atol=1e-12,
    )


def test_log_std_head_gives_log_sigma_formula() -> None:
    head = POSTERIORS.build("log_std", latent_dim=LATENT).double()
    h = _raw("log_std", scale=3.0).detach()
    mean, s = h[:, :LATENT], h[:, LATENT:]
    formula = (-s + ((2 * s).exp() + mean.square()) / 2 - 0.5).sum(-1)
    torch.testing.assert_close(
        kl_divergence(
            head(h),
            StandardNormal(
                torch.zeros(LATENT, dtype=torch.float64), torch.ones(LATENT, dtype=torch.float64)
            ),
        ),
        formula,
        rtol=1e-12,
        atol=1e-12,
    )


def test_all_diagonal_heads_give_the_same_kl_for_the_same_mean_and_sigma() -> None:
    mean = 2 * torch.randn(BATCH, LATENT, dtype=torch.float64)
    sigma = torch.exp(torch.randn(BATCH, LATENT, dtype=torch.float64))
    softplus_one = math.log(math.e - 1)
    inverse_softplus = lambda y: y + torch.log(-torch.expm1(-y))  # noqa: E731
    raws = {
        "log_var": (sigma.square()).log(),
        "log_std": sigma.log(),
        "std": inverse_softplus(sigma - 1e-4) - softplus_one,
        "var": inverse_softplus(sigma.square() - 1e-8) - softplus_one,
    }
    prior = PRIORS.build("standard_normal", latent_dim=LATENT).double()()
    values = {
        name: kl_divergence(
            POSTERIORS.build(name, latent_dim=LATENT).double()(torch.cat([mean, raw], -1)), prior
        )
        for name, raw in raws.items()
    }
    for value in values.values():
        torch.testing.assert_close(value, values["log_var"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_extreme_means_and_scales_give_finite_nonnegative_kl(name: str) -> None:
    """|μ| up to 1e3 and σ from 1e-6 to 1e3, in float32: finite, ≥ 0, finite gradients."""
    prior = PRIORS.build("standard_normal", latent_dim=2)()
    sigmas = torch.tensor([1e-6, 1e-3, 1.0, 1e3])
    means = torch.tensor([-1e3, 0.0, 1e-3, 1e3])
    mean, sigma = torch.meshgrid(means, sigmas, indexing="ij")
    mean, sigma = mean.reshape(-1, 1).repeat(1, 2), sigma.reshape(-1, 1).repeat(1, 2)
    if name in DIAGONAL:
        raw = {
            "log_var": 2 * sigma.log(),
            "log_std": sigma.log(),
            "std": sigma - math.log(math.e - 1),  # softplus ≈ identity for large σ, floor for small
            "var": sigma.square() - math.log(math.e - 1),
        }[name]
        h = torch.cat([mean, raw], -1)
    elif name == "cholesky":
        h = torch.cat([mean, sigma[:, :1] - 0.5413, 0.5 * sigma[:, :1], sigma[:, :1] - 0.5413], -1)
    else:
        h = torch.cat([mean, sigma.repeat(1, 2), sigma - 0.5413], -1)
    h.requires_grad_()
    head = POSTERIORS.build(name, latent_dim=2)
    kl = kl_divergence(head(h), prior)
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all()
    kl.sum().backward()
    assert h.grad is not None
    assert torch.isfinite(h.grad).all()


def test_diagonal_posterior_against_full_covariance_prior() -> None:
    loc_q = torch.randn(BATCH, LATENT, dtype=torch.float64)
    scale_q = torch.rand(BATCH, LATENT, dtype=torch.float64) + 0.2
    a = torch.randn(LATENT, LATENT, dtype=torch.float64)
    p = MultivariateNormal(
        torch.randn(LATENT, dtype=torch.float64), covariance_matrix=a @ a.T + torch.eye(LATENT)
    )
    q = DiagonalNormal(loc_q, scale_q)
    assert has_closed_form(q, p)
    reference = torch_kl_divergence(
        MultivariateNormal(loc_q, covariance_matrix=torch.diag_embed(scale_q.square())), p
    )
    torch.testing.assert_close(kl_divergence(q, p), reference, rtol=1e-9, atol=1e-12)


def test_plain_torch_independent_normal_takes_the_closed_form() -> None:
    q = Independent(Normal(torch.randn(BATCH, LATENT), torch.rand(BATCH, LATENT) + 0.1), 1)
    p = Independent(Normal(torch.zeros(LATENT), torch.ones(LATENT)), 1)
    torch.testing.assert_close(kl_divergence(q, p), torch_kl_divergence(q, p))
    assert kl_per_dim(q, p).shape == (BATCH, LATENT)


def test_torch_registry_is_used_for_pairs_lit_vae_does_not_cover() -> None:
    a = torch.randn(LATENT, LATENT, dtype=torch.float64)
    q = MultivariateNormal(
        torch.randn(BATCH, LATENT, dtype=torch.float64),
        covariance_matrix=a @ a.T + torch.eye(LATENT),
    )
    p = LowRankMultivariateNormal(
        torch.zeros(LATENT, dtype=torch.float64),
        torch.randn(LATENT, 2, dtype=torch.float64),
        torch.ones(LATENT, dtype=torch.float64),
    )
    assert has_closed_form(q, p)
    torch.testing.assert_close(kl_divergence(q, p), torch_kl_divergence(q, p))


def test_no_closed_form_without_samples_names_both_types() -> None:
    q = POSTERIORS.build("log_var", latent_dim=LATENT)(torch.randn(BATCH, 2 * LATENT))
    p = PRIORS.build("mixture", latent_dim=LATENT)()
    assert isinstance(p, MixtureSameFamily)
    with pytest.raises(
        ValueError, match=r"no closed-form KL\(DiagonalNormal ‖ MixtureSameFamily\)"
    ):
        kl_divergence(q, p)


def test_monte_carlo_with_given_samples_is_pathwise_differentiable() -> None:
    h = torch.randn(BATCH, 2 * LATENT, requires_grad=True)
    q = POSTERIORS.build("log_var", latent_dim=LATENT)(h)
    p = PRIORS.build("mixture", latent_dim=LATENT)()
    z = q.rsample((4,))
    kl = kl_divergence(q, p, z=z)
    expected = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    assert h.grad is not None
    assert (h.grad != 0).all()


@pytest.mark.parametrize("prior_name", PRIOR_NAMES)
@pytest.mark.parametrize("name", DIAGONAL)
def test_kl_per_dim_sums_to_kl_and_matches_one_dimensional_kl(name: str, prior_name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT).double()
    prior = _prior(prior_name)
    q, p = head(_raw(name)), prior()
    per_dim = kl_per_dim(q, p)
    assert per_dim.shape == (BATCH, LATENT)
    torch.testing.assert_close(per_dim.sum(-1), kl_divergence(q, p))
    one_dim = torch_kl_divergence(Normal(q.mean, q.stddev), Normal(p.mean, p.stddev))
    torch.testing.assert_close(per_dim, one_dim)


@pytest.mark.parametrize("name", ["cholesky", "low_rank"])
def test_kl_per_dim_refuses_full_covariance(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=LATENT)
    q = head(torch.randn(BATCH, head.num_params))
    with pytest.raises(ValueError, match="per-dimension KL is undefined"):
        kl_per_dim(q, PRIORS.build("standard_normal", latent_dim=LATENT)())


def test_fused_diagonal_kl_matches_autograd_values_and_gradients() -> None:
    """The hand-written backward of KL(diag ‖ N(0, I)) against autograd through the per-dim
    formula, in float64, with gradients reaching loc, scale and log_scale (and through a head's
    exp, as in training)."""
    torch.manual_seed(3)
    loc = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    prior = StandardNormal(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))

    def fused(loc: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return kl_divergence(DiagonalNormal(loc, raw.exp(), raw), prior)

    def by_autograd(loc: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return (0.5 * (raw.exp().square() + loc.square() - 1.0) - raw).sum(-1)

    weights = torch.randn(5, dtype=torch.float64)
    value = fused(loc, raw)
    torch.testing.assert_close(value, by_autograd(loc, raw), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((value * weights).sum(), (loc, raw))
    expected = torch.autograd.grad((by_autograd(loc, raw) * weights).sum(), (loc, raw))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (loc, raw))
    # a scale shared by the batch broadcasts against the locs
    shared = DiagonalNormal(
        loc,
        torch.full((4,), 2.0, dtype=torch.float64),
        torch.full((4,), math.log(2.0), dtype=torch.float64),
    )
    torch.testing.assert_close(
        kl_divergence(shared, prior), (0.5 * (4.0 + loc.square() - 1.0) - math.log(2.0)).sum(-1)
    )


def test_fused_full_covariance_kl_matches_autograd_values_and_gradients() -> None:
    """KL(MultivariateNormal(μ, L Lᵀ) ‖ N(0, I)) with its hand-written backward, against
    autograd through ½(‖L‖²_F + ‖μ‖² − d) − Σ log L_ii, in float64; and a scale_tril shared by
    the batch, whose gradient sums over it."""
    torch.manual_seed(4)
    dim = 3
    loc = torch.randn(4, dim, dtype=torch.float64, requires_grad=True)
    lower = torch.randn(4, dim, dim, dtype=torch.float64).tril(-1)
    raw_diagonal = torch.randn(4, dim, dtype=torch.float64)
    lower.requires_grad_()
    raw_diagonal.requires_grad_()
    prior = StandardNormal(
        torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    )

    def scale_tril(lower: torch.Tensor, raw_diagonal: torch.Tensor) -> torch.Tensor:
        return lower.tril(-1) + torch.diag_embed(raw_diagonal.exp())

    def fused(loc: torch.Tensor, lower: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        q = MultivariateNormal(loc, scale_tril=scale_tril(lower, raw), validate_args=False)
        return kl_divergence(q, prior)

    def by_autograd(loc: torch.Tensor, lower: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        tril = scale_tril(lower, raw)
        frobenius = tril.square().sum((-2, -1))
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return 0.5 * (frobenius + loc.square().sum(-1) - dim) - log_det

    inputs = (loc, lower, raw_diagonal)
    weights = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(fused(*inputs), by_autograd(*inputs), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((fused(*inputs) * weights).sum(), inputs)
    expected = torch.autograd.grad((by_autograd(*inputs) * weights).sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, inputs)
    # one scale_tril for the whole batch: its gradient is the sum over the batch
    shared = scale_tril(lower[0], raw_diagonal[0]).detach().requires_grad_()
    q = MultivariateNormal(loc.detach(), scale_tril=shared, validate_args=False)
    (kl_divergence(q, prior) * weights).sum().backward()
    reference = shared.detach().clone().requires_grad_()
    want = (
        0.5 * (reference.square().sum() + loc.detach().square().sum(-1) - dim)
        - reference.diagonal().log().sum()
    )
    (want * weights).sum().backward()
    assert shared.grad is not None
    torch.testing.assert_close(shared.grad, reference.grad)
