import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import Logger
from torch.distributions import MultivariateNormal

from lit_vae.callbacks import (
    KLPerDimPlot,
    LatentScatter,
    LatentTraversals,
    PosteriorCollapseMonitor,
    PosteriorCollapseWarning,
)
from lit_vae.data import DigitsDataModule
from lit_vae.diagnostics import (
    active_units,
    active_units_from_moments,
    is_collapsed,
    kl_per_dimension,
    latent_traversal,
    mean_kl_per_dimension,
    plot_kl_per_dim,
    plot_latent_scatter,
    posterior_means,
)
from lit_vae.distributions import DiagonalNormal, StandardNormal
from lit_vae.kl import kl_divergence, kl_per_dim
from lit_vae.module import LitVAE


def _standard(d: int) -> StandardNormal:
    return StandardNormal(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64))


def test_active_units_counts_dims_whose_mean_varies() -> None:
    generator = torch.Generator().manual_seed(0)
    std = torch.tensor([0.7, 0.05, 0.2])  # variances 0.49, 0.0025, 0.04 against 0.01
    means = torch.randn(20000, 3, generator=generator) * std + torch.tensor([5.0, -3.0, 0.0])
    assert active_units(means).tolist() == [True, False, True]
    assert active_units(means, threshold=0.1).tolist() == [True, False, False]
    moments = active_units_from_moments(
        torch.tensor([1.0, 2.0]), torch.tensor([1.5, 4.005]), threshold=0.01
    )
    assert moments.tolist() == [True, False]


def test_kl_per_dimension_diagonal_and_marginals() -> None:
    loc = torch.randn(5, 3, dtype=torch.float64)
    scale = torch.rand(5, 3, dtype=torch.float64) + 0.2
    q = DiagonalNormal(loc, scale)
    torch.testing.assert_close(kl_per_dimension(q, _standard(3)), kl_per_dim(q, _standard(3)))

    factor = torch.randn(5, 3, 3, dtype=torch.float64)
    covariance = factor @ factor.mT + 0.5 * torch.eye(3, dtype=torch.float64)
    full = MultivariateNormal(loc, covariance_matrix=covariance)
    marginal = kl_per_dimension(full, _standard(3))
    variance = covariance.diagonal(dim1=-2, dim2=-1)
    expected = 0.5 * (variance + loc.square() - 1.0 - variance.log())
    torch.testing.assert_close(marginal, expected)
    # Σ_j KL(q_j ‖ p_j) = KL(q ‖ p) − TC(q), TC(q) = ½(Σ log Σ_jj − log det Σ)
    total_correlation = 0.5 * (variance.log().sum(-1) - torch.logdet(covariance))
    torch.testing.assert_close(
        marginal.sum(-1), kl_divergence(full, _standard(3)) - total_correlation
    )


def test_kl_per_dimension_refuses_mixture_priors() -> None:
    model = LitVAE((4,), 2, prior={"name": "mixture"})
    with pytest.raises(ValueError, match="needs a factorized Gaussian prior"):
        kl_per_dimension(model.encode(torch.rand(3, 4)), model.prior())


def test_mean_kl_per_dimension_and_posterior_means() -> None:
    model = LitVAE((1, 4, 4), 3, encoder={"name": "mlp", "hidden_sizes": [8]})
    x = torch.rand(10, 1, 4, 4)
    y = torch.arange(10)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    with torch.no_grad():
        expected = kl_per_dim(model.encode(x), model.prior()).double().mean(0)
        means, labels = posterior_means(model, batches)
        torch.testing.assert_close(means, model.encode(x).mean)
    torch.testing.assert_close(mean_kl_per_dimension(model, batches), expected)
    assert labels is not None
    assert labels.tolist() == list(range(10))


def test_is_collapsed() -> None:
    assert is_collapsed(torch.tensor([0.001, 0.009]), 0.01)
    assert not is_collapsed(torch.tensor([0.001, 0.02]), 0.01)


def test_latent_traversal_decodes_each_axis() -> None:
    model = LitVAE((1, 4, 4), 2, decoder={"name": "mlp", "hidden_sizes": [8]})
    images = latent_traversal(model, num_steps=5, span=2.0)
    assert images.shape == (2, 5, 1, 4, 4)
    values = torch.linspace(-2.0, 2.0, 5)
    with torch.no_grad():
        for j in range(2):
            z = torch.zeros(5, 2)
            z[:, j] = values
            torch.testing.assert_close(images[j], torch.sigmoid(model.decoder(z)))
    with pytest.raises(ValueError, match="num_steps=1 must be >= 2"):
        latent_traversal(model, num_steps=1)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_plot_kl_per_dim_draws_one_bar_per_dim(tmp_path: Path) -> None:
    path = plot_kl_per_dim(torch.tensor([0.5, 2.0, 0.0, 1.0]), tmp_path / "kl.png", threshold=0.1)
    pixels = _png(path)
    assert pixels.shape == (300, 400, 3)  # 4 × 3 inches at 100 dpi
    blue = np.all(np.abs(pixels.astype(int) - [31, 119, 180]) < 8, axis=-1)  # tab:blue bars
    columns = blue.any(axis=0)
    bars = int(np.sum(columns[1:] & ~columns[:-1]))  # runs of blue columns
    assert bars == 3  # the zero bar has no height
    heights = [int(blue[:, c].sum()) for c in np.flatnonzero(columns)]
    assert max(heights) > 3 * min(heights)


def test_plot_latent_scatter(tmp_path: Path) -> None:
    z = torch.randn(200, 2)
    pixels = _png(plot_latent_scatter(z, tmp_path / "s.png", labels=torch.arange(200) % 10))
    assert pixels.shape == (450, 500, 3)
    assert (pixels.reshape(-1, 3) != 255).any(axis=-1).mean() > 0.02
    with pytest.raises(ValueError, match=r"needs z of shape \(n, 2\)"):
        plot_latent_scatter(torch.randn(5, 3), tmp_path / "bad.png")


class RecordingLogger(Logger):
    """A logger that keeps what it is given: images (file paths) and metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.images[key] = images[0]


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "max_epochs": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    settings.update(options)
    return pl.Trainer(**settings)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=256)


def _digits_model(latent_dim: int) -> LitVAE:
    return LitVAE(
        (1, 8, 8),
        latent_dim,
        encoder={"name": "mlp", "hidden_sizes": [32]},
        decoder={"name": "mlp", "hidden_sizes": [32]},
    )


def test_diagnostic_callbacks_write_pngs_and_log_them(
    tmp_path: Path, digits: DigitsDataModule
) -> None:
    logger = RecordingLogger()
    callbacks: list[pl.Callback] = [
        KLPerDimPlot(str(tmp_path)),
        LatentTraversals(str(tmp_path), num_steps=7, span=2.0),
        LatentScatter(str(tmp_path)),
    ]
    model = _digits_model(2)
    _trainer(tmp_path, callbacks, logger=logger).fit(model, datamodule=digits)
    # 8×8 images with 2 px padding, 7 columns × 2 rows, upscaled 4×
    assert _png(tmp_path / "latent_traversals.png").shape == ((2 * 10 + 2) * 4, (7 * 10 + 2) * 4, 3)
    assert _png(tmp_path / "kl_per_dim.png").shape == (300, 400, 3)
    assert _png(tmp_path / "latent_scatter.png").shape == (450, 500, 3)
    assert logger.images == {
        f"images/{name}": str(tmp_path / f"{name}.png")
        for name in ("kl_per_dim", "latent_traversals", "latent_scatter")
    }


def test_latent_scatter_only_for_two_dims(tmp_path: Path, digits: DigitsDataModule) -> None:
    _trainer(tmp_path, [LatentScatter(str(tmp_path))], logger=False, max_steps=1).fit(
        _digits_model(3), datamodule=digits
    )
    assert not (tmp_path / "latent_scatter.png").exists()


def _freeze_encoder(model: LitVAE, loc_gain: float) -> None:
    """Encoder output ``[loc_gain · W x, 0]``: q = N(loc_gain · W x, I) (σ = 1 from log_var 0)."""
    last = model.encoder.net[-1]  # type: ignore[index]
    d = model.latent_dim
    with torch.no_grad():
        last.weight[:d] *= loc_gain
        last.weight[d:] = 0.0
        last.bias.zero_()
    model.encoder.requires_grad_(False)


def _collapse_run(tmp_path: Path, digits: DigitsDataModule, loc_gain: float) -> pl.Trainer:
    model = _digits_model(2)
    _freeze_encoder(model, loc_gain)
    monitor = PosteriorCollapseMonitor(threshold=0.01, warmup_steps=2)
    trainer = _trainer(tmp_path, [monitor], logger=False, max_epochs=2)
    trainer.fit(model, datamodule=digits)
    return trainer


def test_collapse_warning_fires_on_a_collapsed_model(
    tmp_path: Path, digits: DigitsDataModule
) -> None:
    with pytest.warns(PosteriorCollapseWarning, match="posterior collapse at step") as record:
        trainer = _collapse_run(tmp_path, digits, loc_gain=0.0)  # q(z|x) = N(0, I) = p(z)
    collapse = [w for w in record if issubclass(w.category, PosteriorCollapseWarning)]
    assert len(collapse) == 1  # once per fit, though both epochs are collapsed
    assert "below 0.01 nats" in str(collapse[0].message)
    assert float(trainer.callback_metrics["diagnostics/posterior_collapse"]) == 1.0


def test_collapse_warning_stays_silent_on_a_healthy_model(
    tmp_path: Path, digits: DigitsDataModule
) -> None:
    trainer = _collapse_run(tmp_path, digits, loc_gain=20.0)  # warnings are errors here
    assert float(trainer.callback_metrics["diagnostics/posterior_collapse"]) == 0.0
    model: Any = trainer.lightning_module
    kl = mean_kl_per_dimension(model, digits.val_dataloader())
    assert bool((kl > 0.01).all())


def test_collapse_monitor_waits_for_warm_up(tmp_path: Path, digits: DigitsDataModule) -> None:
    model = _digits_model(2)
    _freeze_encoder(model, 0.0)
    monitor = PosteriorCollapseMonitor(threshold=0.01, warmup_steps=10**6)
    trainer = _trainer(tmp_path, [monitor], logger=False)
    trainer.fit(model, datamodule=digits)
    assert "diagnostics/posterior_collapse" not in trainer.callback_metrics
    assert not monitor.warned
    assert math.isfinite(float(trainer.callback_metrics["val/elbo"]))
