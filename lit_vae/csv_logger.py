"""The logger of ``logger=csv``: Lightning's CSV logger, continuing ``metrics.csv`` on resume.

Lightning's :class:`~pytorch_lightning.loggers.CSVLogger` deletes an existing ``metrics.csv``
when it starts writing, so a run resumed in its run dir (``ckpt_path=last``, a requeued SLURM
job) would lose the learning curves logged before it stopped. :class:`CSVLogger` keeps them.
Told that the run resumes at global step ``G`` (:meth:`CSVLogger.continue_from`, which
``lit-vae-train`` calls with the checkpoint's step), it keeps the rows logged at steps before
``G`` and drops the later ones, which the resumed run logs again. Lightning logs the rows of the
``s``-th optimizer step, and the epoch-end rows after it, at ``step = s − 1``, so the file then
reads as the one of an uninterrupted run. A run that does not resume starts a fresh file, as
Lightning's does.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import csv_logs

__all__ = ["CSVLogger", "ContinuedExperimentWriter"]


def _logged_before(row: dict[str, Any], global_step: int) -> bool:
    """Whether ``row`` of ``metrics.csv`` was logged before ``global_step``; a row without a
    readable step is kept."""
    try:
        return float(row["step"]) < global_step
    except (KeyError, TypeError, ValueError):
        return True


class ContinuedExperimentWriter(csv_logs.ExperimentWriter):
    """Lightning's CSV writer that keeps the rows of an existing ``metrics.csv`` logged before
    ``keep_before_step`` (all of them are dropped when it is ``None``).

    The kept rows are rewritten through a temporary file and a rename, so an interruption
    while it starts leaves the previous file whole.
    """

    def __init__(self, log_dir: str, keep_before_step: int | None = None) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning warns about a non-empty directory here and deletes metrics.csv; a Hydra run
        # dir is never empty, and a resumed run keeps what it logged before
        if not self._fs.isfile(self.metrics_file_path):
            return
        if self.keep_before_step is None:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            fieldnames = list(reader.fieldnames or [])
        kept = [row for row in rows if _logged_before(row, self.keep_before_step)]
        partial = f"{self.metrics_file_path}.partial"
        with self._fs.open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(partial, self.metrics_file_path)
        self.metrics_keys = fieldnames


class CSVLogger(csv_logs.CSVLogger):
    """:class:`pytorch_lightning.loggers.CSVLogger` whose ``metrics.csv`` continues across a
    resume (:meth:`continue_from`); same arguments."""

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self._keep_before_step: int | None = None

    def continue_from(self, global_step: int) -> None:
        """Keep the rows of an existing ``metrics.csv`` logged before ``global_step``, the global
        step of the checkpoint the run resumes from. Call it before anything is logged."""
        if global_step < 0:
            raise ValueError(f"global_step={global_step}: must be >= 0")
        self._keep_before_step = global_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricExperimentWriter:
        """The writer of ``metrics.csv`` (and ``hparams.yaml``) in :attr:`log_dir`."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = ContinuedExperimentWriter(self.log_dir, self._keep_before_step)
        return self._experiment
