"""Training metrics and the optimizer's update: exact epoch means, step values only on the steps
the loggers write, and fused Adam giving the same updates as torch's default."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lit_vae.data import TensorDataModule
from lit_vae.metrics import EpochSums
from lit_vae.module import LitVAE
from lit_vae.optim import build_optimizer
from tests.helpers import quiet_trainer


def test_epoch_sums_mean_over_samples_of_the_global_batches() -> None:
    sums = EpochSums()
    sums.reset(epoch=3)
    values = torch.arange(10.0).reshape(5, 2)
    sums.add(values[:3].sum(0), 3)
    sums.add(values[3:].sum(0), 2)
    torch.testing.assert_close(sums.means(lambda t: t), values.double().mean(0))
    # two processes, each holding half of every global batch: the counts are global already
    halves = EpochSums()
    halves.add(values[:2].sum(0), 4)
    torch.testing.assert_close(
        halves.means(lambda t: t + values[2:4].sum(0)), values[:4].double().mean(0)
    )
    state = sums.state_dict()
    restored = EpochSums()
    restored.load_state_dict(state, torch.device("cpu"))
    assert restored.epoch == 3
    assert restored.count == 5
    assert EpochSums().means(lambda t: t) is None


class _BatchLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append((float(outputs["loss"]), batch[0].shape[0]))


def _rows(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_train_logs_epoch_means_and_steps_every_n(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = (torch.rand(70, 16) > 0.5).float()
    datamodule = TensorDataModule(train=x, val=x[:10], batch_size=16)  # 4 full batches + 6
    model = LitVAE((16,), 2, encoder={"name": "mlp", "hidden_sizes": [8]}, init_output_bias=False)
    record = _BatchLosses()
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(
        max_epochs=2,
        log_every_n_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[record],
    )
    trainer.fit(model, datamodule=datamodule)
    rows = _rows(tmp_path)
    step_rows = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert step_rows == [1, 3, 5, 7, 9]  # every second of the 10 steps
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 2
    for epoch, logged in enumerate(epoch_losses):
        batches = record.losses[5 * epoch : 5 * (epoch + 1)]
        expected = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
        assert logged == pytest.approx(expected, rel=1e-6)
    elbo = [float(r["train/elbo_epoch"]) for r in rows if r.get("train/elbo_epoch")]
    assert elbo == pytest.approx([-v for v in epoch_losses], rel=1e-6)  # β = 1: loss = −ELBO


def _adam_updates(fused: bool | None, steps: int = 5) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(7, 3))
    optimizer = build_optimizer([weight], {"name": "adam", "lr": 1e-2, "fused": fused})
    for _ in range(steps):
        optimizer.zero_grad()
        (weight.sin().square().sum()).backward()
        optimizer.step()
    return optimizer, weight.detach()


def test_adam_is_fused_by_default_on_the_cpu_with_the_same_updates() -> None:
    default, fused_weight = _adam_updates(None)
    assert default.defaults["fused"] is True
    plain, plain_weight = _adam_updates(False)
    assert not plain.defaults["fused"]
    torch.testing.assert_close(fused_weight, plain_weight, rtol=1e-6, atol=1e-7)
    loop = build_optimizer([torch.nn.Parameter(torch.ones(2))], {"name": "adam", "foreach": False})
    assert not loop.defaults.get("fused")
    sgd = build_optimizer([torch.nn.Parameter(torch.ones(2))], {"name": "sgd", "lr": 0.1})
    assert not sgd.defaults.get("fused")
