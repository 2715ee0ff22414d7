"""The ``iwae`` learning-rate schedule: stage lengths, rates per epoch, budget rule, errors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import yaml

from lit_vae.optim import (
    IWAE_DECAY_PER_STAGE,
    SCHEDULERS,
    IWAEStagesLR,
    build_optimizer,
    build_scheduler,
    iwae_stage_epochs,
)

from .helpers import CONF


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return build_optimizer([torch.nn.Parameter(torch.zeros(3))], {"name": "adam", "lr": lr})


def _rates(scheduler: IWAEStagesLR, epochs: int) -> list[float]:
    """The learning rate each epoch ``0 .. epochs − 1`` trains with (stepped per epoch)."""
    rates = []
    for _ in range(epochs):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_the_papers_schedule_has_3280_epochs_in_eight_stages() -> None:
    assert iwae_stage_epochs() == [1, 3, 9, 27, 81, 243, 729, 2187]
    scheduler = IWAEStagesLR(_optimizer())
    assert scheduler.total_epochs == 3280
    assert pytest.approx(0.719685673, abs=1e-9) == IWAE_DECAY_PER_STAGE


@pytest.mark.parametrize(
    ("epoch", "stage"),
    [
        *[(0, 0), (1, 1), (3, 1), (4, 2), (12, 2), (13, 3), (39, 3), (40, 4), (120, 4)],
        *[(121, 5), (363, 5), (364, 6), (1092, 6), (1093, 7), (3279, 7), (3280, 7), (5000, 7)],
    ],
)
def test_epoch_e_trains_at_lr_times_ten_to_minus_stage_over_seven(epoch: int, stage: int) -> None:
    scheduler = IWAEStagesLR(_optimizer(1e-3))
    rates = _rates(scheduler, epoch + 1)
    assert rates[epoch] == pytest.approx(1e-3 * 10 ** (-stage / 7), rel=1e-12)


def test_the_last_stage_trains_at_a_tenth_of_the_first_rate() -> None:
    rates = _rates(IWAEStagesLR(_optimizer(1e-3)), 3280)
    assert rates[0] == 1e-3
    assert rates[-1] == pytest.approx(1e-4, rel=1e-12)
    assert len(set(rates)) == 8


@pytest.mark.parametrize(
    ("budget", "epochs"),
    [
        (1.0, [1, 3, 9, 27, 81, 243, 729, 2187]),
        (0.1, [1, 1, 1, 3, 9, 25, 73, 219]),  # ceil(24.3) = 25; 2.7 → 3
        (0.01, [1, 1, 1, 1, 1, 3, 8, 22]),
        (1e-6, [1] * 8),  # never below one epoch
        (2.0, [2, 6, 18, 54, 162, 486, 1458, 4374]),
        (1 / 3, [1, 1, 3, 9, 27, 81, 243, 729]),  # 1/3 · 3^i is an integer: no rounding up
    ],
)
def test_budget_shrinks_every_stage_to_at_least_one_epoch(budget: float, epochs: list[int]) -> None:
    assert iwae_stage_epochs(budget=budget) == epochs


def test_a_shrunk_schedule_changes_rate_at_its_own_stage_ends() -> None:
    scheduler = IWAEStagesLR(_optimizer(1e-3), budget=0.01)
    assert scheduler.total_epochs == 38
    rates = _rates(scheduler, 38)
    ends = [1, 2, 3, 4, 5, 8, 16, 38]
    for stage, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        assert rates[start:end] == pytest.approx([1e-3 * 10 ** (-stage / 7)] * (end - start))


def test_other_stage_counts_bases_and_decays() -> None:
    scheduler = IWAEStagesLR(_optimizer(1.0), num_stages=3, base=2, decay_per_stage=0.5)
    assert scheduler.stage_epochs == [1, 2, 4]
    assert _rates(scheduler, 8) == [1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25]


def test_state_dict_loads_weights_only_and_resumes_the_schedule() -> None:
    first = IWAEStagesLR(_optimizer(1e-3), budget=0.01)
    _rates(first, 6)
    buffer = io.BytesIO()
    torch.save({"scheduler": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what a resumed run restores, as Lightning
    resumed = IWAEStagesLR(_optimizer(1e-3), budget=0.01)
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert resumed.last_epoch == 6
    assert _rates(resumed, 2) == pytest.approx(_rates(first, 2))


def test_the_yaml_builds_the_papers_schedule() -> None:
    config: dict[str, Any] = yaml.safe_load((CONF / "scheduler" / "iwae.yaml").read_text())
    assert config["name"] == "iwae"
    assert "iwae" in SCHEDULERS
    assert config["decay_per_stage"] == pytest.approx(10 ** (-1 / 7), rel=1e-15)
    built = build_scheduler(_optimizer(), config)
    assert built is not None
    assert built["interval"] == "epoch"
    assert isinstance(built["scheduler"], IWAEStagesLR)
    assert built["scheduler"].total_epochs == 3280


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "scheduler.budget=0: must be a finite number > 0"),
        ({"budget": -0.5}, "scheduler.budget=-0.5: must be a finite number > 0"),
        ({"budget": math.inf}, "scheduler.budget=inf: must be a finite number > 0"),
        ({"num_stages": 0}, "scheduler.num_stages=0: must be an integer >= 1"),
        ({"num_stages": 2.5}, "scheduler.num_stages=2.5: must be an integer >= 1"),
        ({"base": 0.5}, "scheduler.base=0.5: must be a finite number >= 1"),
        ({"decay_per_stage": 0}, "scheduler.decay_per_stage=0: must be a number in (0, 1]"),
        ({"decay_per_stage": 1.5}, "scheduler.decay_per_stage=1.5: must be a number in (0, 1]"),
        ({"interval": "step"}, "scheduler.interval='step': scheduler 'iwae' counts epochs; "),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"^scheduler\.") as info:
        build_scheduler(_optimizer(), {"name": "iwae", **options})
    assert str(info.value).startswith(message), str(info.value)
