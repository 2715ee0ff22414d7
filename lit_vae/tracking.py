"""Weights & Biases for lit-vae runs: one W&B run per Hydra job.

Each job's run is named and tagged from its Hydra overrides, grouped by its multirun, carries
the fully resolved config (flat enough to filter on: ``posterior: log_var`` next to
``posterior.min_raw: -30.0``), logs at the trainer's global step, and is finished when the job
ends, so the next job of a sweep starts a run of its own. It is offline unless ``WANDB_MODE`` (or
``logger.wandb.mode``) says otherwise, and training resumed from ``<run dir>/checkpoints/last.ckpt``
continues the same W&B run.

``conf/logger/wandb.yaml`` builds :class:`HydraWandbLogger`; ``lit-vae-train`` calls
:func:`describe_run` once the loggers exist and :func:`finish_tracking` when the job ends.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "RUN_ID_FILE",
    "HydraJob",
    "HydraWandbLogger",
    "TrackingError",
    "describe_run",
    "find_run_id",
    "finish_tracking",
    "flat_config",
    "hydra_job",
    "run_name",
    "run_tags",
    "sweep_group",
]

MODES = ("online", "offline", "disabled", "shared")
# the file in a run dir that holds the W&B run id, read back when training resumes
RUN_ID_FILE = "wandb_run_id"
# metric → W&B summary kept for it (besides the last value W&B keeps anyway)
SUMMARIES: dict[str, str] = {"val/elbo": "max", "test/nll": "min"}
# config subtrees that are plumbing, not hyperparameters: only their group choice is logged
PLUMBING = ("callbacks", "logger", "paths", "hydra")
# override keys (and their sub-keys) that do not name a run
NAME_EXCLUDE = (
    "ckpt_path",
    "paths",
    "logger",
    "callbacks",
    "trainer",
    "eval",
    "hydra",
    "hparams_search",
)
# override keys (and their sub-keys) that do not become tags
TAG_EXCLUDE = ("ckpt_path", "paths")
# W&B rejects longer tags
TAG_MAX_LEN = 64


class TrackingError(RuntimeError):
    """W&B could not start the run the config asks for."""


# --------------------------------------------------------------------------- the Hydra job


@dataclass(frozen=True)
class HydraJob:
    """What Hydra knows about the running job.

    Attributes:
        overrides: the job's command-line overrides, e.g. ``["posterior=cholesky", "seed=2"]``.
        choices: the option chosen in each config group, e.g. ``{"posterior": "cholesky"}``.
        sweep_dir: the multirun's directory, ``None`` for a single run.
    """

    overrides: tuple[str, ...] = ()
    choices: Mapping[str, str | None] = field(default_factory=dict)
    sweep_dir: str | None = None


def hydra_job() -> HydraJob | None:
    """The running Hydra job, or ``None`` outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices, resolve=True)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return HydraJob(
        overrides=tuple(str(o) for o in hydra_cfg.overrides.task),
        choices={str(k): v for k, v in choices.items()} if isinstance(choices, dict) else {},
        sweep_dir=str(hydra_cfg.sweep.dir) if multirun else None,
    )


def override_key(override: str) -> str:
    """``"+trainer.max_time=1"`` → ``"trainer.max_time"``; ``"~scheduler"`` → ``"scheduler"``."""
    return override.split("=", 1)[0].lstrip("+~")


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in prefixes)


def run_name(overrides: Sequence[str], exclude: Iterable[str] = NAME_EXCLUDE) -> str | None:
    """A run name from the overrides that say what the run is: ``"posterior=cholesky,seed=2"``.

    Overrides of plumbing (``trainer.*``, ``logger``, ``ckpt_path``, ...) are left out; ``None``
    when nothing is left (W&B then picks a name).
    """
    exclude = tuple(exclude)
    kept = [o for o in overrides if not _under(override_key(o), exclude)]
    return ",".join(kept) or None


def run_tags(overrides: Sequence[str], exclude: Iterable[str] = TAG_EXCLUDE) -> list[str]:
    """Every override as a tag (paths left out), cut to W&B's 64 characters."""
    exclude = tuple(exclude)
    return [o[:TAG_MAX_LEN] for o in overrides if not _under(override_key(o), exclude)]


def sweep_group(sweep_dir: str | os.PathLike[str]) -> str:
    """The W&B group of a multirun: its directory's last two parts, ``"2024-05-01_12-30-00"``
    for Hydra's ``outputs/multirun/<date>/<time>``."""
    parts = Path(sweep_dir).parts[-2:]
    return "_".join(parts)


# --------------------------------------------------------------------------- the config


def flat_config(
    config: Mapping[str, Any], choices: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """The run's config as W&B config: group choices at the top, options as dotted keys.

    ``{"posterior": {"name": "log_var", "min_raw": -30.0}, "seed": 2}`` with the choice
    ``posterior=log_var`` becomes ``{"posterior": "log_var", "posterior.min_raw": -30.0,
    "seed": 2}``: filter on ``posterior`` to pick a head, on ``posterior.min_raw`` for an option.
    These keys are the Hydra override keys, so a W&B sweep parameter named ``regularizer.beta``
    lands on the same key. ``_target_`` entries and the contents of ``callbacks``, ``logger``,
    ``paths`` and ``hydra`` are left out (their choices stay); ``paths.output_dir`` becomes
    ``run_dir``. Without ``choices`` (outside Hydra), a group is a top-level mapping with a
    ``name`` key.

    Args:
        config: the resolved config as plain containers.
        choices: Hydra's group choices (``hydra.runtime.choices``); nested groups such as
            ``hydra/launcher`` are skipped.
    """
    flat: dict[str, Any] = {}
    for group, choice in (choices or {}).items():
        if "/" not in group and group != "hydra":
            flat[group] = choice
    for key, value in config.items():
        if key in PLUMBING:
            continue
        if isinstance(value, Mapping):
            if choices is None and isinstance(value.get("name"), str):
                flat[key] = value["name"]
            _flatten_into(flat, key, value, group_choice=flat.get(key))
        else:
            flat[key] = value
    paths = config.get("paths")
    if isinstance(paths, Mapping) and paths.get("output_dir") is not None:
        flat["run_dir"] = str(paths["output_dir"])
    return flat


def _flatten_into(
    flat: dict[str, Any], prefix: str, mapping: Mapping[str, Any], group_choice: Any = None
) -> None:
    for key, value in mapping.items():
        if key == "_target_":
            continue
        if key == "name" and value == group_choice:
            continue
        dotted = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            _flatten_into(flat, dotted, value)
        else:
            flat[dotted] = value


def _resolved(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` as plain resolved containers; top-level keys that do not resolve (``paths``
    outside a Hydra job) are left out."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    plain: dict[str, Any] = {}
    for key in cfg:
        try:
            value = cfg[key]
            plain[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except Exception:  # an interpolation that needs a Hydra job
            log.debug("config key %s does not resolve here; not tracked", key)
    return plain


# --------------------------------------------------------------------------- resume


def find_run_id(ckpt_path: str | os.PathLike[str] | None) -> str | None:
    """The W&B run id recorded in the run dir of ``ckpt_path`` (``<run dir>/checkpoints/x.ckpt``
    or ``<run dir>/x.ckpt``), or ``None``."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path)
    for directory in (ckpt.parent.parent, ckpt.parent):
        record = directory / RUN_ID_FILE
        if record.is_file():
            run_id = record.read_text().strip()
            if run_id:
                return run_id
    return None


# --------------------------------------------------------------------------- the logger


class HydraWandbLogger(WandbLogger):
    """Lightning's :class:`~pytorch_lightning.loggers.WandbLogger` for Hydra jobs.

    On top of Lightning's logger it: derives name, tags and group from the Hydra job; resolves
    the mode (``mode`` → ``WANDB_MODE`` → ``offline``); logs the run config given by
    :meth:`set_run_config` instead of the model's hyperparameters; logs every metric at the
    trainer's global step (so a resumed run's steps continue); keeps ``val/elbo`` max and
    ``test/nll`` min summaries; writes the run id to ``<save_dir>/wandb_run_id`` and, when
    ``resume_from`` is a checkpoint of a run that has one, continues that run.

    Args:
        project: W&B project.
        entity: W&B entity (user or team); W&B's default when ``None``.
        save_dir: the run dir; W&B writes ``<save_dir>/wandb/``.
        mode: ``online``, ``offline``, ``disabled`` or ``shared``; ``WANDB_MODE`` or
            ``offline`` when ``None``.
        job_type: ``train`` or ``eval`` (the Hydra ``task_name``).
        name, tags, group: W&B's; derived from the Hydra job when ``None``.
        log_model: log checkpoints as W&B artifacts (``True``: at the end; ``"all"``: each).
        resume_from: a checkpoint path; a ``train`` job continues the W&B run recorded next to it.
        fallback_offline: when an online run cannot start (no credentials, no network), log
            offline instead of failing.
        init_timeout: seconds W&B may take to start the run.
        summaries: metric → ``min``/``max``/``mean``/``last``; :data:`SUMMARIES` when ``None``.
        **kwargs: passed on to :func:`wandb.init`; a ``settings`` mapping there is merged
            with ``init_timeout``.
    """

    def __init__(
        self,
        project: str = "lit-vae",
        entity: str | None = None,
        save_dir: str = ".",
        mode: str | None = None,
        job_type: str = "train",
        name: str | None = None,
        tags: Sequence[str] | None = None,
        group: str | None = None,
        log_model: bool | str = False,
        resume_from: str | None = None,
        fallback_offline: bool = False,
        init_timeout: float = 60.0,
        summaries: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in MODES:
            raise ValueError(f"logger.wandb.mode={mode!r}: allowed: {', '.join(MODES)}")
        if log_model not in (True, False, "all"):
            raise ValueError(f"logger.wandb.log_model={log_model!r}: allowed: true, false, all")
        job = hydra_job()
        if job is not None:
            name = name if name is not None else run_name(job.overrides)
            tags = tags if tags is not None else run_tags(job.overrides)
            if group is None and job.sweep_dir is not None:
                group = sweep_group(job.sweep_dir)
        run_id = kwargs.pop("id", None)
        if run_id is None and job_type == "train":
            run_id = find_run_id(resume_from)
            if run_id is not None:
                log.info("resuming W&B run %s recorded next to %s", run_id, resume_from)
        super().__init__(
            name=name,
            save_dir=save_dir,
            id=run_id,
            project=project,
            log_model=log_model,  # type: ignore[arg-type]
            entity=entity,
            mode=mode,
            job_type=job_type,
            tags=list(tags) if tags else None,
            group=group,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the key, even unset
            self._wandb_init.pop("anonymous", None)
        self._fallback_offline = bool(fallback_offline)
        self._init_timeout = float(init_timeout)
        self._summaries = dict(SUMMARIES if summaries is None else summaries)
        self._run_config: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        """The W&B mode this logger starts its run in."""
        return str(self._wandb_init["mode"])

    def set_run_config(self, config: Mapping[str, Any]) -> None:
        """Log ``config`` as the W&B run config (in place of the model's hyperparameters)."""
        self._run_config = dict(config)
        if self._experiment is not None:
            self._experiment.config.update(self._run_config, allow_val_change=True)
        else:
            self._wandb_init["config"] = self._run_config

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, started on first use (rank zero only; other ranks get a dummy)."""
        if self._experiment is None:
            self._start_run()
        return self._experiment

    def _start_run(self) -> None:
        import wandb

        stale = wandb.run
        if stale is not None and stale.id != self._wandb_init.get("id"):
            log.warning("finishing W&B run %s left open by an earlier job", stale.id)
            wandb.finish()
        settings = self._wandb_init.get("settings") or {}
        if isinstance(settings, Mapping):
            self._wandb_init["settings"] = {"init_timeout": self._init_timeout, **settings}
        try:
            run = super().experiment
        except wandb.errors.Error as err:
            if self.mode not in ("online", "shared") or not self._fallback_offline:
                raise TrackingError(_start_failure(self.mode, err)) from err
            log.warning("W&B could not start an online run (%s); logging offline instead", err)
            self._experiment = None
            self._wandb_init["mode"] = "offline"
            run = super().experiment
        if self.mode == "disabled":
            return
        for metric, summary in self._summaries.items():
            run.define_metric(metric, summary=summary, step_metric="trainer/global_step")
        if self.save_dir and Path(self.save_dir).is_dir():
            (Path(self.save_dir) / RUN_ID_FILE).write_text(f"{run.id}\n")

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._run_config is None:
            super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` at W&B step ``step`` (the trainer's global step), also as
        ``trainer/global_step``, so the steps of a resumed run continue."""
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        if step is None:
            self.experiment.log(dict(metrics))
        else:
            self.experiment.log({**metrics, "trainer/global_step": step}, step=int(step))


def _start_failure(mode: str, err: Exception) -> str:
    reason = str(err).strip().rstrip(".")
    return (
        f"W&B could not start a run in mode {mode!r}: {reason}. Log in (`wandb login` or "
        "WANDB_API_KEY) and check the network, or track offline with WANDB_MODE=offline and "
        "upload later with `wandb sync <run dir>/wandb/offline-run-*`; "
        "logger.wandb.fallback_offline=true falls back to offline by itself"
    )


# --------------------------------------------------------------------------- entry-point hooks


def describe_run(loggers: Iterable[Any], cfg: DictConfig | Mapping[str, Any]) -> None:
    """Hand the run's resolved config (:func:`flat_config`) to every W&B logger in ``loggers``."""
    trackers = [logger for logger in loggers if isinstance(logger, HydraWandbLogger)]
    if not trackers:
        return
    job = hydra_job()
    config = flat_config(_resolved(cfg), job.choices if job is not None else None)
    for tracker in trackers:
        tracker.set_run_config(config)


def finish_tracking(exit_code: int = 0, summary: Mapping[str, Any] | None = None) -> None:
    """Finish the open W&B run, if any, with ``exit_code`` (nonzero marks it failed), after
    adding ``summary`` to its summary. Does nothing when W&B was never imported."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    if summary:
        run.summary.update(dict(summary))
    run.finish(exit_code=exit_code)
