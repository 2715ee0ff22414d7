"""Numerical guards: non-finite losses stop or skip, extreme head outputs stay finite."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lit_vae.data import DigitsDataModule
from lit_vae.guards import (
    NonFiniteLossError,
    all_finite,
    check_nan_policy,
    describe_non_finite,
    non_finite_names,
)
from lit_vae.module import LitVAE
from lit_vae.posteriors import POSTERIORS
from lit_vae.resume import LastCheckpoint
from tests.helpers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(Path(sys.executable).with_name("lit-vae-train"))

# Lightning's note that a step was skipped on purpose, which nan_policy=skip does
SKIP_WARNING = "ignore:`training_step` returned `None`:UserWarning"


def tiny_model(**kwargs: Any) -> LitVAE:
    options: dict[str, Any] = {
        "data_shape": (1, 8, 8),
        "latent_dim": 2,
        "encoder": {"name": "mlp", "hidden_sizes": [16]},
        "decoder": {"name": "mlp", "hidden_sizes": [16]},
        "eval_num_samples": 2,
    }
    return LitVAE(**{**options, **kwargs})


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=128, eval_batch_size=400)


def trainer(tmp_path: Path, max_steps: int, **kwargs: Any) -> pl.Trainer:
    # a LastCheckpoint is a checkpoint callback: checkpointing must be on for it
    checkpoints = [c for c in kwargs.get("callbacks", []) if isinstance(c, pl.callbacks.Checkpoint)]
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "enable_checkpointing": bool(checkpoints),
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
    }
    return quiet_trainer(**{**options, **kwargs})


def poison_encoder_at(model: LitVAE, steps: set[int], value: float = math.nan) -> None:
    """Make the encoder output ``value`` for the first sample of the given training steps."""
    forward = model.encoder.forward

    def poisoned(x: Tensor) -> Tensor:
        h = forward(x)
        if model.training and model._trainer is not None and model.global_step in steps:
            h = h.clone()
            h[0, 0] = value
        return h

    model.encoder.forward = poisoned  # type: ignore[method-assign]


class PoisonedDigits(DigitsDataModule):
    """Digits whose first training image gets a NaN pixel at the given global steps."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__(batch_size=128, eval_batch_size=400)
        self.steps = steps

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and trainer.global_step in self.steps:
            x, y = batch
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
            return x, y
        return batch


# ---------------------------------------------------------------------------- units


def test_nan_policy_values() -> None:
    assert check_nan_policy("raise") == "raise"
    assert check_nan_policy("skip") == "skip"
    with pytest.raises(ValueError, match=r"nan_policy='ignore': allowed: raise, skip"):
        check_nan_policy("ignore")
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        tiny_model(nan_policy="ignore")


def test_describe_non_finite_names_each_bad_term() -> None:
    terms = {
        "recon": torch.tensor([1.0, math.nan, math.nan, 2.0]),
        "kl": torch.tensor([math.inf, 0.0, 0.0, 0.0]),
        "penalty (kl)": torch.tensor([1.0, 1.0, 1.0, 1.0]),
    }
    assert describe_non_finite(terms) == "recon (nan in 2 of 4 samples), kl (inf in 1 of 4 samples)"
    assert describe_non_finite({"kl": torch.tensor([-math.inf])}) == "kl (-inf in 1 of 1 samples)"
    assert describe_non_finite({"recon": torch.zeros(3)}) == ""


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_and_non_finite_names_find_one_bad_entry(bad: float) -> None:
    grads = {"weight": torch.ones(3, 4), "bias": torch.zeros(4), "unused": None}
    assert all_finite(grads.values())
    assert non_finite_names(grads.items()) == []
    tensor = grads["weight"]
    assert tensor is not None
    tensor[2, 1] = bad
    assert not all_finite(grads.values())
    assert non_finite_names(grads.items()) == ["weight"]


def test_all_finite_is_exact_per_entry_and_leaves_values_as_they_are() -> None:
    assert all_finite([])
    assert all_finite([None])
    # finite entries whose squares overflow float32: a norm-based check would call them infinite
    huge = torch.tensor([3e38, -3e38, 1e20])
    half = torch.tensor([6e4, -6e4], dtype=torch.float16)
    assert all_finite([huge, half, torch.ones(2, dtype=torch.float64)])
    assert torch.equal(huge, torch.tensor([3e38, -3e38, 1e20]))
    assert torch.equal(half, torch.tensor([6e4, -6e4], dtype=torch.float16))
    assert non_finite_names([("huge", huge), ("half", half)]) == []


# ---------------------------------------------------------------------------- nan_policy=raise


def test_nan_from_the_encoder_raises_naming_terms_step_and_batch(tmp_path: Path) -> None:
    model = tiny_model()
    poison_encoder_at(model, {4})
    last = LastCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=2)
    fit = trainer(tmp_path, max_steps=8, callbacks=[last])
    with pytest.raises(NonFiniteLossError) as info:
        fit.fit(model, datamodule=digits())
    message = str(info.value)
    assert "\n" not in message
    assert "global step 4 (epoch 0, batch 4)" in message
    # the NaN mean of sample 0 poisons its reconstruction, its KL and so the β·KL penalty
    assert "recon (nan in 1 of 128 samples)" in message
    assert "kl (nan in 1 of 128 samples)" in message
    assert "penalty (kl) (nan in 1 of 128 samples)" in message
    assert fit.global_step == 4  # no optimizer step on the bad batch
    # last.ckpt is the one written after step 4's update: finite, and nothing was written since
    checkpoint = torch.load(last.path, weights_only=True)
    assert checkpoint["global_step"] == 4
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all(), name
    model_state = model.state_dict()
    saved_weights = checkpoint["state_dict"]
    # the bad batch changed nothing: the weights still equal the checkpoint's
    assert all(torch.equal(saved_weights[k], model_state[k]) for k in saved_weights)


def test_nan_in_the_data_raises(tmp_path: Path) -> None:
    model = tiny_model()
    with pytest.raises(NonFiniteLossError) as info:
        trainer(tmp_path, max_steps=4).fit(model, datamodule=PoisonedDigits({2}))
    message = str(info.value)
    assert "global step 2 (epoch 0, batch 2)" in message
    assert "recon (nan in 1 of 128 samples)" in message
    assert "kl (nan in 1 of 128 samples)" in message


def test_infinite_gradient_with_a_finite_loss_raises(tmp_path: Path) -> None:
    model = tiny_model()
    parameter = next(model.decoder.parameters())

    def infinite_gradient(grad: Tensor) -> Tensor:
        return torch.full_like(grad, math.inf) if model.global_step == 3 else grad

    parameter.register_hook(infinite_gradient)
    with pytest.raises(NonFiniteLossError) as info:
        trainer(tmp_path, max_steps=6).fit(model, datamodule=digits())
    message = str(info.value)
    names = [n for n, p in model.named_parameters() if p is parameter]
    assert message.startswith(
        f"non-finite gradient at global step 3 (epoch 0, batch 3) with a finite loss: {names[0]};"
    )


class CorruptWeightAt(pl.Callback):
    """Sets one decoder weight to +inf at the end of training step ``step`` (before the
    callbacks after it in the list run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.decoder.parameters()).view(-1)[0] = math.inf


def test_last_checkpoint_never_saves_non_finite_weights(tmp_path: Path) -> None:
    model = tiny_model()
    last = LastCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1)
    fit = trainer(tmp_path, max_steps=6, callbacks=[CorruptWeightAt(3), last])
    with pytest.raises(NonFiniteLossError) as info:
        fit.fit(model, datamodule=digits())
    name = next(n for n, _ in model.decoder.named_parameters())
    assert str(info.value) == (
        f"non-finite weights after global step 3 (epoch 0, batch 2): decoder.{name}; "
        f"{last.path} was not overwritten and holds the last finite ones"
    )
    checkpoint = torch.load(last.path, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


# ---------------------------------------------------------------------------- nan_policy=skip


class StepRecorder(pl.Callback):
    """Copies of the weights before and after each training batch, by global step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.after[trainer.global_step - 1] = {
            k: v.clone() for k, v in pl_module.state_dict().items()
        }


@pytest.mark.filterwarnings(SKIP_WARNING)
@pytest.mark.parametrize("poison", ["encoder", "data"])
def test_skip_policy_skips_and_counts(tmp_path: Path, poison: str) -> None:
    model = tiny_model(nan_policy="skip")
    datamodule = digits()
    if poison == "encoder":
        poison_encoder_at(model, {2, 5})
    else:
        datamodule = PoisonedDigits({2, 5})
    recorder = StepRecorder()
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="", version="")
    fit = trainer(tmp_path, max_steps=7, callbacks=[recorder], logger=logger, log_every_n_steps=1)
    fit.fit(model, datamodule=datamodule)
    assert model.skipped_batches == 2
    assert fit.global_step == 7  # a skipped batch still counts as a step
    for step in range(7):
        unchanged = all(
            torch.equal(recorder.before[step][k], recorder.after[step][k])
            for k in recorder.before[step]
        )
        assert unchanged is (step in (2, 5)), step  # skipped steps leave the weights alone
    for value in model.state_dict().values():
        assert torch.isfinite(value).all()
    # Adam took 5 steps, not 7
    optimizer = fit.optimizers[0]
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {5.0}
    # the running count is logged at every step
    import csv

    with open(tmp_path / "metrics.csv") as stream:
        rows = [r for r in csv.DictReader(stream) if r.get("train/skipped_batches")]
    counts = [float(r["train/skipped_batches"]) for r in rows]
    assert counts == [0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]


@pytest.mark.filterwarnings(SKIP_WARNING)
def test_skipped_count_survives_a_checkpoint(tmp_path: Path) -> None:
    model = tiny_model(nan_policy="skip")
    poison_encoder_at(model, {1})
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(model, datamodule=digits())
    fit.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert checkpoint["skipped_batches"] == 1
    resumed = tiny_model(nan_policy="skip")
    poison_encoder_at(resumed, {4})
    trainer(tmp_path, max_steps=5).fit(resumed, datamodule=digits(), ckpt_path=tmp_path / "a.ckpt")
    assert resumed.skipped_batches == 2


# ---------------------------------------------------------------------------- extreme raw outputs


def _set_encoder_output(model: LitVAE, raw: Tensor) -> None:
    """Make the encoder output ``raw`` for every input, through its own last layer: zero
    weights and ``raw`` as the bias, so gradients still flow into the encoder."""
    last = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(raw)


@pytest.mark.parametrize("name", POSTERIORS.names())
@pytest.mark.parametrize("extreme", [-1e4, -100.0, 100.0, 1e4])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_extreme_scale_outputs_give_finite_loss_and_gradients(
    name: str, extreme: float, likelihood: str
) -> None:
    """Every raw number after the mean (log σ², σ's raw value, the entries of L, the low-rank
    factor and diagonal) is set to ``extreme`` times a spread of 0.5..1, so scale factors are
    huge (overflow) or, through the floors, tiny (underflow)."""
    latent = 3
    model = tiny_model(latent_dim=latent, posterior={"name": name}, likelihood={"name": likelihood})
    head = model.posterior
    raw = torch.zeros(head.num_params)
    raw[latent:] = extreme * torch.linspace(0.5, 1.0, head.num_params - latent)
    raw[:latent] = torch.tensor([0.5, -1.0, 2.0])
    _set_encoder_output(model, raw)
    x = torch.rand(16, 1, 8, 8)
    terms = model.elbo_terms(x)
    loss = (terms.recon + terms.penalty.penalty).mean()
    assert torch.isfinite(loss), (name, extreme, float(loss))
    assert torch.isfinite(terms.penalty.kl).all()
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), (name, extreme, parameter_name)
    # the floor or the clamp is what held: the variance is positive and finite
    variance = model.encode(x).variance
    assert torch.isfinite(variance).all()
    assert (variance > 0).all()


@pytest.mark.parametrize("name", ["log_var", "log_std"])
def test_log_heads_clamp_as_documented(name: str) -> None:
    head = POSTERIORS.build(name, latent_dim=1)
    power = 2.0 if name == "log_var" else 1.0
    h = torch.tensor([[0.0, 1e6], [0.0, -1e6], [0.0, 1.0]], requires_grad=True)
    q = head(h)
    expected = torch.tensor([30.0, -30.0, 1.0]) / power
    torch.testing.assert_close(q.base_dist.scale.log().squeeze(-1), expected)
    q.base_dist.scale.sum().backward()
    assert h.grad is not None
    # zero gradient outside the clamp, the exact one inside
    assert h.grad[0, 1] == 0
    assert h.grad[1, 1] == 0
    torch.testing.assert_close(h.grad[2, 1], torch.tensor(math.exp(1.0 / power) / power))


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_cli_divergence_is_one_error_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [
            TRAIN,
            f"hydra.run.dir={tmp_path}",
            "optimizer=sgd",
            "optimizer.lr=1e4",
            "optimizer.momentum=0.0",
            "optimizer.nesterov=false",
            "model.encoder.hidden_sizes=[16]",
            "model.decoder.hidden_sizes=[16]",
            "trainer.max_epochs=1",
            "callbacks=minimal",
            "callbacks.last_checkpoint.every_n_train_steps=1",
            "logger=csv",
            "eval.num_samples=10",
            "trainer.deterministic=true",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: non-finite training loss at global step "), lines[-1]
    assert "(epoch 0, batch " in lines[-1]
    assert "recon (" in lines[-1]
    step = int(lines[-1].split("global step ")[1].split()[0])
    # last.ckpt, written after every step, is the one from just before the bad batch
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step
    for value in checkpoint["state_dict"].values():
        assert torch.isfinite(value).all()
    assert not (tmp_path / "results.json").exists()
