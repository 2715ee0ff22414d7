"""``logger=csv``: ``metrics.csv`` continues across a resume instead of starting over."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lit_vae.csv_logger import CSVLogger


def write_metrics(path: Path, rows: list[dict[str, str]]) -> None:
    fieldnames = sorted({key for row in rows for key in row})
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


OLD_ROWS = [
    {"step": "9", "epoch": "0", "train/loss_step": "3.0"},
    {"step": "9", "epoch": "0", "val/elbo": "-2.5"},
    {"step": "19", "epoch": "1", "train/loss_step": "2.0"},
    {"step": "19", "epoch": "1", "val/elbo": "-1.5"},
]


def test_a_resumed_logger_keeps_the_rows_before_its_step_and_appends(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics.csv", OLD_ROWS)
    (tmp_path / "train.log").write_text("a Hydra run dir is never empty\n")
    logger = CSVLogger(tmp_path, name="", version="")
    logger.continue_from(10)  # resumed from the checkpoint written after 10 optimizer steps
    logger.log_metrics({"train/loss_step": 2.25, "train/kl_step": 0.5}, step=19)
    logger.save()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(row["step"], row["train/loss_step"], row["val/elbo"]) for row in rows] == [
        ("9", "3.0", ""),
        ("9", "", "-2.5"),
        ("19", "2.25", ""),
    ]
    assert rows[-1]["train/kl_step"] == "0.5"  # a new column: the header was rewritten
    assert not (tmp_path / "metrics.csv.partial").exists()


def test_a_fresh_logger_starts_a_new_file(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics.csv", OLD_ROWS)
    logger = CSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"train/loss_step": 4.0}, step=0)
    logger.save()
    assert read_metrics(tmp_path / "metrics.csv") == [{"step": "0", "train/loss_step": "4.0"}]


def test_rows_without_a_readable_step_are_kept(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics.csv", [{"step": "", "note": "kept"}, *OLD_ROWS])
    logger = CSVLogger(tmp_path, name="", version="")
    logger.continue_from(0)
    logger.log_metrics({"train/loss_step": 4.0}, step=0)
    logger.save()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(row["note"], row["step"]) for row in rows] == [("kept", ""), ("", "0")]


def test_continue_from_refuses_a_negative_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="global_step=-1"):
        CSVLogger(tmp_path, name="", version="").continue_from(-1)
