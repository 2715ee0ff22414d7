"""A callback that holds a training subprocess still at a chosen step, for tests that signal or
kill it from outside at a known point (``+callbacks.pause._target_=tests.pause.PauseAt``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class PauseAt(pl.Callback):
    """At the end of training batch ``step`` (global step), write ``ready`` and wait for
    ``go`` to exist (or ``timeout`` seconds), then go on."""

    def __init__(self, step: int, ready: str, go: str, timeout: float = 120.0) -> None:
        self.step = step
        self.ready = Path(ready)
        self.go = Path(go)
        self.timeout = timeout

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step != self.step:
            return
        self.ready.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
