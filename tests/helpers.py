"""Shared helpers for tests that compose configs, build trainers and run the entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "lit_vae" / "conf"
BIN = Path(sys.executable).parent

#: overrides that make a real run tiny: small nets, few samples for test/nll, no progress bars
TINY = (
    "model.encoder.hidden_sizes=[32]",
    "model.decoder.hidden_sizes=[32]",
    "eval.num_samples=10",
    "callbacks=minimal",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


def quiet_trainer(**options: Any) -> pl.Trainer:
    """A one-process CPU ``Trainer`` with no logger, checkpoints, progress bar or model summary;
    ``options`` add to or override these."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **options})


def find_mnist() -> Path | None:
    """``$LIT_VAE_MNIST_DIR``, else ``shared/data/mnist`` beside the checkout or a folder above."""
    if "LIT_VAE_MNIST_DIR" in os.environ:
        path = Path(os.environ["LIT_VAE_MNIST_DIR"])
        return path if path.is_dir() else None
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / "mnist"
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    return None


def compose_config(
    overrides: Sequence[str], output_dir: Path, config_name: str = "train"
) -> DictConfig:
    """Compose ``config_name`` with ``overrides`` as Hydra would, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_cli(
    command: str,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a console script of this environment; on failure, show its output."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [str(BIN / command), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))
