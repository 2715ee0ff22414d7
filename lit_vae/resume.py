"""Crash-safe training: checkpoints a killed run can resume from, to the same result.

A resumed run continues exactly where the checkpoint left it, mid-epoch included:

* optimizer, LR scheduler, loop counters (``global_step``, hence the β schedule): Lightning;
* the position within the epoch: the training loader is a :class:`ResumableDataLoader`, whose
  ``state_dict`` (batches served in the current pass) Lightning stores in the checkpoint and
  hands back before the first batch; the resumed pass skips the batches already trained on. The
  order itself is a function of ``(seed, epoch)`` (:class:`~lit_vae.data.EpochRandomSampler`),
  and so is dynamic binarization;
* the global RNGs (torch, CUDA, numpy, python ``random``), which the posterior's ``rsample``
  draws from: :class:`RNGState` stores them as tensors and plain numbers and restores them when
  training starts.

:class:`LastCheckpoint` writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer
steps, at the end of every epoch, and when SIGTERM or SIGUSR1 arrives (a scheduler's preemption
notice), then stops the run with :class:`PreemptedError`. ``ckpt_path=last`` resumes from it
(:func:`resolve_ckpt_path`).
"""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_vae.errors import NonFiniteLossError, PreemptedError
from lit_vae.guards import non_finite_names

__all__ = [
    "LAST_CHECKPOINT",
    "LastCheckpoint",
    "PreemptedError",
    "RNGState",
    "ResumableDataLoader",
    "capture_rng_state",
    "resolve_ckpt_path",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
"""The file name :class:`LastCheckpoint` writes and ``ckpt_path=last`` reads."""


# --------------------------------------------------------------------------------------------
# The position within an epoch.


class ResumableDataLoader(DataLoader[Any]):
    """A :class:`~torch.utils.data.DataLoader` that can resume in the middle of a pass.

    :meth:`state_dict` holds the epoch of the current pass and the number of batches it has
    served; Lightning stores it in every checkpoint (its loops look for loaders with
    ``state_dict``/``load_state_dict``) and calls :meth:`load_state_dict` before iterating
    again. The sampler is then set to that epoch, and the resumed pass drops the batches
    already trained on when its first batch is asked for (after Lightning's own ``set_epoch``).
    For lit-vae's in-memory datasets a dropped batch costs one tensor index. The order must be
    a function of the epoch (a seeded sampler with ``set_epoch``), as with
    :class:`~lit_vae.data.EpochRandomSampler` or a ``DistributedSampler``.
    """

    _skip: int = 0
    _current: Any = None

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._current = _SkippingIterator(super().__iter__(), skip)
        return self._current

    def state_dict(self) -> dict[str, int]:
        """``{"batches_served": n, "epoch": e}``: batches the current pass has yielded (skipped
        ones included) and the sampler's epoch for that pass (absent without one)."""
        state = {"batches_served": self._current.served if self._current is not None else 0}
        epoch = getattr(self.sampler, "pass_epoch", getattr(self.sampler, "epoch", None))
        if isinstance(epoch, int):
            state["epoch"] = epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass the one of ``state_dict["epoch"]``, starting after
        ``state_dict["batches_served"]`` batches."""
        self._skip = int(state_dict.get("batches_served", 0))
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if "epoch" in state_dict and callable(set_epoch):
            set_epoch(int(state_dict["epoch"]))


class _SkippingIterator:
    """A loader's iterator that drops its first ``skip`` batches when first asked for one."""

    def __init__(self, iterator: Any, skip: int) -> None:
        self._iterator = iterator
        self._skip = skip
        self._served = 0

    @property
    def served(self) -> int:
        """Batches drawn from the pass so far, dropped ones included."""
        return self._served

    def __iter__(self) -> _SkippingIterator:
        return self

    def __next__(self) -> Any:
        while self._skip > 0:
            self._skip -= 1
            next(self._iterator)
            self._served += 1
        batch = next(self._iterator)
        self._served += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)


# --------------------------------------------------------------------------------------------
# Random number generators.


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python RNG states as tensors and plain numbers, so a
    checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNGs to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    internal = tuple(int(v) for v in python_state["internal"].tolist())
    random.setstate((python_state["version"], internal, python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(pl.Callback):
    """Saves the global RNG states in every checkpoint and restores them when a resumed fit
    starts training, right before its first batch.

    Under DDP the states of rank 0 are saved and restored on every rank: ranks seeded alike
    that run the same operations keep identical streams.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


# --------------------------------------------------------------------------------------------
# last.ckpt: periodic, at epoch ends, and on preemption signals.


def _positive_int_or_none(key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: must be null or an integer >= 1")
    return value


_SIGNALS = ("SIGTERM", "SIGUSR1")


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` current, for crash-safe resumption.

    It is written every ``every_n_train_steps`` optimizer steps (if set), at the end of every
    training epoch, and on each of ``signals`` received while training: the checkpoint is saved
    at the end of the running training batch (or of the epoch, if the signal came during
    validation) and the run stops with :class:`PreemptedError` once that batch's (or epoch's)
    metrics are logged, before any further training or validation. Under DDP every rank stops
    at the same batch. ``SIGUSR1`` is left to Lightning's SLURM auto-requeue where that is
    active.

    It is a :class:`~pytorch_lightning.callbacks.Checkpoint`, so Lightning runs it after the
    other callbacks, and after the checkpoint callbacks listed before it (lit-vae's
    ``build_callbacks`` lists it last): the state it saves at an epoch's end then includes the
    ``ModelCheckpoint`` saves of that epoch, and a resumed run knows its best checkpoint file.

    Args:
        dirpath: the directory of ``last.ckpt`` (``<run dir>/checkpoints``).
        every_n_train_steps: save every this many optimizer steps too; ``None``: epoch ends only.
        signals: names of the signals that save and stop (``SIGTERM``, ``SIGUSR1``).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        signals: list[str] | tuple[str, ...] = _SIGNALS,
    ) -> None:
        key = "callbacks.last_checkpoint"
        if not isinstance(dirpath, str | Path) or not str(dirpath):
            raise ValueError(f"{key}.dirpath={dirpath!r}: must be a directory path")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = _positive_int_or_none(
            f"{key}.every_n_train_steps", every_n_train_steps
        )
        unknown = [s for s in signals if s not in _SIGNALS]
        if unknown or isinstance(signals, str):
            raise ValueError(f"{key}.signals={signals!r}: allowed: a list of {', '.join(_SIGNALS)}")
        self.signals = [getattr(signal, name) for name in signals]
        self._received: int | None = None
        self._stop_pending = False
        self._previous: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        """``<dirpath>/last.ckpt``."""
        return self.dirpath / LAST_CHECKPOINT

    # ---------------------------------------------------------------- signals

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received = signum

    def _install(self) -> None:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        for signum in self.signals:
            if signum == signal.SIGUSR1 and SLURMEnvironment.detect():
                continue  # Lightning's SLURM handler saves and requeues
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                return

    def _uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        requested = self._received is not None
        return bool(trainer.strategy.reduce_boolean_decision(requested, all=False))

    # ---------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks: list[pl.Callback] = getattr(trainer, "callbacks", [])
        later = callbacks[callbacks.index(self) + 1 :] if self in callbacks else []
        if any(isinstance(c, Checkpoint) and not isinstance(c, LastCheckpoint) for c in later):
            rank_zero_warn(
                "LastCheckpoint comes before a checkpoint callback: the state it saves at an "
                "epoch's end misses that callback's save of the epoch; list it last"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._received = None
        self._stop_pending = False
        self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        self._stop_if_saved(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows; a save here would resume past the epoch's end
        if self._stop_requested(trainer):
            self._save(trainer)
            self._stop_pending = True  # stops once Lightning has logged this batch's metrics
            return
        n = self.every_n_train_steps
        if n is not None and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        # stops once the module's epoch-end metrics are logged (they come after this hook)
        self._stop_pending = self._stop_requested(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_saved(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def _stop_if_saved(self, trainer: pl.Trainer) -> None:
        """Stop, if a signal's checkpoint was saved at the previous batch or epoch end."""
        if self._stop_pending:
            self._stop_pending = False
            self._stop(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt``, unless a weight is NaN or infinite: then the last good one stays
        and the run stops with :class:`~lit_vae.guards.NonFiniteLossError`."""
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        bad = non_finite_names(trainer.lightning_module.named_parameters())
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            kept = (
                f"{self.path} was not overwritten and holds the last finite ones"
                if self.path.exists()
                else "no checkpoint was written"
            )
            where = (
                f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {trainer.fit_loop.epoch_loop.batch_idx})"
            )
            raise NonFiniteLossError(f"non-finite weights after {where}: {shown}; {kept}")
        trainer.save_checkpoint(self.path, weights_only=False)

    def _stop(self, trainer: pl.Trainer) -> None:
        signum = self._received if self._received is not None else signal.SIGTERM
        self._uninstall()
        raise PreemptedError(signum, trainer.global_step, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "every_n_train_steps": self.every_n_train_steps}


# --------------------------------------------------------------------------------------------
# ckpt_path=last


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """``ckpt_path`` as ``trainer.fit`` takes it.

    ``None`` stays ``None``; ``last`` is ``<checkpoint_dir>/last.ckpt`` when that exists and
    ``None`` (a fresh start, as when a requeued job never got to write one) when it does not;
    anything else must be an existing file.

    Raises:
        ValueError: an explicit path that is not a file.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = Path(checkpoint_dir) / LAST_CHECKPOINT
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last: no %s yet, starting from scratch", last)
        return None
    if not Path(ckpt_path).is_file():
        raise ValueError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file; allowed: null, last "
            "(<run dir>/checkpoints/last.ckpt) or the path of a .ckpt file"
        )
    return str(ckpt_path)
