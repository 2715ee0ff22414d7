"""Exact dataset means across batches and processes.

:class:`PerSampleMean` keeps float64 sums and a count, reduced by summation across DDP ranks, so
the mean over an epoch is the mean over *samples* whatever the batch sizes and however the
samples were split between processes. Many quantities share one state vector, so a whole epoch's
metrics cost a single all-reduce.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PerSampleMean"]


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
