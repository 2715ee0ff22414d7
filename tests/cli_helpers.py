"""Helpers for tests that run ``lit-vae-train`` / ``lit-vae-eval`` in a subprocess.

The subprocess gets this checkout on ``PYTHONPATH``, so configs can point ``_target_`` at the
classes below (``+callbacks.pause._target_=tests.cli_helpers.PauseAt``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = [
    "model.encoder.hidden_sizes=[32]",
    "model.decoder.hidden_sizes=[32]",
    "callbacks=minimal",
    "callbacks.image_grids=null",
    "logger=csv",
    "eval.num_samples=10",
    "trainer.deterministic=true",
]
"""Overrides for a small, quiet, deterministic run on digits."""


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update({"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **extra})
    return env


def run_tool(
    tool: str, run_dir: Path, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """``<tool> hydra.run.dir=<run_dir> *args``, waited for, output captured."""
    return subprocess.run(
        [str(BIN / tool), f"hydra.run.dir={run_dir}", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_tool(tool: str, run_dir: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """``<tool> hydra.run.dir=<run_dir> *args`` started in the background, its output going to
    ``<run_dir>.stdout`` and ``<run_dir>.stderr`` (files, so a full pipe never blocks it)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(f"{run_dir}.stdout", "w") as stdout,
        open(f"{run_dir}.stderr", "w") as stderr,
    ):
        return subprocess.Popen(
            [str(BIN / tool), f"hydra.run.dir={run_dir}", *args],
            cwd=REPO,
            env=cli_env(**env),
            stdout=stdout,
            stderr=stderr,
            text=True,
        )


def stderr_of(run_dir: Path) -> str:
    """What a run started by :func:`start_tool` wrote to stderr."""
    return Path(f"{run_dir}.stderr").read_text()


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    """Wait until ``path`` exists; fail if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc={process.returncode}) before {path}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


class PauseAt(pl.Callback):
    """At the end of training batch ``step`` (global step), write ``ready`` and wait for
    ``go`` to exist (or ``timeout`` seconds), then go on: a test can signal or kill the run at
    a known point."""

    def __init__(self, step: int, ready: str, go: str, timeout: float = 120.0) -> None:
        self.step = step
        self.ready = Path(ready)
        self.go = Path(go)
        self.timeout = timeout

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step != self.step:
            return
        self.ready.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
