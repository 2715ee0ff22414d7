"""Crash-safe resume: a killed or preempted run, resumed, ends where an uninterrupted one does."""

from __future__ import annotations

import csv
import json
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lit_vae.data import EpochRandomSampler
from lit_vae.resume import (
    LastCheckpoint,
    ResumableDataLoader,
    capture_rng_state,
    resolve_ckpt_path,
    restore_rng_state,
)
from tests.cli_helpers import TINY, run_tool, start_tool, stderr_of, wait_for

# digits: 1258 training images in batches of 128 are 10 steps per epoch; last.ckpt every 3
# steps and at every epoch end; the LR halves every epoch, so a lost or doubled scheduler step
# would show in the metrics
RUN = [
    *TINY,
    "trainer.max_epochs=3",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "scheduler=step",
    "scheduler.step_size=1",
    "scheduler.gamma=0.5",
]
STEPS_PER_EPOCH = 10


def results(run_dir: Path) -> dict[str, float]:
    values: dict[str, float] = json.loads((run_dir / "results.json").read_text())
    return values


def assert_same_results(run_dir: Path, reference: Path) -> None:
    got, expected = results(run_dir), results(reference)
    assert sorted(got) == sorted(expected)
    assert "test/nll" in got
    assert "val/elbo" in got
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6, (key, got[key], value)


def assert_same_metrics_csv(run_dir: Path, reference: Path) -> None:
    """The resumed run's ``metrics.csv`` holds the rows of an uninterrupted run's, in order:
    those logged before the interruption kept, those after it logged once."""

    def rows(path: Path) -> list[dict[str, str]]:
        with (path / "metrics.csv").open(newline="") as file:
            return list(csv.DictReader(file))

    got, expected = rows(run_dir), rows(reference)
    assert [(r["step"], r["epoch"]) for r in got] == [(r["step"], r["epoch"]) for r in expected]
    for got_row, expected_row in zip(got, expected):
        assert {k for k, v in got_row.items() if v} == {k for k, v in expected_row.items() if v}
        for key, value in expected_row.items():
            if value:
                assert abs(float(got_row[key]) - float(value)) <= 1e-6, (key, got_row, value)


def assert_same_checkpoint_files(run_dir: Path, reference: Path) -> None:
    """The resumed run's best checkpoint is the uninterrupted run's, and no earlier one is left
    behind: the checkpoint callbacks' state in ``last.ckpt`` was current when it was saved."""
    names = [sorted(p.name for p in (d / "checkpoints").iterdir()) for d in (run_dir, reference)]
    assert names[0] == names[1]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == expected["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6)
    assert got["lr_schedulers"][0]["_last_lr"] == expected["lr_schedulers"][0]["_last_lr"]


def train_position(checkpoint_path: Path) -> tuple[int, int, int]:
    """``(global_step, epoch, batches of that epoch trained)`` recorded in a checkpoint."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    fit_loop = checkpoint["loops"]["fit_loop"]
    served = fit_loop["state_dict"]["combined_loader"][0]["batches_served"]
    return checkpoint["global_step"], checkpoint["epoch"], served


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_tool("lit-vae-train", run_dir, *RUN)
    assert result.returncode == 0, result.stderr
    return run_dir


def paused_run(run_dir: Path, step: int) -> tuple[Any, Path]:
    """Start a run that holds still at the end of global step ``step``; returns it and the
    file it waits for."""
    ready, go = run_dir.parent / f"{run_dir.name}.ready", run_dir.parent / f"{run_dir.name}.go"
    process = start_tool(
        "lit-vae-train",
        run_dir,
        *RUN,
        "+callbacks.pause._target_=tests.cli_helpers.PauseAt",
        f"+callbacks.pause.step={step}",
        f"+callbacks.pause.ready={ready}",
        f"+callbacks.pause.go={go}",
    )
    wait_for(ready, process)
    return process, go


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_result(
    uninterrupted: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    process, _ = paused_run(run_dir, step=STEPS_PER_EPOCH + 9)  # epoch 1, 9 batches in
    # the latest last.ckpt is the mid-epoch one of step 18: 8 of epoch 1's batches trained
    assert train_position(run_dir / "checkpoints" / "last.ckpt") == (18, 1, 8)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()

    resumed = run_tool("lit-vae-train", run_dir, *RUN, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr
    assert "You're resuming from a checkpoint that ended before the epoch ended" not in (
        resumed.stderr
    )
    assert_same_results(run_dir, uninterrupted)
    assert_same_weights(run_dir, uninterrupted)
    assert_same_metrics_csv(run_dir, uninterrupted)
    assert_same_checkpoint_files(run_dir, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "step", "saved_at", "position"),
    [
        # mid-epoch: saved at the end of the training batch the signal arrived in
        (signal.SIGTERM, 4, 4, (4, 0, 4)),
        # during the epoch's last batch: saved at the end of the epoch, after validation
        (signal.SIGUSR1, STEPS_PER_EPOCH, STEPS_PER_EPOCH, (10, 0, 10)),
    ],
)
def test_preemption_signal_saves_exits_and_resumes(
    uninterrupted: Path,
    tmp_path: Path,
    signum: signal.Signals,
    step: int,
    saved_at: int,
    position: tuple[int, int, int],
) -> None:
    run_dir = tmp_path / "run"
    process, go = paused_run(run_dir, step=step)
    process.send_signal(signum)
    go.touch()
    process.wait(timeout=120)
    stderr = stderr_of(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: {signum.name} received: saved {last} at global step {saved_at}; "
        f"resume with ckpt_path={last}"
    )
    assert train_position(last) == position
    assert not (run_dir / "results.json").exists()

    resumed = run_tool("lit-vae-train", run_dir, *RUN, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(run_dir, uninterrupted)
    assert_same_weights(run_dir, uninterrupted)
    assert_same_metrics_csv(run_dir, uninterrupted)
    assert_same_checkpoint_files(run_dir, uninterrupted)


@pytest.mark.slow
def test_same_seed_same_results(uninterrupted: Path, tmp_path: Path) -> None:
    again = run_tool("lit-vae-train", tmp_path, *RUN)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "results.json").read_text() == (uninterrupted / "results.json").read_text()
    other_seed = run_tool("lit-vae-train", tmp_path / "seed7", *RUN, "seed=7")
    assert other_seed.returncode == 0, other_seed.stderr
    assert results(tmp_path / "seed7")["val/elbo"] != results(uninterrupted)["val/elbo"]


# ---------------------------------------------------------------------------- in process


def test_resumable_loader_skips_the_batches_already_served() -> None:
    dataset = TensorDataset(torch.arange(10))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(
            dataset, batch_size=3, sampler=EpochRandomSampler(dataset, seed=3)
        )

    reference = loader()
    reference.sampler.set_epoch(2)  # type: ignore[attr-defined]
    whole = [b[0].tolist() for b in reference]
    first = loader()
    first.sampler.set_epoch(2)  # type: ignore[attr-defined]
    iterator = iter(first)
    served = [next(iterator)[0].tolist() for _ in range(2)]
    assert first.state_dict() == {"batches_served": 2, "epoch": 2}
    # a fresh loader, as in a new process: the state alone gives the epoch and the position
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [b[0].tolist() for b in resumed]
    assert served + rest == whole
    assert resumed.state_dict() == {"batches_served": 4, "epoch": 2}
    resumed.sampler.set_epoch(2)  # type: ignore[attr-defined]
    assert [b[0].tolist() for b in resumed] == whole  # the skip applies to one pass only
    # Lightning sets the epoch again after loading the state and before the first batch
    late = loader()
    late.load_state_dict({"batches_served": 2, "epoch": 2})
    late_iterator = iter(late)
    late.sampler.set_epoch(2)  # type: ignore[attr-defined]
    assert [b[0].tolist() for b in late_iterator] == rest


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # a cached Gaussian in python's state
    state = capture_rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.save({"rng": state}, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(loaded)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert resolve_ckpt_path(None, checkpoints) is None
    assert resolve_ckpt_path("last", checkpoints) is None  # nothing yet: a fresh start
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", checkpoints) == str(checkpoints / "last.ckpt")
    assert resolve_ckpt_path(str(checkpoints / "last.ckpt"), tmp_path) == str(
        checkpoints / "last.ckpt"
    )
    with pytest.raises(ValueError, match=r"^ckpt_path='nope.ckpt': no such checkpoint file"):
        resolve_ckpt_path("nope.ckpt", checkpoints)


def test_last_checkpoint_options() -> None:
    assert LastCheckpoint("d").path == Path("d") / "last.ckpt"
    with pytest.raises(ValueError, match=r"every_n_train_steps=0: must be null or an integer"):
        LastCheckpoint("d", every_n_train_steps=0)
    with pytest.raises(ValueError, match=r"signals=\['SIGINT'\]: allowed: a list of SIGTERM"):
        LastCheckpoint("d", signals=["SIGINT"])
