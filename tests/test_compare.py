"""``lit-vae-compare`` on run dirs written by hand (numbers known in advance) and on a real tiny
multirun."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig

from lit_vae.compare import (
    Reach,
    find_runs,
    group_runs,
    main,
    parse_reach,
    plot_curves,
    read_metrics_csv,
    sort_groups,
    steps_to_reach,
)

from .train_runs import TINY, run_train

# job → (overrides, final results, val/elbo curve at steps 9, 19, 29, 39)
JOBS: dict[str, tuple[list[str], dict[str, float], list[float]]] = {
    "0": (
        ["posterior=log_var", "seed=0"],
        {"val/elbo": -30.0, "test/nll": 29.0, "test/kl": 3.0, "test/active_units": 2.0},
        [-40.0, -33.0, -30.5, -30.0],
    ),
    "1": (
        ["posterior=log_var", "seed=1"],
        {"val/elbo": -31.0, "test/nll": 30.0, "test/kl": 3.5, "test/active_units": 2.0},
        [-41.0, -35.0, -31.2, -31.0],
    ),
    "2": (
        ["posterior=log_var", "seed=2"],
        {"val/elbo": -32.5, "test/nll": 31.5, "test/kl": 2.5, "test/active_units": 1.0},
        [-42.0, -36.0, -33.0, -32.5],
    ),
    "3": (
        ["posterior=cholesky", "seed=0"],
        {"val/elbo": -29.0, "test/nll": 28.0, "test/kl": 4.0, "test/active_units": 2.0},
        [-35.0, -30.5, -29.5, -29.0],
    ),
    "4": (
        ["posterior=cholesky", "seed=1"],
        {"val/elbo": -29.5, "test/nll": 28.4, "test/kl": 4.5, "test/active_units": 2.0},
        [-36.0, -31.0, -29.8, -29.5],
    ),
}
COMMON = ["trainer.max_epochs=4", "logger=csv"]
STEPS = [9, 19, 29, 39]


def write_run(
    run_dir: Path,
    overrides: Sequence[str],
    results: Mapping[str, float],
    curve: Sequence[float],
    train_loss: Sequence[str] = ("40.0", "35.0", "31.0", "30.0"),
) -> None:
    """A run dir as lit-vae-train leaves it: results.json, .hydra/overrides.yaml, metrics.csv
    (val/elbo on epoch rows, train/loss_step on step rows, as the csv logger writes them)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(dict(results)))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train/loss_step", "val/elbo"])
        for epoch, (step, loss, elbo) in enumerate(zip(STEPS, train_loss, curve)):
            writer.writerow([epoch, step, loss, ""])
            writer.writerow([epoch, step, "", repr(elbo)])


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun dir with 3 seeds of log_var and 2 of cholesky; one cholesky run logged a NaN
    and an Inf."""
    root = tmp_path / "multirun"
    for job, (overrides, results, curve) in JOBS.items():
        loss = ("nan", "inf", "31.0", "30.0") if job == "4" else ("40.0", "35.0", "31.0", "30.0")
        write_run(root / job, [*overrides, *COMMON], results, curve, loss)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _values(jobs: Sequence[str], metric: str) -> list[float]:
    return [JOBS[job][1][metric] for job in jobs]


LOG_VAR, CHOLESKY = ["0", "1", "2"], ["3", "4"]


# --------------------------------------------------------------------------- reading


def test_find_runs_reads_overrides_results_and_curves(sweep: Path) -> None:
    runs = find_runs([sweep, sweep / "3"])  # overlapping dirs: each run once
    assert [run.path.name for run in runs] == ["0", "1", "2", "3", "4"]
    first = runs[0]
    assert first.overrides == {
        "posterior": "log_var",
        "seed": "0",
        "trainer.max_epochs": "4",
        "logger": "csv",
    }
    assert first.results["test/nll"] == 29.0
    assert first.history["val/elbo"] == list(zip(STEPS, JOBS["0"][2]))
    assert [run.nonfinite for run in runs] == [0, 0, 0, 0, 2]


def test_read_metrics_csv_skips_empty_cells_and_counts_nan_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,a,b\n0,0,1.5,\n0,1,nan,-inf\n1,2,,2.0\n")
    history, nonfinite = read_metrics_csv(path)
    assert history["b"][1] == (2, 2.0)
    assert math.isnan(history["a"][1][1])
    assert [step for step, _ in history["a"]] == [0, 1]
    assert nonfinite == 2


# --------------------------------------------------------------------------- numbers


def test_seeds_pool_into_mean_and_sample_std(sweep: Path) -> None:
    groups = {group.label: group for group in group_runs(find_runs([sweep]))}
    assert sorted(groups) == [
        "posterior=cholesky trainer.max_epochs=4",
        "posterior=log_var trainer.max_epochs=4",
    ]
    log_var = groups["posterior=log_var trainer.max_epochs=4"]
    mean, std = log_var.stat("val/elbo")  # type: ignore[misc]
    expected = np.array(_values(LOG_VAR, "val/elbo"))
    assert mean == pytest.approx(expected.mean(), abs=1e-12)
    assert std == pytest.approx(expected.std(ddof=1), abs=1e-12)
    assert mean == pytest.approx(-31.166666666666668)
    assert std == pytest.approx(1.2583057392117916)
    assert groups["posterior=cholesky trainer.max_epochs=4"].stat("test/nll") == pytest.approx(
        (28.2, statistics.stdev([28.0, 28.4]))
    )
    assert [len(g.runs) for g in group_runs(find_runs([sweep]), seed_key=None)] == [1] * 5


def test_steps_to_reach_is_the_first_step_at_the_target() -> None:
    history = list(zip(STEPS, [-40.0, -33.0, -30.5, -30.0]))
    assert steps_to_reach(history, parse_reach("val/elbo=-31")) == 29
    assert steps_to_reach(history, parse_reach("val/elbo=-30")) == 39
    assert steps_to_reach(history, parse_reach("val/elbo=-29.9")) is None
    assert steps_to_reach(history, parse_reach("val/elbo=-45")) == 9
    nll = list(zip(STEPS, [40.0, 33.0, 30.5, 30.0]))
    assert parse_reach("test/nll=31") == Reach("test/nll", 31.0, at_least=False)
    assert steps_to_reach(nll, parse_reach("test/nll=31")) == 29
    assert steps_to_reach(nll, parse_reach("test/nll>=33")) == 9
    assert parse_reach("val/elbo<=-35") == Reach("val/elbo", -35.0, at_least=False)
    with pytest.raises(ValueError, match=r"--reach 'val/elbo': expected METRIC=VALUE"):
        parse_reach("val/elbo")


def test_sort_puts_the_best_first(sweep: Path) -> None:
    groups = group_runs(find_runs([sweep]))
    best_nll = sort_groups(groups, "test/nll")
    assert [g.label.split()[0] for g in best_nll] == ["posterior=cholesky", "posterior=log_var"]
    best_elbo = sort_groups(groups, "val/elbo")
    assert [g.label.split()[0] for g in best_elbo] == ["posterior=cholesky", "posterior=log_var"]
    worst = sort_groups(groups, "val/elbo", reverse=True)
    assert [g.label.split()[0] for g in worst] == ["posterior=log_var", "posterior=cholesky"]


# --------------------------------------------------------------------------- the CLI


def test_cli_writes_csv_and_json_with_stats_reach_and_nonfinite(
    sweep: Path, tmp_path: Path
) -> None:
    csv_path, json_path = tmp_path / "table.csv", tmp_path / "table.json"
    argv = [str(sweep), "--sort", "test/nll", "--reach", "val/elbo=-31"]
    assert main([*argv, "--csv", str(csv_path), "--json", str(json_path)]) == 0

    table = json.loads(json_path.read_text())
    assert [row["overrides"]["posterior"] for row in table] == ["cholesky", "log_var"]
    cholesky, log_var = table
    assert cholesky["n"] == 2
    assert log_var["n"] == 3
    assert log_var["runs"] == [str(sweep / job) for job in LOG_VAR]
    kl = np.array(_values(LOG_VAR, "test/kl"))
    assert log_var["metrics"]["test/kl"]["mean"] == pytest.approx(kl.mean())
    assert log_var["metrics"]["test/kl"]["std"] == pytest.approx(kl.std(ddof=1))
    assert log_var["metrics"]["test/active_units"]["values"] == [2.0, 2.0, 1.0]
    reach = log_var["reach"]["steps to val/elbo>=-31"]
    assert reach["steps"] == [29, 39, None]
    assert reach["mean"] == pytest.approx(34.0)
    assert reach["std"] == pytest.approx(statistics.stdev([29, 39]))
    assert cholesky["reach"]["steps to val/elbo>=-31"]["steps"] == [19, 19]
    assert (cholesky["nonfinite"], log_var["nonfinite"]) == (2, 0)

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["posterior"] for row in rows] == ["cholesky", "log_var"]
    assert float(rows[1]["val/elbo_mean"]) == pytest.approx(-31.166666666666668)
    assert float(rows[1]["val/elbo_std"]) == pytest.approx(1.2583057392117916)
    assert float(rows[1]["steps to val/elbo>=-31_mean"]) == pytest.approx(34.0)
    assert rows[0]["nonfinite"] == "2"


def test_cli_table_shows_mean_pm_std_and_varying_overrides(
    sweep: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    assert main([str(sweep), "--reach", "val/elbo=-31", "--metrics", "val/elbo,test/nll"]) == 0
    out = capsys.readouterr().out
    assert "-31.167 ± 1.258" in out
    assert "28.200 ± 0.283" in out
    assert "34 ± 7 (2/3)" in out  # two of the three log_var seeds reached -31
    assert "all runs: trainer.max_epochs=4" in out


def test_cli_where_and_runs_select_rows(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--where", "posterior=cholesky", "--json", "-"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["n"] == 2
    assert main([str(sweep), "--runs", "--json", "-"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    assert main([str(sweep), "--where", "posterior=var", "--json", "-"]) == 1
    with pytest.raises(FileNotFoundError, match="no such run dir"):
        main([str(sweep / "missing")])


def test_plot_writes_learning_curves_png(sweep: Path, tmp_path: Path) -> None:
    output = tmp_path / "plots" / "elbo.png"
    assert main([str(sweep), "--plot", "val/elbo", "--plot-file", str(output), "--json", "-"]) == 0
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (540, 840)  # 7 × 4.5 inches at 120 dpi
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    with pytest.raises(ValueError, match=r"--plot test/nll: no run logged 'test/nll'"):
        plot_curves(group_runs(find_runs([sweep])), "test/nll", tmp_path / "x.png")


# --------------------------------------------------------------------------- a real multirun


@pytest.fixture
def _no_hydra_job_left() -> Iterator[None]:
    yield
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hydra_job_left")
def test_compare_a_real_multirun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "sweep"
    run_train(
        "-m",
        *TINY,
        "logger=csv",
        "posterior=log_var,std",
        "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    capsys.readouterr()
    assert (
        main([str(sweep_dir), "--sort", "val/elbo", "--reach", "val/elbo=-1000", "--json", "-"])
        == 0
    )
    table: list[dict[str, Any]] = json.loads(capsys.readouterr().out)

    results = {}
    for job_dir in sweep_dir.iterdir():
        if (job_dir / "results.json").is_file():
            overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
            results[tuple(overrides[-2:])] = json.loads((job_dir / "results.json").read_text())
    assert len(results) == 4
    assert sorted(row["overrides"]["posterior"] for row in table) == ["log_var", "std"]
    for row in table:
        head = row["overrides"]["posterior"]
        values = [results[(f"posterior={head}", f"seed={s}")]["val/elbo"] for s in (0, 1)]
        assert row["n"] == 2
        assert row["metrics"]["val/elbo"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["metrics"]["val/elbo"]["std"] == pytest.approx(statistics.stdev(values))
        # one epoch of 3 steps: val/elbo is logged once, at step 2, and any ELBO beats -1000
        assert row["reach"]["steps to val/elbo>=-1000"]["steps"] == [2, 2]
        assert row["nonfinite"] == 0
    means = [row["metrics"]["val/elbo"]["mean"] for row in table]
    assert means == sorted(means, reverse=True)
