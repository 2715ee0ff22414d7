"""Mixed precision: the networks run under autocast, the posterior, prior, ``z``, KL and
likelihood in float32 (float64 stays float64)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lit_vae.data import TensorDataModule
from lit_vae.module import ElboTerms, LitVAE
from lit_vae.noise import NoiseKey, keyed_rsample
from lit_vae.precision import at_least_float32, full_precision
from lit_vae.sharding import BatchShard
from tests.helpers import quiet_trainer

HEADS = ["log_var", "cholesky", "low_rank"]
PRIORS = [{"name": "standard_normal"}, {"name": "mixture", "num_components": 3}]


def _model(head: str, prior: dict[str, Any]) -> LitVAE:
    torch.manual_seed(0)
    return LitVAE(
        data_shape=(1, 8, 8),
        latent_dim=4,
        encoder={"name": "mlp", "hidden_sizes": [64]},
        decoder={"name": "mlp", "hidden_sizes": [64]},
        posterior={"name": head},
        prior=prior,
    )


def _x(batch: int = 32) -> Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_autocast_lowers_matrix_products_on_cpu() -> None:
    # the premise: a Cholesky or low-rank sample z = μ + L ε under autocast would be bfloat16
    scale_tril = torch.eye(4) + 0.1 * torch.randn(4, 4).tril()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(scale_tril, torch.randn(4, 1)).dtype == torch.bfloat16
        with full_precision(torch.device("cpu")):
            assert torch.matmul(scale_tril, torch.randn(4, 1)).dtype == torch.float32


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p["name"])
@pytest.mark.parametrize("head", HEADS)
def test_kl_is_float32_and_exact_under_bf16_autocast(head: str, prior: dict[str, Any]) -> None:
    model = _model(head, prior)
    x = _x()
    key = NoiseKey(seed=123, shard=BatchShard(0, x.shape[0], x.shape[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms: ElboTerms = model.elbo_terms(x, key)
        params = model._posterior_params(x)  # the encoder output the step used
        encoder_dtype = model.encoder(x).dtype
    assert encoder_dtype == torch.bfloat16  # the network did run in bfloat16
    for name, value in {
        "kl": terms.penalty.kl,
        "penalty": terms.penalty.penalty,
        "recon": terms.recon,
        "z": terms.z,
    }.items():
        assert value.dtype == torch.float32, name

    # the same q, z and KL computed in float32 without autocast: identical
    q = model.posterior(params)
    z = keyed_rsample(model.posterior, params, key).unsqueeze(0)
    penalty = model.regularizer(q, model.prior(), z, 0)
    torch.testing.assert_close(terms.z, z, rtol=0, atol=0)
    torch.testing.assert_close(terms.penalty.kl, penalty.kl, rtol=1e-6, atol=1e-6)

    # and close to the all-float32 model: only the encoder's rounding differs
    full = model.elbo_terms(x, key)
    torch.testing.assert_close(terms.penalty.kl, full.penalty.kl, rtol=0.05, atol=0.05)
    torch.testing.assert_close(terms.recon, full.recon, rtol=0.02, atol=0.5)


def test_log_likelihood_under_autocast_is_float32() -> None:
    model = _model("cholesky", PRIORS[1])
    x = _x(8)
    key = NoiseKey(seed=5, shard=BatchShard(0, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.log_likelihood(x, num_samples=20, chunk_size=7, noise=key)
    full = model.log_likelihood(x, num_samples=20, chunk_size=7, noise=key)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=0.02, atol=0.5)


def test_float64_stays_float64() -> None:
    model = _model("low_rank", PRIORS[0]).double()
    terms = model.elbo_terms(_x(4).double())
    assert terms.penalty.kl.dtype == torch.float64
    assert terms.z.dtype == torch.float64
    assert at_least_float32(torch.ones(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_float32(torch.ones(1, dtype=torch.float64)).dtype == torch.float64


class _Recorder(LitVAE):
    """Records the dtypes of every training step's terms."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict[str, torch.dtype]] = []

    def elbo_terms(self, x: Tensor, noise: NoiseKey | None = None) -> ElboTerms:
        terms = super().elbo_terms(x, noise)
        if self.training:
            self.seen.append(
                {
                    "kl": terms.penalty.kl.dtype,
                    "recon": terms.recon.dtype,
                    "z": terms.z.dtype,
                    "decoder": self.decoder(terms.z[0]).dtype,
                }
            )
        return terms


def test_bf16_mixed_trainer_keeps_the_kl_in_float32(tmp_path: Any) -> None:
    model = _Recorder(
        data_shape=(1, 8, 8),
        latent_dim=3,
        encoder={"name": "mlp", "hidden_sizes": [16]},
        decoder={"name": "mlp", "hidden_sizes": [16]},
        posterior={"name": "cholesky"},
    )
    data = TensorDataModule(train=_x(64), val=_x(16), batch_size=16)
    trainer = quiet_trainer(
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert len(model.seen) == 2
    for seen in model.seen:
        assert seen == {
            "kl": torch.float32,
            "recon": torch.float32,
            "z": torch.float32,
            "decoder": torch.bfloat16,
        }
    assert torch.isfinite(trainer.callback_metrics["val/elbo"])
