"""Data-parallel processes that belong to the Hydra job that started them.

With ``strategy=ddp`` on one node, Lightning starts the processes of local ranks ``1..n-1`` by
running the current command again. Inside a Hydra job that command is the whole command line:
under ``-m`` it is the whole sweep, so every child would run every job of the sweep, in a run
dir of its own. :class:`HydraJobLauncher` starts each child as a single run of *this job*
instead: the job's own overrides (``hydra.overrides.task``; for a sweep job these include the
values the sweeper chose), its Hydra overrides minus the ones about sweeping and launching, and
``hydra.run.dir=<this job's run dir>`` with ``hydra.output_subdir=null``, so the children write
into the job's run dir and leave its ``.hydra/`` alone.

:class:`~lit_vae.hydra_callbacks.DDPJobCallback` (a Hydra callback, configured in
``conf/hydra/default.yaml``) ends a job's process group and child processes when the job ends
(:func:`end_job`) and restores the variables the launcher set (``MASTER_PORT``, ``LOCAL_RANK``,
...), so that the next job of a sweep run by the same process starts a fresh group with fresh
child processes.

:func:`use_hydra_job_launcher` puts the launcher in place on a trainer; ``build_trainer`` does.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import pytorch_lightning as pl
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

from lit_vae.hydra_callbacks import DDP_ENVIRONMENT

log = logging.getLogger(__name__)

__all__ = [
    "DDP_ENVIRONMENT",
    "HydraJobLauncher",
    "end_job",
    "hydra_job_command",
    "use_hydra_job_launcher",
]


_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
_DROPPED_HYDRA_KEYS = ("hydra.run.dir", "hydra.output_subdir", "hydra.job.name", "hydra.mode")
_DROPPED_HYDRA_PREFIXES = (
    "hydra.sweep.",
    "hydra.launcher.",
    "hydra.sweeper.",
    "hydra/launcher",
    "hydra/sweeper",
)

_children: list[subprocess.Popen[bytes]] = []


def _entry_point() -> list[str]:
    """How this process was started: ``python -m package.module`` or ``python script``."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name]
    return [sys.executable, os.path.abspath(sys.argv[0])]


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-path/--config-name/--config-dir`` flags (and values) of ``argv``."""
    kept: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _CONFIG_FLAGS and index + 1 < len(argv):
            kept += [arg, argv[index + 1]]
            index += 2
            continue
        if arg.split("=", 1)[0] in _CONFIG_FLAGS[1::2] and "=" in arg:
            kept.append(arg)
        index += 1
    return kept


def _override_key(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0]


def _keeps(override: str) -> bool:
    key = _override_key(override)
    return key not in _DROPPED_HYDRA_KEYS and not key.startswith(_DROPPED_HYDRA_PREFIXES)


def _quoted(value: str) -> str:
    """``value`` as a double-quoted Hydra override value."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hydra_job_command(local_rank: int, argv: Sequence[str] | None = None) -> list[str]:
    """The command that runs the current Hydra job once more, as the process of ``local_rank``:
    same entry point and config flags, the job's overrides, and the job's run dir.

    Args:
        local_rank: the child's local rank (names its log file ``<job>_ddp_process_<rank>``).
        argv: the command line this process got; ``sys.argv[1:]`` by default.
    """
    hydra_cfg = HydraConfig.get()
    command = _entry_point() + _config_flags(sys.argv[1:] if argv is None else argv)
    command += [str(o) for o in hydra_cfg.overrides.task]
    command += [str(o) for o in hydra_cfg.overrides.hydra if _keeps(str(o))]
    command += [
        f"hydra.run.dir={_quoted(str(hydra_cfg.runtime.output_dir))}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_ddp_process_{local_rank}",
    ]
    return command


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher of one node's DDP processes, whose children re-run the current Hydra
    job (:func:`hydra_job_command`) rather than the command line. Outside Hydra it is
    Lightning's launcher."""

    def _call_children_scripts(self) -> None:
        if not HydraConfig.initialized():
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        environment = self.cluster_environment
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        os.environ["NODE_RANK"] = str(environment.node_rank())
        os.environ["LOCAL_RANK"] = str(environment.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        from hydra.utils import get_original_cwd

        for local_rank in range(1, self.num_processes):
            child_environment = {**os.environ, "LOCAL_RANK": str(local_rank)}
            command = hydra_job_command(local_rank)
            log.debug("starting local rank %d: %s", local_rank, command)
            process = subprocess.Popen(command, env=child_environment, cwd=get_original_cwd())
            self.procs.append(process)
            _children.append(process)


def use_hydra_job_launcher(trainer: pl.Trainer) -> pl.Trainer:
    """Give ``trainer``'s strategy a :class:`HydraJobLauncher` where it would use Lightning's
    script launcher (``ddp`` and the strategies built on it); returns ``trainer``."""
    launcher = trainer.strategy.launcher
    if type(launcher) is _SubprocessScriptLauncher:
        trainer.strategy._launcher = HydraJobLauncher(  # the strategy's launcher slot
            launcher.cluster_environment, launcher.num_processes, launcher.num_nodes
        )
    return trainer


def end_process_group(synchronize: bool) -> None:
    """Destroy the default process group, if any; after a barrier when ``synchronize`` (every
    process finished its job), so that no process leaves while another still talks to it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def _wait_for_children(timeout_s: float = 120.0) -> None:
    while _children:
        process = _children.pop()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("DDP process %d did not exit; killing it", process.pid)
            process.kill()
            process.wait()


def end_job(synchronize: bool) -> None:
    """End this process's part of a finished Hydra job: destroy the process group (after a
    barrier when ``synchronize``) and wait for the job's DDP child processes."""
    end_process_group(synchronize=synchronize)
    _wait_for_children()
