"""SLURM jobs that continue where they stopped.

A job of ``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``) that SLURM requeues —
preempted, timed out and resubmitted by submitit, or ``scontrol requeue <job id>`` — starts
again from the top, with the same config and run dir. :func:`resume_path` makes such a restart
continue from the run's ``checkpoints/last.ckpt`` (written at the end of every epoch by the
default callbacks) instead of starting over; SLURM counts the restarts in
``SLURM_RESTART_COUNT``.

Importing this module registers the ``lit_vae.gpus_per_node`` resolver the preset uses: one GPU
per task when the trainer's accelerator is a GPU, none otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = ["gpus_per_node", "is_requeued_slurm_job", "resume_path"]

GPU_ACCELERATORS = ("gpu", "cuda")


def gpus_per_node(accelerator: Any, devices: Any) -> Any:
    """``devices`` when ``accelerator`` is a GPU one (``gpu``, ``cuda``), else ``None``."""
    return devices if str(accelerator) in GPU_ACCELERATORS else None


OmegaConf.register_new_resolver("lit_vae.gpus_per_node", gpus_per_node, replace=True)


def is_requeued_slurm_job() -> bool:
    """Whether this process belongs to a SLURM job that was requeued at least once."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return "SLURM_JOB_ID" in os.environ and count.isdigit() and int(count) > 0


def resume_path(ckpt_path: str | None, output_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint to fit from: ``ckpt_path`` when given; else, in a requeued SLURM job,
    ``<output_dir>/checkpoints/last.ckpt`` if it exists; else ``None`` (a fresh start).

    ``None`` as well when ``output_dir`` holds an ``hpc_ckpt_<n>.ckpt``: Lightning wrote it when
    SLURM signalled the job (``#SBATCH --signal=SIGUSR1@90`` in a batch script of your own) and
    resumes from it by itself under SLURM.
    """
    if ckpt_path:
        return str(ckpt_path)
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if any(Path(output_dir).glob("hpc_ckpt_*.ckpt")):
        return None  # saved by Lightning at SLURM's signal: Lightning resumes from it itself
    if is_requeued_slurm_job() and last.is_file():
        log.info(
            "requeued SLURM job %s (restart %s): resuming from %s",
            os.environ.get("SLURM_JOB_ID"),
            os.environ.get("SLURM_RESTART_COUNT"),
            last,
        )
        return str(last)
    return None
