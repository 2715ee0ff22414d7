"""Every option of every config group composes, instantiates and runs (lightning-hydra-template
style): compose in-process, build the objects, and run ``fast_dev_run`` where it can run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra

from lit_vae.build import build_datamodule, build_model
from lit_vae.data import DATAMODULES
from lit_vae.likelihoods import LIKELIHOODS
from lit_vae.nets import DECODERS, ENCODERS
from lit_vae.optim import OPTIMIZERS, SCHEDULERS
from lit_vae.posteriors import POSTERIORS
from lit_vae.priors import PRIORS
from lit_vae.regularizers import REGULARIZERS
from lit_vae.train import train

from .helpers import CONF, compose_config, find_mnist

FAST = ("debug=fast_dev_run", "callbacks=none", "logger=none")
#: options that need hardware this machine lacks: composed and checked, not run
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "ddp")}
#: options run as separate processes elsewhere in the suite (DDP relaunches the script)
RUN_ELSEWHERE = {("trainer", "ddp_cpu")}


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def _uses_mnist(group: str, option: str) -> bool:
    if group == "data":
        return option == "mnist"
    if group == "experiment":
        return "override /data: mnist" in (CONF / group / f"{option}.yaml").read_text()
    return False


def _extra_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    if (group, option) == ("data", "tensors"):
        path = tmp_path / "train.pt"
        torch.save(torch.rand(40, 6), path)
        return [f"data.train={path}", "data.test_fraction=0.25"]
    if _uses_mnist(group, option):
        mnist = find_mnist()
        if mnist is None:
            pytest.skip("MNIST IDX files not found (set LIT_VAE_MNIST_DIR)")
        return [f"data.root={mnist}"]
    if group == "debug" and option != "fast_dev_run":
        return [
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "trainer.check_val_every_n_epoch=1",
        ]
    return []


GROUPS = [
    "data",
    "model",
    "posterior",
    "prior",
    "likelihood",
    "regularizer",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "experiment",
]
CASES = [(group, option) for group in GROUPS for option in _options(group)]


@pytest.fixture(autouse=True)
def _clear_hydra() -> None:
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_runs(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *FAST, *_extra_overrides(group, option, tmp_path)]
    if group == "experiment":  # experiments tune their callbacks: keep them
        overrides.remove("callbacks=none")
    if group in ("callbacks", "logger", "debug"):
        overrides = [o for o in overrides if not o.startswith(f"{group}=")] + [f"{group}={option}"]
    cfg = compose_config(overrides, tmp_path)
    if (group, option) in NEEDS_GPU | RUN_ELSEWHERE:
        assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
        assert cfg.trainer.get("strategy") == "ddp" or cfg.trainer.accelerator == "gpu"
        return
    metrics = train(cfg)
    assert metrics, "fast_dev_run produced no metrics"
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    expected = {"val/elbo", "val/kl", "val/recon"}
    if cfg.test:
        expected |= {"test/elbo", "test/nll", "test/kl", "test/recon", "test/active_units"}
    assert expected <= set(metrics)


@pytest.mark.parametrize(
    ("group", "registry"),
    [
        ("posterior", POSTERIORS),
        ("prior", PRIORS),
        ("likelihood", LIKELIHOODS),
        ("regularizer", REGULARIZERS),
        ("data", DATAMODULES),
        ("optimizer", OPTIMIZERS),
    ],
)
def test_group_files_are_named_after_registry_entries(group: str, registry) -> None:
    for path in (CONF / group).glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["name"] == path.stem, path
        assert path.stem in registry, path


def test_scheduler_and_model_files_name_registered_entries() -> None:
    for path in (CONF / "scheduler").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["name"] in SCHEDULERS
    for path in (CONF / "model").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["encoder"]["name"] in ENCODERS, path
        assert config["decoder"]["name"] in DECODERS, path


def test_default_config_is_digits_log_var_2d(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.data.name == "digits"
    assert cfg.posterior.name == "log_var"
    assert cfg.latent_dim == 2
    model = build_model(cfg, tuple(build_datamodule(cfg.data).data_shape))
    assert model.hparams["posterior"] == {"name": "log_var", "min_raw": -30.0, "max_raw": 30.0}
    assert type(model.hparams["posterior"]) is dict  # plain containers, not DictConfig
