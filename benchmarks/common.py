"""What every benchmark script shares: the environment header, side-by-side timing, tables.

Timings are medians over interleaved repeats (``A B A B ...``), so a slow-down of the machine
during a run hits every contender alike and the printed ratios stay comparable.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "base_parser",
    "environment",
    "interleaved_medians",
    "markdown_table",
    "pick_device",
    "print_environment",
    "synchronize",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict[str, str]:
    """Date, machine, device and library versions, for the header of a results table."""
    import pytorch_lightning

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_environment(device: torch.device | None = None) -> None:
    for key, value in environment(device).items():
        print(f"# {key}: {value}")


def pick_device(name: str) -> torch.device:
    """``auto`` → the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in interleaved rounds."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for call in contenders.values():
            call()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, call in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep what ``format`` gave them upstream."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser
