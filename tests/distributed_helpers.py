"""Shared pieces of the distributed tests: tiny data files, runs with a probe, comparisons."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from .helpers import BIN, REPO, TINY, compose_config, read_json

#: items per split: none divisible by 2 processes, and the last global training batch of 2 × 16
#: items (67 = 2 · 32 + 3) splits unevenly, 2 + 1
SPLIT_ROWS = {"train": range(0, 67), "val": range(100, 111), "test": range(200, 213)}

#: the process-count-independent setup of every comparison: float64, keyed noise, a curve per
#: step, two epochs
EXACT = (
    *TINY,
    "trainer.precision=64-true",
    "reparam_noise=keyed",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
)


def write_digits_splits(directory: Path) -> list[str]:
    """Small digits splits as ``.pt`` files; the ``data=tensors`` overrides that read them."""
    pixels, labels = load_digits(return_X_y=True)
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    overrides = ["data=tensors"]
    for split, rows in SPLIT_ROWS.items():
        index = torch.tensor(list(rows))
        path = directory / f"{split}.pt"
        torch.save({"x": x[index], "y": y[index]}, path)
        overrides.append(f"data.{split}={path}")
    return overrides


def probe_overrides(probe_dir: Path | str) -> list[str]:
    return [
        "+callbacks.probe._target_=tests.ddp_probe.Probe",
        f"+callbacks.probe.output_dir={probe_dir}",
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a console-script run: this checkout importable (for the probe)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def run_console(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 200
) -> subprocess.CompletedProcess[str]:
    """``lit-vae-train *args`` in its own process group; on a timeout the whole group (the
    DDP children included) is killed. Fails with the output when it exits non-zero."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **subprocess_env(), **(env or {})}
    process = subprocess.Popen(
        [str(BIN / "lit-vae-train"), *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        output, _ = process.communicate()
        raise AssertionError(
            f"lit-vae-train timed out after {timeout} s\n{output[-4000:]}"
        ) from None
    if process.returncode != 0:
        raise AssertionError(f"lit-vae-train exited {process.returncode}\n{output[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def kill_group(process: subprocess.Popen[str]) -> None:
    """Kill the process group ``process`` leads (it was started with a new session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def train_in_process(overrides: Sequence[str], run_dir: Path) -> dict[str, float]:
    """One ``lit-vae-train`` run in this process (the one-process reference)."""
    from lit_vae.train import train

    cfg = compose_config(overrides, run_dir)
    return train(cfg)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def load_probes(probe_dir: Path) -> list[dict[str, Any]]:
    """The probe files of a run, by global rank."""
    files = sorted(probe_dir.glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    return [torch.load(path, weights_only=True) for path in files]


def metric_rows(metrics_csv: Path) -> dict[str, list[float]]:
    """Every logged value of ``metrics.csv`` by column, in the order logged."""
    columns: dict[str, list[float]] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step"):
                    columns.setdefault(key, []).append(float(value))
    return columns


def assert_close_tensors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-6
) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(
            actual[key].double(), expected[key].double(), rtol=tol, atol=tol, msg=key
        )


def assert_matches_one_process(run_dir: Path, reference_dir: Path, world_size: int) -> None:
    """Everything a run of ``world_size`` processes did equals what one process did with
    ``world_size`` times the batch: per-step losses, gradients, final state, logged curves and
    results."""
    reference = load_probes(reference_dir / "probe")
    ranks = load_probes(run_dir / "probe")
    assert len(reference) == 1
    assert [r["global_rank"] for r in ranks] == list(range(world_size))
    assert all(r["world_size"] == world_size for r in ranks)
    (one,) = reference
    assert one["precision"] == "64-true"

    # the global batches are the one-process batches: same sizes, the last one split unevenly
    per_step = [sum(sizes) for sizes in zip(*(r["batch_sizes"] for r in ranks))]
    assert per_step == one["batch_sizes"] == [32, 32, 3, 32, 32, 3]
    assert [r["batch_sizes"][2] for r in ranks] == [2, 1][:world_size]

    # each process returns its part of the global mean times the number of processes
    mean_losses = [sum(losses) / world_size for losses in zip(*(r["losses"] for r in ranks))]
    np.testing.assert_allclose(mean_losses, one["losses"], rtol=1e-6, atol=1e-6)

    for rank in ranks:
        assert len(rank["steps"]) == len(one["steps"]) == 2
        for grads, expected in zip(rank["steps"], one["steps"]):
            assert_close_tensors(grads, expected)
        assert_close_tensors(rank["state"], one["state"])
        assert_close_tensors(rank["initial_state"], one["initial_state"], tol=0.0)

    logged, expected_logged = (
        metric_rows(run_dir / "metrics.csv"),
        metric_rows(reference_dir / "metrics.csv"),
    )
    assert logged.keys() == expected_logged.keys()
    for key in ("train/loss_step", "train/kl_step", "train/loss_epoch", "val/elbo", "val/kl"):
        assert len(expected_logged[key]) == (6 if key.endswith("_step") else 2), key
    for key, values in expected_logged.items():
        np.testing.assert_allclose(logged[key], values, rtol=1e-6, atol=1e-6, err_msg=key)

    results, expected_results = (
        read_json(run_dir / "results.json"),
        read_json(reference_dir / "results.json"),
    )
    assert results.keys() == expected_results.keys()
    assert {"test/nll", "test/active_units", "test/elbo", "val/elbo"} <= results.keys()
    for key, value in expected_results.items():
        assert math.isclose(results[key], value, rel_tol=1e-6, abs_tol=1e-6), key
