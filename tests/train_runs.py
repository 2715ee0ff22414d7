"""Run ``lit-vae-train`` in the test process, as from the command line (fast: no new Python)."""

from __future__ import annotations

import sys

from lit_vae.train import main

# the smallest real training: 3 steps per epoch on digits, 10 importance samples for test/nll
TINY = (
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "eval.num_samples=10",
    "callbacks=minimal",
)


def run_train(*overrides: str) -> None:
    """``lit-vae-train *overrides`` in this process (``-m`` for a multirun)."""
    saved = sys.argv
    sys.argv = ["lit-vae-train", *overrides]
    try:
        main()
    finally:
        sys.argv = saved
