"""Read back what W&B wrote offline: ``<dir>/wandb/offline-run-*/run-<id>.wandb``.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version) and
then LevelDB log records (``crc32 | length | type | data`` in 32 KiB blocks, long records split
into FIRST/MIDDLE/LAST pieces), each a serialized ``wandb_internal_pb2.Record``. W&B 0.31 has
no Python reader of its own, so this one follows the format and checks every checksum.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B"
HEADER_LEN = 7
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_bytes(path: Path) -> Iterator[bytes]:
    """The payload of every record in a ``.wandb`` file, checksums verified."""
    data = path.read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path}: not a W&B transaction log (starts {data[:7]!r})")
    pos, pending = HEADER_LEN, b""
    while pos + HEADER_LEN <= len(data):
        room = BLOCK_LEN - pos % BLOCK_LEN
        if room < HEADER_LEN:  # block trailer
            pos += room
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_LEN])
        if kind == 0 and length == 0:  # zero padding
            pos += HEADER_LEN
            continue
        chunk = data[pos + HEADER_LEN : pos + HEADER_LEN + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += HEADER_LEN + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _assign(target: dict[str, Any], item: Any) -> None:
    """Set ``item``'s value at its key; a nested key (``["images/samples", "count"]``) makes
    nested dicts."""
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """One offline W&B run as written to disk."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, bool]] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    exit_code: int | None = None

    def steps(self, key: str) -> list[int]:
        """The ``_step`` of every history row that has ``key``."""
        return [row["_step"] for row in self.history if key in row]

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def read_run(path: Path) -> OfflineRun:
    """Parse ``run-<id>.wandb`` into an :class:`OfflineRun`."""
    run = OfflineRun(path=path)
    for raw in record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.job_type, run.name, run.tags = r.job_type, r.display_name, list(r.tags)
            for item in r.config.update:
                _assign(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _assign(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _assign(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _assign(run.summary, item)
        elif kind == "metric":
            metric = record.metric
            run.metrics[metric.name or metric.glob_name] = {
                "min": metric.summary.min,
                "max": metric.summary.max,
            }
        elif kind == "artifact":
            run.artifacts.append((record.artifact.type, record.artifact.name))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def read_finished_run(path: Path, timeout: float = 60.0) -> OfflineRun:
    """:func:`read_run` once the file holds the run's exit record.

    ``run.finish()`` returns when W&B's service has the run's last record, not when the
    service has written it to disk, so a file read right after may still be short.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_run(path)
        except ValueError:  # a record still being written
            if time.monotonic() > deadline:
                raise
        else:
            if run.exit_code is not None or time.monotonic() > deadline:
                return run
        time.sleep(0.1)


def offline_runs(directory: Path) -> list[OfflineRun]:
    """Every finished offline run below ``directory``, oldest first."""
    files = sorted(directory.rglob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [read_finished_run(path) for path in files]
