"""Training throughput of LitVAE with 1 and 2 CPU processes (DDP, gloo), and GPUs if present.

Each configuration is one fresh run of this script as a training job, the way users run DDP: a
``pytorch_lightning.Trainer(strategy="ddp", devices=N)`` in a script, which starts the processes
of ranks ``1..N-1`` by running the same command line again (Lightning's script launcher). The
data is MNIST in memory (``conf/data/mnist.yaml``: dynamic binarization, batch 128), the model
``experiment=mnist_mlp`` (784-512-256-32). Throughput is global training samples per second
over one epoch, from the end of the first ``--warmup-steps`` steps to the end of the epoch
(epoch-end metric reduction included), measured on rank 0; every step synchronizes the ranks.

With 2 cores, a process count is only fair with a thread count: ``1 process × 1 thread`` is one
worker on one core, the reference of the scaling efficiency ``throughput_N / (N ×
throughput_1)``; ``2 processes × 1 thread`` is two such workers on the two cores. ``1 process ×
2 threads`` uses the same two cores through intra-op threads, so ``throughput(2 processes × 1
thread) / throughput(1 process × 2 threads)`` says whether DDP or threading makes better use of
the machine. Strong scaling keeps the global batch (128 = 2 × 64); weak scaling keeps the batch
per process (2 × 128, against 1 × 128).

Configurations run in interleaved rounds (``A B C D A B C D``); the table gives medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from common import base_parser, interleaved_medians, markdown_table, print_environment
from mnist_vae import DEFAULT_DATA_ROOT, mlp_vae, mnist_datamodule, mnist_options

from lit_vae.build import quiet_lightning_advice
from lit_vae.distributed import end_process_group


class Config(NamedTuple):
    label: str
    accelerator: str
    processes: int
    threads: int
    batch_size: int  # per process


# ------------------------------------------------------------------------------ training job


class Throughput(pl.Callback):
    """Global samples per second from batch ``warmup_steps`` to the end of the first epoch."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.start = 0.0
        self.samples = 0
        self.result: dict[str, float] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup_steps:
            self.start = time.perf_counter()
        if batch_idx >= self.warmup_steps:
            self.samples += int(batch[0].shape[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result:
            return
        seconds = time.perf_counter() - self.start
        local = torch.tensor(float(self.samples))
        samples = float(trainer.strategy.reduce(local, reduce_op="sum"))
        self.result = {"samples": samples, "seconds": seconds, "per_second": samples / seconds}


def train_job(args: argparse.Namespace) -> None:
    """One training run; rank 0 writes its throughput to ``args.out``."""
    torch.set_num_threads(args.threads)
    quiet_lightning_advice()
    pl.seed_everything(args.seed, verbose=False)
    datamodule = mnist_datamodule(args.data_root, batch_size=args.batch_size)
    model = mlp_vae(args.hidden_sizes, args.latent_dim)
    throughput = Throughput(args.warmup_steps)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.processes,
        strategy="ddp" if args.processes > 1 else "auto",
        max_epochs=1,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[throughput],
    )
    trainer.fit(model, datamodule=datamodule)
    if trainer.global_rank == 0:
        result = {**throughput.result, "world_size": trainer.world_size}
        result["threads"] = torch.get_num_threads()
        Path(args.out).write_text(json.dumps(result))
    end_process_group(synchronize=True)


# ------------------------------------------------------------------------------ parent


def _job_command(args: argparse.Namespace, config: Config, out: Path) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--job",
        "--out", str(out),
        "--accelerator", config.accelerator,
        "--processes", str(config.processes),
        "--threads", str(config.threads),
        "--batch-size", str(config.batch_size),
        "--data-root", args.data_root,
        "--warmup-steps", str(args.warmup_steps),
        "--limit-train-batches", str(args.limit_train_batches),
        "--hidden-sizes", *map(str, args.hidden_sizes),
        "--latent-dim", str(args.latent_dim),
        "--seed", str(args.seed),
    ]  # fmt: skip


def _run_job(command: list[str], threads: int, out: Path, log: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("LOCAL_RANK", None)
    with log.open("w") as handle:
        done = subprocess.run(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=3600
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} exited {done.returncode}:\n{log.read_text()[-3000:]}"
        )
    return dict(json.loads(out.read_text()))


def configs(batch_size: int) -> list[Config]:
    half = batch_size // 2
    found = [
        Config("1 process × 1 thread", "cpu", 1, 1, batch_size),
        Config("1 process × 2 threads", "cpu", 1, 2, batch_size),
        Config(f"2 processes × 1 thread, {half} each (strong)", "cpu", 2, 1, half),
        Config(f"2 processes × 1 thread, {batch_size} each (weak)", "cpu", 2, 1, batch_size),
    ]
    gpus = torch.cuda.device_count()
    if gpus:
        found.append(Config("1 GPU", "gpu", 1, 1, batch_size))
    if gpus > 1:
        share = batch_size // gpus
        found.append(Config(f"{gpus} GPUs, {share} each (strong)", "gpu", gpus, 1, share))
        found.append(Config(f"{gpus} GPUs, {batch_size} each (weak)", "gpu", gpus, 1, batch_size))
    return found


def main() -> None:
    options = mnist_options()
    parser = base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--batch-size", type=int, default=options["batch_size"])
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--latent-dim", type=int, default=32)
    for name, kind, default in (
        ("--job", bool, False),
        ("--out", str, ""),
        ("--accelerator", str, "cpu"),
        ("--processes", int, 1),
        ("--threads", int, 1),
    ):
        if kind is bool:
            parser.add_argument(name, action="store_true", help=argparse.SUPPRESS)
        else:
            parser.add_argument(name, type=kind, default=default, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        train_job(args)
        return

    print_environment()
    print("# command: python " + shlex.join(sys.argv))
    runs = configs(args.batch_size)
    results: dict[str, list[dict[str, Any]]] = {c.label: [] for c in runs}
    with tempfile.TemporaryDirectory(prefix="lit-vae-ddp-") as tmp:

        def contender(config: Config, index: int) -> Any:
            out, log = Path(tmp) / f"{index}.json", Path(tmp) / f"{index}.log"

            def run() -> None:
                result = _run_job(_job_command(args, config, out), config.threads, out, log)
                results[config.label].append(result)
                print(f"# done: {config.label}: {result}", flush=True)

            return run

        walls = interleaved_medians(
            {c.label: contender(c, i) for i, c in enumerate(runs)}, repeats=args.rounds, warmup=0
        )

    per_second = {
        label: statistics.median(r["per_second"] for r in rs) for label, rs in results.items()
    }
    one = per_second[runs[0].label]
    same_cores = per_second[runs[1].label]
    gpu_one = per_second.get("1 GPU")
    rows = []
    for config in runs:
        value = per_second[config.label]
        base = gpu_one if config.accelerator == "gpu" else one
        n = config.processes
        rows.append(
            [
                config.label,
                config.processes * config.threads if config.accelerator == "cpu" else n,
                config.batch_size * n,
                f"{value:.0f}",
                f"{min(r['per_second'] for r in results[config.label]):.0f}–"
                f"{max(r['per_second'] for r in results[config.label]):.0f}",
                f"{value / (n * base):.2f}" if base else "-",
                f"{value / same_cores:.2f}" if config.accelerator == "cpu" else "-",
                f"{walls[config.label]:.0f}",
            ]
        )
    headers = [
        "configuration",
        "cores (CPU) / GPUs",
        "global batch",
        "samples/s (median)",
        "range",
        "efficiency thr_N / (N·thr_1)",
        "vs 1 process × 2 threads",
        "job wall s",
    ]
    print()
    print(markdown_table(headers, rows))
    timed = int(results[runs[0].label][0]["samples"])
    print()
    print(
        f"Throughput: global samples per second over the {timed} samples of one epoch that "
        f"follow {args.warmup_steps} warm-up steps, median of {args.rounds} interleaved "
        "rounds. thr_1 = 1 process × 1 thread (CPU) or 1 GPU. 'job wall s' includes start-up, "
        "data loading and the warm-up."
    )


if __name__ == "__main__":
    main()
