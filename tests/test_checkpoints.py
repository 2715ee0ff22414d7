"""Checkpoints: written atomically, loadable with ``weights_only=True``, pickles refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

import lit_vae.checkpoints as checkpoints_module
from lit_vae.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
)
from lit_vae.module import LitVAE
from tests.cli_helpers import REPO, TINY, run_tool

PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def assert_plain(value: Any, where: str = "checkpoint") -> int:
    """Every value in ``value`` is a tensor or a plain container/number/string; returns how
    many tensors it holds."""
    assert isinstance(value, PLAIN), (where, type(value))
    if isinstance(value, dict):
        return sum(assert_plain(v, f"{where}[{k!r}]") for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(assert_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    return int(isinstance(value, torch.Tensor))


class Evil:
    """A custom object: only a full unpickle could rebuild it."""


class Trap:
    """Unpickling it would create ``marker``: proof that nothing unpickles checkpoints."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_save_writes_a_loadable_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.ckpt"
    atomic_save({"x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt"]


def test_a_failed_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"version": torch.tensor(1)}, path)
    before = path.read_bytes()

    def half_written(obj: Any, stream: Any) -> None:
        stream.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints_module.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert int(torch.load(path, weights_only=True)["version"]) == 1


def test_a_failed_rename_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"version": torch.tensor(1)}, path)

    def no_rename(source: Any, target: Any) -> None:
        raise OSError("interrupted")

    monkeypatch.setattr(checkpoints_module.os, "replace", no_rename)
    with pytest.raises(OSError, match="interrupted"):
        atomic_save({"version": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert int(torch.load(path, weights_only=True)["version"]) == 1


WRITER = """
import sys, torch
from lit_vae.checkpoints import atomic_save
path, ready = sys.argv[1], sys.argv[2]
version = 0
while True:
    version += 1
    payload = torch.full((2_000_000,), version)
    atomic_save({"version": torch.tensor(version), "payload": payload}, path)
    open(ready, "w").close()
"""


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_broken_file(tmp_path: Path) -> None:
    path, ready = tmp_path / "last.ckpt", tmp_path / "ready"
    for delay in (0.1,):
        ready.unlink(missing_ok=True)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(ready)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and writer.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)  # somewhere inside a later write
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        checkpoint = torch.load(path, weights_only=True)
        version = int(checkpoint["version"])
        assert version >= 1
        assert torch.equal(checkpoint["payload"], torch.full((2_000_000,), version))


def test_the_trainer_config_writes_atomically(tmp_path: Path) -> None:
    from lit_vae.build import build_trainer

    with initialize_config_dir(config_dir=str(REPO / "lit_vae" / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}"])
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------------------- loading


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^ckpt_path='.*absent.ckpt': no such checkpoint"):
        load_checkpoint(tmp_path / "absent.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"not a readable torch checkpoint") as info:
        load_checkpoint(garbage)
    assert not isinstance(info.value, UnsafeCheckpointError)
    tensor_only = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(CheckpointError, match=r"holds a Tensor, not a checkpoint dict$"):
        load_checkpoint(tensor_only)
    with pytest.raises(CheckpointError, match=r"has no 'hyper_parameters'; it was not written"):
        model_from_checkpoint({"state_dict": {}})


def test_custom_objects_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": Evil()}, evil)
    for mmap in (False, True):
        with pytest.raises(UnsafeCheckpointError) as info:
            load_checkpoint(evil, mmap=mmap)
        message = str(info.value)
        assert message == (
            f"ckpt_path={str(evil)!r} cannot be loaded with torch.load(weights_only=True): it "
            f"holds a pickled {__name__}.Evil object. lit-vae does not unpickle checkpoints; "
            "re-save it from trusted code with plain containers and tensors only"
        )
    trap = tmp_path / "trap.ckpt"
    marker = tmp_path / "unpickled"
    torch.save({"state_dict": {}, "extra": Trap(marker)}, trap)
    with pytest.raises(UnsafeCheckpointError, match=r"holds a pickled posix\.mkdir object\."):
        load_checkpoint(trap)
    assert not marker.exists()


# ---------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny")
    result = run_tool(
        "lit-vae-train",
        run_dir,
        *TINY,
        "trainer.max_epochs=2",
        "scheduler=step",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "nan_policy=skip",
    )
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
def test_every_checkpoint_of_a_run_loads_with_weights_only(tiny_run: Path) -> None:
    paths = sorted((tiny_run / "checkpoints").glob("*.ckpt"))
    assert len(paths) == 2
    assert paths[0].name.startswith("best-epoch00")
    assert paths[1].name == "last.ckpt"
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert assert_plain(checkpoint) > 10
        callbacks = checkpoint["callbacks"]
        assert set(callbacks) == {
            "RNGState",
            next(k for k in callbacks if k.startswith("LastCheckpoint")),
            next(k for k in callbacks if k.startswith("ModelCheckpoint")),
        }
        rng = callbacks["RNGState"]
        assert rng["torch"].dtype == torch.uint8
        assert rng["numpy"]["keys"].shape == (624,)
        assert rng["python"]["internal"].shape == (625,)
        assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] in (
            0,
            1,
        )
        assert checkpoint["lr_schedulers"][0]["step_size"] == 30
        assert checkpoint["hyper_parameters"]["nan_policy"] == "skip"
        assert checkpoint["datamodule_hyper_parameters"]["name"] == "digits"
        assert checkpoint["skipped_batches"] == 0
        model = load_model(path)
        assert isinstance(model, LitVAE)
        torch.testing.assert_close(model.state_dict(), checkpoint["state_dict"])


@pytest.mark.slow
def test_eval_loads_a_real_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    result = run_tool(
        "lit-vae-eval",
        tmp_path / "eval",
        f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}",
        "eval.num_samples=5",
        f"output={output}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert metrics["test/nll"] > 0
    assert metrics["test/nll"] <= metrics["test/loss"] + 1.0  # IWAE-5 vs the 1-sample bound


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["lit-vae-eval", "lit-vae-train"])
def test_the_tools_refuse_a_pickled_checkpoint(tiny_run: Path, tmp_path: Path, tool: str) -> None:
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "unpickled"
    checkpoint["extra"] = {"custom": Evil(), "trap": Trap(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    args = [*TINY, "trainer.max_epochs=3"] if tool == "lit-vae-train" else []
    result = run_tool(tool, tmp_path / "run", f"ckpt_path={evil}", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"error: ckpt_path={str(evil)!r} cannot be loaded with torch.load(weights_only=True): "
        f"it holds a pickled {__name__}.Evil object. lit-vae does not unpickle checkpoints; "
        "re-save it from trusted code with plain containers and tensors only"
    )
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
