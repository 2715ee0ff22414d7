"""How the command-line tools stop: one line on stderr, no traceback, an exit status.

:func:`run_cli` runs ``lit-vae-train`` / ``lit-vae-eval``'s work and turns the errors a user can
fix (a bad config value, bad data, an unusable checkpoint, a diverged run) into

    error: data.batch_size=0: must be an integer >= 1

on stderr and an exit status (:data:`EXIT_USAGE`, :data:`EXIT_DIVERGED`); a run stopped by a
preemption signal prints ``stopped: ...`` and exits with ``128 + signal``, the shell's convention
for a process ended by that signal. ``HYDRA_FULL_ERROR=1`` re-raises instead, so Hydra prints the
full traceback.

This module imports neither torch nor Lightning, so the entry points can report a bad config
before loading them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf.errors import OmegaConfBaseException

from lit_vae.validation import one_line

__all__ = ["EXIT_DIVERGED", "EXIT_USAGE", "NonFiniteLossError", "PreemptedError", "run_cli"]

EXIT_USAGE = 2
"""Exit status for a bad config, bad data or an unusable checkpoint."""
EXIT_DIVERGED = 1
"""Exit status for a training run stopped by a non-finite loss, gradient or weight."""

T = TypeVar("T")


class NonFiniteLossError(FloatingPointError):
    """A training loss, gradient or weight that is NaN or infinite; the message names the
    terms, the step and the batch (:mod:`lit_vae.guards`)."""


class PreemptedError(Exception):
    """Training stopped on a signal after writing ``path``; the run resumes from it
    (:class:`lit_vae.resume.LastCheckpoint`)."""

    def __init__(self, signum: int, global_step: int, path: Path) -> None:
        self.signum = signum
        self.global_step = global_step
        self.path = path
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved {path} at global step {global_step}")


def _is_misconfiguration(err: BaseException) -> bool:
    """Lightning's ``MisconfigurationException``, without importing Lightning to find out."""
    module = sys.modules.get("lightning_fabric.utilities.exceptions")
    exception = getattr(module, "MisconfigurationException", None)
    return exception is not None and isinstance(err, exception)


def _in_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(err: BaseException, status: int) -> NoReturn:
    """Print ``err`` as one line and exit with ``status`` — or, in one job of a multirun,
    re-raise it, so Hydra marks that job failed and goes on with the next."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    if _in_multirun():
        raise err
    sys.exit(status)


def run_cli(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, with user errors reported as one line and an exit status."""
    try:
        return function(*args)
    except PreemptedError as stop:
        print(f"stopped: {stop}; resume with ckpt_path={stop.path}", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, NonFiniteLossError):
            _fail(err, EXIT_DIVERGED)
        if isinstance(err, ValueError | OmegaConfBaseException) or _is_misconfiguration(err):
            _fail(err, EXIT_USAGE)
        raise
