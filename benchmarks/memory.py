"""Peak memory and speed of ``test/nll``: chunked importance sampling against all ``k`` at once.

``test/nll`` is ``-LitVAE.log_likelihood(x, k, chunk_size)`` on every test batch of
``eval_batch_size`` items (``conf/data/mnist.yaml``). Every row runs in a fresh child process that
loads only the test images and the model, so the memory it reports is that of the evaluation:

* CPU: the growth of the resident set, ``VmHWM - VmRSS`` (peak minus the resident size just
  before), with the peak reset through ``/proc/self/clear_refs`` after loading; where that file
  cannot be written, ``ru_maxrss`` after minus the resident size before. The process peak
  (Python, torch, model, data and evaluation) is reported too.
* GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated before.

The chunked estimate holds one chunk of ``chunk × batch`` decoder outputs at a time, so its peak
depends on ``chunk × batch``, not on the number of test items nor on ``k``: one full test batch
is a representative subset (``--test-subset``). All ``k`` samples at once hold ``k × batch``
outputs: that is measured on a few small batches (``--naive-items``) and extrapolated linearly
to a full test batch, clearly labelled. Time is reported per 1000 test items at the row's ``k``
and per item·sample, which do not depend on the subset size.

Run ``python benchmarks/memory.py --data-root /work/shared/data/mnist``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    base_parser,
    interleaved_medians,
    markdown_table,
    pick_device,
    print_environment,
)
from mnist_vae import DEFAULT_DATA_ROOT, mlp_vae, mnist_datamodule, mnist_options

MIB = 2**20
TARGET_BYTES = 2 * 2**30


# ------------------------------------------------------------------------------ child process


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the peak resident size (``VmHWM``) to the current one; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One evaluation of ``test/nll`` as ``spec`` describes, in this (fresh) process."""
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    x_all = torch.load(spec["data"], weights_only=True)[: spec["items"]]
    model = mlp_vae(spec["hidden_sizes"], spec["latent_dim"])
    model.load_state_dict(torch.load(spec["state"], weights_only=True))
    model.eval().to(device)
    chunks_seen: list[int] = []
    model.decoder.register_forward_pre_hook(lambda _, args: chunks_seen.append(args[0].shape[0]))
    model.log_likelihood(x_all[:2].to(device), 2, 1)  # warm-up: kernels, thread pools
    chunks_seen.clear()
    gc.collect()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _status_bytes("VmRSS")
        exact_peak = _reset_peak_rss()
    start = time.perf_counter()
    nll_sum = 0.0
    for x in x_all.split(spec["eval_batch_size"]):
        nll = -model.log_likelihood(x.to(device), spec["num_samples"], spec["chunk_size"])
        nll_sum += float(nll.sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        process_peak = peak
        how = "cuda.max_memory_allocated"
    else:
        if exact_peak:
            peak, how = _status_bytes("VmHWM"), "VmHWM after clear_refs"
        else:  # ru_maxrss is in KiB on Linux and may include a peak from before the reset
            peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
        process_peak = peak
    return {
        "growth": max(0, peak - before),
        "process_peak": process_peak,
        "seconds": seconds,
        "mean_nll": nll_sum / x_all.shape[0],
        "chunk": max(chunks_seen),
        "how": how,
    }


# ------------------------------------------------------------------------------ parent


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {spec}\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` against ``xs``."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var_x = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x
    return mean_y - slope * mean_x, slope


def speed_rows(
    base: dict[str, Any], chunk_sizes: list[int], k: int, repeats: int, full_k: int
) -> list[list[Any]]:
    """Seconds of ``log_likelihood`` on one test batch per chunk size, interleaved in one
    process, so that the chunk sizes compare fairly on a busy machine."""
    device = torch.device(base["device"])
    x = torch.load(base["data"], weights_only=True)[: base["eval_batch_size"]].to(device)
    model = mlp_vae(base["hidden_sizes"], base["latent_dim"])
    model.load_state_dict(torch.load(base["state"], weights_only=True))
    model.eval().to(device)
    chunks: list[int | None] = [None, *(c for c in chunk_sizes if c <= k)]
    contenders = {
        "default" if c is None else f"chunk {c}": (lambda c=c: model.log_likelihood(x, k, c))
        for c in chunks
    }
    medians = interleaved_medians(contenders, repeats=repeats, warmup=1, device=device)
    rows = []
    for name, seconds in medians.items():
        per_item_sample = seconds / (x.shape[0] * k)
        rows.append(
            [
                name,
                x.shape[0],
                k,
                f"{seconds:.2f}",
                f"{per_item_sample * 1e9:.0f}",
                f"{per_item_sample * 1000 * full_k:.0f}",
                f"{seconds / medians['default']:.2f}",
            ]
        )
    return rows


def main() -> None:
    options = mnist_options()
    parser = base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples k")
    parser.add_argument(
        "--test-subset", type=int, default=options["eval_batch_size"],
        help="test items of the main rows (default: one full test batch)",
    )  # fmt: skip
    parser.add_argument("--eval-batch-size", type=int, default=options["eval_batch_size"])
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="*", default=[1, 32, 128],
        help="explicit chunk sizes, run on --test-subset items with --sweep-samples samples",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-samples", type=int, default=512,
        help="k of the explicit chunk sizes (their peak does not depend on k >= chunk)",
    )  # fmt: skip
    parser.add_argument(
        "--naive-items", type=int, nargs="*", default=[5, 10, 20],
        help="batch sizes of the all-k-at-once rows, extrapolated to a full test batch",
    )  # fmt: skip
    parser.add_argument("--timing-samples", type=int, default=256, help="k of the speed table")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    device = pick_device(args.device)
    print_environment(device)
    print("# command: python " + shlex.join(sys.argv))
    k, batch = args.num_samples, args.eval_batch_size
    with tempfile.TemporaryDirectory(prefix="lit-vae-memory-") as tmp:
        datamodule = mnist_datamodule(args.data_root, eval_batch_size=batch)
        x_test = datamodule.split("test")[0]  # binarize=dynamic: the fixed test bits
        needed = max([args.test_subset, *args.naive_items])
        torch.save(x_test[:needed].clone(), Path(tmp) / "x.pt")
        torch.manual_seed(args.seed)
        model = mlp_vae(args.hidden_sizes, args.latent_dim)
        torch.save(model.state_dict(), Path(tmp) / "state.pt")
        del datamodule, x_test, model
        base = {
            "data": str(Path(tmp) / "x.pt"),
            "state": str(Path(tmp) / "state.pt"),
            "hidden_sizes": args.hidden_sizes,
            "latent_dim": args.latent_dim,
            "eval_batch_size": batch,
            "device": str(device),
            "seed": args.seed,
        }
        runs: list[tuple[str, dict[str, Any]]] = [
            ("chunked, default chunk", {"items": args.test_subset, "num_samples": k}),
            *(
                (
                    f"chunked, chunk {c}",
                    {
                        "items": args.test_subset,
                        "chunk_size": c,
                        "num_samples": max(c, args.sweep_samples),
                    },
                )
                for c in args.chunk_sizes
            ),
            *(
                ("chunked, default chunk", {"items": n, "num_samples": k})
                for n in args.naive_items[-1:]
            ),
            *(
                ("naive, all k at once", {"items": n, "num_samples": k, "chunk_size": k})
                for n in args.naive_items
            ),
        ]
        results = []
        for label, spec in runs:
            spec = {**base, "chunk_size": None, **spec}
            result = _run_child(spec)
            results.append((label, spec, result))
            print(f"# done: {label}, {spec['items']} items, k={spec['num_samples']}: {result}")
        speed = speed_rows(base, args.chunk_sizes, args.timing_samples, args.timing_repeats, k)

    reference = results[0][2]["growth"]
    rows = []
    for label, spec, result in results:
        per_item_sample = result["seconds"] / (spec["items"] * spec["num_samples"])
        rows.append(
            [
                label,
                spec["items"],
                min(spec["items"], batch),
                spec["num_samples"],
                result["chunk"],
                f"{result['growth'] / MIB:.0f}",
                f"{result['process_peak'] / MIB:.0f}",
                f"{result['growth'] / reference:.2f}",
                f"{per_item_sample * 1000 * spec['num_samples']:.1f}",
                f"{per_item_sample * 1e9:.0f}",
                f"{result['mean_nll']:.2f}",
                "measured",
            ]
        )
    naive = [
        (spec["items"], result["growth"]) for label, spec, result in results if "naive" in label
    ]
    if len(naive) >= 2:
        intercept, slope = _linear_fit([float(n) for n, _ in naive], [float(g) for _, g in naive])
        growth = intercept + slope * batch
        rows.append(
            [
                "naive, all k at once",
                batch,
                batch,
                k,
                k,
                f"{growth / MIB:.0f}",
                "-",
                f"{growth / reference:.0f}",
                "-",
                "-",
                "-",
                f"extrapolated: linear fit of the naive rows ({slope / MIB:.1f} MiB per item)",
            ]
        )
    headers = [
        "test/nll",
        "test items",
        "batch",
        "k",
        "chunk",
        "peak growth MiB",
        "process peak MiB",
        "growth / default",
        "s per 1000 items × k",
        "ns per item·sample",
        "mean NLL (untrained)",
        "",
    ]
    print()
    print(markdown_table(headers, rows))
    print()
    print(
        f"Speed by chunk size: one test batch, k={args.timing_samples}, medians of "
        f"{args.timing_repeats} interleaved repeats in one process (time is linear in k)."
    )
    print()
    speed_headers = [
        "chunk",
        "test items",
        "k",
        "s per call",
        "ns per item·sample",
        f"s per 1000 items × {k} (scaled)",
        "time / default",
    ]
    print(markdown_table(speed_headers, speed))
    main_row = results[0][2]
    per_1000 = main_row["seconds"] / results[0][1]["items"] * 1000
    print()
    print(
        f"Memory measured as {main_row['how']} in a fresh process per row; 'growth / default' "
        f"divides by the first row. Test batch {batch} (eval_batch_size, "
        f"{options['eval_batch_size']} in conf/data/mnist.yaml); "
        f"decoder outputs of one chunk: chunk × batch × 784 floats. Peak with chunking depends "
        f"on chunk × batch only, not on the number of test items nor on k."
    )
    print(
        f"Full test set (10000 items, k={k}) projected from the first row: "
        f"{per_1000 * 10 / 60:.1f} min."
    )
    verdict = "met" if main_row["process_peak"] < TARGET_BYTES else "NOT met"
    print(
        f"Target: test/nll with k={k} under 2 GiB: {verdict} (process peak "
        f"{main_row['process_peak'] / MIB:.0f} MiB, of which the evaluation "
        f"{main_row['growth'] / MIB:.0f} MiB)."
    )


if __name__ == "__main__":
    main()
