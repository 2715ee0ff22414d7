"""Datasets as Lightning data modules, held in memory and served in sliced batches.

Every data module here keeps its train/val/test splits as in-memory tensors ``x`` of shape
``(n, *data_shape)`` (float32) and ``y`` of shape ``(n,)`` (int64 labels, zeros when unlabeled),
and its loaders yield ``(x, y)`` batches of shapes ``(batch, *data_shape)`` and ``(batch,)``.
A batch is one indexing of those tensors with an index tensor, not a stack of single items.

The family is a :class:`~lit_vae.registry.Registry`, ``DATAMODULES``; a config ``data`` group
names an entry and its options::

    name: mnist
    root: data/mnist
    binarize: dynamic

Registered names:

* ``digits``: scikit-learn's bundled 8×8 digits (1797 images, no download), ``(1, 8, 8)``.
* ``mnist``: the four official gzip IDX files of MNIST from a directory, ``(1, 28, 28)``, with
  optional static or dynamic binarization.
* ``ppca``: a synthetic linear-Gaussian (probabilistic PCA) dataset whose exact marginal
  likelihood and exact posterior are available, ``(data_dim,)``.
* ``tensors``: tensors given by the user, or ``.pt`` files holding them.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from lit_vae.registry import Registry
from lit_vae.resume import ResumableDataLoader
from lit_vae.sharding import GlobalBatchSampler

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DATAMODULES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_FILES",
    "DataError",
    "DigitsDataModule",
    "EpochRandomSampler",
    "LoaderOptions",
    "MNISTDataModule",
    "PPCADataModule",
    "TensorDataModule",
    "TensorPairDataset",
    "check_mnist_files",
    "collate_as_is",
    "derive_seed",
    "load_mnist",
    "read_idx",
    "seeded_generator",
]

DATAMODULES: Registry[type[TensorDataModule]] = Registry("data")

Batch = tuple[Tensor, Tensor]
"""A batch ``(x, y)``: ``x`` of shape ``(batch, *data_shape)`` float32, ``y`` ``(batch,)`` int64."""

TensorSource = Tensor | str | os.PathLike[str] | Sequence[Tensor] | Mapping[str, Tensor]
"""Where user data comes from: a tensor ``x``; an ``(x, y)`` pair; a mapping with ``x`` and
optionally ``y``; or the path of a ``.pt`` file holding any of those."""

SPLITS = ("train", "val", "test")

# Stream tags keep the seeded random streams of one data module apart.
_SPLIT_STREAM = 0
_SHUFFLE_STREAM = 1
_BINARIZE_STREAM = 2
_DYNAMIC_STREAM = 3
_PPCA_PARAMS_STREAM = 4
_PPCA_SAMPLES_STREAM = 5
_LOADER_STREAM = 6


class DataError(ValueError):
    """Data that cannot be read or that breaks its format: the message names the file, one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers, e.g. ``(seed, stream, epoch, batch)``."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def seeded_generator(*words: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded by :func:`derive_seed` of ``words``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*words))
    return generator


# --------------------------------------------------------------------------------------------
# Option checks: a wrong value raises ValueError naming the key, ``data.batch_size=0: ...``.


def _fail(key: str, value: object, requirement: str) -> ValueError:
    return ValueError(f"data.{key}={value!r}: {requirement}")


def _check_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, value, f"must be an integer >= {minimum}")
    return value


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "must be true or false")
    return value


def _check_fraction(key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 < float(value) < 1.0
    ):
        raise _fail(key, value, "must be a number strictly between 0 and 1")
    return float(value)


def _check_positive(key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _fail(key, value, "must be a finite number > 0")
    return float(value)


def _check_choice(key: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(key, value, f"must be one of: {', '.join(choices)}")
    return str(value)


def _split_sizes(n: int, fractions: Sequence[float], keys: Sequence[str]) -> list[int]:
    """Sizes of the held-out parts ``round(n * fraction)``; each must hold >= 1 item and leave
    at least one item for training."""
    sizes = [round(n * f) for f in fractions]
    for key, f, size in zip(keys, fractions, sizes):
        if size < 1:
            raise _fail(key, f, f"leaves an empty split of the {n} items")
    if sum(sizes) >= n:
        given = ", ".join(f"data.{k}={f}" for k, f in zip(keys, fractions))
        raise ValueError(f"{given}: together they leave no training items out of {n}")
    return sizes


def _seeded_split(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Disjoint sorted index sets of ``sizes`` and the remainder (first), fixed by ``seed``."""
    perm = torch.randperm(n, generator=seeded_generator(seed, _SPLIT_STREAM))
    parts: list[Tensor] = []
    start = sum(sizes)
    parts.append(perm[start:].sort().values)
    offset = 0
    for size in sizes:
        parts.append(perm[offset : offset + size].sort().values)
        offset += size
    return parts


# --------------------------------------------------------------------------------------------
# Dataset, collate function and sampler.


class TensorPairDataset(Dataset[Batch]):
    """A map-style dataset over ``x: (n, *data_shape)`` and ``y: (n,)`` whose batches are slices.

    :meth:`__getitems__` indexes both tensors once with an index tensor, so a batch of indices
    becomes ``(x[idx], y[idx])`` of shapes ``(batch, *data_shape)`` and ``(batch,)`` with no
    per-item work; use it with :func:`collate_as_is`.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x holds {x.shape[0]} items but y holds {y.shape[0]}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Batch:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x[idx], self.y[idx]


def collate_as_is(batch: Any) -> Any:
    """The collate function for :class:`TensorPairDataset`: the sliced batch ``(x, y)`` is
    already whole and is returned as it is."""
    return batch


class EpochRandomSampler(RandomSampler):
    """A :class:`~torch.utils.data.RandomSampler` whose order is a function of ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed at an epoch
    boundary sees the same order as an uninterrupted one. Under a distributed strategy the data
    modules shard its order with a :class:`~lit_vae.sharding.GlobalBatchSampler`.
    """

    def __init__(self, data_source: Sequence[Any] | Dataset[Any], seed: int) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0
        self.pass_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of the coming pass to the one of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.pass_epoch = self.epoch  # the running pass's epoch, for a resumable loader's state
        generator = seeded_generator(self.seed, _SHUFFLE_STREAM, self.epoch)
        self.epoch += 1  # a loop that never calls set_epoch still gets a fresh order per pass
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


# --------------------------------------------------------------------------------------------
# The common base, also the ``tensors`` entry.


class LoaderOptions(TypedDict, total=False):
    """Loader options shared by every data module; see :class:`TensorDataModule`."""

    batch_size: int
    eval_batch_size: int
    shuffle: bool
    drop_last: bool
    num_workers: int
    pin_memory: bool
    on_device: bool


def _source_name(source: object) -> str:
    return str(source) if isinstance(source, str | os.PathLike) else "tensor"


def _load_source(source: TensorSource) -> tuple[Tensor, Tensor | None, str]:
    """``(x, y or None, name)`` from a tensor, a pair, a mapping or a ``.pt`` file."""
    name = _source_name(source)
    content: Any = source
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise DataError(f"{path}: cannot be read by torch.load ({err})") from None
    if isinstance(content, Tensor):
        return content, None, name
    if isinstance(content, Mapping) and "x" in content:
        x, y = content["x"], content.get("y")
    elif isinstance(content, Sequence) and not isinstance(content, str) and len(content) == 2:
        x, y = content
    else:
        raise DataError(
            f"{name}: expected a tensor x, a pair (x, y) or a mapping with 'x' (and 'y'), "
            f"found {type(content).__name__}"
        )
    if not isinstance(x, Tensor) or not (y is None or isinstance(y, Tensor)):
        raise DataError(f"{name}: x and y must be tensors")
    return x, y, name


def _as_split(
    x: Tensor, y: Tensor | None, name: str, pixel_range: tuple[float, float] | None
) -> Batch:
    if x.dim() < 2 or x.shape[0] < 1:
        raise DataError(
            f"{name}: x must have shape (n, *data_shape) with n >= 1, found {tuple(x.shape)}"
        )
    if not (
        x.is_floating_point()
        or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise DataError(f"{name}: x must hold numbers, found dtype {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise DataError(f"{name}: x holds NaN or infinite values")
    if pixel_range is not None:
        lo, hi = pixel_range
        found_lo, found_hi = float(x.min()), float(x.max())
        if found_lo < lo or found_hi > hi:
            raise DataError(
                f"{name}: values must lie in the pixel range [{lo:g}, {hi:g}], "
                f"found values in [{found_lo:g}, {found_hi:g}]"
            )
    if y is None:
        y = torch.zeros(x.shape[0], dtype=torch.long)
    elif y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex():
        raise DataError(
            f"{name}: y must be integer labels of shape ({x.shape[0]},), "
            f"found {y.dtype} of shape {tuple(y.shape)}"
        )
    return x, y.detach().to(device="cpu", dtype=torch.long).contiguous()


@DATAMODULES.register("tensors")
class TensorDataModule(pl.LightningDataModule):
    """In-memory train/val/test tensors served as sliced ``(x, y)`` batches.

    Used directly (registered as ``tensors``) it serves the user's tensors; the other data
    modules subclass it and produce their splits in :meth:`_load_splits`.

    Args:
        train: the training data: a tensor ``x`` of shape ``(n, *data_shape)``, an ``(x, y)``
            pair, a mapping with ``x`` (and ``y``), or the path of a ``.pt`` file holding one of
            those. ``y`` holds ``(n,)`` integer labels; missing labels become zeros.
        val: the validation data, in the same forms; when absent, ``val_fraction`` of ``train``
            is held out by a permutation fixed by ``seed``.
        test: the test data, in the same forms; when absent, ``test_fraction`` of ``train`` is
            held out if given, otherwise there is no test split.
        val_fraction: the held-out validation share of ``train`` when ``val`` is absent.
        test_fraction: the held-out test share of ``train`` when ``test`` is absent.
        pixel_range: ``(low, high)``: every value of every split must lie in it, e.g. ``(0, 1)``
            for a Bernoulli likelihood; a value outside raises :class:`DataError` naming the file
            (or ``tensor``) and the range.
        seed: fixes the held-out splits and the training order.
        batch_size: training batch size per process; under a distributed strategy the global
            batch of every optimizer step holds ``batch_size × world_size`` items, the batch of
            one process with that size, split between the processes.
        eval_batch_size: validation and test batch size per process; evaluation sees every
            item exactly once, however many processes share it.
        shuffle: reshuffle the training split every epoch (the order is fixed by ``seed`` and
            the epoch).
        drop_last: drop the last incomplete training batch.
        num_workers: loader worker processes; 0 loads in the main process.
        pin_memory: pin host batches for faster copies to the GPU.
        on_device: in :meth:`setup`, move every split to the trainer's root device, so batches
            need no host-to-device copy (requires ``num_workers=0`` and ``pin_memory=False``).

    Tensor data is read and checked at construction, so :attr:`data_shape` is known at once.
    """

    def __init__(
        self,
        *,
        train: TensorSource | None = None,
        val: TensorSource | None = None,
        test: TensorSource | None = None,
        val_fraction: float = 0.1,
        test_fraction: float | None = None,
        pixel_range: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        self.seed = _check_int("seed", seed, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
        self.shuffle = _check_bool("shuffle", shuffle)
        self.drop_last = _check_bool("drop_last", drop_last)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.pin_memory = _check_bool("pin_memory", pin_memory)
        self.on_device = _check_bool("on_device", on_device)
        if self.on_device and (self.num_workers > 0 or self.pin_memory):
            raise ValueError(
                f"data.on_device=True: needs data.num_workers=0 and data.pin_memory=false, "
                f"found num_workers={self.num_workers}, pin_memory={self.pin_memory}"
            )
        self._splits: dict[str, Batch] | None = None
        self._data_shape: tuple[int, ...] = ()
        if type(self) is TensorDataModule or train is not None:
            self._init_user_tensors(train, val, test, val_fraction, test_fraction, pixel_range)

    def _init_user_tensors(
        self,
        train: TensorSource | None,
        val: TensorSource | None,
        test: TensorSource | None,
        val_fraction: float,
        test_fraction: float | None,
        pixel_range: Sequence[float] | None,
    ) -> None:
        if train is None:
            raise ValueError("data.train: required (a tensor, an (x, y) pair or a .pt file path)")
        bounds: tuple[float, float] | None = None
        if pixel_range is not None:
            try:
                bounds_list = [float(v) for v in pixel_range]
            except (TypeError, ValueError):
                bounds_list = []
            if len(bounds_list) != 2 or not bounds_list[0] < bounds_list[1]:
                raise _fail(
                    "pixel_range", pixel_range, "must be a pair [low, high] with low < high"
                )
            bounds = (bounds_list[0], bounds_list[1])
        given = {"train": train, "val": val, "test": test}
        loaded: dict[str, Batch] = {}
        for split, source in given.items():
            if source is not None:
                x, y, name = _load_source(source)
                loaded[split] = _as_split(
                    x, y, f"{name} (data.{split})" if name == "tensor" else name, bounds
                )
        shapes = {split: tuple(x.shape[1:]) for split, (x, _) in loaded.items()}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{s}: {shape}" for s, shape in shapes.items())
            raise ValueError(f"data: the splits disagree on the item shape ({listed})")
        held_keys, held_fractions = [], []
        if val is None:
            held_keys.append("val_fraction")
            held_fractions.append(_check_fraction("val_fraction", val_fraction))
        if test is None and test_fraction is not None:
            held_keys.append("test_fraction")
            held_fractions.append(_check_fraction("test_fraction", test_fraction))
        elif test is not None and test_fraction is not None:
            raise _fail(
                "test_fraction", test_fraction, "give either data.test or data.test_fraction"
            )
        if held_keys:
            x, y = loaded["train"]
            sizes = _split_sizes(x.shape[0], held_fractions, held_keys)
            parts = _seeded_split(x.shape[0], sizes, self.seed)
            loaded["train"] = (x[parts[0]], y[parts[0]])
            for key, part in zip(held_keys, parts[1:]):
                split = "val" if key == "val_fraction" else "test"
                loaded[split] = (x[part], y[part])
        self._data_shape = shapes["train"]
        self._user_splits = loaded

    # ---------------------------------------------------------------------------------------
    # What subclasses provide.

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one item, ``x.shape[1:]``: ``(1, 28, 28)``, ``(data_dim,)``, ..."""
        return self._data_shape

    def _load_splits(self) -> dict[str, Batch]:
        """``{"train": (x, y), "val": ..., "test": ...}`` on the CPU; ``test`` may be absent."""
        return dict(self._user_splits)

    # ---------------------------------------------------------------------------------------
    # Lightning hooks and loaders.

    def setup(self, stage: str | None = None) -> None:
        """Produce the splits (once) and, with ``on_device``, move them to the root device."""
        splits = self._get_splits()
        if self.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self._splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}

    def _get_splits(self) -> dict[str, Batch]:
        if self._splits is None:
            splits = self._load_splits()
            for split, (x, y) in splits.items():
                if tuple(x.shape[1:]) != self.data_shape or x.dtype != torch.float32:
                    raise RuntimeError(
                        f"{type(self).__name__} produced {split} x of {x.dtype} "
                        f"{tuple(x.shape)}, not float32 (n, *{self.data_shape})"
                    )
                if y.shape != (x.shape[0],) or y.dtype != torch.long:
                    raise RuntimeError(f"{type(self).__name__} produced bad {split} labels")
            self._splits = splits
        return self._splits

    def split(self, name: str) -> Batch:
        """The tensors ``(x, y)`` of split ``name`` (``train``, ``val`` or ``test``): ``x`` of
        shape ``(n, *data_shape)`` float32, ``y`` of shape ``(n,)`` int64. Loads if needed."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
        splits = self._get_splits()
        if name not in splits:
            raise ValueError(
                f"data: {type(self).__name__} has no {name} split "
                f"(give data.{name} or data.{name}_fraction)"
            )
        return splits[name]

    @property
    def num_train(self) -> int:
        """Number of training items."""
        return int(self.split("train")[0].shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation items."""
        return int(self.split("val")[0].shape[0])

    @property
    def num_test(self) -> int:
        """Number of test items."""
        return int(self.split("test")[0].shape[0])

    def train_mean(self) -> Tensor:
        """The mean training item, shape ``data_shape`` float32, e.g. to set a Bernoulli
        decoder's output bias to ``logit(mean)``. On the device the data is on."""
        x = self.split("train")[0]
        return x.mean(dim=0, dtype=torch.float64).to(torch.float32)

    def _loader(self, split: str, train: bool) -> DataLoader[Batch]:
        """The training loader resumes mid-pass (:class:`~lit_vae.resume.ResumableDataLoader`);
        every loader has its own generator, so making one never draws from the global RNG."""
        x, y = self.split(split)
        dataset = TensorPairDataset(x, y)
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._sampler(dataset, train),
            drop_last=self.drop_last if train and self._world_size() == 1 else False,
            collate_fn=collate_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=seeded_generator(self.seed, _LOADER_STREAM, SPLITS.index(split)),
        )

    def _world_size(self) -> int:
        return int(getattr(self.trainer, "world_size", 1))

    def _sampler(self, dataset: TensorPairDataset, train: bool) -> Sampler[int] | None:
        """The order of one pass; under a distributed strategy, this process's shards of the
        global batches (:class:`~lit_vae.sharding.GlobalBatchSampler`): the global batches are
        the batches of one process with ``batch_size × world_size`` items."""
        order = EpochRandomSampler(dataset, self.seed) if train and self.shuffle else None
        world_size = self._world_size()
        if world_size == 1:
            return order
        if not train and len(dataset) < world_size:
            raise ValueError(
                f"data: {len(dataset)} evaluation items cannot be shared by {world_size} "
                "processes; every process needs at least one"
            )
        return GlobalBatchSampler(
            order if order is not None else SequentialSampler(dataset),
            self.batch_size if train else self.eval_batch_size,
            num_replicas=world_size,
            rank=int(getattr(self.trainer, "global_rank", 0)),
            drop_last=self.drop_last if train else False,
            even=train,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        """Training batches ``(x, y)``: ``(batch_size, *data_shape)`` and ``(batch_size,)``."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        """Validation batches ``(x, y)`` of up to ``eval_batch_size`` items, in order."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader[Batch]:
        """Test batches ``(x, y)`` of up to ``eval_batch_size`` items, in order."""
        return self._loader("test", train=False)


def _check_loader_options(owner: str, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(LoaderOptions.__annotations__))
    if unknown:
        raise TypeError(
            f"{owner} got unexpected options: {', '.join(unknown)}; loader options: "
            f"{', '.join(LoaderOptions.__annotations__)}"
        )


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8×8 digits.

DIGITS_SIZE = 1797


@DATAMODULES.register("digits")
class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled 8×8 handwritten digits: 1797 images, no download.

    Pixels (0..16 in the source) are scaled to [0, 1] by /16; ``x`` has shape ``(n, 1, 8, 8)``
    and ``y`` holds the digit. Validation and test parts are held out by a permutation fixed by
    ``seed``.

    Args:
        val_fraction: validation share of the 1797 images.
        test_fraction: test share of the 1797 images.
        seed: fixes the split and the training order.
        **loader: :class:`LoaderOptions` (``batch_size``, ``eval_batch_size``, ``shuffle``, ...).
    """

    def __init__(
        self,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        _check_loader_options(type(self).__name__, loader)
        super().__init__(seed=seed, **loader)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self._sizes = _split_sizes(
            DIGITS_SIZE,
            [self.val_fraction, self.test_fraction],
            ["val_fraction", "test_fraction"],
        )
        self._data_shape = (1, 8, 8)

    def _load_splits(self) -> dict[str, Batch]:
        from sklearn.datasets import load_digits

        pixels, labels = load_digits(return_X_y=True)
        x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        train, val, test = _seeded_split(x.shape[0], self._sizes, self.seed)
        return {
            "train": (x[train], y[train]),
            "val": (x[val], y[val]),
            "test": (x[test], y[test]),
        }


# --------------------------------------------------------------------------------------------
# mnist: the official gzip IDX files.

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
"""The four files :class:`MNISTDataModule` reads from its ``root``."""

IDX_IMAGES_MAGIC = 2051
"""IDX magic number of unsigned-byte 3-d arrays (images)."""
IDX_LABELS_MAGIC = 2049
"""IDX magic number of unsigned-byte 1-d arrays (labels)."""


def read_idx(path: str | os.PathLike[str], magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes as an array ``(count, *item_shape)``.

    Args:
        path: the ``.gz`` file.
        magic: the expected magic number, e.g. 2051 for images, 2049 for labels; its low byte is
            the number of dimensions.
        item_shape: the expected shape of one item, e.g. ``(28, 28)``, or ``()`` for labels.

    Raises:
        DataError: unreadable gzip, wrong magic number, wrong item shape, or a data length that
            disagrees with the header; the message names the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({type(err).__name__}: {err})") from None
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes after decompression, too short for IDX")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, too short for the {header}-byte IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if dims[1:] != item_shape:
        shown = "×".join(map(str, dims[1:])) or "scalar"
        expected = "×".join(map(str, item_shape)) or "scalar"
        raise DataError(f"{path}: items of shape {shown}, expected {expected}")
    expected_bytes = math.prod(dims)
    if len(data) - header != expected_bytes:
        raise DataError(
            f"{path}: the header promises {dims[0]} items ({expected_bytes} data bytes) "
            f"but the file holds {len(data) - header} data bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def check_mnist_files(root: str | os.PathLike[str]) -> dict[str, Path]:
    """The paths of the four MNIST files under ``root``; a missing one raises
    :class:`DataError` listing the directory and the missing names."""
    directory = Path(root).expanduser()
    paths = {key: directory / name for key, name in MNIST_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        where = str(directory) + ("" if directory.is_dir() else " (no such directory)")
        raise DataError(
            f"MNIST directory {where} lacks: {', '.join(missing)}{_layout_hint(directory)}"
        )
    return paths


def _layout_hint(directory: Path) -> str:
    """A hint for a root that holds the MNIST files in the wrong place or form."""
    if not directory.is_dir():
        return ""
    names = list(MNIST_FILES.values())
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        if all((sub / name).is_file() for name in names):
            return f"; they are in {sub}: set data.root={sub}"
    if any((directory / name.removesuffix(".gz")).is_file() for name in names):
        return "; found uncompressed IDX files: lit-vae reads the official .gz files"
    return ""


def load_mnist(root: str | os.PathLike[str]) -> dict[str, Batch]:
    """The MNIST ``train`` (60000) and ``test`` (10000) parts as ``(x, y)``: ``x`` of shape
    ``(n, 1, 28, 28)`` float32 in [0, 1] (bytes /255), ``y`` of shape ``(n,)`` int64 digits.

    Raises:
        DataError: a missing or malformed file, or images and labels that disagree in count.
    """
    paths = check_mnist_files(root)
    parts: dict[str, Batch] = {}
    for part in ("train", "test"):
        images_path, labels_path = paths[f"{part}_images"], paths[f"{part}_labels"]
        images = read_idx(images_path, IDX_IMAGES_MAGIC, (28, 28))
        labels = read_idx(labels_path, IDX_LABELS_MAGIC, ())
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"{labels_path}: label {int(labels.max())} outside the digits 0..9")
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        parts[part] = (x, y)
    return parts


BINARIZE_MODES = ("none", "static", "dynamic")
STATIC_MODES = ("threshold", "sample")


@DATAMODULES.register("mnist")
class MNISTDataModule(TensorDataModule):
    """MNIST from its four official gzip IDX files, optionally binarized.

    ``x`` has shape ``(n, 1, 28, 28)`` float32 in [0, 1], ``y`` the digit. ``val_size`` of the
    60000 training images are held out by a permutation fixed by ``seed``; the 10000 test images
    form the test split.

    Binarization (``binarize``):

    * ``none``: grey levels /255.
    * ``static``: binarized once in :meth:`setup`, every split: ``static_mode=threshold`` keeps
      ``x > 0.5``; ``static_mode=sample`` draws one Bernoulli sample with probabilities ``x``
      from a generator fixed by ``seed``.
    * ``dynamic``: training batches are redrawn as Bernoulli samples every time they are served
      (in :meth:`on_after_batch_transfer`, on the batch's device), seeded by
      ``(seed, epoch, batch index, global rank)`` so a resumed run redraws the same bits;
      validation and test hold one fixed sample drawn in :meth:`setup` (the same bits as
      ``static`` with ``static_mode=sample``), the evaluation protocol of the IWAE paper.

    A sample for an image does not depend on the train/val split: whole files are drawn at once.

    Args:
        root: the directory holding ``train-images-idx3-ubyte.gz``,
            ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
            ``t10k-labels-idx1-ubyte.gz``.
        val_size: number of training images held out for validation.
        binarize: ``none``, ``static`` or ``dynamic``.
        static_mode: ``threshold`` or ``sample``, for ``binarize=static``.
        seed: fixes the split, the training order and every Bernoulli draw.
        **loader: :class:`LoaderOptions` (``batch_size``, ``eval_batch_size``, ``shuffle``, ...).

    Raises:
        DataError: a missing file (at construction), an unreadable or malformed one (at setup).
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        val_size: int = 10000,
        binarize: str = "none",
        static_mode: str = "threshold",
        seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        _check_loader_options(type(self).__name__, loader)
        super().__init__(seed=seed, **loader)
        if not isinstance(root, str | os.PathLike) or not str(root):
            raise _fail("root", root, "must be the path of the directory of the MNIST files")
        self.root = Path(root).expanduser()
        self.val_size = _check_int("val_size", val_size, 1)
        self.binarize = _check_choice("binarize", binarize, BINARIZE_MODES)
        self.static_mode = _check_choice("static_mode", static_mode, STATIC_MODES)
        self._data_shape = (1, 28, 28)
        self._paths = check_mnist_files(self.root)

    def _load_splits(self) -> dict[str, Batch]:
        parts = load_mnist(self.root)
        (train_x, train_y), (test_x, test_y) = parts["train"], parts["test"]
        n = train_x.shape[0]
        if self.val_size >= n:
            raise _fail(
                "val_size",
                self.val_size,
                f"must be smaller than the {n} images of {self._paths['train_images']}",
            )
        train_x, val_x, test_x = self._binarize_files(train_x, test_x)
        train, val = _seeded_split(n, [self.val_size], self.seed)
        return {
            "train": (train_x[train], train_y[train]),
            "val": (val_x[val], train_y[val]),
            "test": (test_x, test_y),
        }

    def _binarize_files(self, train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(train, val, test)`` source tensors: ``train`` and ``val`` are indexed from the
        training file's images, ``test`` is the test file's."""
        if self.binarize == "none":
            return train_x, train_x, test_x
        if self.binarize == "static" and self.static_mode == "threshold":
            train_bits = (train_x > 0.5).to(torch.float32)
            return train_bits, train_bits, (test_x > 0.5).to(torch.float32)
        train_bits = torch.bernoulli(
            train_x, generator=seeded_generator(self.seed, _BINARIZE_STREAM, 0)
        )
        test_bits = torch.bernoulli(
            test_x, generator=seeded_generator(self.seed, _BINARIZE_STREAM, 1)
        )
        if self.binarize == "dynamic":
            return train_x, train_bits, test_bits
        return train_bits, train_bits, test_bits

    def dynamic_seed(self, epoch: int, batch_idx: int, global_rank: int = 0) -> int:
        """The seed of the dynamic binarization of training batch ``batch_idx`` of ``epoch`` on
        process ``global_rank``."""
        return derive_seed(self.seed, _DYNAMIC_STREAM, epoch, batch_idx, global_rank)

    def binarize_batch(self, x: Tensor, epoch: int, batch_idx: int, global_rank: int = 0) -> Tensor:
        """One Bernoulli sample with probabilities ``x`` (``(batch, 1, 28, 28)``), drawn on
        ``x``'s device from the generator of :meth:`dynamic_seed`."""
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.dynamic_seed(epoch, batch_idx, global_rank))
        return torch.bernoulli(x, generator=generator)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``binarize=dynamic``, redraw a training batch ``(x, y)`` as Bernoulli bits.

        Only while the trainer is training; validation and test batches pass unchanged. The
        batch index is the one the training loop gives this batch: the loop counts the batch
        right after this hook, so it is ``fit_loop.epoch_loop.batch_idx + 1`` here.
        """
        trainer = self.trainer
        if self.binarize != "dynamic" or trainer is None or not trainer.training:
            return batch
        x, y = batch
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1
        return self.binarize_batch(x, trainer.current_epoch, batch_idx, trainer.global_rank), y


# --------------------------------------------------------------------------------------------
# ppca: a linear-Gaussian dataset with an exact likelihood and posterior.


@DATAMODULES.register("ppca")
class PPCADataModule(TensorDataModule):
    """Synthetic probabilistic-PCA data ``x = W z + b + ε``, ``z ~ N(0, I)``, ``ε ~ N(0, σ² I)``.

    ``W`` (``(data_dim, latent_dim)``) and ``b`` (``(data_dim,)``) have standard normal entries
    drawn from ``seed``; so do the samples. ``x`` has shape ``(n, data_dim)`` float32, labels are
    zeros. The marginal ``p(x) = N(b, W Wᵀ + σ² I)`` and the posterior
    ``p(z | x) = N(M⁻¹ Wᵀ (x − b), σ² M⁻¹)`` with ``M = Wᵀ W + σ² I`` are exact, and for a
    generic ``W`` the posterior covariance is not diagonal.

    Args:
        data_dim: dimension of ``x``.
        latent_dim: dimension of ``z``.
        noise_std: the noise standard deviation ``σ``.
        num_train: number of training samples.
        num_val: number of validation samples.
        num_test: number of test samples.
        seed: fixes ``W``, ``b``, the samples and the training order.
        **loader: :class:`LoaderOptions` (``batch_size``, ``eval_batch_size``, ``shuffle``, ...).
    """

    def __init__(
        self,
        *,
        data_dim: int = 10,
        latent_dim: int = 3,
        noise_std: float = 0.5,
        num_train: int = 5000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        _check_loader_options(type(self).__name__, loader)
        super().__init__(seed=seed, **loader)
        self.data_dim = _check_int("data_dim", data_dim, 1)
        self.latent_dim = _check_int("latent_dim", latent_dim, 1)
        self.noise_std = _check_positive("noise_std", noise_std)
        self._sizes = {
            "train": _check_int("num_train", num_train, 1),
            "val": _check_int("num_val", num_val, 1),
            "test": _check_int("num_test", num_test, 1),
        }
        self._data_shape = (self.data_dim,)
        generator = seeded_generator(self.seed, _PPCA_PARAMS_STREAM)
        self._weight = torch.randn(
            self.data_dim, self.latent_dim, generator=generator, dtype=torch.float64
        )
        self._bias = torch.randn(self.data_dim, generator=generator, dtype=torch.float64)

    def true_params(self) -> dict[str, Any]:
        """The generating parameters: ``weight`` ``(data_dim, latent_dim)`` and ``bias``
        ``(data_dim,)`` as float64 tensors, ``noise_std`` as a float."""
        return {
            "weight": self._weight.clone(),
            "bias": self._bias.clone(),
            "noise_std": self.noise_std,
        }

    def _load_splits(self) -> dict[str, Batch]:
        generator = seeded_generator(self.seed, _PPCA_SAMPLES_STREAM)
        splits: dict[str, Batch] = {}
        for split in SPLITS:
            n = self._sizes[split]
            z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
            noise = torch.randn(n, self.data_dim, generator=generator, dtype=torch.float64)
            x = z @ self._weight.T + self._bias + self.noise_std * noise
            splits[split] = (x.to(torch.float32), torch.zeros(n, dtype=torch.long))
        return splits

    def marginal(self, device: torch.device | str | None = None) -> MultivariateNormal:
        """The exact marginal ``p(x) = N(b, W Wᵀ + σ² I)`` in float64, on ``device``."""
        w, b = self._weight.to(device), self._bias.to(device)
        eye = torch.eye(self.data_dim, dtype=torch.float64, device=w.device)
        covariance = w @ w.T + self.noise_std**2 * eye
        return MultivariateNormal(b, scale_tril=torch.linalg.cholesky(covariance))

    def exact_log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = log N(x; b, W Wᵀ + σ² I)`` of ``x`` ``(batch, data_dim)``, computed in
        float64 on ``x``'s device; returns ``(batch,)`` float64."""
        return self.marginal(x.device).log_prob(x.to(torch.float64))

    def true_posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact posterior ``p(z | x)`` of ``x`` ``(batch, data_dim)``: a float64
        :class:`~torch.distributions.MultivariateNormal` of batch shape ``(batch,)`` and event
        shape ``(latent_dim,)``, mean ``M⁻¹ Wᵀ (x − b)`` and covariance ``σ² M⁻¹``,
        ``M = Wᵀ W + σ² I``."""
        w, b = self._weight.to(x.device), self._bias.to(x.device)
        variance = self.noise_std**2
        m = w.T @ w + variance * torch.eye(self.latent_dim, dtype=torch.float64, device=w.device)
        m_chol = torch.linalg.cholesky(m)
        centered = x.to(torch.float64) - b
        mean = torch.cholesky_solve((centered @ w).unsqueeze(-1), m_chol).squeeze(-1)
        covariance = variance * torch.cholesky_inverse(m_chol)
        covariance = 0.5 * (covariance + covariance.T)
        return MultivariateNormal(mean, covariance_matrix=covariance)
