"""``lit-vae-train``: train (and test) a VAE from the composed Hydra config.

lit-vae-train                                   # digits, log_var head, 2-D latent
lit-vae-train posterior=cholesky latent_dim=8
lit-vae-train -m posterior=log_var,log_std,std,var
lit-vae-train hydra.run.dir=<run dir> ckpt_path=last     # resume a stopped run

The config is validated before anything is built; a bad value, bad data or an unusable
checkpoint stops the run with one ``error: ...`` line (:mod:`lit_vae.errors`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from lit_vae.build import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
)
from lit_vae.checkpoints import load_checkpoint
from lit_vae.resume import resolve_ckpt_path
from lit_vae.slurm import resume_path
from lit_vae.tracking import describe_run
from lit_vae.validation import config_errors, validate_train_config

log = logging.getLogger(__name__)

__all__ = ["main", "train"]


def _float_metrics(trainer: pl.Trainer, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in sorted(trainer.callback_metrics.items())
        if key.startswith(prefixes)
    }


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _checkpoint_dir(cfg: DictConfig, output_dir: Path) -> Path:
    """Where ``last.ckpt`` goes: the ``last_checkpoint`` callback's ``dirpath``, by default
    ``<run dir>/checkpoints``."""
    last = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
    return Path(last.get("dirpath") or output_dir / "checkpoints")


def _load_data(datamodule: pl.LightningDataModule) -> None:
    """Read lit-vae's in-memory splits now, so bad data stops the run before training."""
    split = getattr(datamodule, "split", None)
    if callable(split):
        split("train")


def _continue_logs(loggers: list[Any], global_step: int) -> None:
    """Loggers that keep their files across a resume keep what was logged before
    ``global_step`` (:meth:`lit_vae.csv_logger.CSVLogger.continue_from`)."""
    for logger in loggers:
        continue_from = getattr(logger, "continue_from", None)
        if callable(continue_from):
            continue_from(global_step)


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, fit (resuming from ``ckpt_path``; a requeued SLURM job resumes from its
    ``last.ckpt``), then test the best checkpoint; write ``results.json``; return the metrics."""
    validate_train_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), _checkpoint_dir(cfg, output_dir))
    ckpt_path = ckpt_path or resume_path(None, output_dir)
    resume_step = None
    if ckpt_path is not None:
        # refuses a checkpoint that needs pickle; its step is where the logs continue
        resume_step = int(load_checkpoint(ckpt_path, mmap=True).get("global_step", 0))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed %d", cfg.seed)

    with config_errors("data"):
        datamodule = build_datamodule(cfg.data)
        _load_data(datamodule)
    with config_errors():
        model = build_model(cfg, tuple(datamodule.data_shape))  # type: ignore[attr-defined]
    with config_errors("callbacks"):
        callbacks = build_callbacks(cfg.get("callbacks"))
    with config_errors("logger"):
        loggers = build_loggers(cfg.get("logger"))
    if resume_step is not None:
        _continue_logs(loggers, resume_step)
    describe_run(loggers, cfg)
    with config_errors("trainer"):
        trainer = build_trainer(cfg.trainer, callbacks, loggers)

    fit = cfg.get("train", True)
    if fit:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _float_metrics(trainer, ("val/",))
    if cfg.get("test", True):
        trainer.test(
            model,
            datamodule=datamodule,
            ckpt_path=_best_checkpoint(trainer) if fit else ckpt_path,
            verbose=False,
            weights_only=True,
        )
        metrics.update(_float_metrics(trainer, ("test/",)))

    if trainer.is_global_zero:
        results = output_dir / "results.json"
        results.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        _report(output_dir, metrics)
    return metrics


def _report(output_dir: Path, metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run dir: {output_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console = Console()
    console.print(table)
    for name in ("results.json", "samples.png", "reconstructions.png", "checkpoints/last.ckpt"):
        if (output_dir / name).exists():
            console.print(f"  {name:<22} {output_dir / name}")


def main() -> None:
    """``python -m lit_vae.train``: the same as ``lit-vae-train`` (:mod:`lit_vae.cli`)."""
    from lit_vae.cli import train_main

    train_main()


if __name__ == "__main__":
    main()
