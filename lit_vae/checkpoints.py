"""Checkpoints written atomically and loaded safely.

Writing: :class:`AtomicCheckpointIO`, the trainer's checkpoint plugin, writes every checkpoint
(Lightning's ``ModelCheckpoint``, ``trainer.save_checkpoint``, the preemption save) to a temporary
file in the same directory, flushes it to disk and renames it over the target with
``os.replace``: a crash at any moment leaves the old file or the new one, never half a file.

Loading: ``torch.load(weights_only=True)``, never arbitrary pickles. Everything lit-vae puts in a
checkpoint is tensors and plain containers, so its own checkpoints always load this way.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_vae.module import LitVAE

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "UnsafeCheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not written by lit-vae."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds objects that only a full pickle load could rebuild."""


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save(checkpoint, path)`` through a temporary file and ``os.replace``.

    The temporary file ``.<name>.tmp-<pid>`` lives next to ``path`` (same file system, so the
    rename is atomic), is fsynced before the rename, and is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as stream:
            torch.save(checkpoint, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover - file systems that refuse directory fsync
        pass
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for local paths (remote
    ``scheme://`` paths keep Lightning's own writer)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def _pickled_global(err: Exception) -> str | None:
    """The ``module.name`` a refused ``weights_only`` load stopped at, if torch names one."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
    return found.group(1) if found else None


def _weights_only_reason(err: Exception) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(err), re.DOTALL)
    return " ".join(found.group(1).split()) if found else type(err).__name__


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's dict, loaded with ``weights_only=True`` on the CPU.

    Args:
        mmap: map the tensors' storage instead of reading it (cheap: to check that a file
            loads before handing it to Lightning).

    Raises:
        CheckpointError: no file at ``path``, or not a torch checkpoint.
        UnsafeCheckpointError: the file needs pickle to load (code could run on load).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    try:
        checkpoint: Any = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        pickled = _pickled_global(err)
        if pickled is None and not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"ckpt_path={str(path)!r}: not a readable torch checkpoint "
                f"({_weights_only_reason(err)})"
            ) from None
        reason = (
            f"it holds a pickled {pickled} object"
            if pickled
            else f"it holds objects that need pickle ({_weights_only_reason(err)})"
        )
        raise UnsafeCheckpointError(
            f"ckpt_path={str(path)!r} cannot be loaded with torch.load(weights_only=True): "
            f"{reason}. lit-vae does not unpickle checkpoints; re-save it from trusted code "
            "with plain containers and tensors only"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(
            f"ckpt_path={str(path)!r}: not a readable torch checkpoint ({reason})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"ckpt_path={str(path)!r}: holds a {type(checkpoint).__name__}, not a checkpoint dict"
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> LitVAE:
    """Rebuild :class:`LitVAE` from a loaded checkpoint's hyperparameters and weights."""
    for key in ("hyper_parameters", "state_dict"):
        if key not in checkpoint:
            raise CheckpointError(f"the checkpoint has no {key!r}; it was not written by LitVAE")
    model = LitVAE(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LitVAE:
    """:func:`load_checkpoint` then :func:`model_from_checkpoint`, on ``map_location``."""
    return model_from_checkpoint(load_checkpoint(path)).to(map_location)
