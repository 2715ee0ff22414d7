"""``lit-vae-train``: train (and test) a VAE from the composed Hydra config.

lit-vae-train                                   # digits, log_var head, 2-D latent
lit-vae-train posterior=cholesky latent_dim=8
lit-vae-train -m posterior=log_var,log_std,std,var
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from lit_vae.build import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
    quiet_lightning_advice,
)
from lit_vae.slurm import resume_path
from lit_vae.tracking import describe_run, finish_tracking

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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (a requeued SLURM job resumes from its ``last.ckpt``), then test the best checkpoint;
    write ``results.json``; return the metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, tuple(datamodule.data_shape))  # type: ignore[attr-defined]
    loggers = build_loggers(cfg.get("logger"))
    describe_run(loggers, cfg)
    trainer = build_trainer(cfg.trainer, build_callbacks(cfg.get("callbacks")), loggers)

    if cfg.get("train", True):
        ckpt_path = resume_path(cfg.get("ckpt_path"), output_dir)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _float_metrics(trainer, ("val/",))
    if cfg.get("test", True):
        trainer.test(
            model, datamodule=datamodule, ckpt_path=_best_checkpoint(trainer), verbose=False
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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns ``cfg.optimized_metric`` for Hydra sweepers.

    The job's W&B run (if any) is finished here, failed or not, so the next job of a multirun
    starts its own; it records the returned value as its ``objective`` summary.
    """
    quiet_lightning_advice()
    try:
        metrics = train(cfg)
    except BaseException:
        finish_tracking(exit_code=1)
        raise
    metric_name = cfg.get("optimized_metric")
    value = metrics.get(metric_name) if metric_name else None
    finish_tracking(summary=None if value is None else {"objective": value})
    return value


if __name__ == "__main__":
    main()
