"""Likelihoods: fused nll against float64 references, float32 under autocast, broadcasting,
means, output biases, option checks and the likelihood configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal

import lit_vae
from lit_vae.likelihoods import (
    LIKELIHOODS,
    continuous_bernoulli_log_norm,
    continuous_bernoulli_mean,
)

LIKELIHOOD_CONFIGS = sorted((Path(lit_vae.__file__).parent / "conf" / "likelihood").glob("*.yaml"))
NAMES = ["bernoulli", "continuous_bernoulli", "gaussian"]
SHAPE = (2, 3, 4)
F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def reference_log_prob(name: str, params: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
    """float64 ``log p(x | params)`` summed over SHAPE, from ``torch.distributions``."""
    params, x = params.to(F64), x.to(F64)
    base: torch.distributions.Distribution
    if name == "bernoulli":
        base = Bernoulli(logits=params, validate_args=False)
    elif name == "continuous_bernoulli":
        base = ContinuousBernoulli(logits=params, validate_args=False)
    else:
        base = Normal(params, torch.full_like(params, scale), validate_args=False)
    return Independent(base, len(SHAPE), validate_args=False).log_prob(x)


def textbook_nll(name: str, logits_or_mean: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
    """float64 elementwise formulas, summed over the last three dims."""
    p, x = logits_or_mean.to(F64), x.to(F64)
    if name == "gaussian":
        per = 0.5 * ((x - p) / scale) ** 2 + math.log(scale) + 0.5 * math.log(2 * math.pi)
    else:
        lam = torch.sigmoid(p)
        per = -(x * torch.log(lam) + (1 - x) * torch.log1p(-lam))
        if name == "continuous_bernoulli":
            # C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), 2 at lambda = 1/2
            u = 1 - 2 * lam
            c = torch.where(u == 0, torch.full_like(u, 2.0), 2 * torch.atanh(u) / u)
            per = per - torch.log(c)
    return per.sum(dim=(-3, -2, -1))


def sample_x(name: str, shape: tuple[int, ...]) -> Tensor:
    if name == "gaussian":
        return torch.randn(shape, dtype=F64)
    x = torch.rand(shape, dtype=F64)  # fractional pixels
    flat = x.view(-1)
    flat[:6] = torch.tensor([0.0, 1.0, 1e-6, 1 - 1e-6, 0.5, 1e-3], dtype=F64)
    return x


# ----------------------------------------------------------------------------- nll values


@pytest.mark.parametrize("name", NAMES)
def test_nll_matches_torch_distributions_in_float64(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=SHAPE)
    params = 3 * torch.randn(5, *SHAPE, dtype=F64)
    x = sample_x(name, (5, *SHAPE))
    nll = lik.nll(params, x)
    assert nll.shape == (5,)
    assert nll.dtype == F64
    torch.testing.assert_close(nll, -reference_log_prob(name, params, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll, textbook_nll(name, params, x), rtol=1e-6, atol=1e-6)
    # the distribution returned by forward agrees with the fused path
    torch.testing.assert_close(-lik(params).log_prob(x), nll, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float32_nll_matches_float64_reference(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=SHAPE)
    params = (3 * torch.randn(5, *SHAPE)).float()
    x = sample_x(name, (5, *SHAPE)).float()
    nll = lik.nll(params, x)
    assert nll.dtype == torch.float32
    ref = -reference_log_prob(name, params, x)
    torch.testing.assert_close(nll.to(F64), ref, rtol=1e-6, atol=1e-5)


def test_bernoulli_nll_with_fractional_pixels() -> None:
    lik = LIKELIHOODS.build("bernoulli", data_shape=(3,))
    logits = torch.tensor([[0.0, 2.0, -1.5]], dtype=F64)
    x = torch.tensor([[0.3, 0.5, 0.9]], dtype=F64)
    lam = torch.sigmoid(logits)
    expected = -(x * lam.log() + (1 - x) * (1 - lam).log()).sum(-1)
    torch.testing.assert_close(lik.nll(logits, x), expected, rtol=1e-12, atol=1e-12)


def test_continuous_bernoulli_near_zero_logits_and_boundary_pixels() -> None:
    logits = torch.tensor(
        [0.0, 1e-8, -1e-6, 1e-4, -3e-3, 0.01, -0.0999, 0.1, 0.1001, 0.3, -0.5, 0.5001, 2.0, -8.0],
        dtype=F64,
    )
    lik = LIKELIHOODS.build("continuous_bernoulli", data_shape=(logits.numel(),))
    for pixel in (0.0, 1e-7, 0.5, 1 - 1e-7, 1.0):
        x = torch.full_like(logits, pixel)
        ref = ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x)
        torch.testing.assert_close(lik.nll(logits, x), -ref.sum(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lik.elementwise_nll(logits, x), -ref, rtol=1e-6, atol=1e-9)


def test_continuous_bernoulli_log_norm_closed_form() -> None:
    # log C = log(l / tanh(l / 2)); at l = 0 it is log 2; far from 0 torch's probs-based
    # formula loses precision, the closed form in logits does not.
    logits = torch.tensor([1e-6, 0.05, 0.0999, 0.1, 0.7, 3.0, 15.0, 60.0, 700.0], dtype=F64)
    expected = torch.log(logits / torch.tanh(logits / 2))
    for sign in (1.0, -1.0):
        got = continuous_bernoulli_log_norm(sign * logits)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    zero = continuous_bernoulli_log_norm(torch.zeros(1, dtype=F64))
    torch.testing.assert_close(zero, torch.tensor([math.log(2.0)], dtype=F64))


def test_continuous_bernoulli_mean_matches_torch() -> None:
    logits = torch.cat(
        [
            torch.linspace(-12, 12, 241, dtype=F64),
            torch.tensor([0.0, 1e-7, -1e-4, 0.4999, -0.5, 0.5001], dtype=F64),
        ]
    )
    lik = LIKELIHOODS.build("continuous_bernoulli", data_shape=(logits.numel(),))
    expected = ContinuousBernoulli(logits=logits, validate_args=False).mean
    torch.testing.assert_close(lik.mean(logits), expected, rtol=1e-9, atol=1e-10)
    # far tails: mean ~ -1/l and 1 + 1/l, no overflow in float32
    big = torch.tensor([-1000.0, 1000.0])
    torch.testing.assert_close(continuous_bernoulli_mean(big), torch.tensor([1e-3, 1 - 1e-3]))


def test_continuous_bernoulli_gradients_are_finite_everywhere() -> None:
    logits = torch.tensor([0.0, 1e-30, -0.1, 0.1, 0.5, -0.5, 80.0, -1000.0], requires_grad=True)
    lik = LIKELIHOODS.build("continuous_bernoulli", data_shape=(logits.numel(),))
    x = torch.rand(logits.numel())
    (lik.nll(logits, x).sum() + lik.mean(logits).sum()).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("scale", [0.1, 1.0, 2.5])
def test_gaussian_nll_is_a_normalised_density(scale: float) -> None:
    lik = LIKELIHOODS.build("gaussian", data_shape=SHAPE, scale=scale)
    mean = torch.randn(4, *SHAPE, dtype=F64)
    x = mean + scale * torch.randn(4, *SHAPE, dtype=F64)
    d = math.prod(SHAPE)
    closed = (
        0.5 * ((x - mean) / scale).square().sum(dim=(-3, -2, -1))
        + d * math.log(scale)
        + 0.5 * d * math.log(2 * math.pi)
    )
    torch.testing.assert_close(lik.nll(mean, x), closed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lik.scale.double(), torch.tensor(scale, dtype=F64))


def test_gaussian_learned_scale_gets_the_right_gradient() -> None:
    lik = LIKELIHOODS.build("gaussian", data_shape=(5,), scale=0.5, learn_scale=True)
    names = [n for n, _ in lik.named_parameters()]
    assert names == ["log_scale"]
    torch.testing.assert_close(lik.log_scale.detach(), torch.tensor(math.log(0.5)))
    mean, x = torch.randn(3, 5), torch.randn(3, 5)
    lik.nll(mean, x).sum().backward()
    assert lik.log_scale.grad is not None
    # d nll / d log sigma = sum(1 - ((x - mu) / sigma)^2)
    expected = (1 - ((x - mean) / 0.5).square()).sum()
    torch.testing.assert_close(lik.log_scale.grad, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_fixed_scale_is_a_buffer() -> None:
    lik = LIKELIHOODS.build("gaussian", data_shape=(5,), scale=2.0)
    assert list(lik.parameters()) == []
    assert "log_scale" in lik.state_dict()


# ----------------------------------------------------------------------------- dtype and shapes


@pytest.mark.parametrize("name", NAMES)
def test_nll_is_float32_under_bf16_autocast(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=SHAPE)
    layer = torch.nn.Linear(4, 4)
    x = sample_x(name, (3, *SHAPE)).float()
    h = torch.randn(3, 2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = layer(h)
        assert params.dtype == torch.bfloat16
        nll = lik.nll(params, x)
    assert nll.dtype == torch.float32
    # equal to the float32 nll of the same bfloat16 parameters, computed outside autocast
    torch.testing.assert_close(nll, lik.nll(params.float(), x))
    # the parameters' precision decides: float64 data do not promote a float32 model
    assert lik.nll(params.float(), x.double()).dtype == torch.float32
    assert lik.nll(params, x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_nll_broadcasts_a_leading_samples_dim(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=SHAPE)
    params = torch.randn(7, 3, *SHAPE)  # (samples, batch, *data_shape)
    x = sample_x(name, (3, *SHAPE)).float()  # (batch, *data_shape)
    nll = lik.nll(params, x)
    assert nll.shape == (7, 3)
    for s in range(7):
        torch.testing.assert_close(nll[s], lik.nll(params[s], x))
    assert lik(params).batch_shape == (7, 3)


@pytest.mark.parametrize("name", NAMES)
def test_distribution_shapes_and_samples(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=(1, 8, 8))
    params = torch.randn(4, 1, 8, 8)
    dist = lik(params)
    assert dist.event_shape == (1, 8, 8)
    assert dist.batch_shape == (4,)
    x = lik.sample(params)
    assert x.shape == params.shape
    assert not x.requires_grad
    if name == "bernoulli":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    if name == "continuous_bernoulli":
        assert ((x >= 0) & (x <= 1)).all()
    assert lik.mean(params).shape == params.shape


def test_means_in_data_space() -> None:
    logits = torch.randn(3, *SHAPE)
    bern = LIKELIHOODS.build("bernoulli", data_shape=SHAPE)
    torch.testing.assert_close(bern.mean(logits), torch.sigmoid(logits))
    gauss = LIKELIHOODS.build("gaussian", data_shape=SHAPE, scale=0.3)
    torch.testing.assert_close(gauss.mean(logits), logits)
    cb = LIKELIHOODS.build("continuous_bernoulli", data_shape=SHAPE)
    # torch's float32 mean loses digits near logit 0, so the reference is float64
    expected = ContinuousBernoulli(logits=logits.double()).mean
    torch.testing.assert_close(cb.mean(logits).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_raises(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=SHAPE)
    with pytest.raises(ValueError, match="params"):
        lik.nll(torch.randn(3, 2, 3, 5), torch.rand(3, *SHAPE))
    with pytest.raises(ValueError, match="x must"):
        lik.nll(torch.randn(3, *SHAPE), torch.rand(3, 24))
    with pytest.raises(ValueError, match="params"):
        lik(torch.randn(24))


# ----------------------------------------------------------------------------- output bias


@pytest.mark.parametrize("name", NAMES)
def test_output_bias_round_trips_to_the_training_mean(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=(1, 8, 8))
    train_mean = torch.rand(1, 8, 8).clamp(1e-3, 1 - 1e-3)
    train_mean.view(-1)[:3] = torch.tensor([1e-3, 0.5, 1 - 1e-3])
    bias = lik.output_bias_for(train_mean)
    assert bias is not None
    assert bias.shape == train_mean.shape
    assert bias.dtype == train_mean.dtype
    torch.testing.assert_close(lik.mean(bias), train_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bernoulli", "continuous_bernoulli"])
def test_output_bias_is_finite_for_constant_pixels(name: str) -> None:
    lik = LIKELIHOODS.build(name, data_shape=(4,))
    train_mean = torch.tensor([0.0, 0.0, 1.0, 0.4])
    bias = lik.output_bias_for(train_mean)
    assert bias is not None
    assert torch.isfinite(bias).all()
    mean = lik.mean(bias)
    torch.testing.assert_close(mean, torch.tensor([1e-3, 1e-3, 1 - 1e-3, 0.4]), rtol=1e-5, atol=0)


def test_bernoulli_output_bias_is_the_clamped_logit() -> None:
    lik = LIKELIHOODS.build("bernoulli", data_shape=(3,))
    bias = lik.output_bias_for(torch.tensor([0.0, 0.25, 1.0]))
    assert bias is not None
    torch.testing.assert_close(bias, torch.logit(torch.tensor([1e-3, 0.25, 1 - 1e-3])))


# ----------------------------------------------------------------------------- options, configs


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("gaussian", {"scale": 0.0}, "scale"),
        ("gaussian", {"scale": -1.0}, "scale"),
        ("gaussian", {"scale": float("nan")}, "scale"),
        ("gaussian", {"scale": "1"}, "scale"),
        ("gaussian", {"learn_scale": "yes"}, "learn_scale"),
        ("bernoulli", {"data_shape": ()}, "data_shape"),
        ("bernoulli", {"data_shape": (1, 0)}, "data_shape"),
        ("continuous_bernoulli", {"data_shape": "784"}, "data_shape"),
    ],
)
def test_bad_options_name_the_option(name: str, options: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        LIKELIHOODS.build(name, **{"data_shape": (4,), **options})


def test_registered_names() -> None:
    assert LIKELIHOODS.names() == NAMES


@pytest.mark.parametrize("path", LIKELIHOOD_CONFIGS, ids=lambda p: p.stem)
def test_likelihood_configs_build(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    assert cfg.name == path.stem
    lik = LIKELIHOODS.from_config(cfg, "likelihood", data_shape=(1, 8, 8))
    params = torch.randn(2, 3, 1, 8, 8)
    assert lik.nll(params, torch.rand(3, 1, 8, 8)).shape == (2, 3)


def test_likelihood_config_names() -> None:
    assert [p.stem for p in LIKELIHOOD_CONFIGS] == NAMES
    gauss = OmegaConf.load(LIKELIHOOD_CONFIGS[2])
    assert gauss.scale == 1.0
    assert gauss.learn_scale is False
