"""Training throughput of ``LitVAE`` vs a hand-written PyTorch loop, and vs pythae.

Model: MNIST 784-200-200-50 MLP (ReLU), ``log_var`` head, Bernoulli decoder, Adam lr 1e-3,
batch 128, statically binarized training images held in memory (the same tensor for everyone).

* **lit-vae**: built from the packaged Hydra config (``lit_vae.conf``, the defaults a user gets)
  and trained by a Lightning ``Trainer`` with the CSV logger, as ``lit-vae-train`` does, without
  validation, checkpoints and image callbacks.
* **hand loop**: :mod:`hand_loop` — the identical loss on the identical data, sliced batches.
* **pythae**: the same networks as a ``pythae.models.VAE`` trained by its ``BaseTrainer``, run
  in a benchmark venv (``benchmarks/.venv-pythae``, created on first use) by
  ``pythae_epochs.py``, next to the hand loop again; skipped with a message if it cannot be set up.

Epochs are interleaved (one lit-vae epoch, one hand-loop epoch, ...) inside one process, so
both see the same machine; the first epoch of each is warm-up. pythae and lit-vae run in
different processes, so their ratio goes through the hand loop, measured in both:
``lit-vae / pythae = (lit-vae / hand loop) × (hand loop / pythae)``.

    python benchmarks/throughput.py --epochs 4
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import base_parser, markdown_table, pick_device, print_environment, synchronize
from hand_loop import HandVAE, hand_epoch

HERE = Path(__file__).resolve().parent
PYTHAE_VENV = HERE / ".venv-pythae"


def load_images(root: str, limit: int | None) -> tuple[torch.Tensor, str]:
    """Binarized training images ``(n, 1, 28, 28)``: MNIST's when its files are in ``root``."""
    from lit_vae.data import load_mnist

    try:
        x = load_mnist(root)["train"][0]
        source = f"MNIST train ({root})"
    except (OSError, ValueError) as error:
        print(f"# MNIST not found ({error}); random binary 28x28 images instead")
        x = torch.rand(60000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        source = "random 28x28"
    x = (x > 0.5).float()
    return (x[:limit] if limit else x), source


def lit_vae_config(output_dir: str, args: Any) -> Any:
    """The packaged training config with the benchmark's model and the user's defaults."""
    from hydra import compose, initialize_config_module

    overrides = [
        "latent_dim=50",
        "model.encoder.hidden_sizes=[200,200]",
        "model.decoder.hidden_sizes=[200,200]",
        "posterior=log_var",
        "likelihood=bernoulli",
        f"paths.output_dir={output_dir}",
        *args.override,
    ]
    with initialize_config_module("lit_vae.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


class InterleavedEpochs(pl.Callback):
    """Times each Lightning training epoch, then runs and times one hand-loop epoch."""

    def __init__(self, hand_step: Any, device: torch.device) -> None:
        self.hand_step = hand_step
        self.device = device
        self.lit_vae: list[float] = []
        self.hand: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(self.device)
        self.lit_vae.append(time.perf_counter() - self._start)
        start = time.perf_counter()
        with torch.enable_grad():
            self.hand_step()
        synchronize(self.device)
        self.hand.append(time.perf_counter() - start)


def measure_lit_vae_and_hand(
    x: torch.Tensor, device: torch.device, args: Any
) -> tuple[list[float], list[float]]:
    from lit_vae.build import build_loggers, build_model, quiet_lightning_advice
    from lit_vae.data import TensorDataModule

    quiet_lightning_advice()
    hand = HandVAE(x[0].numel(), [200, 200], 50).to(device)
    hand_optimizer = torch.optim.Adam(hand.parameters(), lr=1e-3)
    flat = x.flatten(1).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def hand_step() -> None:
        hand_epoch(hand, hand_optimizer, flat, args.batch_size, generator)

    clock = InterleavedEpochs(hand_step, device)
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = lit_vae_config(output_dir, args)
        pl.seed_everything(args.seed, verbose=False)
        datamodule = TensorDataModule(
            train=x,
            val=x[:1],
            batch_size=args.batch_size,
            on_device=device.type == "cuda",
        )
        model = build_model(cfg, tuple(x.shape[1:]))
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_epochs=args.epochs + 1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=build_loggers(cfg.logger) or False,
            callbacks=[clock],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=datamodule)
    return clock.lit_vae[1:], clock.hand[1:]


def ensure_pythae_venv() -> Path | None:
    """The benchmark venv's python, installing torch (this version) and pythae on first use."""
    python = PYTHAE_VENV / "bin" / "python"
    check = [str(python), "-c", "import pythae"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"# setting up {PYTHAE_VENV} (torch=={torch.__version__.split('+')[0]}, pythae)")
    steps = [
        [sys.executable, "-m", "venv", str(PYTHAE_VENV)],
        [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
        [str(python), "-m", "pip", "install", "-q", "pythae"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"# pythae skipped: {' '.join(step)} failed:\n{result.stderr[-2000:]}")
            return None
    return python


def measure_pythae_and_hand(
    x: torch.Tensor, device: torch.device, args: Any
) -> tuple[list[float], list[float]] | None:
    python = ensure_pythae_venv()
    if python is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.pt"
        torch.save(x.flatten(1), data)
        command = [
            str(python),
            str(HERE / "pythae_epochs.py"),
            str(data),
            f"--epochs={args.epochs + 1}",
            f"--batch-size={args.batch_size}",
            f"--device={device}",
            f"--threads={torch.get_num_threads()}",
            f"--seed={args.seed}",
            f"--output-dir={tmp}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"# pythae run failed:\n{result.stderr[-3000:]}")
        return None
    times = json.loads(result.stdout.strip().splitlines()[-1])
    return times["pythae"][1:], times["hand"][1:]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs, after one warm-up")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument(
        "--data-root", default=os.environ.get("LIT_VAE_DATA_DIR", str(HERE.parent / "data/mnist"))
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, everyone"
    )
    parser.add_argument("--no-pythae", action="store_true")
    parser.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides for lit-vae"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print_environment(device)
    print(f"# command: python {' '.join(sys.argv)}")
    x, source = load_images(args.data_root, args.limit)
    print(f"# data: {source}, {x.shape[0]} images, batch {args.batch_size}, device {device}")

    lit_times, hand_times = measure_lit_vae_and_hand(x, device, args)
    n = x.shape[0]
    lit_rate = n / statistics.median(lit_times)
    hand_rate = n / statistics.median(hand_times)
    rows = [
        ["hand-written loop", f"{hand_rate:,.0f}", "1.00"],
        ["lit-vae (LitVAE + Trainer)", f"{lit_rate:,.0f}", f"{lit_rate / hand_rate:.2f}"],
    ]
    pythae = None if args.no_pythae else measure_pythae_and_hand(x, device, args)
    if pythae is not None:
        pythae_rate = n / statistics.median(pythae[0])
        hand_there = n / statistics.median(pythae[1])
        rows.append(
            ["pythae (VAE + BaseTrainer)", f"{pythae_rate:,.0f}", f"{pythae_rate / hand_there:.2f}"]
        )
        print(markdown_table(["trainer", "samples/s", "vs hand loop"], rows))
        print()
        print(f"hand loop / pythae: {hand_there / pythae_rate:.2f}x")
        print(f"lit-vae / pythae: {lit_rate / hand_rate * hand_there / pythae_rate:.2f}x")
    else:
        print(markdown_table(["trainer", "samples/s", "vs hand loop"], rows))
    print(f"lit-vae / hand loop: {lit_rate / hand_rate:.2f}")


if __name__ == "__main__":
    main()
