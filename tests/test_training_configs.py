"""Composition of the objective, regularizer, schedule, callbacks and experiment configs."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_vae.build import build_callbacks, build_datamodule, build_model
from lit_vae.callbacks import (
    KLPerDimPlot,
    LatentScatter,
    LatentTraversals,
    PosteriorCollapseMonitor,
)
from lit_vae.data import PPCADataModule
from lit_vae.likelihoods import GaussianLikelihood
from lit_vae.nets import LinearDecoder
from lit_vae.objectives import OBJECTIVES, ElboObjective, IWAEObjective
from lit_vae.posteriors import CholeskyHead
from lit_vae.regularizers import (
    REGULARIZERS,
    BetaTCRegularizer,
    CapacityRegularizer,
    FreeBitsRegularizer,
    KLRegularizer,
)
from lit_vae.schedules import SCHEDULES, CyclicalSchedule, LinearSchedule, SigmoidSchedule

CONF = Path(__file__).resolve().parents[1] / "lit_vae" / "conf"


def _compose(*overrides: str, hydra: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def _model(cfg: DictConfig, data_shape: tuple[int, ...] = (1, 8, 8)) -> Any:
    return build_model(cfg, data_shape)


@pytest.mark.parametrize(
    ("registry", "folder"),
    [
        (REGULARIZERS, "regularizer"),
        (SCHEDULES, "regularizer/schedule"),
        (OBJECTIVES, "objective"),
    ],
)
def test_every_name_has_its_yaml(registry: Any, folder: str) -> None:
    files = sorted(path.stem for path in (CONF / folder).glob("*.yaml"))
    assert files == registry.names()
    for name in files:
        assert OmegaConf.load(CONF / folder / f"{name}.yaml")["name"] == name


def test_default_is_the_plain_elbo() -> None:
    cfg = _compose()
    assert OmegaConf.to_container(cfg.regularizer) == {
        "name": "kl",
        "beta": 1.0,
        "schedule": {"name": "constant"},
    }
    model = _model(cfg)
    assert isinstance(model.regularizer, KLRegularizer)
    assert model.regularizer.is_elbo()
    assert isinstance(model.objective, ElboObjective)
    assert model.objective.num_samples == 1


@pytest.mark.parametrize(
    ("overrides", "schedule_type", "values"),
    [
        (["regularizer/schedule=linear"], LinearSchedule, {0: 0.0, 5000: 0.5, 10**6: 1.0}),
        (
            ["regularizer/schedule=cyclical", "regularizer.schedule.total_steps=400"],
            CyclicalSchedule,
            {0: 0.0, 25: 0.5, 50: 1.0, 100: 0.0},
        ),
        (["regularizer/schedule=sigmoid"], SigmoidSchedule, {5000: 0.5}),
    ],
)
def test_schedules_compose(overrides: list[str], schedule_type: Any, values: dict) -> None:
    cfg = _compose(*overrides)
    regularizer = _model(cfg).regularizer
    assert isinstance(regularizer.schedule, schedule_type)
    for step, beta in values.items():
        assert regularizer.schedule(step) == pytest.approx(beta)


def test_bad_schedule_option_names_the_key() -> None:
    cfg = _compose("regularizer/schedule=cyclical", "regularizer.schedule.ratio=1.5")
    with pytest.raises(ValueError, match=r"regularizer\.schedule\.ratio=1\.5: must be in \(0, 1\]"):
        _model(cfg)


def test_other_regularizers_compose() -> None:
    free_bits = _model(_compose("regularizer=free_bits")).regularizer
    assert isinstance(free_bits, FreeBitsRegularizer)
    assert (free_bits.threshold, free_bits.group_size) == (0.25, 1)
    capacity = _model(_compose("regularizer=capacity")).regularizer
    assert isinstance(capacity, CapacityRegularizer)
    assert (capacity.gamma, capacity.capacity_max, capacity.capacity_steps) == (1000, 25, 100000)
    beta_tc = _model(_compose("regularizer=beta_tc")).regularizer
    assert isinstance(beta_tc, BetaTCRegularizer)
    assert (beta_tc.beta, beta_tc.alpha, beta_tc.gamma, beta_tc.dataset_size) == (6, 1, 1, None)
    with pytest.raises(ValueError, match=r"regularizer\.name=free_bits: needs the KL per latent"):
        _model(_compose("regularizer=free_bits", "posterior=cholesky"))


def test_iwae_objective_composes() -> None:
    model = _model(_compose("objective=iwae", "objective.num_samples=7"))
    assert isinstance(model.objective, IWAEObjective)
    assert model.objective.num_samples == 7
    assert model.hparams["objective"] == {"name": "iwae", "num_samples": 7}
    with pytest.raises(ValueError, match=r"objective\.name=iwae: the bound has no separate KL"):
        _model(_compose("objective=iwae", "regularizer.beta=0.5"))


def test_diagnostics_callbacks_compose(tmp_path: Path) -> None:
    cfg = _compose("callbacks=diagnostics", f"paths.output_dir={tmp_path}")
    callbacks = build_callbacks(cfg.callbacks)
    kinds = {type(c) for c in callbacks}
    assert {KLPerDimPlot, LatentTraversals, LatentScatter, PosteriorCollapseMonitor} <= kinds
    monitor = next(c for c in callbacks if isinstance(c, PosteriorCollapseMonitor))
    assert (monitor.threshold, monitor.warmup_steps) == (0.01, 1000)
    traversals = next(c for c in callbacks if isinstance(c, LatentTraversals))
    assert traversals.output_dir == str(tmp_path)
    assert len(callbacks) == 4 + len(_compose("callbacks=default").callbacks)


def test_ppca_experiment_composes() -> None:
    cfg = _compose("experiment=ppca")
    assert cfg.latent_dim == 3
    assert cfg.data.latent_dim == 3
    assert cfg.likelihood.scale == 0.5
    datamodule = build_datamodule(cfg.data)
    assert isinstance(datamodule, PPCADataModule)
    model = _model(cfg, tuple(datamodule.data_shape))
    assert isinstance(model.decoder, LinearDecoder)
    assert isinstance(model.likelihood, GaussianLikelihood)
    assert float(model.likelihood.scale) == pytest.approx(0.5)
    assert isinstance(model.posterior, CholeskyHead)
    assert model.encoder.net[0].in_features == 10  # affine encoder: one layer
    assert len(model.encoder.net) == 1


@pytest.mark.parametrize(
    ("experiment", "data"), [("kl_heads", "mnist"), ("kl_heads_digits", "digits")]
)
def test_kl_heads_experiments_sweep_five_heads_and_three_seeds(experiment: str, data: str) -> None:
    cfg = _compose(f"experiment={experiment}", hydra=True)
    params = cfg.hydra.sweeper.params
    assert params.posterior.split(",") == ["log_var", "log_std", "std", "var", "cholesky"]
    assert params.seed.split(",") == ["1", "2", "3"]
    assert cfg.data.name == data
    assert cfg.callbacks.posterior_collapse._target_.endswith("PosteriorCollapseMonitor")
    for posterior in params.posterior.split(","):
        composed = _compose(f"experiment={experiment}", f"posterior={posterior}")
        shape = (1, 28, 28) if data == "mnist" else (1, 8, 8)
        assert _model(composed, shape).hparams["posterior"]["name"] == posterior


@pytest.mark.slow
def test_ppca_experiment_trains_below_the_exact_likelihood(tmp_path: Path) -> None:
    """A short `lit-vae-train experiment=ppca`: the model's test log-likelihood cannot beat the
    data's exact one (up to the test split's sampling noise), and the ELBO stays below it."""
    from lit_vae.train import train

    cfg = _compose(
        "experiment=ppca",
        "trainer.max_epochs=3",
        "callbacks=none",
        "logger=none",
        "eval.num_samples=100",
        f"paths.output_dir={tmp_path}",
    )
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    metrics = train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == pytest.approx(metrics)
    datamodule = build_datamodule(cfg.data)
    exact = float(datamodule.exact_log_prob(datamodule.split("test")[0]).mean())  # type: ignore[attr-defined]
    model_log_likelihood = -results["test/nll"]
    assert results["test/elbo"] <= model_log_likelihood + 0.01
    assert model_log_likelihood <= exact + 0.05
    assert torch.isfinite(torch.tensor(model_log_likelihood))


def test_iwae_mnist_experiment_is_the_papers_protocol() -> None:
    """Burda et al. (2016), Table 1: 784-200-200-50 tanh, log σ head, Bernoulli decoder from
    the mean pixel, Adam ε 1e-4, batch 20, 3280 epochs of the staged schedule, k = 5000."""
    from lit_vae.optim import iwae_stage_epochs

    cfg = _compose("experiment=iwae_mnist")
    assert (cfg.data.name, cfg.data.binarize, cfg.data.batch_size) == ("mnist", "dynamic", 20)
    assert (cfg.latent_dim, cfg.posterior.name, cfg.likelihood.name) == (50, "log_std", "bernoulli")
    assert cfg.objective.name == "elbo"
    assert cfg.init_output_bias is True
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.eps) == ("adam", 1e-3, 1e-4)
    assert list(cfg.optimizer.betas) == [0.9, 0.999]
    schedule = cfg.scheduler
    assert (schedule.name, schedule.interval, schedule.budget) == ("iwae", "epoch", 1.0)
    stages = iwae_stage_epochs(schedule.num_stages, schedule.base, schedule.budget)
    assert cfg.trainer.max_epochs == sum(stages) == 3280
    assert cfg.eval.num_samples == 5000
    model = _model(cfg, (1, 28, 28))
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linear]
    assert shapes == [(784, 200), (200, 200), (200, 100), (50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 4
    assert model.hparams["init_output_bias"] is True

    iwae = _model(_compose("experiment=iwae_mnist", "objective=iwae", "objective.num_samples=50"))
    assert isinstance(iwae.objective, IWAEObjective)
    assert iwae.objective.num_samples == 50
    assert _model(_compose("init_output_bias=false")).hparams["init_output_bias"] is False
