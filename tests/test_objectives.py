import math

import pytest
import torch

from lit_vae.data import PPCADataModule
from lit_vae.kl import kl_divergence
from lit_vae.module import LitVAE
from lit_vae.objectives import OBJECTIVES, ElboObjective, IWAEObjective, log_weights
from lit_vae.ppca import load_true_decoder


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 matrices: one thread is fastest
    yield
    torch.set_num_threads(threads)


def _model(**options: object) -> LitVAE:
    return LitVAE(
        (1, 4, 4),
        latent_dim=3,
        encoder={"name": "mlp", "hidden_sizes": [16]},
        decoder={"name": "mlp", "hidden_sizes": [16]},
        **options,  # type: ignore[arg-type]
    )


def _x(n: int = 10) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(3))


def test_registry_and_defaults() -> None:
    assert OBJECTIVES.names() == ["elbo", "iwae"]
    assert ElboObjective().num_samples == 1
    assert IWAEObjective().num_samples == 5
    with pytest.raises(ValueError, match=r"objective\.num_samples=0: must be an integer >= 1"):
        IWAEObjective(num_samples=0)


def test_iwae_with_one_sample_is_the_single_sample_elbo() -> None:
    model = _model(objective={"name": "iwae", "num_samples": 1})
    x = _x()
    terms = model.elbo_terms(x)
    assert terms.z.shape == (1, 10, 3)
    q, p = terms.q, terms.p
    expected = terms.recon + q.log_prob(terms.z[0]) - p.log_prob(terms.z[0])
    torch.testing.assert_close(terms.loss, expected)


def test_iwae_k1_equals_elbo_loss_with_the_same_samples() -> None:
    """With a mixture prior the ELBO's KL is Monte Carlo over the same z: identical numbers."""
    model = _model(prior={"name": "mixture", "num_components": 4})
    x = _x()
    torch.manual_seed(11)
    elbo = model.elbo_terms(x)
    model.objective = IWAEObjective(num_samples=1)
    torch.manual_seed(11)
    iwae = model.elbo_terms(x)
    torch.testing.assert_close(iwae.z, elbo.z)
    torch.testing.assert_close(iwae.loss, elbo.loss)
    torch.testing.assert_close(iwae.penalty.kl, elbo.penalty.kl)


def test_iwae_logs_the_true_elbo_from_its_samples() -> None:
    model = _model(objective={"name": "iwae", "num_samples": 8})
    x = _x()
    terms = model.elbo_terms(x)
    assert terms.z.shape == (8, 10, 3)
    with torch.no_grad():
        recon = model.likelihood.nll(model.decoder(terms.z), x)
        log_w = log_weights(recon, terms.q, terms.p, terms.z)
    torch.testing.assert_close(terms.recon, recon.mean(0))
    torch.testing.assert_close(terms.penalty.kl, kl_divergence(terms.q, terms.p))
    torch.testing.assert_close(terms.loss, -(torch.logsumexp(log_w, 0) - math.log(8)))
    # Jensen: the IWAE bound is above the mean of its log weights for every x
    assert torch.all(-terms.loss >= log_w.mean(0) - 1e-6)


def test_iwae_needs_the_plain_kl() -> None:
    for regularizer in (
        {"name": "kl", "beta": 2.0},
        {"name": "kl", "beta": 1.0, "schedule": {"name": "linear"}},
        {"name": "free_bits"},
    ):
        with pytest.raises(ValueError, match=r"objective\.name=iwae: the bound has no separate KL"):
            _model(objective={"name": "iwae"}, regularizer=regularizer)


def _ppca_model_with_known_gap() -> tuple[LitVAE, PPCADataModule, float]:
    """A linear model at the true PPCA parameters whose affine encoder outputs the exact
    posterior mean and twice the best diagonal variances: ``KL(q ‖ p(z|x))`` is the same
    known number for every ``x``."""
    datamodule = PPCADataModule(num_train=10, num_val=10, num_test=1000)
    model = LitVAE(
        (10,),
        3,
        encoder={"name": "mlp", "hidden_sizes": []},
        decoder={"name": "linear"},
        likelihood={"name": "gaussian"},
        posterior={"name": "log_var"},
    ).double()
    load_true_decoder(model, datamodule)
    params = datamodule.true_params()
    weight, bias, variance = params["weight"], params["bias"], params["noise_std"] ** 2
    m = weight.T @ weight + variance * torch.eye(3, dtype=torch.float64)
    gain = torch.linalg.solve(m, weight.T)  # posterior mean = gain (x − b)
    precision = m / variance
    log_var = torch.log(2.0 / precision.diagonal())
    layer = model.encoder.net[-1]  # type: ignore[index]
    with torch.no_grad():
        layer.weight.copy_(torch.cat([gain, torch.zeros(3, 10, dtype=torch.float64)]))
        layer.bias.copy_(torch.cat([-gain @ bias, log_var]))
    covariance = torch.linalg.inv(precision)
    q_cov = torch.diag(2.0 / precision.diagonal())
    gap = 0.5 * float(
        torch.trace(precision @ q_cov) - 3 + torch.logdet(covariance) - torch.logdet(q_cov)
    )
    return model, datamodule, gap


def test_iwae_bound_grows_with_k_towards_log_likelihood() -> None:
    model, datamodule, gap = _ppca_model_with_known_gap()
    x = datamodule.split("test")[0].double()
    exact = datamodule.exact_log_prob(x)
    q = model.encode(x)
    torch.testing.assert_close(q.mean, datamodule.true_posterior(x).mean)
    n = x.shape[0]
    means, errors = [], []
    ks = (1, 4, 16, 64, 256)
    with torch.no_grad():
        for k in ks:
            model.objective = IWAEObjective(num_samples=k)
            deficit = -model.elbo_terms(x).loss - exact  # bound − log p(x), (n,)
            means.append(float(deficit.mean()))
            errors.append(float(deficit.std()) / math.sqrt(n))
        log_likelihood = model.log_likelihood(x, 256) - exact
    # IWAE-1 is the ELBO in expectation: −gap
    assert abs(means[0] + gap) < 4 * errors[0]
    assert gap > 0.05
    for i in range(len(ks) - 1):
        tolerance = 3 * math.hypot(errors[i], errors[i + 1])
        assert means[i + 1] > means[i] - tolerance, (ks[i], ks[i + 1], means)
    assert means[-1] - means[0] > 5 * math.hypot(errors[0], errors[-1])
    # every bound stays below log p(x) in expectation, and IWAE-256 is within 0.01 nats of it
    assert all(m < 3 * e for m, e in zip(means, errors))
    assert abs(means[-1]) < 0.01
    # the training objective and LitVAE.log_likelihood are the same estimator at equal k
    assert abs(float(log_likelihood.mean()) - means[-1]) < 3 * math.hypot(
        errors[-1], float(log_likelihood.std()) / math.sqrt(n)
    )
