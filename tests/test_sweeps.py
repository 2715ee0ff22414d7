"""Sweeps: Hydra's Optuna sweeper (with a resumable sqlite study), the joblib launcher with one
W&B run per job, the submitit launcher's config, and the shipped W&B sweep files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lit_vae.sweeps import SWEEPS_DIR, sweep_file, sweep_names
from lit_vae.tracking import finish_tracking, sweep_group

from .train_runs import TINY, run_train
from .wandb_records import offline_runs

CONF_DIR = Path(__file__).resolve().parents[1] / "lit_vae" / "conf"
OPTUNA_PARAMS = ("regularizer.beta", "latent_dim", "optimizer.lr")


@pytest.fixture(autouse=True)
def _no_hydra_job_left() -> Iterator[None]:
    yield
    finish_tracking()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    """Hydra initialized on lit-vae's configs, for ``compose``."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lit_vae.conf", version_base="1.3"):
        yield


def _compose(overrides: list[str]) -> DictConfig:
    return compose("train", overrides=overrides, return_hydra_config=True)


def _jobs(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, float], DictConfig]]:
    """``(overrides, results, config)`` of every job of a multirun, in job order."""
    jobs = []
    for job_dir in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not (job_dir / "results.json").is_file():
            continue
        overrides = dict(
            str(o).split("=", 1)
            for o in yaml.safe_load((job_dir / ".hydra/overrides.yaml").read_text())
        )
        results = json.loads((job_dir / "results.json").read_text())
        config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        assert isinstance(config, DictConfig)
        jobs.append((overrides, results, config))
    return jobs


# --------------------------------------------------------------------------- Optuna


@pytest.mark.usefixtures("hydra_conf")
def test_optuna_configs_compose_with_their_direction_and_metric() -> None:
    maximize = _compose(["hparams_search=optuna"])
    assert maximize.optimized_metric == "val/elbo"
    assert maximize.hydra.sweeper.direction == "maximize"
    assert maximize.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sorted(maximize.hydra.sweeper.params) == sorted(OPTUNA_PARAMS)
    assert maximize.hydra.mode == RunMode.MULTIRUN
    minimize = _compose(["hparams_search=optuna_test_nll"])
    assert minimize.optimized_metric == "test/nll"
    assert minimize.hydra.sweeper.direction == "minimize"
    assert minimize.hydra.sweeper.params == maximize.hydra.sweeper.params


@pytest.mark.slow
def test_optuna_sweep_maximizes_val_elbo_and_resumes_its_sqlite_study(tmp_path: Path) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = (
        *TINY,
        "logger=csv",
        "hparams_search=optuna",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=test-study",
        "hydra.sweeper.sampler.seed=7",
    )
    run_train(*common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'first'}")
    run_train(*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'second'}")

    trials: list[tuple[dict[str, Any], float]] = []
    for sweep in ("first", "second"):
        for overrides, results, config in _jobs(tmp_path / sweep):
            # the trial's parameters reached the job's composed config
            assert float(overrides["regularizer.beta"]) == config.regularizer.beta
            assert 0.1 <= config.regularizer.beta <= 10.0
            assert int(overrides["latent_dim"]) == config.latent_dim in (2, 4, 8, 16, 32)
            assert 1e-4 <= config.optimizer.lr <= 1e-2
            assert config.trainer.max_epochs == 1
            params = {
                "regularizer.beta": config.regularizer.beta,
                "latent_dim": config.latent_dim,
                "optimizer.lr": config.optimizer.lr,
            }
            trials.append((params, results["val/elbo"]))
    assert len(trials) == 3
    assert all(math.isfinite(value) for _, value in trials)

    first = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    best_params, best_value = max(trials[:2], key=lambda t: t[1])
    assert first["best_value"] == pytest.approx(best_value, rel=1e-12)
    assert first["best_params"] == pytest.approx(best_params, rel=1e-12)
    # the second sweep added one trial to the stored study: its best is over all three
    second = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert second["best_value"] == pytest.approx(max(v for _, v in trials), rel=1e-12)

    study = optuna.load_study(study_name="test-study", storage=storage)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in completed) == pytest.approx(sorted(v for _, v in trials))


# --------------------------------------------------------------------------- joblib


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_joblib_launcher_runs_jobs_in_parallel_with_one_wandb_run_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    sweep_dir = tmp_path / "sweep"
    run_train(
        "-m",
        *TINY,
        "logger=many",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    jobs = _jobs(sweep_dir)
    assert [overrides["seed"] for overrides, _, _ in jobs] == ["0", "1"]
    runs = {run.name: run for run in offline_runs(sweep_dir)}
    assert sorted(runs) == ["seed=0", "seed=1"]
    assert runs["seed=0"].run_id != runs["seed=1"].run_id
    assert {run.group for run in runs.values()} == {sweep_group(sweep_dir)}
    for job, (_, results, config) in enumerate(jobs):
        run = runs[f"seed={job}"]
        assert run.path.is_relative_to(sweep_dir / str(job))
        assert config.seed == run.config["seed"] == job
        assert run.summary["objective"] == results["val/elbo"]
        assert run.values("test/nll") == [results["test/nll"]]
        assert run.exit_code == 0


@pytest.mark.usefixtures("hydra_conf")
def test_submitit_slurm_launcher_composes() -> None:
    cfg = _compose(["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=30"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 30


# --------------------------------------------------------------------------- W&B sweeps


def _candidate_values(spec: dict[str, Any]) -> list[Any]:
    """The values a W&B sweep parameter can take that a test can enumerate."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def test_sweep_files_ship_with_the_package() -> None:
    assert sweep_names() == ["beta_latent_bayes", "heads_grid"]
    assert sweep_file("heads_grid") == SWEEPS_DIR / "heads_grid.yaml"
    with pytest.raises(ValueError, match=r"sweep 'nope': allowed: beta_latent_bayes, heads_grid"):
        sweep_file("nope")


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize("name", ["heads_grid", "beta_latent_bayes"])
def test_wandb_sweep_parameters_are_valid_overrides(name: str) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(sweep_file(name).read_text())
    assert spec["metric"] == {"name": "objective", "goal": "maximize"}
    assert spec["method"] in ("grid", "bayes")
    command = spec["command"]
    assert command[0] == spec["program"] == "lit-vae-train"
    assert command[-1] == "${args_no_hyphens}"
    fixed = [str(arg) for arg in command[1:-1]]
    assert "logger.wandb.mode=online" in fixed

    for key, param in spec["parameters"].items():
        for value in _candidate_values(param):
            # the arguments W&B's agent appends for this parameter value
            args = create_sweep_command_args({"args": {key: {"value": value}}})["args_no_hyphens"]
            assert args == [f"{key}={value}"]
            cfg = _compose([*fixed, *args])
            if (CONF_DIR / key).is_dir():  # a config group: the option was chosen
                assert cfg.hydra.runtime.choices[key] == value
            else:
                assert OmegaConf.select(cfg, key) == value
            assert cfg.logger.wandb.mode == "online"
