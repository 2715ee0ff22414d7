"""Tests of the data modules: splits, loaders, MNIST reading and binarization, PPCA exactness."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.distributions import MultivariateNormal, Normal

from lit_vae.data import (
    DATAMODULES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_FILES,
    DataError,
    DigitsDataModule,
    MNISTDataModule,
    PPCADataModule,
    TensorDataModule,
    TensorPairDataset,
    collate_as_is,
    read_idx,
)
from tests.helpers import quiet_trainer

CONF_DIR = Path(__file__).resolve().parents[1] / "lit_vae" / "conf" / "data"


def _find_mnist() -> Path | None:
    """The shared MNIST directory: ``$LIT_VAE_MNIST_DIR``, else ``shared/data/mnist`` beside the
    checkout or beside any folder above it."""
    env = os.environ.get("LIT_VAE_MNIST_DIR")
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [p / "shared" / "data" / "mnist" for p in repo.parents]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in MNIST_FILES.values()):
            return candidate
    return None


MNIST_DIR = _find_mnist()
requires_mnist = pytest.mark.skipif(
    MNIST_DIR is None,
    reason="the MNIST files are absent: set LIT_VAE_MNIST_DIR or place them in shared/data/mnist",
)


def same_rows(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same items, counted with repeats, in any order."""
    rows_a, counts_a = torch.unique(a.flatten(1), dim=0, return_counts=True)
    rows_b, counts_b = torch.unique(b.flatten(1), dim=0, return_counts=True)
    return torch.equal(rows_a, rows_b) and torch.equal(counts_a, counts_b)


def is_binary(x: Tensor) -> bool:
    """Whether ``x`` holds only 0s and 1s, and both."""
    return bool(((x == 0) | (x == 1)).all()) and bool((x == 0).any()) and bool((x == 1).any())


def fake_trainer(epoch: int, batch_idx: int, rank: int = 0, training: bool = True) -> Any:
    """Enough of a trainer for the transfer hook to run as it does on batch ``batch_idx``.

    The training loop counts a batch right after its transfer hooks, so while they run its
    ``batch_idx`` still points at the previous batch.
    """
    return SimpleNamespace(
        training=training,
        current_epoch=epoch,
        global_rank=rank,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx - 1)),
    )


class Recorder(pl.LightningModule):
    """A trivial module that records the batches it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches: list[tuple[int, int, Tensor, Tensor]] = []
        self.val_batches: list[tuple[int, Tensor]] = []
        self.test_batches: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.train_batches.append((self.current_epoch, batch_idx, x.clone(), y.clone()))
        return (self.weight - x.mean()) ** 2

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_batches.append((self.current_epoch, batch[0].clone()))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_batches.append(batch[0].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# --------------------------------------------------------------------------------------------
# Synthetic IDX files.


def idx_bytes(array: np.ndarray, magic: int, dims: tuple[int, ...] | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    return struct.pack(f">I{len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


def make_mnist_dir(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """Four small valid MNIST files under ``root``, with random grey levels and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": (rng.integers(0, 256, (n_train, 28, 28)), IDX_IMAGES_MAGIC),
        "train_labels": (rng.integers(0, 10, (n_train,)), IDX_LABELS_MAGIC),
        "test_images": (rng.integers(0, 256, (n_test, 28, 28)), IDX_IMAGES_MAGIC),
        "test_labels": (rng.integers(0, 10, (n_test,)), IDX_LABELS_MAGIC),
    }
    for key, (array, magic) in arrays.items():
        write_gz(root / MNIST_FILES[key], idx_bytes(array, magic))
    return root


@pytest.fixture
def small_mnist(tmp_path: Path) -> Path:
    return make_mnist_dir(tmp_path / "mnist")


# --------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0, batch_size=100, eval_batch_size=64)
    dm.setup("fit")
    return dm


def test_digits_shapes_and_range(digits: DigitsDataModule) -> None:
    assert DigitsDataModule().data_shape == (1, 8, 8)
    total = 0
    for split in ("train", "val", "test"):
        x, y = digits.split(split)
        assert x.shape[1:] == (1, 8, 8)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert y.shape == (x.shape[0],)
        assert float(x.min()) >= 0.0
        assert float(x.max()) <= 1.0
        assert set(y.tolist()) <= set(range(10))
        total += x.shape[0]
    assert total == 1797
    assert (digits.num_train, digits.num_val, digits.num_test) == (1258, 180, 359)
    assert float(digits.split("train")[0].max()) == 1.0  # 16/16 occurs


def test_digits_split_is_disjoint_and_fixed_by_seed(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    # the 1797 images are distinct, so each split image identifies its source row
    source = {row.tobytes(): i for i, row in enumerate(load_digits().data.astype(np.float32) / 16)}
    assert len(source) == 1797

    def rows(dm: DigitsDataModule) -> dict[str, list[int]]:
        return {
            split: [source[r.tobytes()] for r in dm.split(split)[0].flatten(1).numpy()]
            for split in ("train", "val", "test")
        }

    first = rows(digits)
    sets = {split: set(ids) for split, ids in first.items()}
    assert sum(len(ids) for ids in first.values()) == 1797
    assert set().union(*sets.values()) == set(range(1797))  # so the splits are disjoint
    assert first["train"] == sorted(first["train"])  # each split keeps the source order
    assert rows(DigitsDataModule(seed=0)) == first
    other = rows(DigitsDataModule(seed=1))
    assert all(set(other[split]) != sets[split] for split in sets)
    labels = torch.from_numpy(load_digits().target)
    for split, ids in first.items():
        assert torch.equal(digits.split(split)[1], labels[ids])


def test_digits_loaders_cover_each_split_once(digits: DigitsDataModule) -> None:
    loader = digits.train_dataloader()
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [b[0].shape[0] for b in batches] == [100] * 12 + [58]
        for x, y in batches:
            assert x.shape[1:] == (1, 8, 8)
            assert y.shape == x.shape[:1]
        x = torch.cat([b[0] for b in batches])
        assert same_rows(x, digits.split("train")[0])
        epochs.append(x)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    fresh = DigitsDataModule(seed=0, batch_size=100)
    assert torch.equal(torch.cat([b[0] for b in fresh.train_dataloader()]), epochs[0])

    for split, loader in [("val", digits.val_dataloader()), ("test", digits.test_dataloader())]:
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        assert torch.equal(x, digits.split(split)[0])  # evaluation keeps the order
        assert torch.equal(y, digits.split(split)[1])
        assert max(b[0].shape[0] for b in loader) == 64


def test_drop_last_and_no_shuffle() -> None:
    dm = DigitsDataModule(batch_size=500, drop_last=True, shuffle=False)
    batches = list(dm.train_dataloader())
    assert [b[0].shape[0] for b in batches] == [500, 500]
    assert torch.equal(torch.cat([b[0] for b in batches]), dm.split("train")[0][:1000])


def test_train_mean(digits: DigitsDataModule) -> None:
    mean = digits.train_mean()
    assert mean.shape == (1, 8, 8)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, digits.split("train")[0].mean(0))


def test_batches_are_slices_not_items(
    digits: DigitsDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_items(self: TensorPairDataset, index: int) -> Any:
        raise AssertionError("batches must not be assembled item by item")

    monkeypatch.setattr(TensorPairDataset, "__getitem__", no_items)
    x, _ = next(iter(digits.val_dataloader()))
    assert torch.equal(x, digits.split("val")[0][:64])
    dataset = TensorPairDataset(*digits.split("val"))
    got = dataset.__getitems__([3, 1, 4])
    assert torch.equal(got[0], digits.split("val")[0][[3, 1, 4]])
    assert collate_as_is(got) is got
    assert pickle.loads(pickle.dumps(collate_as_is)) is collate_as_is


def test_worker_processes_give_the_same_batches(digits: DigitsDataModule) -> None:
    dm = DigitsDataModule(seed=0, eval_batch_size=64, num_workers=1)
    with_workers = [b[0] for b in dm.val_dataloader()]
    in_process = [b[0] for b in digits.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process, strict=True))


def test_on_device_moves_the_splits() -> None:
    dm = DigitsDataModule(on_device=True, batch_size=32)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.setup("fit")
    assert dm.split("train")[0].device.type == "meta"
    x, y = next(iter(dm.train_dataloader()))
    assert x.device.type == "meta"
    assert y.device.type == "meta"
    assert x.shape == (32, 1, 8, 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0: must be an integer >= 1"),
        ({"batch_size": 2.5}, "data.batch_size=2.5: must be an integer >= 1"),
        ({"eval_batch_size": -1}, "data.eval_batch_size=-1: must be an integer >= 1"),
        ({"num_workers": -1}, "data.num_workers=-1: must be an integer >= 0"),
        ({"seed": -3}, "data.seed=-3: must be an integer >= 0"),
        ({"shuffle": "yes"}, "data.shuffle='yes': must be true or false"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0: must be a number strictly between 0 and 1"),
        ({"test_fraction": 0}, "data.test_fraction=0: must be a number strictly between 0 and 1"),
        ({"val_fraction": 0.0001}, "data.val_fraction=0.0001: leaves an empty split"),
        (
            {"val_fraction": 0.6, "test_fraction": 0.4},
            "data.val_fraction=0.6, data.test_fraction=0.4: together they leave no training items",
        ),
        ({"on_device": True, "num_workers": 2}, "data.on_device=True: needs data.num_workers=0"),
    ],
)
def test_digits_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DigitsDataModule(**options)


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(TypeError, match="unexpected options: train"):
        DigitsDataModule(train=torch.zeros(3, 2))  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PPCADataModule(colour="red")  # type: ignore[call-arg]


# --------------------------------------------------------------------------------------------
# MNIST on the shared files


@pytest.fixture(scope="module")
def mnist_dynamic() -> MNISTDataModule:
    assert MNIST_DIR is not None
    dm = MNISTDataModule(root=MNIST_DIR, binarize="dynamic", seed=0)
    dm.setup("fit")
    return dm


@requires_mnist
def test_mnist_shapes_labels_and_range() -> None:
    dm = MNISTDataModule(root=str(MNIST_DIR))
    assert dm.data_shape == (1, 28, 28)
    dm.setup("fit")
    assert (dm.num_train, dm.num_val, dm.num_test) == (50000, 10000, 10000)
    assert dm.num_train + dm.num_val == 60000
    x, y = dm.split("test")
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert torch.equal(x * 255, (x * 255).round())  # grey levels /255
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published t10k labels
    both = torch.cat([dm.split("train")[1], dm.split("val")[1], y])
    assert both.shape == (70000,)
    assert torch.bincount(y, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    train_counts = torch.bincount(torch.cat([dm.split("train")[1], dm.split("val")[1]]))
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    torch.testing.assert_close(dm.train_mean(), dm.split("train")[0].mean(0))
    assert 0.12 < float(dm.train_mean().mean()) < 0.14
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (128, 1, 28, 28)
    assert batch_y.shape == (128,)


@requires_mnist
def test_mnist_dynamic_keeps_train_grey_and_fixes_eval_bits(mnist_dynamic: MNISTDataModule) -> None:
    train_x = mnist_dynamic.split("train")[0]
    assert ((train_x > 0) & (train_x < 1)).any()
    for split in ("val", "test"):
        assert is_binary(mnist_dynamic.split(split)[0])
    static = MNISTDataModule(root=MNIST_DIR, binarize="static", static_mode="sample", seed=0)
    for split in ("val", "test"):  # the one fixed evaluation sample is the static sample
        assert torch.equal(static.split(split)[0], mnist_dynamic.split(split)[0])
    assert is_binary(static.split("train")[0])
    # a Bernoulli sample keeps the grey-level mean
    assert abs(float(static.split("train")[0].mean()) - float(train_x.mean())) < 1e-3


@requires_mnist
def test_mnist_dynamic_redraws_per_epoch_and_batch(mnist_dynamic: MNISTDataModule) -> None:
    x, y = next(iter(mnist_dynamic.train_dataloader()))
    dm = mnist_dynamic

    def draw(epoch: int, batch_idx: int, rank: int = 0) -> Tensor:
        dm.trainer = fake_trainer(epoch, batch_idx, rank)
        try:
            bits, labels = dm.on_after_batch_transfer((x, y), dataloader_idx=0)
        finally:
            dm.trainer = None
        assert labels is y
        return bits

    first = draw(3, 7)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert first.shape == x.shape
    assert torch.equal(draw(3, 7), first)
    assert not torch.equal(draw(4, 7), first)
    assert not torch.equal(draw(3, 8), first)
    assert not torch.equal(draw(3, 7, rank=1), first)
    assert abs(float(first.mean()) - float(x.mean())) < 0.01
    dm.trainer = fake_trainer(3, 7, training=False)
    try:
        assert dm.on_after_batch_transfer((x, y), dataloader_idx=0)[0] is x
    finally:
        dm.trainer = None


@requires_mnist
def test_mnist_static_threshold(mnist_dynamic: MNISTDataModule) -> None:
    dm = MNISTDataModule(root=MNIST_DIR, binarize="static", static_mode="threshold", val_size=5000)
    assert (dm.num_train, dm.num_val) == (55000, 5000)
    grey = MNISTDataModule(root=MNIST_DIR, val_size=5000)
    for split in ("train", "val", "test"):
        assert torch.equal(dm.split(split)[0], (grey.split(split)[0] > 0.5).float())


@requires_mnist
def test_truncated_copy_of_the_real_labels(tmp_path: Path) -> None:
    assert MNIST_DIR is not None
    root = tmp_path / "mnist"
    shutil.copytree(MNIST_DIR, root)
    target = root / MNIST_FILES["test_labels"]
    target.write_bytes(target.read_bytes()[:2000])
    dm = MNISTDataModule(root=root)
    with pytest.raises(DataError, match=f"^{target}: not a readable gzip file"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------
# MNIST readers on small synthetic files


def test_small_mnist_loads(small_mnist: Path) -> None:
    dm = MNISTDataModule(root=small_mnist, val_size=8, batch_size=8)
    assert (dm.num_train, dm.num_val, dm.num_test) == (32, 8, 20)
    images = read_idx(small_mnist / MNIST_FILES["train_images"], IDX_IMAGES_MAGIC, (28, 28))
    grey = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)
    assert same_rows(torch.cat([dm.split("train")[0], dm.split("val")[0]]), grey)


def test_static_sample_is_reproducible(small_mnist: Path) -> None:
    def sample(seed: int) -> Tensor:
        dm = MNISTDataModule(
            root=small_mnist, val_size=8, binarize="static", static_mode="sample", seed=seed
        )
        return torch.cat([dm.split(s)[0] for s in ("train", "val", "test")])

    first = sample(0)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(sample(0), first)
    assert not torch.equal(sample(1), first)


def test_dynamic_binarization_in_a_real_fit(small_mnist: Path) -> None:
    dm = MNISTDataModule(
        root=small_mnist, val_size=8, batch_size=8, eval_batch_size=8, shuffle=False,
        binarize="dynamic", seed=5,
    )  # fmt: skip
    model = Recorder()
    quiet_trainer(max_epochs=2).fit(model, datamodule=dm)
    grey = dm.split("train")[0]
    assert len(model.train_batches) == 8
    for epoch, batch_idx, x, _ in model.train_batches:
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        source = grey[batch_idx * 8 : (batch_idx + 1) * 8]
        assert torch.equal(x, dm.binarize_batch(source, epoch, batch_idx))
    by_key = {(e, b): x for e, b, x, _ in model.train_batches}
    assert not torch.equal(by_key[(0, 0)], by_key[(1, 0)])
    val_bits = dm.split("val")[0]
    assert set(val_bits.unique().tolist()) == {0.0, 1.0}
    assert all(torch.equal(x, val_bits) for _, x in model.val_batches)  # sanity check included


def test_resumed_run_redraws_the_same_bits_in_the_same_order(
    small_mnist: Path, tmp_path: Path
) -> None:
    def datamodule() -> MNISTDataModule:
        return MNISTDataModule(
            root=small_mnist, val_size=8, batch_size=8, binarize="dynamic", seed=2
        )

    whole = Recorder()
    quiet_trainer(max_epochs=3).fit(whole, datamodule=datamodule())
    first = Recorder()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(first, datamodule=datamodule())
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed = Recorder()
    quiet_trainer(max_epochs=3).fit(
        resumed, datamodule=datamodule(), ckpt_path=tmp_path / "epoch0.ckpt"
    )
    later = [(e, b, x) for e, b, x, _ in whole.train_batches if e >= 1]
    assert len(later) == len(resumed.train_batches) == 8
    for (e, b, x), (e2, b2, x2, _) in zip(later, resumed.train_batches):
        assert (e, b) == (e2, b2)
        assert torch.equal(x, x2)


def test_missing_files(small_mnist: Path) -> None:
    (small_mnist / MNIST_FILES["train_labels"]).unlink()
    (small_mnist / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(DataError) as info:
        MNISTDataModule(root=small_mnist)
    message = str(info.value)
    assert str(small_mnist) in message
    assert "train-labels-idx1-ubyte.gz" in message
    assert "t10k-images-idx3-ubyte.gz" in message
    assert "train-images" not in message
    with pytest.raises(DataError, match="no such directory"):
        MNISTDataModule(root=small_mnist / "absent")


def test_truncated_gzip(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["train_images"]
    target.write_bytes(target.read_bytes()[:-200])
    with pytest.raises(DataError, match=f"^{target}: not a readable gzip file") as info:
        MNISTDataModule(root=small_mnist).setup("fit")
    assert "\n" not in str(info.value)


def test_not_gzip(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["test_labels"]
    target.write_bytes(gzip.decompress(target.read_bytes()))  # the raw IDX bytes
    with pytest.raises(DataError, match=f"^{target}: not a readable gzip file"):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_corrupted_gzip_data(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["train_images"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{target}: not a readable gzip file"):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_wrong_magic(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["train_labels"]
    write_gz(target, idx_bytes(np.zeros(40), 2051, dims=(40,)))
    with pytest.raises(DataError, match=f"^{target}: magic number 2051, expected 2049$"):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_wrong_image_size(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["test_images"]
    write_gz(target, idx_bytes(np.zeros((20, 27, 28)), IDX_IMAGES_MAGIC))
    with pytest.raises(DataError, match=f"^{target}: items of shape 27×28, expected 28×28$"):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_length_disagrees_with_header(small_mnist: Path) -> None:
    target = small_mnist / MNIST_FILES["test_images"]
    write_gz(target, idx_bytes(np.zeros((19, 28, 28)), IDX_IMAGES_MAGIC, dims=(20, 28, 28)))
    with pytest.raises(DataError, match=f"^{target}: the header promises 20 items"):
        MNISTDataModule(root=small_mnist).setup("fit")
    write_gz(target, b"\x00\x00")
    with pytest.raises(DataError, match=f"^{target}: 2 bytes after decompression"):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_image_label_count_mismatch(small_mnist: Path) -> None:
    labels = small_mnist / MNIST_FILES["train_labels"]
    write_gz(labels, idx_bytes(np.zeros(39), IDX_LABELS_MAGIC))
    images = small_mnist / MNIST_FILES["train_images"]
    expected = f"^{images} holds 40 images but {labels} holds 39 labels$"
    with pytest.raises(DataError, match=expected):
        MNISTDataModule(root=small_mnist).setup("fit")


def test_bad_label_value(small_mnist: Path) -> None:
    labels = small_mnist / MNIST_FILES["test_labels"]
    write_gz(labels, idx_bytes(np.full(20, 12), IDX_LABELS_MAGIC))
    with pytest.raises(DataError, match=f"^{labels}: label 12 outside the digits 0..9$"):
        MNISTDataModule(root=small_mnist).setup("fit")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"binarize": "sometimes"}, "data.binarize='sometimes': must be one of: none, static"),
        ({"static_mode": "otsu"}, "data.static_mode='otsu': must be one of: threshold, sample"),
        ({"val_size": 0}, "data.val_size=0: must be an integer >= 1"),
        ({"batch_size": 0}, "data.batch_size=0: must be an integer >= 1"),
    ],
)
def test_mnist_rejects_bad_options(
    small_mnist: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        MNISTDataModule(root=small_mnist, **options)


def test_val_size_larger_than_the_file(small_mnist: Path) -> None:
    dm = MNISTDataModule(root=small_mnist, val_size=40)
    with pytest.raises(ValueError, match=r"^data\.val_size=40: must be smaller than the 40 images"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------
# ppca


@pytest.fixture(scope="module")
def ppca() -> PPCADataModule:
    dm = PPCADataModule()
    dm.setup("fit")
    return dm


def test_ppca_data(ppca: PPCADataModule) -> None:
    assert ppca.data_shape == (10,)
    assert (ppca.num_train, ppca.num_val, ppca.num_test) == (5000, 1000, 1000)
    x, y = ppca.split("train")
    assert x.shape == (5000, 10)
    assert x.dtype == torch.float32
    assert torch.equal(y, torch.zeros(5000, dtype=torch.long))
    params = ppca.true_params()
    assert params["weight"].shape == (10, 3)
    assert params["bias"].shape == (10,)
    assert params["noise_std"] == 0.5
    # the sample moments agree with the model's
    torch.testing.assert_close(x.double().mean(0), params["bias"], atol=0.15, rtol=0)
    covariance = params["weight"] @ params["weight"].T + 0.25 * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(x.double().T.cov(), covariance, atol=0.4, rtol=0.1)
    again = PPCADataModule()
    assert torch.equal(again.split("train")[0], x)
    assert torch.equal(again.true_params()["weight"], params["weight"])
    other = PPCADataModule(seed=1)
    assert not torch.equal(other.true_params()["weight"], params["weight"])
    assert PPCADataModule(data_dim=4, latent_dim=2, num_train=7).split("train")[0].shape == (7, 4)


def test_ppca_exact_log_prob_matches_a_reference(ppca: PPCADataModule) -> None:
    x = ppca.split("test")[0][:50]
    params = ppca.true_params()
    w, b = params["weight"], params["bias"]
    reference = MultivariateNormal(
        b, covariance_matrix=w @ w.T + params["noise_std"] ** 2 * torch.eye(10, dtype=torch.float64)
    ).log_prob(x.double())
    got = ppca.exact_log_prob(x)
    assert got.shape == (50,)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-10)


def test_ppca_exact_log_prob_matches_monte_carlo() -> None:
    # log ∫ p(x|z) p(z) dz by plain Monte Carlo over the prior, in a small model
    dm = PPCADataModule(data_dim=3, latent_dim=2, noise_std=1.0, num_test=4, seed=3)
    x = dm.split("test")[0].double()
    params = dm.true_params()
    w, b = params["weight"], params["bias"]
    num_samples = 200_000
    z = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    means = z @ w.T + b  # (samples, 3)
    log_lik = Normal(means[:, None, :], 1.0).log_prob(x[None]).sum(-1)  # (samples, 4)
    estimate = torch.logsumexp(log_lik, dim=0) - math.log(num_samples)
    torch.testing.assert_close(estimate, dm.exact_log_prob(x), atol=0.02, rtol=0)


def test_ppca_exact_log_prob_matches_importance_sampling(ppca: PPCADataModule) -> None:
    # the default model, with a proposal wider than the posterior
    x = ppca.split("val")[0][:5].double()
    params = ppca.true_params()
    w, b, sigma = params["weight"], params["bias"], params["noise_std"]
    posterior = ppca.true_posterior(x)
    proposal = MultivariateNormal(posterior.mean, covariance_matrix=4 * posterior.covariance_matrix)
    torch.manual_seed(0)
    z = proposal.sample((20_000,))  # (samples, 5, 3)
    log_joint = Normal(z @ w.T + b, sigma).log_prob(x).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(
        -1
    )
    log_weights = log_joint - proposal.log_prob(z)
    estimate = torch.logsumexp(log_weights, dim=0) - math.log(z.shape[0])
    torch.testing.assert_close(estimate, ppca.exact_log_prob(x), atol=0.02, rtol=0)


def test_ppca_true_posterior_is_bayes_rule(ppca: PPCADataModule) -> None:
    x = ppca.split("test")[0][:20].double()
    params = ppca.true_params()
    w, b, sigma = params["weight"], params["bias"], params["noise_std"]
    # condition the joint Gaussian of (z, x): cov(z, x) = Wᵀ, cov(x) = W Wᵀ + σ² I
    cov_x = w @ w.T + sigma**2 * torch.eye(10, dtype=torch.float64)
    gain = torch.linalg.solve(cov_x, w).T  # Wᵀ cov(x)⁻¹
    mean = (x - b) @ gain.T
    covariance = torch.eye(3, dtype=torch.float64) - gain @ w
    posterior = ppca.true_posterior(x)
    assert posterior.batch_shape == (20,)
    assert posterior.event_shape == (3,)
    torch.testing.assert_close(posterior.mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        posterior.covariance_matrix, covariance.expand(20, 3, 3), rtol=1e-10, atol=1e-10
    )
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert off_diagonal.abs().max() > 1e-3  # a factorised posterior cannot be exact
    # p(x|z) p(z) / p(z|x) = p(x) for any z
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_joint = Normal(z @ w.T + b, sigma).log_prob(x).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(
        -1
    )
    torch.testing.assert_close(
        log_joint - posterior.log_prob(z), ppca.exact_log_prob(x), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_std": 0.0}, "data.noise_std=0.0: must be a finite number > 0"),
        ({"data_dim": 0}, "data.data_dim=0: must be an integer >= 1"),
        ({"num_val": 0}, "data.num_val=0: must be an integer >= 1"),
    ],
)
def test_ppca_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        PPCADataModule(**options)


# --------------------------------------------------------------------------------------------
# tensors


def test_tensors_from_memory() -> None:
    x = torch.rand(50, 3, 4)
    dm = TensorDataModule(train=x, val_fraction=0.2, test_fraction=0.2, batch_size=16)
    assert dm.data_shape == (3, 4)
    assert (dm.num_train, dm.num_val, dm.num_test) == (30, 10, 10)
    together = torch.cat([dm.split(s)[0] for s in ("train", "val", "test")])
    assert same_rows(together, x)
    assert torch.equal(dm.split("val")[1], torch.zeros(10, dtype=torch.long))
    only_val = TensorDataModule(train=x, val=(x[:5], torch.arange(5)))
    assert only_val.num_val == 5
    assert torch.equal(only_val.split("val")[1], torch.arange(5))
    with pytest.raises(ValueError, match="no test split"):
        only_val.test_dataloader()


def test_tensors_from_files(tmp_path: Path) -> None:
    train, val = tmp_path / "train.pt", tmp_path / "val.pt"
    torch.save({"x": torch.rand(20, 5), "y": torch.arange(20)}, train)
    torch.save(torch.rand(6, 5).double(), val)
    dm = DATAMODULES.build("tensors", train=str(train), val=val, pixel_range=[0, 1])
    assert dm.data_shape == (5,)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32
    assert sorted(y.tolist()) == list(range(20))
    assert dm.split("val")[0].dtype == torch.float32


def test_tensors_pixel_range_names_the_file(tmp_path: Path) -> None:
    train, test = tmp_path / "train.pt", tmp_path / "test.pt"
    torch.save(torch.rand(20, 5), train)
    torch.save(torch.rand(4, 5) + 0.5, test)
    with pytest.raises(DataError, match=rf"^{test}: values must lie in the pixel range \[0, 1\]"):
        TensorDataModule(train=train, test=test, pixel_range=(0, 1))
    with pytest.raises(DataError, match=r"^tensor \(data\.train\): values must lie in .*\[0, 1\]"):
        TensorDataModule(train=torch.rand(20, 5) - 1, pixel_range=(0, 1))
    TensorDataModule(train=train, test=test)  # no range, no check


def test_tensors_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^data\.train: required"):
        TensorDataModule()
    with pytest.raises(DataError, match="no such file"):
        TensorDataModule(train=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="disagree on the item shape"):
        TensorDataModule(train=torch.rand(20, 5), val=torch.rand(4, 6))
    with pytest.raises(DataError, match="y must be integer labels of shape"):
        TensorDataModule(train=(torch.rand(20, 5), torch.zeros(19, dtype=torch.long)))
    with pytest.raises(ValueError, match="pixel_range"):
        TensorDataModule(train=torch.rand(20, 5), pixel_range=(1, 0))


# --------------------------------------------------------------------------------------------
# configs and Lightning


def test_configs_build_their_datamodules(
    small_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIT_VAE_DATA_DIR", str(small_mnist))
    names = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    assert names == sorted(DATAMODULES.names())
    expected = {
        "digits": DigitsDataModule,
        "mnist": MNISTDataModule,
        "ppca": PPCADataModule,
    }
    for name, cls in expected.items():
        config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
        assert config.name == name
        options: Any = OmegaConf.to_container(config, resolve=True)
        dm = DATAMODULES.from_config(
            options, "data", **({"val_size": 8} if name == "mnist" else {})
        )
        assert type(dm) is cls
    assert MNISTDataModule(**{"root": small_mnist, "binarize": "dynamic"}).binarize == "dynamic"
    mnist_config = OmegaConf.load(CONF_DIR / "mnist.yaml")
    assert mnist_config.binarize == "dynamic"
    tensors = OmegaConf.load(CONF_DIR / "tensors.yaml")
    assert OmegaConf.is_missing(tensors, "train")


@pytest.mark.parametrize("name", ["digits", "ppca"])
def test_fast_dev_run_consumes_the_loaders(name: str) -> None:
    dm = DATAMODULES.build(name, batch_size=32, eval_batch_size=50)
    model = Recorder()
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    ((_, _, x, y),) = model.train_batches
    assert x.shape == (32, *dm.data_shape)
    assert y.shape == (32,)
    assert [x.shape for _, x in model.val_batches] == [(50, *dm.data_shape)]
    assert [x.shape for x in model.test_batches] == [(50, *dm.data_shape)]


def test_lightning_distributed_sampler_injection(digits: DigitsDataModule) -> None:
    # what Lightning does to the loaders under a distributed strategy, without processes
    from pytorch_lightning.utilities.data import _is_dataloader_shuffled, _update_dataloader
    from torch.utils.data import DistributedSampler

    for split, loader in [("train", digits.train_dataloader()), ("val", digits.val_dataloader())]:
        shuffled = _is_dataloader_shuffled(loader)
        assert shuffled is (split == "train")
        parts = []
        for rank in range(2):
            sampler = DistributedSampler(
                loader.dataset, num_replicas=2, rank=rank, shuffle=shuffled, seed=0
            )
            injected = _update_dataloader(loader, sampler)
            assert injected.collate_fn is collate_as_is
            assert injected.batch_size == loader.batch_size
            parts.append(torch.cat([x for x, _ in injected]))
        assert parts[0].shape[0] == parts[1].shape[0]
        assert same_rows(torch.cat(parts), digits.split(split)[0])
