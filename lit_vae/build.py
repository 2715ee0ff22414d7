"""Configs → objects: the one place that reads Hydra configs; the rest takes plain values."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from lit_vae.data import DATAMODULES
from lit_vae.distributed import use_hydra_job_launcher
from lit_vae.module import LitVAE
from lit_vae.resume import LastCheckpoint

log = logging.getLogger(__name__)

__all__ = [
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_model",
    "build_trainer",
    "quiet_lightning_advice",
]


def quiet_lightning_advice() -> None:
    """Silence Lightning's advice that does not apply to lit-vae's in-memory datasets, and a
    deprecation inside pytorch-lightning that users cannot act on."""
    for message, category in (
        (r".*does not have many workers", UserWarning),
        (r".*smaller than the logging interval", UserWarning),
        (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
        (r"`training_step` returned `None`", UserWarning),  # nan_policy=skip, on purpose
    ):
        warnings.filterwarnings("ignore", message=message, category=category)


def _container(config: Any) -> Any:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def build_datamodule(config: DictConfig | Mapping[str, Any]) -> pl.LightningDataModule:
    """``cfg.data`` (``name:`` or ``_target_:`` plus options) → a LightningDataModule.

    The config is stored as the datamodule's hyperparameters, so every checkpoint records the
    data it was trained on and ``lit-vae-eval`` can rebuild it.
    """
    plain = _container(config)
    datamodule: pl.LightningDataModule = DATAMODULES.from_config(plain, "data")
    datamodule.save_hyperparameters(plain)
    return datamodule


def build_model(cfg: DictConfig, data_shape: tuple[int, ...]) -> LitVAE:
    """The whole training config → :class:`LitVAE` for data of shape ``data_shape``."""
    return LitVAE(
        data_shape=data_shape,
        latent_dim=cfg.latent_dim,
        encoder=_container(cfg.model.encoder),
        decoder=_container(cfg.model.decoder),
        posterior=_container(cfg.posterior),
        prior=_container(cfg.prior),
        likelihood=_container(cfg.likelihood),
        regularizer=_container(cfg.regularizer),
        objective=_container(cfg.get("objective")),
        optimizer=_container(cfg.optimizer),
        scheduler=_container(cfg.get("scheduler")),
        eval_num_samples=cfg.eval.num_samples,
        eval_chunk_size=cfg.eval.get("chunk_size"),
        init_output_bias=cfg.get("init_output_bias", True),
        reparam_noise=cfg.get("reparam_noise", "torch"),
        noise_seed=cfg.seed,
        nan_policy=cfg.get("nan_policy", "raise"),
    )


def _instantiate_each(group: DictConfig | None, kind: str) -> list[Any]:
    objects: list[Any] = []
    if not group:
        return objects
    for key, entry in group.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{kind}.{key!s} needs a _target_ (got {entry!r})")
        log.debug("instantiating %s.%s", kind, key)
        objects.append(hydra.utils.instantiate(entry))
    return objects


def build_callbacks(config: DictConfig | None) -> list[pl.Callback]:
    """``cfg.callbacks``: a mapping of name → ``{_target_: ..., ...}``; ``null`` entries skipped.

    ``LastCheckpoint`` goes last, after the ``ModelCheckpoint`` callbacks, so the state it saves
    includes theirs (:class:`~lit_vae.resume.LastCheckpoint`)."""
    callbacks = _instantiate_each(config, "callbacks")
    return sorted(callbacks, key=lambda callback: isinstance(callback, LastCheckpoint))


def build_loggers(config: DictConfig | None) -> list[Any]:
    """``cfg.logger``: a mapping of name → ``{_target_: ..., ...}``; ``null`` entries skipped."""
    return _instantiate_each(config, "logger")


def build_trainer(
    config: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]
) -> pl.Trainer:
    """``cfg.trainer`` (``_target_: pytorch_lightning.Trainer`` plus options) → a Trainer whose
    DDP child processes re-run the current Hydra job (:mod:`lit_vae.distributed`)."""
    trainer: pl.Trainer = hydra.utils.instantiate(
        config, callbacks=callbacks, logger=loggers or False
    )
    return use_hydra_job_launcher(trainer)
