"""Optimizers and learning-rate schedules by name, for ``configure_optimizers``.

Configs: ``optimizer: {name: adam, lr: 1e-3, ...}`` (any keyword of the torch optimizer) and
``scheduler: null`` or ``{name: ..., interval: step|epoch, ...}``.

Besides torch's schedulers, ``iwae`` is the staged schedule of Burda et al. (2016): stage
``i = 0 .. 7`` lasts ``3^i`` epochs at ``lr · 10^(−i/7)`` (:class:`IWAEStagesLR`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lit_vae.registry import Registry

__all__ = [
    "IWAE_DECAY_PER_STAGE",
    "OPTIMIZERS",
    "SCHEDULERS",
    "IWAEStagesLR",
    "build_optimizer",
    "build_scheduler",
    "iwae_stage_epochs",
]

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

IWAE_DECAY_PER_STAGE = 10.0 ** (-1.0 / 7.0)
"""The IWAE paper's learning-rate factor from one stage to the next, ``10^(−1/7)``."""


def _fail(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"scheduler.{key}={value!r}: {allowed}")


def iwae_stage_epochs(num_stages: int = 8, base: float = 3, budget: float = 1.0) -> list[int]:
    """Epochs of each stage of the ``iwae`` schedule: stage ``i`` lasts
    ``max(1, ceil(budget · base^i))`` epochs.

    ``budget`` shrinks (or stretches) every stage by the same fraction; a stage never drops
    below one epoch, so every learning rate of the schedule is used and a small budget trains
    for a little more than ``budget`` of the full schedule: ``budget=1`` gives ``1, 3, 9, ...,
    2187`` (3280 epochs), ``budget=0.1`` gives ``1, 1, 1, 3, 9, 25, 73, 219`` (332 epochs).

    Raises:
        ValueError: a value out of range; the message names the ``scheduler`` key.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise _fail("num_stages", num_stages, "must be an integer >= 1")
    if not _finite_number(base) or base < 1:
        raise _fail("base", base, "must be a finite number >= 1 (stage i lasts base^i epochs)")
    if not _finite_number(budget) or budget <= 0:
        raise _fail("budget", budget, "must be a finite number > 0 (1 is the whole schedule)")
    # rounded first, so that 0.1 · 30 = 3.0000000000000004 lasts 3 epochs, not 4
    return [max(1, math.ceil(round(budget * base**i, 9))) for i in range(num_stages)]


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _StageFactor:
    """``epoch → decay^stage``; a plain object, so the scheduler's state dict stores its
    (weights-only loadable) attributes."""

    def __init__(self, stage_ends: list[int], decay_per_stage: float) -> None:
        self.stage_ends = stage_ends
        self.decay_per_stage = decay_per_stage

    def __call__(self, epoch: int) -> float:
        stage = sum(1 for end in self.stage_ends[:-1] if epoch >= end)
        return float(self.decay_per_stage**stage)


@SCHEDULERS.register("iwae")
class IWAEStagesLR(torch.optim.lr_scheduler.LambdaLR):
    """The learning-rate schedule of Burda et al. (2016): stage ``i`` (``0 .. num_stages − 1``)
    lasts ``base^i`` epochs at ``lr · decay_per_stage^i``; after the last stage the rate stays
    at the last stage's. Stepped once per epoch (``interval: epoch``).

    Args:
        optimizer: the optimizer whose learning rates it scales.
        num_stages: number of stages (8 in the paper).
        base: stage ``i`` lasts ``base^i`` epochs before ``budget`` (3 in the paper).
        decay_per_stage: the factor from one stage to the next, in ``(0, 1]`` (``10^(−1/7)``).
        budget: the fraction of every stage's length to train: stage ``i`` lasts
            ``max(1, ceil(budget · base^i))`` epochs (:func:`iwae_stage_epochs`).
        last_epoch: torch's resume index; Lightning restores the state dict instead.

    Raises:
        ValueError: a value out of range; the message names the ``scheduler`` key.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_stages: int = 8,
        base: float = 3,
        decay_per_stage: float = IWAE_DECAY_PER_STAGE,
        budget: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if not _finite_number(decay_per_stage) or not 0 < decay_per_stage <= 1:
            raise _fail("decay_per_stage", decay_per_stage, "must be a number in (0, 1]")
        self.stage_epochs = iwae_stage_epochs(num_stages, base, budget)
        stage_ends = list(itertools.accumulate(self.stage_epochs))
        super().__init__(optimizer, _StageFactor(stage_ends, decay_per_stage), last_epoch)

    required_interval = "epoch"
    """``build_scheduler`` refuses ``interval: step``: the stages are counted in epochs."""

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole schedule (3280 for the paper's)."""
        return sum(self.stage_epochs)


FUSED_DEVICES = ("cpu", "cuda")


def _fused_by_default(options: dict[str, Any], parameters: list[nn.Parameter]) -> None:
    """Adam and AdamW update every parameter in one fused kernel where torch has one.

    ``fused: null`` (the configs' default) picks it when every parameter is a floating-point
    tensor on a CPU or CUDA device; ``fused: false`` or a ``foreach`` choice keeps torch's own.
    torch's default on the CPU is a Python loop over the parameters, slower for the many small
    tensors of a VAE.
    """
    if options.get("fused") is not None:
        return
    if options.get("name") not in ("adam", "adamw") or options.get("foreach") is not None:
        options.pop("fused", None)  # torch's own choice
        return
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
    name = str(options.get("name"))
    entry = SCHEDULERS.get(name) if name in SCHEDULERS else None
    required = getattr(entry, "required_interval", None)
    if required is not None and interval != required:
        raise ValueError(
            f"scheduler.interval={interval!r}: scheduler {name!r} counts {required}s; "
            f"allowed: {required}"
        )
    scheduler = SCHEDULERS.from_config(options, "scheduler", optimizer=optimizer)
    return {"scheduler": scheduler, "interval": interval, "frequency": 1}
