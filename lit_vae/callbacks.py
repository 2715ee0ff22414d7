"""Optional callbacks: things a run can do without, switched on by the ``callbacks`` config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lit_vae.diagnostics import (
    is_collapsed,
    kl_per_dimension,
    latent_traversal,
    mean_kl_per_dimension,
    plot_kl_per_dim,
    plot_latent_scatter,
    posterior_means,
)
from lit_vae.images import save_grid
from lit_vae.kl import kl_divergence

__all__ = [
    "ImageGrids",
    "KLPerDimPlot",
    "LatentScatter",
    "LatentTraversals",
    "PosteriorCollapseMonitor",
    "PosteriorCollapseWarning",
]


class ImageGrids(pl.Callback):
    """Writes ``samples.png`` (decoded prior samples) and ``reconstructions.png`` (validation
    inputs above their reconstructions) into the run dir when fitting ends, and hands the same
    images to every logger that takes images (W&B, TensorBoard).

    Args:
        output_dir: where the PNGs go; the trainer's ``default_root_dir`` when ``None``.
        num_samples: prior samples in the grid.
        num_reconstructions: inputs shown with their reconstructions.
        scale: pixel upscaling of the saved PNG (8×8 digits are tiny).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        num_samples: int = 64,
        num_reconstructions: int = 16,
        scale: int = 4,
    ) -> None:
        for key, value in (
            ("num_samples", num_samples),
            ("num_reconstructions", num_reconstructions),
            ("scale", scale),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.image_grids.{key}={value!r}: must be an integer >= 1")
        self.output_dir = output_dir
        self.num_samples = num_samples
        self.num_reconstructions = num_reconstructions
        self.scale = scale

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        output_dir = Path(self.output_dir or trainer.default_root_dir)
        images: dict[str, torch.Tensor] = {}
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            samples = pl_module.sample(self.num_samples)  # type: ignore[operator]
            images["samples"] = samples
            inputs = self._inputs(trainer, pl_module)
            if inputs is not None:
                reconstructions = pl_module.reconstruct(inputs)  # type: ignore[operator]
                images["reconstructions"] = torch.cat([inputs, reconstructions])
        pl_module.train(was_training)
        for name, batch in images.items():
            if batch.dim() < 3 and not _square(batch.shape[-1]):
                continue
            nrow = self.num_reconstructions if name == "reconstructions" else None
            path = save_grid(batch, output_dir / f"{name}.png", nrow=nrow, scale=self.scale)
            _log_image(trainer, name, path)

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        datamodule: Any = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return None
        x = next(iter(datamodule.val_dataloader()))[0][: self.num_reconstructions]
        return x.to(device=pl_module.device, dtype=pl_module.dtype)


def _square(size: int) -> bool:
    return math.isqrt(size) ** 2 == size


def _log_image(trainer: pl.Trainer, name: str, path: Path) -> None:
    """Send ``path`` to every logger with a ``log_image`` method (W&B's takes file paths)."""
    for logger in trainer.loggers:
        log_image = getattr(logger, "log_image", None)
        if callable(log_image):
            log_image(key=f"images/{name}", images=[str(path)], step=trainer.global_step)


def _output_dir(output_dir: str | None, trainer: pl.Trainer) -> Path:
    return Path(output_dir or trainer.default_root_dir)


def _val_batches(trainer: pl.Trainer, max_batches: int | None) -> list[Any]:
    datamodule: Any = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return []
    batches = []
    for index, batch in enumerate(datamodule.val_dataloader()):
        if max_batches is not None and index >= max_batches:
            break
        batches.append(batch)
    return batches


class _FitEndPlot(pl.Callback):
    """Runs :meth:`plot` once when fitting ends, on rank 0, with the model in eval mode."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                path = self.plot(trainer, pl_module, _output_dir(self.output_dir, trainer))
        finally:
            pl_module.train(was_training)
        if path is not None:
            _log_image(trainer, path.stem, path)

    def plot(self, trainer: pl.Trainer, pl_module: Any, output_dir: Path) -> Path | None:
        raise NotImplementedError


class KLPerDimPlot(_FitEndPlot):
    """Writes ``kl_per_dim.png``: the mean KL of each latent dim over the validation split (the
    marginals' KL for full-covariance heads, see :func:`~lit_vae.diagnostics.kl_per_dimension`)
    as a bar chart. Skipped for priors that do not factorize.

    Args:
        output_dir: where the PNG goes; the trainer's ``default_root_dir`` when ``None``.
        threshold: a dashed line at this KL (nats), the collapse threshold.
        max_batches: validation batches to average over (all when ``None``).
    """

    def __init__(
        self, output_dir: str | None = None, threshold: float = 0.01, max_batches: int | None = None
    ) -> None:
        super().__init__(output_dir)
        self.threshold = threshold
        self.max_batches = max_batches

    def plot(self, trainer: pl.Trainer, pl_module: Any, output_dir: Path) -> Path | None:
        batches = _val_batches(trainer, self.max_batches)
        if not batches or not pl_module.prior.factorized:
            rank_zero_info("KLPerDimPlot: no validation data or a non-factorized prior; skipped")
            return None
        kl = mean_kl_per_dimension(pl_module, batches)
        return plot_kl_per_dim(kl, output_dir / "kl_per_dim.png", threshold=self.threshold)


class LatentTraversals(_FitEndPlot):
    """Writes ``latent_traversals.png``: one row per latent dim ``j``, the decoded means of
    ``z = v·e_j`` for ``v`` from ``−span`` to ``span`` (the prior mean is the middle column).
    Skipped for data that are not images (flat data of non-square size).

    Args:
        output_dir: where the PNG goes; the trainer's ``default_root_dir`` when ``None``.
        num_steps: columns (values of ``v``).
        span: the largest ``|v|``.
        max_dims: rows at most (the first latent dims).
        scale: pixel upscaling of the saved PNG.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        num_steps: int = 9,
        span: float = 3.0,
        max_dims: int = 16,
        scale: int = 4,
    ) -> None:
        super().__init__(output_dir)
        self.num_steps = num_steps
        self.span = span
        self.max_dims = max_dims
        self.scale = scale

    def plot(self, trainer: pl.Trainer, pl_module: Any, output_dir: Path) -> Path | None:
        dims = range(min(self.max_dims, pl_module.latent_dim))
        images = latent_traversal(pl_module, self.num_steps, self.span, dims)
        images = images.flatten(0, 1)
        if images.dim() < 3 and not _square(images.shape[-1]):
            return None
        return save_grid(
            images, output_dir / "latent_traversals.png", nrow=self.num_steps, scale=self.scale
        )


class LatentScatter(_FitEndPlot):
    """Writes ``latent_scatter.png`` for a 2-D latent space: the posterior means ``E_q[z|x]``
    of validation inputs coloured by their labels. Does nothing when ``latent_dim != 2``.

    Args:
        output_dir: where the PNG goes; the trainer's ``default_root_dir`` when ``None``.
        max_points: inputs shown at most.
    """

    def __init__(self, output_dir: str | None = None, max_points: int = 2000) -> None:
        super().__init__(output_dir)
        self.max_points = max_points

    def plot(self, trainer: pl.Trainer, pl_module: Any, output_dir: Path) -> Path | None:
        if pl_module.latent_dim != 2:
            return None
        batches = _val_batches(trainer, None)
        if not batches:
            return None
        means, labels = posterior_means(pl_module, batches)
        means = means[: self.max_points]
        labels = None if labels is None else labels[: self.max_points]
        return plot_latent_scatter(means, output_dir / "latent_scatter.png", labels)


class PosteriorCollapseWarning(UserWarning):
    """Every latent dim's KL is below the collapse threshold: the decoder ignores ``z``."""


class PosteriorCollapseMonitor(pl.Callback):
    """Checks for posterior collapse after each validation epoch once ``warmup_steps`` have run.

    The model has collapsed when every latent dim's KL, averaged over the validation split
    (summed across ranks), is below ``threshold`` nats. For priors that do not factorize the
    total KL is compared with ``threshold · latent_dim``. A check logs
    ``diagnostics/posterior_collapse`` (1.0 collapsed, 0.0 not); the first collapse of a fit
    also raises a :class:`PosteriorCollapseWarning` through ``rank_zero_warn``.

    Args:
        threshold: nats per latent dim (≥ 0).
        warmup_steps: no check before this ``global_step`` (KL annealing starts near 0).
    """

    def __init__(self, threshold: float = 0.01, warmup_steps: int = 1000) -> None:
        if not threshold >= 0:
            raise ValueError(f"callbacks.posterior_collapse.threshold={threshold!r}: must be >= 0")
        if warmup_steps < 0:
            raise ValueError(
                f"callbacks.posterior_collapse.warmup_steps={warmup_steps!r}: must be >= 0"
            )
        self.threshold = float(threshold)
        self.warmup_steps = int(warmup_steps)
        self.warned = False
        self._total: torch.Tensor | None = None
        self._count = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warned = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total, self._count = None, 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or trainer.global_step < self.warmup_steps:
            return
        model: Any = pl_module
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        q, p = model.encode(x), model.prior()
        if model.prior.factorized:
            per_dim = kl_per_dimension(q, p)
        else:
            per_dim = kl_divergence(q, p, num_samples=1).unsqueeze(-1) / model.latent_dim
        total = per_dim.detach().to(torch.float64).sum(0)
        self._total = total if self._total is None else self._total + total
        self._count += x.shape[0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._total is None:
            return
        count = torch.tensor(float(self._count), dtype=torch.float64, device=self._total.device)
        total = trainer.strategy.reduce(self._total, reduce_op="sum")
        count = trainer.strategy.reduce(count, reduce_op="sum")
        kl = total / count
        collapsed = is_collapsed(kl, self.threshold)
        pl_module.log("diagnostics/posterior_collapse", float(collapsed), sync_dist=True)
        if collapsed and not self.warned:
            self.warned = True
            rank_zero_warn(
                f"posterior collapse at step {trainer.global_step}: the KL of every latent dim is "
                f"below {self.threshold:g} nats (largest {float(kl.max()):.3g}); the decoder "
                "ignores z. Try KL annealing (regularizer/schedule=linear or cyclical), "
                "regularizer=free_bits, or a weaker decoder.",
                category=PosteriorCollapseWarning,
            )
