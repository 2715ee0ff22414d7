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
      chose) and ``noise_seed`` (the run's ``seed``, as this process's own config has it).

    With ``pause_at_step``, rank 0 of a run's first SLURM start touches
    ``paused-at-<step>`` after that step and sleeps until it is killed (a preemption point).
    """

    def __init__(
        self,
        output_dir: str,
        grad_steps: int = 2,
        pause_at_step: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.grad_steps = grad_steps
        self.pause_at_step = pause_at_step
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
        first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        if first_run and trainer.global_step == self.pause_at_step and trainer.is_global_zero:
            # a preemption point: announce it, then wait to be killed
            (self.output_dir / f"paused-at-{self.pause_at_step}").touch()
            while True:
                time.sleep(1)

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
                "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            },
            self.output_dir / f"rank{trainer.global_rank}.pt",
        )


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}
