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
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lit_vae.errors import NonFiniteLossError
from lit_vae.validation import NAN_POLICIES

__all__ = [
    "NAN_POLICIES",
    "NonFiniteLossError",
    "check_nan_policy",
    "describe_non_finite",
    "non_finite_names",
]


def check_nan_policy(value: object) -> str:
    """``value`` if it is one of :data:`NAN_POLICIES`; otherwise a ``ValueError`` naming it."""
    if value not in NAN_POLICIES:
        raise ValueError(f"nan_policy={value!r}: allowed: {', '.join(NAN_POLICIES)}")
    return str(value)


def non_finite_names(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """The names whose tensor holds a NaN or an infinity (``None`` tensors are skipped); one
    host sync for all of them."""
    present = [(name, t.detach()) for name, t in named if t is not None]
    if not present:
        return []
    norms = torch._foreach_norm([t.float() if not t.is_floating_point() else t for _, t in present])
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(present, finite.tolist()) if not ok]


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
