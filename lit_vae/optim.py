"""Optimizers and learning-rate schedules by name, for ``configure_optimizers``.

Configs: ``optimizer: {name: adam, lr: 1e-3, ...}`` (any keyword of the torch optimizer) and
``scheduler: null`` or ``{name: ..., interval: step|epoch, ...}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lit_vae.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "build_optimizer", "build_scheduler"]

OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULERS: Registry[Any] = Registry("scheduler")

for _name, _cls in {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,
}.items():
    OPTIMIZERS.register(_name)(_cls)

for _name, _scheduler in {
    "step": torch.optim.lr_scheduler.StepLR,
    "multistep": torch.optim.lr_scheduler.MultiStepLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
}.items():
    SCHEDULERS.register(_name)(_scheduler)


FUSED_DEVICES = ("cpu", "cuda")


def _fused_by_default(options: dict[str, Any], parameters: list[nn.Parameter]) -> None:
    """Adam and AdamW update every parameter in one fused kernel where torch has one.

    ``fused: null`` (the configs' default) picks it when every parameter is a floating-point
    tensor on a CPU or CUDA device; ``fused: false`` or a ``foreach`` choice keeps torch's own.
    torch's default on the CPU is a Python loop over the parameters, slower for the many small
    tensors of a VAE.
    """
    if options.get("name") not in ("adam", "adamw") or options.get("foreach") is not None:
        options.setdefault("fused", None)
        if options["fused"] is None:
            del options["fused"]
        return
    if options.get("fused") is None:
        options["fused"] = bool(parameters) and all(
            p.is_floating_point() and p.device.type in FUSED_DEVICES for p in parameters
        )


def build_optimizer(
    parameters: Iterable[nn.Parameter], config: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """``config = {"name": "adam", "lr": 1e-3, ...}`` → the optimizer over ``parameters``."""
    params = list(parameters)
    options = dict(config)
    _fused_by_default(options, params)
    lr = options.get("lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optimizer.lr={lr!r}: must be a number > 0")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    optimizer: torch.optim.Optimizer = OPTIMIZERS.from_config(options, "optimizer", params=params)
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``config = {"name": ..., "interval": "epoch", **options}`` → Lightning's scheduler dict."""
    if not config:
        return None
    options = dict(config)
    interval = options.pop("interval", "epoch")
    if interval not in ("step", "epoch"):
        raise ValueError(f"scheduler.interval={interval!r}: allowed: step, epoch")
    scheduler = SCHEDULERS.from_config(options, "scheduler", optimizer=optimizer)
    return {"scheduler": scheduler, "interval": interval, "frequency": 1}
