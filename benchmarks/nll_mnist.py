"""Test NLL on dynamically binarized MNIST under the IWAE paper's protocol, per posterior head.

Burda et al. (2016), Table 1: 784-200-200-50 tanh encoder, Bernoulli decoder (50-200-200-784
tanh) starting at the logit of the mean pixel, Adam (β 0.9, 0.999, ε 1e-4), batch 20, 3^i epochs
at lr 1e-3 · 10^(−i/7) for i = 0..7 (3280 epochs), test NLL with k = 5000. Published: VAE (k=1)
86.76 nats, IWAE (k=50) 84.78.

Every run goes through the command-line tools users run: ``lit-vae-train experiment=iwae_mnist
posterior=<head> ...`` trains (resuming from ``last.ckpt`` stage by stage with
``--eval-every-stage``), then ``lit-vae-eval ckpt_path=<run>/checkpoints/last.ckpt`` computes
the test NLL with ``--test-samples`` importance samples. ``--budget`` shrinks every stage of the
schedule: stage ``i`` lasts ``max(1, ceil(budget · 3^i))`` epochs (:func:`iwae_stage_epochs`).

    python benchmarks/nll_mnist.py                                    # the whole protocol
    python benchmarks/nll_mnist.py --budget 0.01 --test-subset 1000   # minutes per head on a CPU
    python benchmarks/nll_mnist.py --objective iwae                   # the IWAE (k=50) row

Runs are not timed against each other (no ratios), so they need no benchmark lock; the wall
times are for planning.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, markdown_table, pick_device, print_environment

from lit_vae.optim import iwae_stage_epochs

REPO = Path(__file__).resolve().parents[1]
HEADS = ("log_var", "log_std", "cholesky")
MNIST_TEST_SIZE = 10000
PUBLISHED = (
    ("VAE", 1, 86.76),
    ("IWAE", 50, 84.78),
)
"""Burda et al. (2016), Table 1, one stochastic layer: (model, training k, test NLL, k=5000)."""


@dataclass
class StagePoint:
    """The test metrics after ``epochs`` epochs (the end of a stage)."""

    epochs: int
    nll: float
    elbo: float
    train_s: float
    test_s: float


@dataclass
class HeadResult:
    head: str
    points: list[StagePoint] = field(default_factory=list)

    @property
    def final(self) -> StagePoint:
        return self.points[-1]

    @property
    def wall_s(self) -> float:
        return sum(p.train_s + p.test_s for p in self.points)


def _tool(name: str) -> list[str]:
    """The console script ``name`` of this environment, else ``python -m`` its module."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module = {"lit-vae-train": "lit_vae.train", "lit-vae-eval": "lit_vae.eval"}[name]
    return [sys.executable, "-m", module]


def _eval_batch_size(test_items: int) -> int:
    """The largest batch of at most 1000 items that divides ``test_items`` evenly, so
    ``limit_test_batches`` batches hold exactly the first ``test_items`` test images."""
    return next(b for b in range(min(test_items, 1000), 0, -1) if test_items % b == 0)


def _run(command: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run ``command``, its output into ``log_path``; the wall seconds. Fails loudly."""
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        result = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False
        )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-30:]
        raise SystemExit(
            f"exited {result.returncode} after {seconds:.0f} s; the end of {log_path}:\n"
            + "\n".join(tail)
        )
    return seconds


def _train_overrides(args: argparse.Namespace, head: str, run_dir: Path) -> list[str]:
    overrides = [
        "experiment=iwae_mnist",
        f"posterior={head}",
        f"data.root={args.data_root}",
        f"seed={args.seed}",
        f"scheduler.budget={args.budget}",
        "test=false",
        "callbacks=minimal",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
    ]
    if args.objective == "iwae":
        overrides += ["objective=iwae", f"objective.num_samples={args.iwae_samples}"]
    if args.device_type == "cuda":
        overrides += ["trainer=gpu", "data.on_device=true"]
    return overrides + args.override


def _eval_overrides(args: argparse.Namespace, run_dir: Path, epochs: int) -> list[str]:
    batch = _eval_batch_size(args.test_subset)
    overrides = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"eval.num_samples={args.test_samples}",
        f"++data.root={args.data_root}",
        f"++data.eval_batch_size={batch}",
        f"++trainer.limit_test_batches={args.test_subset // batch}",
        "trainer.enable_progress_bar=false",
        f"output={run_dir / f'eval-epoch{epochs:04d}.json'}",
        f"hydra.run.dir={run_dir / 'eval'}",
    ]
    if args.device_type == "cuda":
        overrides += ["trainer=gpu"]
    return overrides


def run_head(args: argparse.Namespace, head: str, stage_ends: list[int]) -> HeadResult:
    """Train ``head`` through the schedule and evaluate it where ``--eval-every-stage`` says."""
    run_dir = args.output_dir / head
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    points = stage_ends if args.eval_every_stage else stage_ends[-1:]
    result = HeadResult(head)
    for epochs in points:
        train = [
            *_tool("lit-vae-train"),
            *_train_overrides(args, head, run_dir),
            f"trainer.max_epochs={epochs}",
            "ckpt_path=last",
        ]
        train_s = _run(train, run_dir / "train.out", env)
        evaluate = [*_tool("lit-vae-eval"), *_eval_overrides(args, run_dir, epochs)]
        test_s = _run(evaluate, run_dir / "eval.out", env)
        metrics = json.loads((run_dir / f"eval-epoch{epochs:04d}.json").read_text())
        point = StagePoint(epochs, metrics["test/nll"], metrics["test/elbo"], train_s, test_s)
        result.points.append(point)
        print(
            f"# {head}: {epochs} epochs, test NLL {point.nll:.2f}, test ELBO {point.elbo:.2f} "
            f"(train {train_s:.0f} s, test {test_s:.0f} s)",
            flush=True,
        )
    return result


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def print_tables(args: argparse.Namespace, results: list[HeadResult], stages: list[int]) -> None:
    k = args.test_samples
    subset = "" if args.test_subset == MNIST_TEST_SIZE else f", first {args.test_subset} images"
    objective = "ELBO (k=1)" if args.objective == "elbo" else f"IWAE (k={args.iwae_samples})"
    print(
        f"\n### Test NLL, IWAE protocol, {objective} training, budget {args.budget:g} "
        f"({sum(stages)} of 3280 epochs; stages {stages}), k={k}{subset}\n"
    )
    rows = [
        [
            r.head,
            r.final.epochs,
            f"{args.budget:g}",
            f"{r.final.nll:.2f}",
            f"{r.final.elbo:.2f}",
            f"{_minutes(r.wall_s)} (test {_minutes(sum(p.test_s for p in r.points))})",
        ]
        for r in results
    ]
    headers = ["head", "epochs", "budget", f"test NLL (k={k})", "test ELBO", "wall time"]
    print(markdown_table(headers, rows))
    if args.eval_every_stage:
        print(f"\n### Test NLL (k={k}) at the end of each stage\n")
        by_head = [f"{r.head} NLL" for r in results]
        stage_rows = [
            [stage, point.epochs, *(f"{r.points[stage].nll:.2f}" for r in results)]
            for stage, point in enumerate(results[0].points)
        ]
        print(markdown_table(["stage", "epochs", *by_head], stage_rows))
    by_name = {r.head: r.final for r in results}
    if "cholesky" in by_name and "log_std" in by_name:
        full, diagonal = by_name["cholesky"], by_name["log_std"]
        print(
            f"\nFull covariance (cholesky) − diagonal (log_std), budget {args.budget:g}: "
            f"test NLL {full.nll - diagonal.nll:+.2f} nats, test ELBO "
            f"{full.elbo - diagonal.elbo:+.2f} nats (negative NLL / positive ELBO: the full "
            "covariance is better)"
        )
    print("\n### Published (Burda et al. 2016, Table 1, 3280 epochs, k=5000, all test images)\n")
    print(
        markdown_table(
            ["model", "training k", "test NLL"],
            [[name, train_k, f"{nll:.2f}"] for name, train_k, nll in PUBLISHED],
        )
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="fraction of the schedule: stage i lasts max(1, ceil(budget · 3^i)) epochs",
    )
    parser.add_argument("--heads", nargs="+", default=list(HEADS), help="posterior heads")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path(os.environ.get("LIT_VAE_DATA_DIR", "/work/shared/data/mnist")),
        help="the four MNIST IDX files (default: $LIT_VAE_DATA_DIR or /work/shared/data/mnist)",
    )
    parser.add_argument("--test-samples", type=int, default=5000, help="k of the test NLL")
    parser.add_argument(
        "--test-subset",
        type=int,
        default=MNIST_TEST_SIZE,
        help="evaluate the first N test images (default: all 10000)",
    )
    parser.add_argument("--objective", choices=("elbo", "iwae"), default="elbo")
    parser.add_argument(
        "--iwae-samples", type=int, default=50, help="k of the IWAE training objective"
    )
    parser.add_argument(
        "--eval-every-stage",
        action="store_true",
        help="evaluate at the end of every stage (resuming the run), not only at the end",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the runs (0: torch's default); batch 20 runs best on one",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more lit-vae-train override (repeatable), e.g. trainer.limit_train_batches=50",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="run dirs go here (default: outputs/benchmarks/nll_mnist-<time>)",
    )
    args = parser.parse_args(argv)
    if not args.budget > 0 or not math.isfinite(args.budget):
        parser.error(f"--budget={args.budget}: must be a number > 0")
    if not 1 <= args.test_subset <= MNIST_TEST_SIZE:
        parser.error(f"--test-subset={args.test_subset}: must be in 1..{MNIST_TEST_SIZE}")
    if args.test_samples < 1 or args.iwae_samples < 1:
        parser.error("--test-samples and --iwae-samples must be >= 1")
    unknown = sorted(set(args.heads) - {"log_var", "log_std", "std", "var", "cholesky"})
    if unknown:
        parser.error(f"--heads: unknown {unknown}; allowed: log_var, log_std, std, var, cholesky")
    if args.output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        args.output_dir = REPO / "outputs" / "benchmarks" / f"nll_mnist-{stamp}"
    args.output_dir = args.output_dir.resolve()
    args.data_root = args.data_root.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    args.device_type = device.type
    stage_epochs = iwae_stage_epochs(budget=args.budget)
    stage_ends = [sum(stage_epochs[: i + 1]) for i in range(len(stage_epochs))]
    print_environment(device)
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# stage epochs {stage_epochs}, {stage_ends[-1]} in all; runs in {args.output_dir}")
    print(f"# OMP_NUM_THREADS of the runs: {args.threads or 'torch default'}", flush=True)
    results = [run_head(args, head, stage_ends) for head in args.heads]
    print_tables(args, results, stage_epochs)
    print(f"\n# command: {shlex.join([sys.executable, *sys.argv])}")


if __name__ == "__main__":
    main()
