import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.distributions import MultivariateNormal, Normal

from lit_vae.data import TensorDataModule
from lit_vae.distributions import DiagonalNormal
from lit_vae.kl import kl_divergence
from lit_vae.module import LitVAE
from lit_vae.priors import PRIORS
from lit_vae.regularizers import (
    REGULARIZERS,
    BetaTCRegularizer,
    CapacityRegularizer,
    FreeBitsRegularizer,
    KLRegularizer,
    minibatch_weighted_terms,
)
from tests.helpers import quiet_trainer


def _standard(d: int, dtype: torch.dtype = torch.float64) -> DiagonalNormal:
    return PRIORS.build("standard_normal", latent_dim=d).to(dtype)()


def _diagonal(batch: int = 6, d: int = 3) -> tuple[torch.Tensor, torch.Tensor, DiagonalNormal]:
    loc = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)
    log_scale = (0.5 * torch.randn(batch, d, dtype=torch.float64)).requires_grad_()
    return loc, log_scale, DiagonalNormal(loc, log_scale.exp(), log_scale)


def _hand_kl_per_dim(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """−log σ + (σ² + μ²)/2 − ½ per element, elementwise with Python floats."""
    out = torch.empty_like(loc)
    for index in range(loc.numel()):
        m, s = float(loc.flatten()[index]), float(log_scale.flatten()[index])
        out.view(-1)[index] = -s + (math.exp(2 * s) + m * m) / 2 - 0.5
    return out


def test_registry_names() -> None:
    assert REGULARIZERS.names() == ["beta_tc", "capacity", "free_bits", "kl"]


# ------------------------------------------------------------------------------------ kl


def test_kl_with_linear_schedule_scales_the_true_kl() -> None:
    _, _, q = _diagonal()
    p = _standard(3)
    z = q.rsample((1,))
    regularizer = KLRegularizer(beta=2.0, schedule={"name": "linear", "start": 0.0, "steps": 10})
    for step, beta in [(0, 0.0), (5, 1.0), (10, 2.0), (50, 2.0)]:
        penalty = regularizer(q, p, z, step)
        torch.testing.assert_close(penalty.kl, kl_divergence(q, p))
        torch.testing.assert_close(penalty.penalty, beta * penalty.kl)
        assert penalty.logs["beta"] == pytest.approx(beta)


def test_kl_is_elbo_only_for_constant_beta_one() -> None:
    assert KLRegularizer().is_elbo()
    assert KLRegularizer(beta=1.0, schedule={"name": "constant"}).is_elbo()
    assert not KLRegularizer(beta=0.5).is_elbo()
    assert not KLRegularizer(beta=1.0, schedule={"name": "linear"}).is_elbo()
    assert not FreeBitsRegularizer().is_elbo()


def test_kl_bad_beta_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"regularizer\.beta=-1\.0: must be a finite number >= 0"):
        KLRegularizer(beta=-1.0)


# ------------------------------------------------------------------------------------ free bits


def test_free_bits_equals_hand_computation_and_gradients() -> None:
    loc = torch.tensor(
        [[2.0, 0.1, 0.0], [1.0, -0.1, 0.3], [-1.5, 0.2, 0.1], [0.5, 0.0, -0.2]],
        dtype=torch.float64,
        requires_grad=True,
    )
    log_scale = torch.tensor(
        [[-1.0, 0.0, -0.1], [-0.5, 0.05, 0.0], [-0.8, 0.0, 0.1], [-1.2, -0.05, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    q = DiagonalNormal(loc, log_scale.exp(), log_scale)
    per_dim = _hand_kl_per_dim(loc.detach(), log_scale.detach())
    batch_mean = per_dim.mean(0)
    threshold = 0.25
    assert batch_mean[0] > threshold
    assert torch.all(batch_mean[1:] < threshold)
    expected = sum(max(threshold, float(k)) for k in batch_mean)

    penalty = FreeBitsRegularizer(threshold=threshold)(q, _standard(3), q.rsample((1,)), 0)
    assert float(penalty.penalty.detach().mean()) == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(penalty.kl, per_dim.sum(-1))
    assert float(penalty.logs["free_bits_clamped"]) == pytest.approx(2 / 3)

    penalty.penalty.mean().backward()
    assert loc.grad is not None
    assert log_scale.grad is not None
    # dims under λ get no gradient; dim 0 gets the gradient of its batch-mean KL
    assert torch.all(loc.grad[:, 1:] == 0)
    assert torch.all(log_scale.grad[:, 1:] == 0)
    batch = loc.shape[0]
    torch.testing.assert_close(loc.grad[:, 0], loc.detach()[:, 0] / batch)
    torch.testing.assert_close(
        log_scale.grad[:, 0], ((2 * log_scale.detach()[:, 0]).exp() - 1.0) / batch
    )


def test_free_bits_groups() -> None:
    loc, log_scale, q = _diagonal(batch=5, d=3)
    per_dim = _hand_kl_per_dim(loc.detach(), log_scale.detach())
    groups = [per_dim[:, :2].sum(-1).mean(), per_dim[:, 2].mean()]  # group_size 2: [0, 1], [2]
    threshold = float(groups[0] + groups[1]) / 2  # between or above the two
    expected = sum(max(threshold, float(g)) for g in groups)
    penalty = FreeBitsRegularizer(threshold=threshold, group_size=2)(q, _standard(3), loc, 0)
    assert float(penalty.penalty.detach().mean()) == pytest.approx(expected, rel=1e-12)


def test_free_bits_refuses_full_covariance() -> None:
    scale_tril = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    q = MultivariateNormal(torch.zeros(4, 3, dtype=torch.float64), scale_tril=scale_tril)
    with pytest.raises(ValueError, match=r"regularizer\.name=free_bits: per-dimension KL is"):
        FreeBitsRegularizer()(q, _standard(3), q.rsample((1,)), 0)
    with pytest.raises(ValueError, match=r"regularizer\.name=free_bits: needs the KL per latent"):
        LitVAE((4,), 3, posterior={"name": "cholesky"}, regularizer={"name": "free_bits"})
    with pytest.raises(ValueError, match=r"regularizer\.name=free_bits: needs the KL per latent"):
        LitVAE((4,), 3, prior={"name": "mixture"}, regularizer={"name": "free_bits"})


# ------------------------------------------------------------------------------------ capacity


@pytest.mark.parametrize(("step", "capacity"), [(0, 0.0), (50, 1.0), (100, 2.0), (1000, 2.0)])
def test_capacity_value_penalty_and_gradient(step: int, capacity: float) -> None:
    loc, log_scale, q = _diagonal(batch=8, d=2)
    regularizer = CapacityRegularizer(gamma=10.0, capacity_max=2.0, capacity_steps=100)
    penalty = regularizer(q, _standard(2), q.rsample((1,)), step)
    assert penalty.logs["capacity"] == pytest.approx(capacity)
    kl = _hand_kl_per_dim(loc.detach(), log_scale.detach()).sum(-1)
    torch.testing.assert_close(penalty.kl, kl)
    mean_kl = float(kl.detach().mean())
    assert float(penalty.penalty.detach().mean()) == pytest.approx(10.0 * abs(mean_kl - capacity))
    penalty.penalty.mean().backward()
    sign = math.copysign(1.0, mean_kl - capacity)
    assert loc.grad is not None
    torch.testing.assert_close(loc.grad, 10.0 * sign * loc.detach() / 8)


def test_capacity_bad_options() -> None:
    with pytest.raises(ValueError, match=r"regularizer\.capacity_steps=0: must be an integer"):
        CapacityRegularizer(capacity_steps=0)
    with pytest.raises(ValueError, match=r"regularizer\.gamma=-1: must be a finite number >= 0"):
        CapacityRegularizer(gamma=-1)


# ------------------------------------------------------------------------------------ beta-TC


def _naive_mws(loc, scale, z, prior, n):  # type: ignore[no-untyped-def]
    """Minibatch-weighted sampling written out with loops over the batch (one sample)."""
    m = loc.shape[0]
    mi, tc, dim_kl = [], [], []
    for i in range(m):
        log_q_zx = Normal(loc[i], scale[i]).log_prob(z[i]).sum()
        per_j = torch.stack([Normal(loc[j], scale[j]).log_prob(z[i]) for j in range(m)])  # (M, d)
        log_q_z = torch.logsumexp(per_j.sum(-1), 0) - math.log(n * m)
        log_q_zk = (torch.logsumexp(per_j, 0) - math.log(n * m)).sum()
        log_p = prior.log_prob(z[i])
        mi.append(log_q_zx - log_q_z)
        tc.append(log_q_z - log_q_zk)
        dim_kl.append(log_q_zk - log_p)
    return torch.stack(mi), torch.stack(tc), torch.stack(dim_kl)


def test_minibatch_weighted_terms_match_the_definition_and_sum_to_the_mc_kl() -> None:
    _, _, q = _diagonal(batch=7, d=4)
    p = _standard(4)
    z = q.rsample((3,))
    terms = minibatch_weighted_terms(q, p, z, dataset_size=1000)
    for s in range(3):
        single = minibatch_weighted_terms(q, p, z[s : s + 1], dataset_size=1000)
        naive = _naive_mws(q.loc.detach(), q.scale.detach(), z[s].detach(), p, 1000)
        for ours, reference in zip(single, naive):
            torch.testing.assert_close(ours.detach(), reference)
    monte_carlo_kl = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(terms.mi + terms.tc + terms.dim_kl, monte_carlo_kl)


def test_beta_tc_penalty_weights_and_logs() -> None:
    _, _, q = _diagonal(batch=6, d=3)
    p = _standard(3)
    z = q.rsample((1,))
    regularizer = BetaTCRegularizer(beta=6.0, alpha=0.5, gamma=2.0, dataset_size=500)
    penalty = regularizer(q, p, z, 0)
    terms = minibatch_weighted_terms(q, p, z, 500)
    torch.testing.assert_close(
        penalty.penalty, 0.5 * terms.mi + 6.0 * terms.tc + 2.0 * terms.dim_kl
    )
    torch.testing.assert_close(penalty.kl, kl_divergence(q, p))
    for name in ("mi", "tc", "dim_kl"):
        assert float(penalty.logs[name]) == pytest.approx(
            float(getattr(terms, name).detach().mean())
        )


def test_beta_tc_dataset_size() -> None:
    _, _, q = _diagonal()
    regularizer = BetaTCRegularizer()
    with pytest.raises(ValueError, match=r"regularizer\.dataset_size=None: beta_tc's minibatch"):
        regularizer(q, _standard(3), q.rsample((1,)), 0)
    regularizer.set_dataset_size(1234)
    assert regularizer.dataset_size == 1234
    given = BetaTCRegularizer(dataset_size=10)
    given.set_dataset_size(1234)
    assert given.dataset_size == 10


def _data(n: int = 96, side: int = 4) -> TensorDataModule:
    x = torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(1))
    return TensorDataModule(train=x, val_fraction=0.25, batch_size=24, eval_batch_size=1000)


def _trainer(tmp_path: Path, **options: object) -> pl.Trainer:
    defaults: dict = {"default_root_dir": tmp_path, "max_epochs": 1, "num_sanity_val_steps": 0}
    return quiet_trainer(**{**defaults, **options})


def _small_model(**options: object) -> LitVAE:
    return LitVAE(
        (1, 4, 4),
        latent_dim=3,
        encoder={"name": "mlp", "hidden_sizes": [16]},
        decoder={"name": "mlp", "hidden_sizes": [16]},
        **options,  # type: ignore[arg-type]
    )


def test_beta_tc_gets_the_dataset_size_from_the_datamodule(tmp_path: Path) -> None:
    model = _small_model(regularizer={"name": "beta_tc"})
    datamodule = _data()
    _trainer(tmp_path, max_steps=1).fit(model, datamodule=datamodule)
    assert datamodule.num_train == 72
    assert isinstance(model.regularizer, BetaTCRegularizer)
    assert model.regularizer.dataset_size == 72


def test_beta_tc_gets_the_dataset_size_when_only_validating(tmp_path: Path) -> None:
    model = _small_model(regularizer={"name": "beta_tc"})
    (metrics,) = _trainer(tmp_path).validate(model, datamodule=_data(), verbose=False)
    assert isinstance(model.regularizer, BetaTCRegularizer)
    assert model.regularizer.dataset_size == 72
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]), 1e-5)


def test_beta_tc_refuses_full_covariance_and_mixture_priors() -> None:
    with pytest.raises(ValueError, match=r"regularizer\.name=beta_tc: needs the KL per latent"):
        LitVAE((4,), 3, posterior={"name": "low_rank"}, regularizer={"name": "beta_tc"})
    with pytest.raises(ValueError, match=r"regularizer\.name=beta_tc: needs the KL per latent"):
        LitVAE(
            (4,), 3, prior={"name": "vamp", "num_components": 2}, regularizer={"name": "beta_tc"}
        )


# ------------------------------------------------------------------------------------ module


@pytest.mark.parametrize(
    "regularizer",
    [
        {"name": "kl", "beta": 3.0},
        {"name": "free_bits", "threshold": 2.0},
        {"name": "capacity", "gamma": 5.0, "capacity_max": 50.0, "capacity_steps": 1},
        {"name": "beta_tc", "beta": 4.0, "dataset_size": 72},
    ],
    ids=lambda c: c["name"],
)
def test_logged_elbo_is_the_true_elbo_whatever_the_penalty(tmp_path: Path, regularizer) -> None:  # type: ignore[no-untyped-def]
    model = _small_model(regularizer=regularizer)
    datamodule = _data()
    (metrics,) = _trainer(tmp_path).validate(model, datamodule=datamodule, verbose=False)
    x = datamodule.split("val")[0]
    with torch.no_grad():
        q, p = model.encode(x), model.prior()
        true_kl = kl_divergence(q, p)
        penalty = model.regularizer(q, p, q.rsample((1,)), 0)
    assert metrics["val/kl"] == pytest.approx(float(true_kl.mean()), rel=1e-5)
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]), 1e-5)
    if regularizer["name"] != "beta_tc":  # the MWS terms depend on the samples z
        expected_penalty = float(penalty.penalty.detach().mean())
        assert metrics["val/loss"] - metrics["val/recon"] == pytest.approx(expected_penalty, 1e-4)
    assert abs(metrics["val/loss"] + metrics["val/elbo"]) > 0.01  # the penalty is not the KL


def test_schedule_resumes_exactly(tmp_path: Path) -> None:
    """β logged per step by a run resumed from a checkpoint equals an uninterrupted run's."""

    def fit(root: Path, epochs: int, ckpt_path: str | None = None) -> pl.Trainer:
        model = _small_model(
            regularizer={"name": "kl", "beta": 1.0, "schedule": {"name": "linear", "steps": 5}}
        )
        trainer = _trainer(
            root,
            max_epochs=epochs,
            logger=pl.loggers.CSVLogger(root, name="", version=""),
            log_every_n_steps=1,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=_data(), ckpt_path=ckpt_path)
        return trainer

    def betas(root: Path) -> dict[int, float]:
        with open(root / "metrics.csv") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("train/beta")]
        return {int(row["step"]): float(row["train/beta"]) for row in rows}

    fit(tmp_path / "straight", 3)  # 3 batches per epoch: steps 0..8
    first = fit(tmp_path / "resumed", 1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    fit(tmp_path / "resumed2", 3, str(tmp_path / "epoch1.ckpt"))
    straight = betas(tmp_path / "straight")
    resumed = {**betas(tmp_path / "resumed"), **betas(tmp_path / "resumed2")}
    assert sorted(straight) == list(range(9))
    assert straight == resumed
    assert [straight[t] for t in range(9)] == pytest.approx([min(1.0, t / 5) for t in range(9)])
