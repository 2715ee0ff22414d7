"""Image grids without torchvision: tensors ``(n, C, H, W)`` in [0, 1] → one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["make_grid", "save_grid"]


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """``(n, C, H, W)`` or ``(n, H, W)`` values in [0, 1] → ``(rows·H', cols·W', 3)`` uint8.

    Flat samples ``(n, D)`` with ``D`` a square number are shown as ``√D × √D`` images.
    """
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    if images.dim() == 2:
        side = math.isqrt(images.shape[1])
        if side * side != images.shape[1]:
            raise ValueError(f"cannot show flat samples of size {images.shape[1]} as images")
        images = images.reshape(-1, 1, side, side)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, channels, height, width = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(
        channels, rows * (height + padding) + padding, cols * (width + padding) + padding
    )
    for index in range(n):
        r, c = divmod(index, cols)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG, upscaled ``scale`` times; return its path."""
    from PIL import Image

    array = make_grid(images, nrow)
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
