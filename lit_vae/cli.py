"""The console entry points ``lit-vae-train`` and ``lit-vae-eval``.

Both validate the composed config before torch or Lightning is imported, so most mistakes are
reported in about a second, then run :func:`lit_vae.train.train` or
:func:`lit_vae.eval.evaluate`. Every error a user can fix ends the process with one
``error: ...`` line on stderr (:mod:`lit_vae.errors`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import lit_vae.slurm  # noqa: F401  (registers the resolver of the hydra/launcher=slurm preset)
from lit_vae.errors import run_cli
from lit_vae.validation import validate_eval_config, validate_train_config

__all__ = ["eval_main", "train_main"]


def _train(cfg: DictConfig) -> float | None:
    """Train; the job's W&B run (if any) is finished here, failed or not, so the next job of a
    multirun starts its own; it records the returned value as its ``objective`` summary."""
    validate_train_config(cfg)
    from lit_vae.build import quiet_lightning_advice
    from lit_vae.tracking import finish_tracking
    from lit_vae.train import train

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


def _evaluate(cfg: DictConfig) -> None:
    """Evaluate; finishes the job's W&B run (``job_type=eval``), failed or not."""
    validate_eval_config(cfg)
    from lit_vae.build import quiet_lightning_advice
    from lit_vae.eval import evaluate
    from lit_vae.tracking import finish_tracking

    quiet_lightning_advice()
    try:
        evaluate(cfg)
    except BaseException:
        finish_tracking(exit_code=1)
        raise
    finish_tracking()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """``lit-vae-train``; returns ``cfg.optimized_metric`` for Hydra sweepers."""
    return run_cli(_train, cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """``lit-vae-eval``."""
    run_cli(_evaluate, cfg)
