"""Bad configs and bad data stop ``lit-vae-train`` before training, with one clear line."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lit_vae.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MNIST_FILES
from lit_vae.validation import (
    ConfigError,
    check_devices,
    check_options,
    config_errors,
    conforms,
    one_line,
    validate_train_config,
)
from tests.cli_helpers import REPO, run_tool
from tests.test_data import idx_bytes, make_mnist_dir, write_gz

CONF = REPO / "lit_vae" / "conf"
CYCLICAL = "+regularizer._target_=tests.user_regularizer.CyclicalKL"


# (overrides, substrings of the one error line: the key, the bad value, what is allowed).
# Most fail before torch or Lightning is imported, so the table runs in seconds per case.
BAD_CONFIGS = [
    pytest.param(["latent_dim=-1"], ["latent_dim=-1", "integer >= 1"], id="latent_dim_negative"),
    pytest.param(["latent_dim=abc"], ["latent_dim='abc'", "integer >= 1"], id="latent_dim_text"),
    pytest.param(
        ["regularizer.beta=-0.5"], ["regularizer.beta=-0.5", "number >= 0"], id="beta_negative"
    ),
    pytest.param(
        ["+posterior._target_=nowhere.Head"],
        ["posterior._target_='nowhere.Head'", "cannot be imported", "log_var, low_rank"],
        id="unknown_head_target",
    ),
    pytest.param(
        ["regularizer=free_bits", "regularizer.threshold=-1.0"],
        ["regularizer.threshold=-1.0", "number >= 0"],
        id="free_bits_lambda_negative",
    ),
    pytest.param(
        ["regularizer/schedule=cyclical", "regularizer.schedule.ratio=1.5"],
        ["regularizer.schedule.ratio=1.5", "(0, 1]"],
        id="cyclical_R_above_1",
    ),
    pytest.param(
        ["regularizer/schedule=cyclical", "regularizer.schedule.ratio=0.0"],
        ["regularizer.schedule.ratio=0.0", "(0, 1]"],
        id="cyclical_R_zero",
    ),
    pytest.param(
        ["regularizer/schedule=cyclical", "regularizer.schedule.cycles=0"],
        ["regularizer.schedule.cycles=0", "integer >= 1"],
        id="cyclical_M_0",
    ),
    pytest.param(
        ["objective=iwae", "objective.num_samples=0"],
        ["objective.num_samples=0", "integer >= 1"],
        id="iwae_k_0",
    ),
    pytest.param(
        [CYCLICAL, "+regularizer.R=1.5", "~regularizer.schedule"],
        ["regularizer.R=1.5", "(0, 1]"],
        id="user_target_regularizer_checks_its_own_range",
    ),
    pytest.param(
        ["data.batch_size=0"], ["data.batch_size=0", "integer >= 1"], id="batch_size_zero"
    ),
    pytest.param(
        ["trainer.devices=4096"],
        ["trainer.devices=4096", "CPU cores", "allowed: 1.."],
        id="devices_above_available",
    ),
    pytest.param(
        ["trainer.accelerator=gpu"],
        ["trainer.accelerator='gpu'", "no CUDA GPUs", "allowed here: cpu"],
        id="gpu_without_gpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    pytest.param(
        ["data=mnist", "data.root={tmp}/absent"],
        ["data: MNIST directory", "absent (no such directory)", "train-images-idx3-ubyte.gz"],
        id="mnist_root_missing",
    ),
    pytest.param(
        ["data=mnist", "data.root={tmp}"],
        ["data: MNIST directory", "they are in", "set data.root=", "/mnist"],
        id="mnist_root_one_level_up",
    ),
    pytest.param(
        ["+logger.csv.flush_every=10"],
        ["logger.csv.flush_every=10", "not an option", "flush_logs_every_n_steps, name"],
        id="csv_logger_unknown_option",
    ),
    pytest.param(["optimizer.lr=abc"], ["optimizer.lr='abc'", "finite number > 0"], id="lr_text"),
    pytest.param(["optimizer.lr=0"], ["optimizer.lr=0", "finite number > 0"], id="lr_zero"),
    pytest.param(
        ["optimizer.lr=-0.001"], ["optimizer.lr=-0.001", "finite number > 0"], id="lr_negative"
    ),
    pytest.param(
        ["optimizer.name=lion"],
        ["optimizer.name='lion'", "allowed: adam, adamax, adamw, rmsprop, sgd"],
        id="unknown_optimizer",
    ),
    pytest.param(
        ["+optimizer.momentum=0.9"],
        ["optimizer.momentum=0.9", "not an option of optimizer 'adam'", "options: amsgrad"],
        id="option_the_optimizer_lacks",
    ),
    pytest.param(
        ["optimizer.betas=[0.9]"],
        ["optimizer.betas=[0.9]", "two numbers in [0, 1)"],
        id="betas_one_number",
    ),
    pytest.param(
        ["trainer.max_epochs=-5"], ["trainer.max_epochs=-5", "integer >= -1"], id="max_epochs"
    ),
    pytest.param(
        ["trainer.precision=17"], ["trainer.precision=17", "allowed: 64-true, 32-true"], id="prec"
    ),
    pytest.param(
        ["eval.num_samples=0"], ["eval.num_samples=0", "integer >= 1"], id="eval_num_samples"
    ),
    pytest.param(["seed=-1"], ["seed=-1", "between 0 and 4294967295"], id="seed_negative"),
    pytest.param(["nan_policy=ignore"], ["nan_policy='ignore'", "raise, skip"], id="nan_policy"),
    pytest.param(
        ["posterior=low_rank", "posterior.rank=0"], ["posterior.rank=0", ">= 1"], id="rank_zero"
    ),
    pytest.param(
        ["posterior.min_raw=abc"], ["posterior.min_raw='abc'", "a number"], id="min_raw_text"
    ),
    pytest.param(
        ["scheduler=step", "scheduler.step_size=0"],
        ["scheduler.step_size=0", "integer >= 1"],
        id="step_size_zero",
    ),
    pytest.param(
        ["data.shuffle=maybe"], ["data.shuffle='maybe'", "true or false"], id="shuffle_text"
    ),
    pytest.param(
        ["data=tensors"], ["data.train: missing value", "data.train=<value>"], id="missing_value"
    ),
    pytest.param(
        ["ckpt_path={tmp}/absent.ckpt"],
        ["ckpt_path=", "absent.ckpt", "no such checkpoint file", "last"],
        id="ckpt_path_missing",
    ),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose ``mnist`` subdirectory holds small valid MNIST files."""
    root = tmp_path_factory.mktemp("data")
    make_mnist_dir(root / "mnist")
    return root


def assert_one_error_line(result: Any, expected: list[str]) -> str:
    """The run failed with status 2 and its stderr is one ``error:`` line holding
    ``expected``; returns that line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for part in expected:
        assert part in line, (part, line)
    return line


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "expected"), BAD_CONFIGS)
def test_bad_config_stops_before_training_with_one_line(
    overrides: list[str], expected: list[str], data_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [o.replace("{tmp}", str(data_root)) for o in overrides]
    result = run_tool("lit-vae-train", run_dir, "trainer.max_epochs=1", *args)
    assert_one_error_line(result, [e.replace("{tmp}", str(data_root)) for e in expected])
    # nothing was trained or written
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.csv").exists()
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["ckpt_path: missing value (???)", "ckpt_path=<value>"]),
        (["ckpt_path={tmp}/absent.ckpt"], ["ckpt_path=", "absent.ckpt", "no such checkpoint"]),
        (["ckpt_path={tmp}/absent.ckpt", "mode=grid"], ["mode='grid'", "allowed: test, sample"]),
    ],
)
def test_bad_eval_config_is_one_line(
    overrides: list[str], expected: list[str], tmp_path: Path
) -> None:
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    result = run_tool("lit-vae-eval", tmp_path / "eval", *args)
    assert_one_error_line(result, expected)


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = run_tool("lit-vae-train", tmp_path, "latent_dim=-1", HYDRA_FULL_ERROR="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ConfigError: latent_dim=-1: must be an integer >= 1" in result.stderr


@pytest.mark.slow
def test_unknown_group_option_lists_the_options(tmp_path: Path) -> None:
    # Hydra's own message: the unknown option and every available one, then its hint
    result = run_tool("lit-vae-train", tmp_path, "posterior=log_variance")
    assert result.returncode == 1
    assert "Could not find 'posterior/log_variance'" in result.stderr
    listed = re.findall(r"^\t(\w+)$", result.stderr, flags=re.MULTILINE)
    assert listed == ["cholesky", "log_std", "log_var", "low_rank", "std", "var"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unknown_key_names_the_plus_form(tmp_path: Path) -> None:
    result = run_tool("lit-vae-train", tmp_path, "trainer.max_epoch=3")
    assert result.returncode == 1
    assert "Could not override 'trainer.max_epoch'" in result.stderr
    assert "+trainer.max_epoch=3" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- bad data


def _truncated(root: Path) -> tuple[Path, str]:
    target = root / MNIST_FILES["train_images"]
    target.write_bytes(target.read_bytes()[:-200])
    return target, "not a readable gzip file"


def _wrong_magic(root: Path) -> tuple[Path, str]:
    target = root / MNIST_FILES["train_labels"]
    write_gz(target, idx_bytes(np.zeros(40), IDX_IMAGES_MAGIC, dims=(40,)))
    return target, f"magic number {IDX_IMAGES_MAGIC}, expected {IDX_LABELS_MAGIC}"


def _count_mismatch(root: Path) -> tuple[Path, str]:
    labels = root / MNIST_FILES["train_labels"]
    write_gz(labels, idx_bytes(np.zeros(39), IDX_LABELS_MAGIC))
    return root / MNIST_FILES["train_images"], f"holds 40 images but {labels} holds 39 labels"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncated, _wrong_magic, _count_mismatch])
def test_bad_mnist_files_are_one_error_line(damage: Any, tmp_path: Path) -> None:
    root = make_mnist_dir(tmp_path / "mnist")
    path, expected = damage(root)
    result = run_tool(
        "lit-vae-train",
        tmp_path / "run",
        "data=mnist",
        f"data.root={root}",
        "data.val_size=8",
        "trainer.max_epochs=1",
    )
    line = assert_one_error_line(result, [f"error: {path}", expected])
    assert line.startswith(f"error: {path}")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_user_tensors_out_of_pixel_range_are_one_error_line(tmp_path: Path) -> None:
    source = tmp_path / "grey.pt"
    torch.save(torch.arange(64 * 10, dtype=torch.float32).reshape(10, 64) / 100, source)
    result = run_tool(
        "lit-vae-train",
        tmp_path / "run",
        "data=tensors",
        f"data.train={source}",
        "data.pixel_range=[0,1]",
        "trainer.max_epochs=1",
    )
    assert_one_error_line(
        result, [f"error: data: {source}: ", "pixel range [0, 1]", "found values in [0, 6.39]"]
    )


# ---------------------------------------------------------------------------- in process


@pytest.fixture
def train_config(tmp_path: Path) -> Any:
    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="train", overrides=[f"paths.output_dir={tmp_path}", *overrides]
            )

    return make


def test_the_default_configs_pass(train_config: Any) -> None:
    validate_train_config(train_config())
    for overrides in (
        ["posterior=cholesky", "prior=mixture", "likelihood=gaussian", "optimizer=sgd"],
        ["model=conv", "scheduler=cosine", "optimizer=adamw", "posterior=low_rank"],
        ["data=ppca", "model=linear", "likelihood=gaussian", "scheduler=step", "prior=vamp"],
        ["logger=tensorboard", "callbacks=none", "scheduler=exponential"],
        ["scheduler=iwae", "scheduler.budget=0.01", "init_output_bias=false"],
    ):
        validate_train_config(train_config(*overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+data.batchsize=64"],
            "data.batchsize=64: not an option of data 'digits' (did you mean ",
        ),
        (["model.encoder.name=transformer"], "model.encoder.name='transformer': not a registered"),
        (["+trainer.num_nodes=0"], "trainer.num_nodes=0: must be an integer >= 1"),
        (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5: must be a fracti"),
        (["+trainer.val_check_interval=0"], "trainer.val_check_interval=0: must be a fraction"),
        (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be"),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0: must be null or an in"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch=3: not an option of pytorch_lightning"),
        (["train=yes"], "train='yes': must be true or false"),
        (["eval.chunk_size=0"], "eval.chunk_size=0: must be null or an integer >= 1"),
        (["optimizer.eps=0"], "optimizer.eps=0: must be a finite number > 0"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1: must be a finite number >="),
        (["scheduler=exponential", "scheduler.gamma=0"], "scheduler.gamma=0: must be a finite"),
        (["scheduler=step", "scheduler.interval=batch"], "scheduler.interval='batch': allowed"),
        (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max=0: must be an integer >="),
        (["scheduler=iwae", "scheduler.budget=0"], "scheduler.budget=0: must be a finite numbe"),
        (["scheduler=iwae", "scheduler.num_stages=0"], "scheduler.num_stages=0: must be an int"),
        (["scheduler=iwae", "scheduler.base=0.5"], "scheduler.base=0.5: must be a finite numb"),
        (["scheduler=iwae", "scheduler.decay_per_stage=2"], "scheduler.decay_per_stage=2: must"),
        (["scheduler=iwae", "scheduler.interval=step"], "scheduler.interval='step': scheduler"),
        (["init_output_bias=yes"], "init_output_bias='yes': must be true or false"),
        (["+callbacks.image_grids.scale=x"], "callbacks.image_grids.scale='x': must be an integer"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]: must be two numbers in"),
        (["data.seed=1.5"], "data.seed=1.5: must be an integer"),
        (["+callbacks.x._target_=no.Such"], "callbacks.x._target_='no.Such': cannot be imported"),
        (["posterior.max_raw=100"], "posterior.max_raw=100: must be in [-80, 80], where σ²"),
        (["posterior=log_std", "posterior.max_raw=50"], "posterior.max_raw=50: must be in [-40,"),
        (["posterior.min_raw=5", "posterior.max_raw=1"], "posterior.min_raw=5 must be below max"),
    ],
)
def test_bad_values_in_process(train_config: Any, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_train_config(train_config(*overrides))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.encoder.hidden_sizes=[0]"], "model.encoder: hidden_sizes entries must be inte"),
        (["likelihood=gaussian", "likelihood.scale=-1"], "likelihood: scale must be a finite"),
        (["callbacks.model_checkpoint.save_top_k=-5"], "callbacks.model_checkpoint: Invalid value"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be a number strictly between"),
        (["prior=mixture", "prior.num_components=0"], "prior.num_components=0: must be an integ"),
        (["+trainer.strategy=warp"], "trainer: You selected an invalid strategy name"),
        (["prior=mixture", "prior.init_spread=-1"], "prior.init_spread=-1: must be a finite"),
        (["+callbacks.image_grids.num_samples=0"], "callbacks.image_grids.num_samples=0: must be"),
    ],
)
def test_range_errors_from_the_builds(
    train_config: Any, overrides: list[str], message: str, tmp_path: Path
) -> None:
    """What only a constructor knows is reported by :func:`train` before anything trains."""
    from lit_vae.train import train

    with pytest.raises(ConfigError) as info:
        train(train_config("trainer.max_epochs=1", *overrides))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_device_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lit_vae.validation._cpu_count", lambda: 4)
    for devices in (1, 4, -1, "auto", "2"):
        check_devices({"accelerator": "cpu", "devices": devices})
    for devices, message in [
        (5, "trainer.devices=5: this machine has 4 CPU cores; allowed: 1..4, -1 (all) or auto"),
        (0, "trainer.devices=0: this machine has 4 CPU cores; allowed: 1..4, -1 (all) or auto"),
        ([0, 1], "trainer.devices=[0, 1]: allowed: 1..4, -1 (all) or auto"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_devices({"accelerator": "cpu", "devices": devices})
        assert str(info.value) == message
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    check_devices({"accelerator": "gpu", "devices": [0, 1]})
    with pytest.raises(ConfigError, match=r"^trainer.devices=\[0, 2\]: device indices must be"):
        check_devices({"accelerator": "gpu", "devices": [0, 2]})
    with pytest.raises(ConfigError, match=r"^trainer.devices=3: this machine has 2 CUDA GPUs"):
        check_devices({"accelerator": "cuda", "devices": 3})


def factory(size: int, rate: float = 0.1, names: Sequence[str] = ()) -> None:
    """A constructor-like function whose annotations :func:`check_options` reads."""


def test_annotations_as_checks() -> None:
    assert conforms(3, int) is True
    assert conforms(True, int) is False
    assert conforms(3, float) is True
    assert conforms("3", float) is False
    assert conforms(None, int | None) is True
    assert conforms([1, 2], Sequence[int]) is True
    assert conforms([1, "2"], Sequence[int]) is False
    assert conforms([0.9, 0.99], tuple[float, float]) is True
    assert conforms([0.9], tuple[float, float]) is False
    assert conforms("a", Literal["a", "b"]) is True
    assert conforms("c", Literal["a", "b"]) is False
    assert conforms(torch.zeros(1), torch.Tensor) is None  # nothing a config value says

    check_options("thing", factory, {"size": 2, "rate": 1, "names": ["a"]}, "thing 'x'")
    with pytest.raises(ConfigError, match=r"^thing.rate='fast': must be a number$"):
        check_options("thing", factory, {"rate": "fast"}, "thing 'x'")
    with pytest.raises(ConfigError) as info:
        check_options("thing", factory, {"sise": 2}, "thing 'x'")
    assert str(info.value) == (
        "thing.sise=2: not an option of thing 'x' (did you mean size?); options: names, rate, size"
    )


def test_config_errors_are_one_line_and_keyed() -> None:
    with pytest.raises(ConfigError, match=r"^trainer: bad\s+thing$"), config_errors("trainer"):
        raise ValueError("bad\n  thing")
    with pytest.raises(ConfigError, match=r"^data.x=1: no$"), config_errors("data"):
        raise ValueError("data.x=1: no")
    assert one_line("\x1b[1mbold\x1b[0m\n\tnext") == "bold next"
