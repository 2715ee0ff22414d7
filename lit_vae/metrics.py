"""Exact dataset means across batches and processes.

:class:`PerSampleMean` keeps float64 sums and a count, reduced by summation across DDP ranks, so
the mean over an epoch is the mean over *samples* whatever the batch sizes and however the
samples were split between processes. Many quantities share one state vector, so a whole epoch's
metrics cost a single all-reduce. :class:`EpochSums` does the same for training steps, with no
per-step work beyond one addition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["EpochSums", "PerSampleMean"]


class PerSampleMean(Metric):
    """Mean over samples of ``width`` quantities, and of their squares.

    ``update(values)`` takes ``values`` of shape ``(batch, width)``; ``compute()`` returns
    ``(mean (width,), mean_of_squares (width,))`` in float64.
    """

    full_state_update = False
    total: Tensor
    total_squares: Tensor
    count: Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.add_state("total", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "total_squares", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64)
        self.total += values.sum(0)
        self.total_squares += values.square().sum(0)
        self.count += values.shape[0]

    def compute(self) -> tuple[Tensor, Tensor]:
        count = self.count.clamp_min(1.0)
        return self.total / count, self.total_squares / count


class EpochSums:
    """Per-epoch sums of per-sample training values, on the values' device.

    :meth:`add` costs one addition on the device and never syncs, so a training step pays
    almost nothing for its epoch metrics; :meth:`means` reduces the sums across processes once,
    at the epoch's end.
    ``count`` is the number of samples of the *global* batches, so the means are over every
    sample of the epoch however the batches were split between processes.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0
        self.epoch = -1

    def reset(self, epoch: int) -> None:
        self.total, self.count, self.epoch = None, 0, epoch

    def add(self, sums: Tensor, count: int) -> None:
        """``sums (width,)``: this process's sums over its part of a global batch of ``count``."""
        sums = sums.detach().to(torch.float64)
        self.total = sums if self.total is None else self.total + sums
        self.count += count

    def means(self, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor | None:
        """``(width,)`` float64 means, or ``None`` before the first :meth:`add`; ``reduce_sum``
        sums a tensor over the processes (identity for one)."""
        if self.total is None or self.count == 0:
            return None
        return reduce_sum(self.total.clone()) / self.count

    def state_dict(self) -> dict[str, Any]:
        total = None if self.total is None else self.total.cpu()
        return {"epoch": self.epoch, "count": self.count, "total": total}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        total = state.get("total")
        self.total = None if total is None else total.to(device)
        self.count = int(state.get("count", 0))
        self.epoch = int(state.get("epoch", -1))
