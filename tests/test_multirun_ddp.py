"""DDP inside Hydra multiruns: each job's processes run that job, in that job's run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from lit_vae.distributed import (
    _config_flags,
    _entry_point,
    _keeps,
    hydra_job_command,
)
from lit_vae.hydra_callbacks import DDPJobCallback

from .distributed_helpers import (
    assert_close_tensors,
    load_probes,
    run_console,
    write_digits_splits,
)
from .helpers import TINY, compose_config, read_json


def test_config_flags_are_kept_and_the_rest_dropped() -> None:
    argv = ["-m", "-cn", "train", "--config-dir=/my/conf", "seed=1,2", "--config-path", "conf"]
    assert _config_flags(argv) == ["-cn", "train", "--config-dir=/my/conf", "--config-path", "conf"]
    assert [
        o
        for o in [
            "hydra.mode=MULTIRUN",
            "hydra.sweep.dir=/s",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debug",
            "+hydra.sweeper.params.x=1",
            "hydra.run.dir=/r",
            "hydra.searchpath=[file:///extra]",
            "hydra.job.chdir=false",
        ]
        if _keeps(o)
    ] == ["hydra.searchpath=[file:///extra]", "hydra.job.chdir=false"]


def test_child_command_reruns_this_job(tmp_path: Path) -> None:
    cfg = compose_config(
        ["trainer=ddp_cpu", "seed=2", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/sweep"], tmp_path
    )
    job_dir = tmp_path / "job dir/1"
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    command = hydra_job_command(1, argv=["-m", "trainer=ddp_cpu", "seed=1,2"])
    overrides = command[command.index("trainer=ddp_cpu") :]
    assert overrides == [
        "trainer=ddp_cpu",
        "seed=2",
        f'hydra.run.dir="{job_dir}"',
        "hydra.output_subdir=null",
        "hydra.job.name=train_ddp_process_1",
    ]
    assert command[: command.index("trainer=ddp_cpu")] == _entry_point()  # argv's -m dropped
    assert "seed=1,2" not in command


def test_job_callback_restores_the_process_group_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    callback = DDPJobCallback()
    callback.on_job_start(config=None)  # type: ignore[arg-type]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", LOCAL_RANK="0")
    callback.on_job_end(config=None, job_return=None)  # type: ignore[arg-type]
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert "MASTER_PORT" not in os.environ
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_multirun_of_ddp_jobs(tmp_path: Path) -> None:
    """``lit-vae-train -m trainer=ddp_cpu seed=1,2``: 2 jobs × 2 processes, through the console
    script. Each process records the seed of the config it ran."""
    data = write_digits_splits(tmp_path)
    sweep_dir, work_dir = tmp_path / "sweep", tmp_path / "cwd"
    work_dir.mkdir()
    run_console(
        "-m",
        "trainer=ddp_cpu",
        "seed=1,2",
        *data,
        *TINY,
        "trainer.max_epochs=1",
        "data.batch_size=16",
        "data.eval_batch_size=8",
        "+callbacks.probe._target_=tests.ddp_probe.Probe",
        "+callbacks.probe.output_dir=${paths.output_dir}/probe",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=work_dir,
        timeout=220,
    )
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    assert list(work_dir.iterdir()) == []  # no stray run dirs where the sweep was started
    results = []
    for job, seed in [(0, 1), (1, 2)]:
        job_dir = sweep_dir / str(job)
        assert f"seed={seed}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        probes = load_probes(job_dir / "probe")
        assert [(p["global_rank"], p["world_size"], p["noise_seed"]) for p in probes] == [
            (0, 2, seed),
            (1, 2, seed),
        ]
        assert_close_tensors(probes[1]["state"], probes[0]["state"], tol=0.0)
        assert (job_dir / "train_ddp_process_1.log").is_file()
        assert not (job_dir / "train_ddp_process_1").exists()
        results.append(read_json(job_dir / "results.json"))
    assert results[0]["val/elbo"] != results[1]["val/elbo"]  # two seeds, two runs
