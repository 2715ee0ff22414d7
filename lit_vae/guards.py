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
    "all_finite",
    "check_nan_policy",
    "describe_non_finite",
    "non_finite_names",
]


def check_nan_policy(value: object) -> str:
    """``value`` if it is one of :data:`NAN_POLICIES`; otherwise a ``ValueError`` naming it."""
    if value not in NAN_POLICIES:
        raise ValueError(f"nan_policy={value!r}: allowed: {', '.join(NAN_POLICIES)}")
    return str(value)


def all_finite(grads: Iterable[Tensor | None]) -> bool:
    """Whether every gradient (``None`` skipped) holds only finite numbers; one host sync.

    The check of every optimizer step. It is exact per entry (a norm would overflow on huge
    finite entries) and fused: one pass over all gradients of a device with the kernel
    :class:`torch.amp.GradScaler` uses, at scale 1, which rewrites every entry as it is.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        if grad is not None:
            by_device.setdefault(grad.device, []).append(grad)
    found = []
    for device, group in by_device.items():
        found_inf = torch.zeros((), device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found_inf, torch.ones((), device=device)
            )
        except (NotImplementedError, RuntimeError):  # a device or dtype without the kernel
            found_inf = torch.stack([(~torch.isfinite(g)).any() for g in group]).any().float()
        found.append(found_inf.cpu() if len(by_device) > 1 else found_inf)
    return not found or not bool(torch.stack(found).any())


def non_finite_names(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """The names whose tensor holds a NaN or an infinity (``None`` tensors are skipped); exact
    per entry, one host sync for all of them."""
    present = [(name, t.detach()) for name, t in named if t is not None]
    if not present:
        return []
    flags = [torch.isfinite(t).all() for _, t in present]
    device = flags[0].device
    finite = torch.stack([flag.to(device) for flag in flags]).tolist()
    return [name for (name, _), ok in zip(present, finite) if not ok]


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
