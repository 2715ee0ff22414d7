"""Optional callbacks: things a run can do without, switched on by the ``callbacks`` config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_vae.images import save_grid

__all__ = ["ImageGrids"]


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
        return x.to(pl_module.device)


def _square(size: int) -> bool:
    return math.isqrt(size) ** 2 == size


def _log_image(trainer: pl.Trainer, name: str, path: Path) -> None:
    """Send ``path`` to every logger with a ``log_image`` method (W&B's takes file paths)."""
    for logger in trainer.loggers:
        log_image = getattr(logger, "log_image", None)
        if callable(log_image):
            log_image(key=f"images/{name}", images=[str(path)], step=trainer.global_step)
