"""A callback the distributed tests add to real runs (``+callbacks.probe._target_=...``): every
process writes what it saw into ``output_dir``, named by its global rank."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_vae.metrics import PerSampleMean

#: the values of the metric check: 13 rows, of which rank 0 of 2 holds 5 and rank 1 holds 8
METRIC_VALUES = torch.linspace(-2.0, 3.0, 39, dtype=torch.float64).reshape(13, 3).sin() * 4
METRIC_SPLIT = 5


class Probe(pl.Callback):
    """Writes ``start-rank<r>-restart<n>.json`` (the global step and epoch fitting starts from,
    per SLURM restart ``n``) when fitting starts, and ``rank<r>.pt`` when it ends, holding:

    * ``steps``: per optimizer step, the gradients after backward (averaged over the
      processes by DDP) ``{name: tensor}`` for the first ``grad_steps`` steps;
    * ``losses``: the loss every step returned (this process's scaled part of the global mean);
    * ``batch_sizes``: this process's batch size at every step;
    * ``initial_state`` and ``state``: the model's ``state_dict`` before the first step and
      after the last one;
    * ``world_size``, ``global_rank``, ``precision``, ``cluster_environment`` (the class Lightning
      chose) and ``noise_seed`` (the run's ``seed``, as this process's own config has it);
    * ``metric_check``: with 2 processes, ``(mean, mean_of_squares)`` of a
      :class:`~lit_vae.metrics.PerSampleMean` that rank 0 fed ``METRIC_VALUES[:5]`` and rank 1
      ``METRIC_VALUES[5:]``, reduced over the process group.

    With ``pause_at_step`` (and ``pause_seed``, if given, equal to the run's seed), rank 0 of a
    run's first SLURM start touches ``paused-at-<step>`` after that step and sleeps until it is
    killed: a preemption point.
    """

    def __init__(
        self,
        output_dir: str,
        grad_steps: int = 2,
        pause_at_step: int | None = None,
        pause_seed: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.grad_steps = grad_steps
        self.pause_at_step = pause_at_step
        self.pause_seed = pause_seed
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []
        self.batch_sizes: list[int] = []
        self.initial_state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_state = _copy(pl_module.state_dict())
        # where fitting (re)started: one small file per start, named by rank and SLURM restart
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        path = self.output_dir / f"start-rank{trainer.global_rank}-restart{restart}.json"
        path.write_text(json.dumps(start))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.batch_sizes.append(int(batch[0].shape[0]))
        if self._pauses_here(trainer, pl_module):
            (self.output_dir / f"paused-at-{self.pause_at_step}").touch()
            while True:
                time.sleep(1)

    def _pauses_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return (
            os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
            and trainer.global_step == self.pause_at_step
            and trainer.is_global_zero
            and self.pause_seed in (None, pl_module.hparams.get("noise_seed"))
        )

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.grads) < self.grad_steps:
            self.grads.append(
                {
                    name: parameter.grad.detach().clone()
                    for name, parameter in pl_module.named_parameters()
                    if parameter.grad is not None
                }
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        torch.save(
            {
                "steps": self.grads,
                "losses": self.losses,
                "batch_sizes": self.batch_sizes,
                "initial_state": self.initial_state,
                "state": _copy(pl_module.state_dict()),
                "noise_seed": pl_module.hparams.get("noise_seed"),
                "world_size": trainer.world_size,
                "global_rank": trainer.global_rank,
                "precision": str(trainer.precision),
                "cluster_environment": type(environment).__name__,
                "metric_check": _metric_check(trainer) if trainer.world_size == 2 else None,
            },
            self.output_dir / f"rank{trainer.global_rank}.pt",
        )


def _metric_check(trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    metric = PerSampleMean(METRIC_VALUES.shape[1])
    rows = (
        METRIC_VALUES[:METRIC_SPLIT] if trainer.global_rank == 0 else METRIC_VALUES[METRIC_SPLIT:]
    )
    for part in rows.split(3):
        metric.update(part)
    mean, mean_squares = metric.compute()
    return mean.clone(), mean_squares.clone()


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}
