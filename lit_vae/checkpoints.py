"""Loading checkpoints safely: ``torch.load(weights_only=True)``, never arbitrary pickles."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lit_vae.module import LitVAE

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "load_model", "model_from_checkpoint"]


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds objects that only a full pickle load could rebuild."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded with ``weights_only=True`` on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs pickle to load (code could run on load).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"ckpt_path={str(path)!r} cannot be loaded with torch.load(weights_only=True): "
            f"it holds objects that need pickle ({first_line}). lit-vae does not unpickle "
            "checkpoints; re-save it from trusted code with plain containers and tensors only"
        ) from None
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> LitVAE:
    """Rebuild :class:`LitVAE` from a loaded checkpoint's hyperparameters and weights."""
    model = LitVAE(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LitVAE:
    """:func:`load_checkpoint` then :func:`model_from_checkpoint`, on ``map_location``."""
    return model_from_checkpoint(load_checkpoint(path)).to(map_location)
