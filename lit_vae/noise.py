"""Where the reparameterization noise of ``z ~ q(z|x)`` comes from.

``reparam_noise`` in a model's config picks one of two sources:

* ``torch`` (the default): ``q.rsample()`` with the process's own torch generator. Under a
  distributed strategy each process reseeds it from the run's seed and its rank when fitting
  starts (:func:`decorrelate_processes`), so the shards of one global batch get independent
  noise.
* ``keyed``: the noise of a whole *global batch* (the union of the processes' shards, see
  :mod:`lit_vae.sharding`) is drawn at once from a generator seeded by ``(seed, stage, epoch,
  batch index)``, and every process keeps the rows of its shard (:func:`keyed_rsample`). A
  sample's ``z`` then depends on the seed and the sample's place in its global batch only: 1
  process with batch ``B`` and ``N`` processes with ``B / N`` each draw the same ``z``, and a run
  restarted at an epoch boundary draws what an uninterrupted one draws. It costs one
  posterior-head pass over the global batch per step (encoder and decoder still see the shard
  only); use it to check a distributed setup against one process, or for exact
  reproducibility across device counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution

from lit_vae.data import derive_seed
from lit_vae.sharding import BatchShard

__all__ = [
    "NOISE_SOURCES",
    "STAGES",
    "NoiseKey",
    "check_noise_source",
    "decorrelate_processes",
    "keyed_rsample",
    "seeded_rng",
]

NOISE_SOURCES = ("torch", "keyed")
"""The values of ``reparam_noise``."""

STAGES = {"train": 0, "val": 1, "test": 2}
"""Stage tags that keep the noise streams of training, validation and test apart."""

_PROCESS_STREAM = 7


def check_noise_source(value: object) -> str:
    """``value`` if it is one of :data:`NOISE_SOURCES`, else a ``ValueError`` naming the key."""
    if value not in NOISE_SOURCES:
        raise ValueError(f"reparam_noise={value!r}: must be one of: {', '.join(NOISE_SOURCES)}")
    return str(value)


class NoiseKey(NamedTuple):
    """The noise of one global batch: its generator seed and this process's shard of it."""

    seed: int
    shard: BatchShard

    @classmethod
    def of(cls, seed: int, stage: str, epoch: int, batch_idx: int, shard: BatchShard) -> NoiseKey:
        """The key of batch ``batch_idx`` of ``stage`` (``train``, ``val``, ``test``) in
        ``epoch`` for a run seeded with ``seed``."""
        return cls(derive_seed(seed, STAGES[stage], epoch, batch_idx), shard)

    def chunk(self, index: int) -> NoiseKey:
        """An independent key for part ``index`` of the draws (e.g. a chunk of importance
        samples), the same on every process."""
        return NoiseKey(derive_seed(self.seed, index), self.shard)


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside, ``device``'s default generator is seeded with ``seed``; its state is restored on
    exit. CPU and CUDA devices."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
            yield
    else:
        raise ValueError(f"reparam_noise=keyed: supported on cpu and cuda, not {device.type}")


def keyed_rsample(
    head: Callable[[Tensor], Distribution],
    params: Tensor,
    key: NoiseKey,
    sample_shape: Sequence[int] = (),
) -> Tensor:
    """Reparameterized samples of ``head(params)`` with the noise of the whole global batch.

    ``params`` (``(size, num_params)``, this process's shard of the global batch) is placed at
    ``key.shard.offset`` in a global-batch-sized input whose other rows repeat a detached row
    (their samples are dropped, and no gradient reaches them); the head's distribution over the
    global batch is sampled under :func:`seeded_rng` and this shard's rows are returned, so
    every process (and a single process holding the whole batch) draws the same noise for the
    same place in the global batch. ``head`` must act row by row, like every posterior head.

    Returns:
        ``(*sample_shape, size, latent)``.
    """
    shard = key.shard
    size = params.shape[0]
    if size != shard.size:
        raise ValueError(f"the shard holds {shard.size} items but params has {size} rows")
    filler = params[:1].detach() if size else params.new_zeros(1, params.shape[-1])
    after = shard.global_size - shard.offset - size
    padded = torch.cat(
        [
            filler.expand(shard.offset, -1),
            params,
            filler.expand(after, -1),
        ]
    )
    with seeded_rng(key.seed, params.device):
        z = head(padded).rsample(torch.Size(sample_shape))
    return z.narrow(len(sample_shape), shard.offset, size)


def decorrelate_processes(rank: int) -> None:
    """Reseed this process's torch generators from the seed they were given and ``rank``.

    Lightning's ``seed_everything`` gives every process the same seed, so without this the
    processes would draw the same noise rows for their different shards.
    """
    torch.manual_seed(derive_seed(torch.initial_seed(), _PROCESS_STREAM, rank))
