"""W&B tracking: config flattening, names/tags/groups, modes, and real offline runs read back
from the files W&B wrote (single run, multirun, failed job, resumed run, no network)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from lit_vae.tracking import (
    RUN_ID_FILE,
    HydraWandbLogger,
    TrackingError,
    find_run_id,
    finish_tracking,
    flat_config,
    run_name,
    run_tags,
    sweep_group,
)

from .train_runs import TINY, run_train
from .wandb_records import OfflineRun, offline_runs

# a W&B server address where nothing listens: online tests never reach a real service, even
# where the environment holds credentials
NO_SERVER = {"base_url": "http://127.0.0.1:9"}


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B offline for real, its config and caches inside ``tmp_path``; no Hydra job left set."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    finish_tracking()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def _results(run_dir: Path) -> dict[str, float]:
    results: dict[str, float] = json.loads((run_dir / "results.json").read_text())
    return results


def _csv_steps(run_dir: Path, metric: str) -> list[int]:
    import csv

    with (run_dir / "metrics.csv").open() as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get(metric)]


# --------------------------------------------------------------------------- pure functions


def test_flat_config_puts_group_choices_on_top_and_options_under_them() -> None:
    config: dict[str, Any] = {
        "posterior": {"name": "log_var", "min_raw": -30.0, "max_raw": 30.0},
        "model": {"encoder": {"name": "mlp", "hidden_sizes": [64, 32]}},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "max_epochs": 3},
        "callbacks": {"model_checkpoint": {"_target_": "x", "monitor": "val/elbo"}},
        "logger": {"wandb": {"_target_": "y", "project": "p"}},
        "paths": {"output_dir": "/runs/a", "data_dir": "data"},
        "scheduler": None,
        "seed": 2,
        "latent_dim": 8,
    }
    choices = {
        "posterior": "log_var",
        "model": "mlp",
        "trainer": "cpu",
        "callbacks": "minimal",
        "logger": "wandb",
        "scheduler": None,
        "hydra": "default",
        "hydra/launcher": "basic",
    }
    assert flat_config(config, choices) == {
        "posterior": "log_var",
        "posterior.min_raw": -30.0,
        "posterior.max_raw": 30.0,
        "model": "mlp",
        "model.encoder.name": "mlp",
        "model.encoder.hidden_sizes": [64, 32],
        "trainer": "cpu",
        "trainer.max_epochs": 3,
        "callbacks": "minimal",
        "logger": "wandb",
        "scheduler": None,
        "seed": 2,
        "latent_dim": 8,
        "run_dir": "/runs/a",
    }


def test_flat_config_outside_hydra_takes_group_names_from_name_keys() -> None:
    config = {"prior": {"name": "mixture", "num_components": 10}, "data": {"batch_size": 64}}
    assert flat_config(config) == {
        "prior": "mixture",
        "prior.num_components": 10,
        "data.batch_size": 64,
    }


def test_run_name_keeps_what_the_run_is_and_tags_keep_every_override() -> None:
    long_value = "x" * 80
    overrides = [
        "posterior=cholesky",
        "seed=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "logger=many",
        "eval.num_samples=10",
        "ckpt_path=/runs/a/checkpoints/last.ckpt",
        "paths.data_dir=/data",
        f"+tag_me={long_value}",
    ]
    assert run_name(overrides) == f"posterior=cholesky,seed=2,+tag_me={long_value}"
    assert run_tags(overrides) == [
        "posterior=cholesky",
        "seed=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "logger=many",
        "eval.num_samples=10",
        f"+tag_me={long_value}"[:64],
    ]
    assert run_name(["trainer.max_epochs=1", "logger=wandb"]) is None


def test_sweep_group_is_the_multirun_dir_date_and_time() -> None:
    assert sweep_group("outputs/multirun/2024-05-01/12-30-00") == "2024-05-01_12-30-00"
    assert sweep_group("/abs/studies/heads") == "studies_heads"


def test_find_run_id_looks_in_the_checkpoint_run_dir(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert find_run_id(tmp_path / "checkpoints" / "last.ckpt") is None
    (tmp_path / RUN_ID_FILE).write_text("abc123\n")
    assert find_run_id(tmp_path / "checkpoints" / "last.ckpt") == "abc123"
    assert find_run_id(tmp_path / "last.ckpt") == "abc123"
    assert find_run_id(None) is None


def test_mode_comes_from_config_then_env_then_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert HydraWandbLogger().mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert HydraWandbLogger().mode == "disabled"
    assert HydraWandbLogger(mode="online").mode == "online"
    with pytest.raises(ValueError, match=r"logger.wandb.mode='sometimes': allowed: online"):
        HydraWandbLogger(mode="sometimes")
    with pytest.raises(ValueError, match=r"logger.wandb.log_model='best'"):
        HydraWandbLogger(log_model="best")


def test_resume_from_continues_the_recorded_run_for_train_jobs_only(tmp_path: Path) -> None:
    (tmp_path / RUN_ID_FILE).write_text("run42\n")
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    assert HydraWandbLogger(mode="disabled", resume_from=ckpt).version == "run42"
    assert HydraWandbLogger(mode="disabled", resume_from=ckpt, job_type="eval").version is None
    assert HydraWandbLogger(mode="disabled").version is None


# --------------------------------------------------------------------------- real offline runs


def _only_run(directory: Path) -> OfflineRun:
    runs = offline_runs(directory)
    assert len(runs) == 1, [r.path for r in runs]
    return runs[0]


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_offline")
def test_single_run_writes_config_tags_history_summaries_images_and_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_train(
        *TINY,
        "logger=many",
        "logger.wandb.log_model=true",
        "posterior=cholesky",
        "seed=3",
        "latent_dim=3",
        f"hydra.run.dir={run_dir}",
    )
    run = _only_run(run_dir)
    results = _results(run_dir)

    assert run.run_id == (run_dir / RUN_ID_FILE).read_text().strip()
    assert (run.project, run.job_type, run.group) == ("lit-vae", "train", "")
    assert run.name == "posterior=cholesky,seed=3,latent_dim=3"
    assert run.tags == [
        *TINY,
        "logger=many",
        "logger.wandb.log_model=true",
        "posterior=cholesky",
        "seed=3",
        "latent_dim=3",
    ]
    config = run.config
    assert (config["posterior"], config["prior"], config["regularizer"]) == (
        "cholesky",
        "standard_normal",
        "kl",
    )
    assert (config["data"], config["seed"], config["latent_dim"]) == ("digits", 3, 3)
    assert config["posterior.min_scale"] == 1.0e-4
    assert config["regularizer.beta"] == 1.0
    assert config["trainer.max_epochs"] == 1
    assert config["run_dir"] == str(run_dir)
    assert "posterior.name" not in config
    assert not [key for key in config if key.endswith("_target_")]
    assert not [key for key in config if key.startswith(("callbacks.", "logger.", "hydra"))]

    # every row is logged at W&B step = trainer global step, the steps the csv logger saw
    assert all(row["_step"] == row["trainer/global_step"] for row in run.history)
    assert run.steps("val/elbo") == _csv_steps(run_dir, "val/elbo")
    assert run.values("val/elbo")[-1] == results["val/elbo"]
    assert run.values("test/nll") == [results["test/nll"]]
    assert run.summary["val/elbo"] == {"max": max(run.values("val/elbo"))}
    assert run.summary["test/nll"] == {"min": results["test/nll"]}
    assert run.summary["objective"] == results["val/elbo"]
    assert run.metrics["val/elbo"] == {"min": False, "max": True}
    assert run.metrics["test/nll"] == {"min": True, "max": False}

    for name in ("samples", "reconstructions"):
        [image] = run.values(f"images/{name}")
        assert image["_type"] == "images/separated"
        assert (run.path.parent / "files" / image["filenames"][0]).is_file()
    # the best checkpoint (by val/elbo) as the run's model artifact
    assert run.artifacts == [("model", f"model-{run.run_id}")]
    assert run.exit_code == 0


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_offline")
def test_multirun_logs_one_wandb_run_per_job_in_one_group(tmp_path: Path) -> None:
    import wandb

    sweep_dir = tmp_path / "sweep"
    run_train("-m", *TINY, "logger=many", "seed=0,1,2", f"hydra.sweep.dir={sweep_dir}")
    assert wandb.run is None

    runs = {run.name: run for run in offline_runs(sweep_dir)}
    assert sorted(runs) == ["seed=0", "seed=1", "seed=2"]
    assert len({run.run_id for run in runs.values()}) == 3
    assert {run.group for run in runs.values()} == {sweep_group(sweep_dir)}
    for job in range(3):
        run = runs[f"seed={job}"]
        job_dir = sweep_dir / str(job)
        assert run.path.is_relative_to(job_dir)
        assert (job_dir / RUN_ID_FILE).read_text().strip() == run.run_id
        assert run.config["seed"] == job
        assert run.summary["objective"] == _results(job_dir)["val/elbo"]
        assert run.exit_code == 0


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_offline")
def test_failed_job_finishes_its_run_failed_and_the_next_job_starts_clean(tmp_path: Path) -> None:
    import wandb

    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit):
        run_train(
            "-m",
            *TINY,
            "logger=wandb",
            "callbacks.model_checkpoint.monitor=missing,val/elbo",
            f"hydra.sweep.dir={sweep_dir}",
        )
    assert wandb.run is None
    failed, finished = (_only_run(sweep_dir / str(job)) for job in (0, 1))
    assert failed.exit_code == 1
    assert finished.exit_code == 0
    assert failed.run_id != finished.run_id
    assert failed.group == finished.group == sweep_group(sweep_dir)
    assert failed.config["callbacks"] == finished.config["callbacks"] == "minimal"
    assert not (sweep_dir / "0" / "results.json").exists()
    assert finished.summary["objective"] == _results(sweep_dir / "1")["val/elbo"]


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_offline")
# resuming into a new run dir: Lightning keeps only the best checkpoint path, and says so
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_resumed_training_continues_the_same_run_and_its_steps(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    run_train(*TINY, "logger=many", f"hydra.run.dir={first_dir}")
    ckpt = first_dir / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(ckpt, weights_only=True)["global_step"]
    run_train(
        *TINY,
        "logger=many",
        "trainer.max_epochs=2",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={second_dir}",
    )
    first, second = _only_run(first_dir), _only_run(second_dir)

    assert second.run_id == first.run_id
    assert (second_dir / RUN_ID_FILE).read_text().strip() == first.run_id
    assert first.steps("val/elbo") == [steps_per_epoch - 1]
    assert second.steps("val/elbo") == [2 * steps_per_epoch - 1]
    assert min(row["_step"] for row in second.history) >= steps_per_epoch
    assert second.steps("val/elbo") == _csv_steps(second_dir, "val/elbo")
    assert second.name == first.name
    assert second.exit_code == 0


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("wandb_offline")
def test_online_without_credentials_fails_fast_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = HydraWandbLogger(save_dir=str(tmp_path), init_timeout=3, settings=NO_SERVER)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"mode 'online'.*WANDB_MODE=offline.*wandb sync"):
        _ = logger.experiment
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("wandb_offline")
def test_online_without_credentials_falls_back_to_offline_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = HydraWandbLogger(
        save_dir=str(tmp_path), fallback_offline=True, init_timeout=3, settings=NO_SERVER
    )
    run_id = logger.experiment.id
    assert logger.mode == "offline"
    logger.log_metrics({"val/elbo": -3.5}, step=7)
    finish_tracking()
    run = _only_run(tmp_path)
    assert run.run_id == run_id == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert run.steps("val/elbo") == [7]
    assert run.values("val/elbo") == [-3.5]
    assert run.summary["val/elbo"] == {"max": -3.5}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("wandb_offline")
def test_online_without_network_fails_within_the_init_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = {**NO_SERVER, "api_key": "a" * 40}
    logger = HydraWandbLogger(
        save_dir=str(tmp_path), mode="online", init_timeout=3, settings=settings
    )
    with pytest.raises(TrackingError, match=r"(?s)mode 'online': .*connection refused.*fallback"):
        _ = logger.experiment
