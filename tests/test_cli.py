"""The console scripts end to end, as a user runs them: real processes, real files."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from .helpers import REPO, TINY, read_json, run_cli

HEADS = ["log_var", "log_std", "std", "var", "cholesky", "low_rank"]
RESULT_KEYS = {
    "val/elbo",
    "val/kl",
    "val/recon",
    "val/loss",
    "test/elbo",
    "test/kl",
    "test/recon",
    "test/nll",
    "test/active_units",
}


def _val_elbo_curve(metrics_csv: Path) -> list[float]:
    with metrics_csv.open() as handle:
        return [float(row["val/elbo"]) for row in csv.DictReader(handle) if row.get("val/elbo")]


@pytest.fixture(scope="module")
def heads_multirun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2-epoch run per posterior head, as a single multirun of the console script."""
    sweep_dir = tmp_path_factory.mktemp("heads")
    run_cli(
        "lit-vae-train",
        "-m",
        f"posterior={','.join(HEADS)}",
        "trainer.max_epochs=2",
        "data.batch_size=32",
        "eval.num_samples=100",
        "callbacks=minimal",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=600,
    )
    return {head: sweep_dir / str(index) for index, head in enumerate(HEADS)}


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_two_epoch_training_per_head(heads_multirun: dict[str, Path], head: str) -> None:
    run_dir = heads_multirun[head]
    assert f"posterior={head}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    results = read_json(run_dir / "results.json")
    assert set(results) >= RESULT_KEYS
    assert all(math.isfinite(value) for value in results.values()), results
    assert results["test/nll"] <= -results["test/elbo"] + 1.0  # the IWAE bound is the tighter one
    assert 0 <= results["test/active_units"] <= 2
    curve = _val_elbo_curve(run_dir / "metrics.csv")
    assert len(curve) == 2
    assert curve[-1] > curve[0], f"val/elbo did not improve: {curve}"
    for name in (
        "samples.png",
        "reconstructions.png",
        "checkpoints/last.ckpt",
        ".hydra/config.yaml",
    ):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.slow
def test_eval_reproduces_test_elbo_and_samples(heads_multirun: dict[str, Path]) -> None:
    run_dir = heads_multirun["log_var"]
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    run_cli(
        "lit-vae-eval",
        f"ckpt_path={best}",
        "eval.num_samples=100",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir / 'eval'}",
    )
    evaluated = read_json(best.parent / "eval.json")
    trained = read_json(run_dir / "results.json")
    assert set(evaluated) == {k for k in RESULT_KEYS if k.startswith("test/")} | {"test/loss"}
    # same weights and data; only the Monte Carlo draws differ
    assert evaluated["test/kl"] == pytest.approx(trained["test/kl"], abs=1e-4)
    assert evaluated["test/elbo"] == pytest.approx(trained["test/elbo"], abs=0.3)
    assert evaluated["test/nll"] == pytest.approx(trained["test/nll"], abs=0.1)

    grid = run_dir / "grid.png"
    run_cli(
        "lit-vae-eval",
        f"ckpt_path={best}",
        "mode=sample",
        "n=16",
        f"output={grid}",
        f"hydra.run.dir={run_dir / 'eval'}",
    )
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size[0] > 8 * 4 * 4


def test_python_dash_m_entry_points(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_vae.train",
            *TINY,
            "debug=fast_dev_run",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(read_json(tmp_path / "results.json")) >= {"test/elbo", "test/nll"}
    help_text = run_cli("lit-vae-eval", "--help").stdout
    assert "ckpt_path" in help_text


def test_run_dirs_follow_the_documented_layout(tmp_path: Path) -> None:
    run_cli("lit-vae-train", *TINY, "debug=fast_dev_run", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "results.json").is_file()


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path: Path) -> None:
    """Build the wheel, install it alone in a new venv that borrows the dev venv's dependencies,
    and train from a directory with no configs: the configs must come from the wheel."""
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("lit_vae-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = next(env_dir.glob("lib/python*/site-packages"))
    dev_site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "dev_dependencies.pth").write_text(f"{dev_site}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    workdir = tmp_path / "empty"
    workdir.mkdir()
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import lit_vae; print(lit_vae.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(site)), where
    result = subprocess.run(
        [
            str(env_dir / "bin" / "lit-vae-train"),
            "trainer.fast_dev_run=true",
            "eval.num_samples=10",
            "callbacks=minimal",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = workdir.glob("outputs/runs/*/*/results.json")
    assert math.isfinite(read_json(results)["test/elbo"])
    shutil.rmtree(env_dir)


def test_checkpoints_load_with_weights_only(heads_multirun: dict[str, Path]) -> None:
    checkpoint = torch.load(
        heads_multirun["cholesky"] / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["hyper_parameters"]["posterior"]["name"] == "cholesky"
    assert checkpoint["datamodule_hyper_parameters"]["name"] == "digits"
