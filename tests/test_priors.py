import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily, Normal

from lit_vae.posteriors import POSTERIORS
from lit_vae.priors import PRIORS, VampPrior

LATENT = 3
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_registry_holds_exactly_the_documented_priors() -> None:
    assert PRIORS.names() == ["learned_diagonal", "mixture", "standard_normal", "vamp"]


@pytest.mark.parametrize(("group", "registry"), [("posterior", POSTERIORS), ("prior", PRIORS)])
def test_every_registry_name_has_its_yaml_and_vice_versa(group: str, registry) -> None:
    import yaml

    files = {path.stem: path for path in (CONF / group).glob("*.yaml")}
    assert sorted(files) == registry.names()
    for name, path in files.items():
        assert yaml.safe_load(path.read_text())["name"] == name


def _build(name: str) -> torch.nn.Module:
    if name == "vamp":
        prior = PRIORS.build(name, latent_dim=LATENT, input_shape=(4,), num_components=5)
        encoder = torch.nn.Linear(4, 2 * LATENT)
        head = POSTERIORS.build("log_var", latent_dim=LATENT)
        prior.bind(lambda x: head(encoder(x)))
        return prior
    return PRIORS.build(name, latent_dim=LATENT)


@pytest.mark.parametrize("name", ["standard_normal", "learned_diagonal", "mixture", "vamp"])
def test_prior_interface(name: str) -> None:
    prior = _build(name)
    p = prior()
    assert isinstance(p, Distribution)
    assert p.event_shape == (LATENT,)
    assert p.batch_shape == ()
    z = torch.randn(2, 7, LATENT)
    assert p.log_prob(z).shape == (2, 7)
    assert p.sample((6,)).shape == (6, LATENT)


@pytest.mark.parametrize("name", ["learned_diagonal", "mixture", "vamp"])
def test_learned_priors_receive_gradients(name: str) -> None:
    prior = _build(name)
    prior().log_prob(torch.randn(10, LATENT)).sum().backward()
    parameters = list(prior.parameters())
    assert parameters
    for parameter in parameters:
        assert parameter.grad is not None
        assert torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_standard_normal_has_no_parameters_and_follows_dtype() -> None:
    prior = PRIORS.build("standard_normal", latent_dim=LATENT).double()
    assert not list(prior.parameters())
    assert prior().mean.dtype == torch.float64
    assert prior.state_dict() == {}


def test_mixture_log_prob_is_the_log_sum_of_weighted_components() -> None:
    prior = PRIORS.build("mixture", latent_dim=LATENT, num_components=4).double()
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.log_scale.copy_(0.3 * torch.randn(4, LATENT))
    z = torch.randn(9, LATENT, dtype=torch.float64)
    weights = prior.logits.softmax(0)
    density = sum(
        weights[k]
        * Independent(Normal(prior.loc[k], prior.log_scale[k].exp()), 1).log_prob(z).exp()
        for k in range(4)
    )
    torch.testing.assert_close(prior().log_prob(z), torch.log(density))


def test_vamp_is_the_uniform_mixture_of_posteriors_at_pseudo_inputs() -> None:
    prior = _build("vamp")
    assert isinstance(prior, VampPrior)
    p = prior()
    assert isinstance(p, MixtureSameFamily)
    pseudo = torch.sigmoid(prior.pseudo_inputs)
    z = torch.randn(8, LATENT)
    components = torch.stack(
        [p.component_distribution.log_prob(z[:, None])[:, k] for k in range(5)], -1
    )
    expected = torch.logsumexp(components, -1) - math.log(5)
    torch.testing.assert_close(p.log_prob(z), expected)
    assert pseudo.shape == (5, 4)


def test_vamp_needs_bind_and_keeps_encoder_out_of_its_state() -> None:
    prior = PRIORS.build("vamp", latent_dim=LATENT, input_shape=(1, 2, 2), num_components=3)
    with pytest.raises(RuntimeError, match=r"call prior.bind"):
        prior()
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2 * LATENT))
    prior.bind(lambda x: POSTERIORS.build("log_var", latent_dim=LATENT)(encoder(x)))
    assert list(prior.state_dict()) == ["pseudo_inputs"]
    assert prior().batch_shape == ()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("standard_normal", {"latent_dim": -1}, r"prior.latent_dim=-1: must be an integer >= 1"),
        ("mixture", {"latent_dim": 2, "num_components": 0}, r"prior.num_components=0"),
        (
            "vamp",
            {"latent_dim": 2, "input_shape": (3,), "input_activation": "tanh"},
            r"prior.input_activation='tanh': allowed: sigmoid, identity",
        ),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PRIORS.build(name, **options)
