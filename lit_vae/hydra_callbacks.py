"""Hydra callbacks, kept free of heavy imports: Hydra loads them before every job, and config
errors are reported before torch or Lightning is imported."""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["DDP_ENVIRONMENT", "DDPJobCallback"]

DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
"""The variables that describe a process group to Lightning and torch."""


class DDPJobCallback(Callback):
    """Ends each Hydra job's process group and child processes with the job.

    ``on_job_start`` remembers :data:`DDP_ENVIRONMENT`; ``on_job_end`` destroys the process group
    (after a barrier when the job completed), waits for the job's DDP child processes
    (:func:`lit_vae.distributed.end_job`) and restores the variables, so a sweep's next job in
    this process starts from scratch. A job that never built a trainer has nothing to end.
    """

    def __init__(self) -> None:
        self._saved: dict[str, str | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._saved = {key: os.environ.get(key) for key in DDP_ENVIRONMENT}

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        distributed = sys.modules.get("lit_vae.distributed")
        if distributed is not None:
            completed = getattr(job_return, "status", None) is JobStatus.COMPLETED
            distributed.end_job(synchronize=completed)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
