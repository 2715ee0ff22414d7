"""How the command-line tools stop on a user's mistake: one line on stderr, no traceback.

:func:`run_cli` runs ``lit-vae-train`` / ``lit-vae-eval``'s work and turns the errors a user can
fix (a bad config value, bad data, an unusable checkpoint, a diverged run) into

    error: data.batch_size=0: must be an integer >= 1

on stderr and an exit status (:data:`EXIT_USAGE`, :data:`EXIT_DIVERGED`); a run stopped by a
preemption signal prints ``stopped: ...`` and exits with ``128 + signal``, the shell's convention
for a process ended by that signal. ``HYDRA_FULL_ERROR=1`` re-raises instead, so Hydra prints the
full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from omegaconf.errors import OmegaConfBaseException

from lit_vae.guards import NonFiniteLossError
from lit_vae.resume import PreemptedError
from lit_vae.validation import one_line

__all__ = ["EXIT_DIVERGED", "EXIT_USAGE", "run_cli"]

log = logging.getLogger(__name__)

EXIT_USAGE = 2
"""Exit status for a bad config, bad data or an unusable checkpoint."""
EXIT_DIVERGED = 1
"""Exit status for a training run stopped by a non-finite loss or gradient."""

T = TypeVar("T")


def _fail(prefix: str, err: BaseException, status: int) -> NoReturn:
    line = f"{prefix}: {one_line(err)}"
    log.error(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def run_cli(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, with user errors reported as one line and an exit status."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        return function(*args)
    except PreemptedError as stop:
        message = f"{stop}; resume with ckpt_path={stop.path}"
        log.warning("stopped: %s", message)
        print(f"stopped: {message}", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except NonFiniteLossError as err:
        if full:
            raise
        _fail("error", err, EXIT_DIVERGED)
    except (ValueError, MisconfigurationException, OmegaConfBaseException) as err:
        if full:
            raise
        _fail("error", err, EXIT_USAGE)
