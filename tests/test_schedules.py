import math

import numpy as np
import pytest

from lit_vae.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CyclicalSchedule,
    LinearSchedule,
    SigmoidSchedule,
    build_schedule,
)


def _sigmoid(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u))


def frange_cycle_linear(
    n_iter: int, start: float = 0.0, stop: float = 1.0, n_cycle: int = 4, ratio: float = 0.5
) -> np.ndarray:
    """Fu et al. (2019)'s reference implementation of cyclical annealing, as published."""
    values = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and (int(i + c * period) < n_iter):
            values[int(i + c * period)] = v
            v += step
            i += 1
    return values


def test_registry_names() -> None:
    assert SCHEDULES.names() == ["constant", "cyclical", "linear", "sigmoid"]


def test_constant() -> None:
    schedule = ConstantSchedule(0.7)
    assert [schedule(t) for t in (0, 1, 10**9)] == [0.7, 0.7, 0.7]
    assert schedule.is_constant()


def test_linear_warm_up() -> None:
    schedule = LinearSchedule(1.0, start=0.1, steps=100)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(25) == pytest.approx(0.1 + 0.9 * 0.25)
    assert schedule(50) == pytest.approx(0.55)
    assert schedule(100) == pytest.approx(1.0)
    assert schedule(10**6) == pytest.approx(1.0)
    assert not schedule.is_constant()
    assert LinearSchedule(2.0, start=2.0, steps=5).is_constant()


def test_cyclical_closed_form() -> None:
    schedule = CyclicalSchedule(1.0, total_steps=100, cycles=4, ratio=0.5)
    assert schedule.period == 25
    expected = {0: 0.0, 5: 0.4, 12: 0.96, 13: 1.0, 24: 1.0, 25: 0.0, 30: 0.4, 99: 1.0, 100: 1.0}
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value), step
    # T/M not an integer: P = ceil(10/3) = 4 steps per cycle, tau = (t mod 4) / (10/3)
    uneven = CyclicalSchedule(2.0, start=0.5, total_steps=10, cycles=3, ratio=0.5)
    assert uneven.period == 4
    assert uneven(1) == pytest.approx(0.5 + 1.5 * min(1.0, 0.3 / 0.5))
    assert uneven(4) == pytest.approx(0.5)
    assert uneven(2) == pytest.approx(2.0)


@pytest.mark.parametrize(("cycles", "ratio"), [(4, 0.5), (1, 1.0), (5, 0.25), (2, 0.8)])
def test_cyclical_matches_fu_et_al_reference(cycles: int, ratio: float) -> None:
    total = 1000
    schedule = CyclicalSchedule(1.0, total_steps=total, cycles=cycles, ratio=ratio)
    reference = frange_cycle_linear(total, n_cycle=cycles, ratio=ratio)
    ours = np.array([schedule(t) for t in range(total)])
    np.testing.assert_allclose(ours, reference, atol=1e-9)


def test_sigmoid_closed_form() -> None:
    schedule = SigmoidSchedule(2.0, start=0.0, midpoint=100, rate=0.05)
    assert schedule(100) == pytest.approx(1.0)
    assert schedule(0) == pytest.approx(2.0 * _sigmoid(-5.0))
    assert schedule(200) == pytest.approx(2.0 * _sigmoid(5.0))
    assert schedule(10**9) == pytest.approx(2.0)  # no overflow far from the midpoint
    shifted = SigmoidSchedule(1.0, start=0.5, midpoint=0, rate=1.0)
    assert shifted(0) == pytest.approx(0.75)


def test_value_is_a_function_of_the_step_only() -> None:
    config = {"name": "cyclical", "total_steps": 50, "cycles": 3, "ratio": 0.3}
    forward = build_schedule(config, 1.0, "regularizer.schedule")
    backward = build_schedule(config, 1.0, "regularizer.schedule")
    steps = list(range(60))
    values_forward = [forward(t) for t in steps]
    values_backward = [backward(t) for t in reversed(steps)][::-1]
    assert values_forward == values_backward
    assert [forward(t) for t in steps] == values_forward  # calling again changes nothing


def test_build_schedule_default_is_constant() -> None:
    schedule = build_schedule(None, 3.0, "regularizer.schedule")
    assert isinstance(schedule, ConstantSchedule)
    assert schedule(123) == 3.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"name": "cyclical", "ratio": 1.5},
            r"regularizer\.schedule\.ratio=1\.5: must be in \(0, 1\]",
        ),
        ({"name": "cyclical", "ratio": 0.0}, r"regularizer\.schedule\.ratio=0\.0: must be in"),
        (
            {"name": "cyclical", "cycles": 0},
            r"regularizer\.schedule\.cycles=0: must be an integer >= 1",
        ),
        (
            {"name": "cyclical", "total_steps": 2.5},
            r"regularizer\.schedule\.total_steps=2\.5: must be an integer >= 1",
        ),
        ({"name": "linear", "steps": 0}, r"regularizer\.schedule\.steps=0: must be an integer"),
        ({"name": "linear", "start": -1.0}, r"regularizer\.schedule\.start=-1\.0: must be"),
        ({"name": "sigmoid", "rate": 0.0}, r"regularizer\.schedule\.rate=0\.0: must be > 0"),
        ({"name": "sigmoid", "midpoint": -3}, r"regularizer\.schedule\.midpoint=-3: must be"),
        (
            {"name": "exponential"},
            r"regularizer\.schedule\.name='exponential' is not a registered schedule; "
            r"allowed: constant, cyclical, linear, sigmoid",
        ),
    ],
)
def test_bad_options_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_schedule(config, 1.0, "regularizer.schedule")


def test_negative_step_raises() -> None:
    with pytest.raises(ValueError, match=r"step=-1: must be an integer >= 0"):
        ConstantSchedule(1.0)(-1)
