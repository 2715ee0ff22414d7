"""Functions run in freshly spawned processes of a gloo group; light imports only, so that a
spawned process starts fast."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from lit_vae.metrics import PerSampleMean


def per_sample_mean(rank: int, port: int, values: torch.Tensor, out: Any) -> None:
    """Rank 0 updates a :class:`PerSampleMean` with the first 5 rows of ``values``, rank 1 with
    the other 8, in batches of 3; both put ``(rank, mean, mean_of_squares)`` on ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metric = PerSampleMean(values.shape[1])
    shard = values[:5] if rank == 0 else values[5:]
    for part in shard.split(3):
        metric.update(part)
    mean, mean_squares = metric.compute()
    out.put((rank, mean, mean_squares))
    dist.barrier()
    dist.destroy_process_group()
