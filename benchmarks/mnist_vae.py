"""The MNIST model and data the memory and scaling benchmarks share.

The loader options (``batch_size``, ``eval_batch_size``, ``binarize``, ...) are read from
``lit_vae/conf/data/mnist.yaml``, so the benchmarks use the batches ``lit-vae-train
experiment=mnist_mlp`` would use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import lit_vae
from lit_vae.data import MNISTDataModule
from lit_vae.module import LitVAE

__all__ = ["DEFAULT_DATA_ROOT", "mlp_vae", "mnist_datamodule", "mnist_options"]

DEFAULT_DATA_ROOT = os.environ.get("LIT_VAE_DATA_DIR", "data/mnist")
_MNIST_YAML = Path(lit_vae.__file__).parent / "conf" / "data" / "mnist.yaml"


def mnist_options() -> dict[str, Any]:
    """``conf/data/mnist.yaml`` as plain values, without ``name`` and ``root``."""
    options: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(_MNIST_YAML))  # type: ignore[assignment]
    options.pop("name")
    options.pop("root")
    return options


def mnist_datamodule(root: str | os.PathLike[str], **overrides: Any) -> MNISTDataModule:
    """``MNISTDataModule`` with the options of ``conf/data/mnist.yaml`` and ``overrides``."""
    return MNISTDataModule(root=root, **{**mnist_options(), **overrides})


def mlp_vae(hidden_sizes: Sequence[int], latent_dim: int, **options: Any) -> LitVAE:
    """The ``model=mlp`` VAE on ``(1, 28, 28)``: encoder ``784-hidden-latent``, decoder the mirror
    image, ``log_var`` posterior, standard normal prior, Bernoulli likelihood, KL, Adam 1e-3."""
    hidden = [int(h) for h in hidden_sizes]
    return LitVAE(
        data_shape=(1, 28, 28),
        latent_dim=latent_dim,
        encoder={"name": "mlp", "hidden_sizes": hidden, "activation": "relu"},
        decoder={"name": "mlp", "hidden_sizes": hidden[::-1], "activation": "relu"},
        **options,
    )
