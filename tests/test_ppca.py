"""The ELBO against the exact log-likelihood of probabilistic PCA, per posterior head."""

import math

import pytest
import torch

from lit_vae.data import PPCADataModule
from lit_vae.kl import kl_divergence
from lit_vae.module import LitVAE
from lit_vae.objectives import IWAEObjective
from lit_vae.ppca import best_diagonal_gap, fit_posterior, linear_gaussian_elbo, load_true_decoder


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 matrices: one thread is fastest
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datamodule() -> PPCADataModule:
    return PPCADataModule()  # data_dim 10, latent_dim 3, noise_std 0.5, as conf/data/ppca.yaml


def _model(datamodule: PPCADataModule, posterior: str) -> LitVAE:
    model = LitVAE(
        data_shape=(datamodule.data_dim,),
        latent_dim=datamodule.latent_dim,
        encoder={"name": "mlp", "hidden_sizes": []},
        decoder={"name": "linear"},
        posterior={"name": posterior},
        likelihood={"name": "gaussian", "scale": datamodule.noise_std},
    ).double()
    load_true_decoder(model, datamodule)
    return model


def test_true_posterior_gives_the_exact_log_likelihood(datamodule: PPCADataModule) -> None:
    """(a) With the true W, b and q = p(z|x) the ELBO is log p(x) (float64)."""
    model = _model(datamodule, "cholesky")
    x = datamodule.split("test")[0][:200].double()
    exact = datamodule.exact_log_prob(x)
    model.encode = datamodule.true_posterior  # type: ignore[method-assign]
    with torch.no_grad():
        elbo = linear_gaussian_elbo(model, x)
        torch.testing.assert_close(elbo, exact, atol=1e-4, rtol=0)
        assert float((elbo - exact).abs().max()) < 1e-6
        # every log weight log p(x|z) + log p(z) − log q(z|x) is log p(x), so the model's
        # training path gives it from any samples, and so does IWAE
        model.objective = IWAEObjective(num_samples=16)
        terms = model.elbo_terms(x)
        torch.testing.assert_close(-terms.loss, exact, atol=1e-6, rtol=0)
        torch.testing.assert_close(terms.penalty.kl, kl_divergence(terms.q, model.prior()))
        torch.testing.assert_close(model.log_likelihood(x, 8), exact, atol=1e-6, rtol=0)


def test_closed_form_elbo_matches_monte_carlo(datamodule: PPCADataModule) -> None:
    """The closed-form ELBO used below is the model's ELBO: its Monte Carlo mean agrees."""
    model = _model(datamodule, "log_var")
    x = datamodule.split("test")[0][:50].double()
    with torch.no_grad():
        closed = linear_gaussian_elbo(model, x)
        recon = torch.stack([model.elbo_terms(x).recon for _ in range(4000)])
        kl = model.elbo_terms(x).penalty.kl
        monte_carlo = -(recon.mean(0) + kl)
        error = recon.std(0) / math.sqrt(recon.shape[0])
    assert torch.all((monte_carlo - closed).abs() < 5 * error + 1e-9)


@pytest.mark.slow
def test_trained_heads_gaps(datamodule: PPCADataModule) -> None:
    """(b) the cholesky head closes the gap; (c) the log_var head keeps the gap of the best
    diagonal Gaussian, ½(Σ log Λ_jj − log det Λ), which the theory puts at 0.080 nats here.

    The decoder stays at the true W, b (frozen), so log p(x) is the data's exact one and the
    gap is KL(q(z|x) ‖ p(z|x)) of the trained encoder alone.
    """
    x_train = datamodule.split("train")[0].double()
    x_test = datamodule.split("test")[0].double()
    exact = datamodule.exact_log_prob(x_test)
    floor = best_diagonal_gap(datamodule)
    assert floor == pytest.approx(0.0800, abs=5e-4)

    torch.manual_seed(0)
    cholesky = _model(datamodule, "cholesky")
    fit_posterior(cholesky, x_train, steps=1500, lr=0.1)
    torch.manual_seed(0)
    log_var = _model(datamodule, "log_var")
    fit_posterior(log_var, x_train, steps=4000, lr=0.1)

    with torch.no_grad():
        cholesky_gap = float((exact - linear_gaussian_elbo(cholesky, x_test)).mean())
        iwae_gap = float((exact - cholesky.log_likelihood(x_test, 1000)).mean())
        log_var_gap = float((exact - linear_gaussian_elbo(log_var, x_test)).mean())
    assert 0.0 <= cholesky_gap < 0.05
    assert abs(iwae_gap) < 0.05
    # no diagonal q can beat the floor (a theorem, exact in float64) and training gets near it
    assert log_var_gap >= floor - 1e-9
    assert log_var_gap < floor + 0.03
    assert log_var_gap - cholesky_gap > floor - 0.05
