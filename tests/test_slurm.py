"""``hydra/launcher=slurm`` against a real SLURM cluster on this machine.

The cluster is the single-node one of ``shared/slurm/start_local_slurm.sh`` (partition
``debug``, 2 CPUs; ``.ci/run`` starts it, and so does this module when it runs as root and finds
the script). Without root, the script, or a working cluster, the tests skip and say why. One
sweep of 2 jobs of 2 CPU tasks each (one DDP process per task, ranks from SLURM) runs once for
the module; the jobs run one after the other, and one of them is requeued on the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .distributed_helpers import (
    assert_close_tensors,
    kill_group,
    load_probes,
    subprocess_env,
    write_digits_splits,
)
from .helpers import BIN, REPO, TINY, read_json

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs lit-vae[slurm]")

STEPS_PER_EPOCH = 3  # 67 training items, global batches of 32: 32, 32, 3


def find_slurm_scripts() -> Path | None:
    """``$LIT_VAE_SLURM_DIR``, else ``shared/slurm`` beside the checkout or a folder above."""
    if "LIT_VAE_SLURM_DIR" in os.environ:
        return Path(os.environ["LIT_VAE_SLURM_DIR"])
    for parent in REPO.parents:
        if (parent / "shared" / "slurm" / "start_local_slurm.sh").is_file():
            return parent / "shared" / "slurm"
    return None


def _cluster_up() -> bool:
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return state.returncode == 0 and bool(state.stdout.strip())


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """A running cluster: the one already up, or one started with the shared script."""
    if shutil.which("sinfo") is None or not _cluster_up():
        if os.geteuid() != 0:
            pytest.skip("no running SLURM cluster, and starting one needs root")
        scripts = find_slurm_scripts()
        if scripts is None:
            pytest.skip("no running SLURM cluster and no shared/slurm/start_local_slurm.sh")
        try:
            started = subprocess.run(
                [str(scripts / "start_local_slurm.sh")],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("start_local_slurm.sh did not finish within 300 s")
        if started.returncode != 0:
            pytest.skip(f"SLURM could not start: {started.stderr.strip()[-1500:]}")
        for line in started.stdout.splitlines():
            if line.startswith("export SLURM_CONF="):
                os.environ["SLURM_CONF"] = line.split("=", 1)[1].strip().strip("'\"")
        if not _cluster_up():
            pytest.skip("start_local_slurm.sh ran but sinfo shows no node")
    for command in ("srun", "sbatch", "squeue", "scontrol"):
        if shutil.which(command) is None:
            pytest.skip(f"SLURM's {command} is not on PATH")


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_digits_splits(tmp_path_factory.mktemp("data"))


def _slurm_overrides(name: str, sweep_dir: Path) -> list[str]:
    """The preset, sized for the local cluster: 2 tasks × 1 CPU per job, DDP on CPU."""
    return [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        f"hydra.launcher.name={name}",
        "trainer=ddp_cpu",
        *TINY,
        "data.batch_size=16",
        "data.eval_batch_size=8",
        "+callbacks.probe._target_=tests.ddp_probe.Probe",
        "+callbacks.probe.output_dir=${paths.output_dir}/probe",
        f"hydra.sweep.dir={sweep_dir}",
    ]


@contextlib.contextmanager
def _submitting(args: list[str], cwd: Path, name: str) -> Iterator[subprocess.Popen[str]]:
    """``lit-vae-train *args`` in the background; on the way out its jobs are cancelled and its
    processes killed, so that no job outlives a failed test."""
    process = subprocess.Popen(
        [str(BIN / "lit-vae-train"), *args],
        cwd=cwd,
        env={**os.environ, "WANDB_MODE": "disabled", **subprocess_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30, check=False)
        kill_group(process)
        process.communicate()


def _finish(process: subprocess.Popen[str], timeout: float) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-6000:]
    return output


def _wait_for(path: Path, timeout: float, process: subprocess.Popen[str] | None = None) -> None:
    """Wait for ``path``; fail at once, with its output, if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout is not None else ""
            raise AssertionError(
                f"lit-vae-train exited ({process.returncode}) before {path} appeared:\n"
                + output[-6000:]
            )
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.5)


def _array_task_id(name: str, task: int) -> str:
    """The id (``<array job>_<task>``) of array task ``task`` of the job named ``name``."""
    listed = subprocess.run(
        ["squeue", "-h", "-r", "--name", name, "-o", "%i %K"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    ids = [
        line.split()[0] for line in listed.stdout.splitlines() if line.split()[1:] == [str(task)]
    ]
    assert len(ids) == 1, listed.stdout
    return ids[0]


MAX_EPOCHS = 4
PAUSE_STEP = 2 * STEPS_PER_EPOCH + 1  # the first step of epoch 2


@pytest.fixture(scope="module")
def requeued_sweep(
    slurm_cluster: None, data_overrides: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``-m hydra/launcher=slurm trainer=ddp_cpu seed=1,2``: 2 SLURM jobs of 2 srun tasks each,
    one gloo process group per job. Job 0 (seed 1) is requeued in epoch 2 with ``scontrol
    requeue``, as preemption does; the sweep dir once both jobs have finished."""
    name = f"litvae-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("slurm")
    sweep_dir, work_dir = root / "sweep", root / "cwd"
    work_dir.mkdir()
    args = [
        *_slurm_overrides(name, sweep_dir),
        *data_overrides,
        f"trainer.max_epochs={MAX_EPOCHS}",
        "seed=1,2",
        f"+callbacks.probe.pause_at_step={PAUSE_STEP}",
        "+callbacks.probe.pause_seed=1",
        # a checkpoint every epoch, whether val/elbo improved or not (Lightning updates
        # last.ckpt only together with a top-k checkpoint)
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    probe_dir = sweep_dir / "0" / "probe"
    with _submitting(args, work_dir, name) as process:
        _wait_for(probe_dir / f"paused-at-{PAUSE_STEP}", timeout=300, process=process)
        job_id = _array_task_id(name, 0)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # SLURM holds a requeued job for a while before it may start again; release it now
        deadline = time.monotonic() + 300
        while not (probe_dir / "start-rank0-restart1.json").exists():
            assert time.monotonic() < deadline, "the requeued job did not start again"
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            time.sleep(2)
        _finish(process, timeout=300)
    assert list(work_dir.iterdir()) == []  # no stray run dirs where the sweep was started
    return sweep_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multirun_of_two_task_ddp_jobs(requeued_sweep: Path) -> None:
    """Both jobs finish with their results, each trained by 2 processes that Lightning found
    through SLURM and that ran that job's config."""
    assert sorted(p.name for p in requeued_sweep.iterdir()) == [
        ".submitit",
        "0",
        "1",
        "multirun.yaml",
    ]
    for job, seed in [(0, 1), (1, 2)]:
        job_dir = requeued_sweep / str(job)
        probes = load_probes(job_dir / "probe")
        assert [
            (p["global_rank"], p["world_size"], p["cluster_environment"], p["noise_seed"])
            for p in probes
        ] == [(0, 2, "SLURMEnvironment", seed), (1, 2, "SLURMEnvironment", seed)]
        assert_close_tensors(probes[1]["state"], probes[0]["state"], tol=0.0)
        results = read_json(job_dir / "results.json")
        assert {"val/elbo", "test/nll", "test/active_units"} <= results.keys()
        assert not (job_dir / "train_ddp_process_1.log").exists()  # srun started every process
    # the job that was not requeued: every epoch's global batch of 32 + 32 + 3 split in two
    rank0, rank1 = load_probes(requeued_sweep / "1" / "probe")
    assert rank0["batch_sizes"] == [16, 16, 2] * MAX_EPOCHS
    assert rank1["batch_sizes"] == [16, 16, 1] * MAX_EPOCHS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_requeued_job_resumes_from_its_checkpoint(requeued_sweep: Path) -> None:
    """The requeued job started again and continued from ``last.ckpt``, not from step 0."""
    probe_dir = requeued_sweep / "0" / "probe"
    starts = {path.stem: json.loads(path.read_text()) for path in probe_dir.glob("start-*.json")}
    assert sorted(starts) == [
        "start-rank0-restart0",
        "start-rank0-restart1",
        "start-rank1-restart0",
        "start-rank1-restart1",
    ]
    assert starts["start-rank0-restart0"] == {"global_step": 0, "epoch": 0}
    resumed = starts["start-rank0-restart1"]
    assert starts["start-rank1-restart1"] == resumed
    # epoch 2 from the checkpoint of epoch 1 (step 6), or from one written at the preemption
    # signal (step 7)
    assert resumed["epoch"] == 2
    assert 2 * STEPS_PER_EPOCH <= resumed["global_step"] <= PAUSE_STEP
    rank0, _ = load_probes(probe_dir)
    # the steps run after the restart are the rest of the run
    assert len(rank0["losses"]) == MAX_EPOCHS * STEPS_PER_EPOCH - resumed["global_step"]
    last = torch.load(requeued_sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == MAX_EPOCHS * STEPS_PER_EPOCH
    assert last["epoch"] == MAX_EPOCHS - 1


# ----------------------------------------------------------------- without a cluster


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], (2, 4, 4)),
        (["trainer=ddp_cpu"], (1, 2, None)),
        (["trainer=cpu"], (1, 1, None)),
    ],
)
def test_preset_sizes_jobs_from_the_trainer(
    trainer: list[str], expected: tuple[int, int, int | None], tmp_path: Path
) -> None:
    from omegaconf import OmegaConf

    import lit_vae.slurm  # noqa: F401  (registers the preset's resolver)

    from .helpers import compose_config

    cfg = compose_config(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *trainer], tmp_path
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(launcher, dict)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == expected
    assert launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] >= 1
    assert launcher["_target_"].endswith("SlurmLauncher")


def test_resume_path_only_for_requeued_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lit_vae.slurm import resume_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_path(None, tmp_path) is None  # a fresh run in a reused dir starts over
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_path(None, tmp_path) is None  # the first start of a job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_path(None, tmp_path) == str(last)
    assert resume_path("/given.ckpt", tmp_path) == "/given.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert resume_path(None, tmp_path) is None  # Lightning's own, newer, SLURM checkpoint
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    last.unlink()
    assert resume_path(None, tmp_path) is None  # requeued before the first checkpoint
