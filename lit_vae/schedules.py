"""Schedules: a value as a pure function of the training step, e.g. the β of ``β·KL``.

A schedule is built with its target ``value`` (the β a regularizer asks for) and called as
``schedule(step) -> float`` with ``step = trainer.global_step``. It keeps no state, so a run
resumed from a checkpoint continues with exactly the values of an uninterrupted one.

============  ====================================================================================
name          ``value(t)`` at step ``t`` (``β`` = the target value, ``β₀`` = ``start``)
============  ====================================================================================
``constant``  ``β``
``linear``    ``β₀ + (β − β₀) · min(1, t / steps)``
``cyclical``  Fu et al. (2019): ``cycles`` ramps over ``total_steps``; in each cycle of
              ``P = ⌈total_steps / cycles⌉`` steps, ``τ = (t mod P) / (total_steps / cycles)``
              and ``β₀ + (β − β₀) · min(1, τ / ratio)``; ``β`` from ``total_steps`` on
``sigmoid``   ``β₀ + (β − β₀) · σ(rate · (t − midpoint))``, the logistic annealing of Bowman et
              al. (2016); halfway at ``midpoint``
============  ====================================================================================

``SCHEDULES`` holds them by name; their configs live in ``conf/regularizer/schedule/``::

    regularizer:
      name: kl
      beta: 1.0
      schedule: {name: cyclical, total_steps: 10000, cycles: 4, ratio: 0.5}
"""

from __future__ import annotations

import math
from typing import Any

from lit_vae.registry import Registry

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CyclicalSchedule",
    "LinearSchedule",
    "Schedule",
    "SigmoidSchedule",
    "build_schedule",
]

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


def _number(key: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number, optionally ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}={value!r}: must be a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{key}={value!r}: must be {'>' if strict else '>='} {minimum:g}")
    return float(value)


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


def _step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be an integer >= 0 (trainer.global_step)")
    return step


class Schedule:
    """Base class: ``schedule(step) -> float``, a pure function of ``step``.

    Args:
        value: the target value (β ≥ 0); a regularizer passes its ``beta``.
        config_key: where the schedule sits in the config, for error messages.
    """

    def __init__(self, value: float, config_key: str = "schedule") -> None:
        self.config_key = config_key
        self.value = _number(f"{config_key}.value", value, minimum=0.0)

    def __call__(self, step: int) -> float:
        return self.at(_step(step))

    def at(self, step: int) -> float:
        """The value at ``step`` (``>= 0``)."""
        raise NotImplementedError

    def is_constant(self) -> bool:
        """Whether the value is the same at every step."""
        return False

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "config_key")
        return f"{type(self).__name__}({options})"


@SCHEDULES.register("constant")
class ConstantSchedule(Schedule):
    """``β`` at every step."""

    def at(self, step: int) -> float:
        return self.value

    def is_constant(self) -> bool:
        return True


class _RampSchedule(Schedule):
    """Schedules that move from ``start`` (β₀ ≥ 0) to ``value`` (β)."""

    def __init__(self, value: float, start: float = 0.0, config_key: str = "schedule") -> None:
        super().__init__(value, config_key)
        self.start = _number(f"{config_key}.start", start, minimum=0.0)

    def _between(self, fraction: float) -> float:
        return self.start + (self.value - self.start) * fraction

    def is_constant(self) -> bool:
        return self.start == self.value


@SCHEDULES.register("linear")
class LinearSchedule(_RampSchedule):
    """Linear warm-up: ``β₀ + (β − β₀) · min(1, t / steps)``.

    Args:
        start: ``β₀``, the value at step 0 (≥ 0).
        steps: warm-up length ``N`` in steps (≥ 1); ``β`` from step ``N`` on.
    """

    def __init__(
        self, value: float, start: float = 0.0, steps: int = 10000, config_key: str = "schedule"
    ) -> None:
        super().__init__(value, start, config_key)
        self.steps = _integer(f"{config_key}.steps", steps, 1)

    def at(self, step: int) -> float:
        return self._between(min(1.0, step / self.steps))


@SCHEDULES.register("cyclical")
class CyclicalSchedule(_RampSchedule):
    """Cyclical annealing (Fu et al., 2019), ``M = cycles`` cycles over ``T = total_steps``.

    With period ``P = ⌈T / M⌉`` steps and ``τ = (t mod P) / (T / M)`` (the paper's
    ``τ = mod(t − 1, ⌈T/M⌉) / (T/M)`` with steps counted from 0), the value is
    ``β₀ + (β − β₀) · min(1, τ / R)``: a linear increase over the first fraction ``R = ratio``
    of each cycle, then ``β``. From step ``T`` on the value stays ``β``.

    Args:
        start: ``β₀`` at the start of each cycle (≥ 0; the paper uses 0).
        total_steps: ``T`` (≥ 1).
        cycles: ``M`` (≥ 1; 4 in the paper).
        ratio: ``R`` in ``(0, 1]`` (0.5 in the paper).
    """

    def __init__(
        self,
        value: float,
        start: float = 0.0,
        total_steps: int = 100000,
        cycles: int = 4,
        ratio: float = 0.5,
        config_key: str = "schedule",
    ) -> None:
        super().__init__(value, start, config_key)
        self.total_steps = _integer(f"{config_key}.total_steps", total_steps, 1)
        self.cycles = _integer(f"{config_key}.cycles", cycles, 1)
        ratio = _number(f"{config_key}.ratio", ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"{config_key}.ratio={ratio!r}: must be in (0, 1]")
        self.ratio = ratio

    @property
    def period(self) -> int:
        """``⌈T / M⌉``, steps per cycle."""
        return math.ceil(self.total_steps / self.cycles)

    def at(self, step: int) -> float:
        if step >= self.total_steps:
            return self.value
        tau = (step % self.period) / (self.total_steps / self.cycles)
        return self._between(min(1.0, tau / self.ratio))


@SCHEDULES.register("sigmoid")
class SigmoidSchedule(_RampSchedule):
    """Logistic annealing: ``β₀ + (β − β₀) · σ(rate · (t − midpoint))``, ``σ(u) = 1/(1 + e⁻ᵘ)``.

    The value is halfway between ``β₀`` and ``β`` at ``midpoint`` and moves from 12 % to 88 % of
    the way in ``4 / rate`` steps; at step 0 it is ``β₀ + (β − β₀) · σ(−rate · midpoint)``, not
    exactly ``β₀``.

    Args:
        start: ``β₀`` (≥ 0).
        midpoint: the step where the value is halfway (≥ 0).
        rate: steepness per step (> 0).
    """

    def __init__(
        self,
        value: float,
        start: float = 0.0,
        midpoint: float = 5000.0,
        rate: float = 0.001,
        config_key: str = "schedule",
    ) -> None:
        super().__init__(value, start, config_key)
        self.midpoint = _number(f"{config_key}.midpoint", midpoint, minimum=0.0)
        self.rate = _number(f"{config_key}.rate", rate, minimum=0.0, strict=True)

    def at(self, step: int) -> float:
        u = self.rate * (step - self.midpoint)
        # σ(u) without overflow for large |u|
        fraction = 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))
        return self._between(fraction)


def build_schedule(config: Any, value: float, key: str) -> Schedule:
    """A schedule from ``config`` (``None``: constant; ``{"name": ..., **options}``;
    ``{"_target_": ...}``) towards ``value``; ``key`` is its place in the config."""
    if config is None:
        return ConstantSchedule(value, config_key=key)
    schedule: Schedule = SCHEDULES.from_config(config, key, value=value, config_key=key)
    return schedule
