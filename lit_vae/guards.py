"""Numerical guards for training: what happens when the loss stops being a finite number.

``nan_policy`` (a top-level config key, passed to :class:`~lit_vae.module.LitVAE`) chooses:

* ``raise`` (default): stop with :class:`NonFiniteLossError`, naming every non-finite term
  (``recon``, ``kl``, the regularizer's ``penalty``), the global step, the epoch and the batch
  index. It is raised inside ``training_step``, before the optimizer step, so the weights are
  untouched and no checkpoint is written over the last good one.
* ``skip``: the batch is skipped (``training_step`` returns ``None``, Lightning's way of skipping
  a step under automatic optimization: no backward pass, no parameter update) and counted in
  ``train/skipped_batches``. Under DDP the decision is shared, so every rank skips together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["NAN_POLICIES", "NonFiniteLossError", "check_nan_policy", "describe_non_finite"]

NAN_POLICIES = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """A training loss that is NaN or infinite; the message names the terms, step and batch."""


def check_nan_policy(value: object) -> str:
    """``value`` if it is one of :data:`NAN_POLICIES`; otherwise a ``ValueError`` naming it."""
    if value not in NAN_POLICIES:
        raise ValueError(f"nan_policy={value!r}: allowed: {', '.join(NAN_POLICIES)}")
    return str(value)


def _first_bad(values: Tensor) -> str:
    bad = values.detach().flatten()
    bad = bad[~torch.isfinite(bad)]
    if bad.numel() == 0:
        return "finite"
    value = float(bad[0])
    kind = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{kind} in {bad.numel()} of {values.numel()} samples"


def describe_non_finite(terms: Mapping[str, Tensor]) -> str:
    """``"recon (nan in 3 of 8 samples), kl (inf in 1 of 8 samples)"`` for the non-finite
    ``terms`` (each ``(batch,)``); ``""`` when every term is finite."""
    parts = [
        f"{name} ({_first_bad(values)})"
        for name, values in terms.items()
        if not bool(torch.isfinite(values).all())
    ]
    return ", ".join(parts)
