"""Global batches split between processes, so that N processes train on what one would.

Under data parallelism every optimizer step consumes one *global batch*: the union of the
batches of all processes. :class:`GlobalBatchSampler` makes the global batches the batches a
single process would see with ``batch_size × num_replicas`` items (same order, same epoch
shuffling) and gives process ``rank`` the ``rank``-th of ``num_replicas`` near-equal, contiguous
*shards* of each of them. So 2 processes with ``batch_size=64`` take exactly the optimizer steps
of 1 process with ``batch_size=128``, and evaluation sees every item exactly once, with no
padding (a :class:`~torch.utils.data.DistributedSampler` repeats items to even out the ranks).

Shards of a full global batch all hold ``batch_size`` items. A last, partial global batch of
``g`` items is split as evenly as possible (the first ``g mod num_replicas`` shards get one item
more). For training (``even=True``) a last global batch of fewer than ``num_replicas`` items is
dropped, so that every process takes the same number of steps with at least one item each;
for evaluation (``even=False``) it is kept, and the processes left without an item have one
batch fewer (evaluation steps do not synchronize).

:class:`BatchShard` says where a process's batch sits in its global batch; :func:`batch_shard`
finds it for the batch a LightningModule is given, which lets a model weight its loss by the
global batch size and draw the noise of the global batch (:mod:`lit_vae.noise`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["BatchShard", "GlobalBatchSampler", "batch_shard", "shard_sizes"]


class BatchShard(NamedTuple):
    """One process's part of a global batch.

    Attributes:
        offset: the position of the shard's first item in the global batch.
        size: the number of items in the shard.
        global_size: the number of items in the global batch.
    """

    offset: int
    size: int
    global_size: int


def shard_sizes(global_size: int, num_replicas: int) -> list[int]:
    """Sizes of the ``num_replicas`` contiguous shards of a global batch of ``global_size``
    items: as equal as possible, the larger ones first."""
    base, extra = divmod(global_size, num_replicas)
    return [base + (rank < extra) for rank in range(num_replicas)]


class GlobalBatchSampler(DistributedSampler):
    """Indices of process ``rank``'s shards of the global batches of ``sampler``'s order.

    A :class:`~torch.utils.data.DistributedSampler`, so Lightning leaves it in place instead of
    injecting its own. Use it with a ``DataLoader(batch_size=batch_size, drop_last=False)``: the
    loader's ``k``-th batch is then the shard :meth:`shard` ``(k)`` describes.

    Args:
        sampler: the order of one pass over the dataset, as one process would see it (e.g. a
            seeded shuffling sampler, or sequential order); :meth:`set_epoch` is passed on to it.
        batch_size: items per process in a full global batch.
        num_replicas: the number of processes.
        rank: this process's global rank.
        drop_last: drop a last, partial global batch.
        even: keep every process busy in every global batch: drop a last global batch with
            fewer items than processes (training). ``False`` keeps it (evaluation).
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        *,
        num_replicas: int,
        rank: int,
        drop_last: bool = False,
        even: bool = True,
    ) -> None:
        if not isinstance(sampler, Sized):
            raise TypeError(f"GlobalBatchSampler needs a sampler with a length, got {sampler!r}")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"GlobalBatchSampler: batch_size={batch_size}, num_replicas={num_replicas}, "
                f"rank={rank}: need batch_size >= 1 and 0 <= rank < num_replicas"
            )
        super().__init__(
            sampler,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
            drop_last=drop_last,
        )
        self.sampler = sampler
        self.batch_size = batch_size
        self.even = even
        self.global_batch_size = batch_size * num_replicas
        full, rest = divmod(len(sampler), self.global_batch_size)
        self._full_batches = full
        self._rest = rest
        keep_rest = rest > 0 and not drop_last and (rest >= num_replicas or not even)
        self.num_global_batches = full + int(keep_rest)
        self._shards = [self._shard_of(k) for k in range(self.num_global_batches)]
        self._shards = [shard for shard in self._shards if shard.size > 0]
        self.num_samples = sum(shard.size for shard in self._shards)
        self.total_size = self._full_batches * self.global_batch_size + (rest if keep_rest else 0)

    def _shard_of(self, index: int) -> BatchShard:
        global_size = self.global_batch_size if index < self._full_batches else self._rest
        sizes = shard_sizes(global_size, self.num_replicas)
        return BatchShard(sum(sizes[: self.rank]), sizes[self.rank], global_size)

    @property
    def num_batches(self) -> int:
        """The number of batches this process gets in one pass."""
        return len(self._shards)

    def shard(self, batch_idx: int) -> BatchShard:
        """Where this process's batch ``batch_idx`` sits in its global batch."""
        return self._shards[batch_idx]

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of the coming pass to the one of ``epoch`` (passed on to ``sampler``)."""
        super().set_epoch(epoch)
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.sampler))
        for index, shard in enumerate(self._shards):
            start = index * self.global_batch_size + shard.offset
            yield from order[start : start + shard.size]

    def __len__(self) -> int:
        return self.num_samples


def _stage_loader(trainer: Any, stage: str) -> Any:
    loaders = {
        "train": lambda: trainer.train_dataloader,
        "val": lambda: trainer.val_dataloaders,
        "test": lambda: trainer.test_dataloaders,
    }
    if stage not in loaders:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(loaders)}")
    loader = loaders[stage]()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    return loader


def batch_shard(trainer: Any, stage: str, batch_idx: int, size: int) -> BatchShard:
    """Where the ``size`` items of batch ``batch_idx`` of ``stage`` (``train``, ``val`` or
    ``test``) sit in their global batch, on this process of ``trainer``.

    Exact when the stage's loader samples with a :class:`GlobalBatchSampler` (lit-vae's data
    modules under a distributed strategy). Any other loader is taken to give every process a
    batch of the same size (what a padding ``DistributedSampler`` does): ``offset = rank ·
    size``, ``global_size = world_size · size``.
    """
    sampler = getattr(_stage_loader(trainer, stage), "sampler", None)
    if isinstance(sampler, GlobalBatchSampler) and batch_idx < sampler.num_batches:
        shard = sampler.shard(batch_idx)
        if shard.size == size:
            return shard
    world_size, rank = int(trainer.world_size), int(trainer.global_rank)
    return BatchShard(rank * size, size, world_size * size)
