"""``lit-vae-compare``: compare finished runs from their run dirs, offline.

lit-vae-compare outputs/multirun/2024-05-01/12-30-00            # a table, seeds pooled
lit-vae-compare outputs/multirun/... --sort test/nll --reach val/elbo=-30
lit-vae-compare outputs/runs/a outputs/runs/b --csv runs.csv --json runs.json
lit-vae-compare outputs/multirun/... --plot val/elbo --plot-file elbo.png

Every ``results.json`` below the given dirs is a run; its dir's ``.hydra/overrides.yaml`` says
what the run is and ``metrics.csv`` (the csv logger's) holds its learning curves. Runs whose
overrides differ only in ``seed`` form one row: mean ± standard deviation over the seeds (the
sample standard deviation, ``n − 1`` in the denominator).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_METRICS",
    "Group",
    "Reach",
    "Run",
    "find_runs",
    "group_runs",
    "higher_is_better",
    "main",
    "parse_reach",
    "plot_curves",
    "read_metrics_csv",
    "steps_to_reach",
]

# the columns shown when --metrics is not given (those the runs have)
DEFAULT_METRICS = ("val/elbo", "test/elbo", "test/nll", "test/kl", "test/active_units")
# override keys that change how a run was run, not what it is: not shown, not grouped on
PLUMBING = ("logger", "callbacks", "paths", "hydra", "ckpt_path")


def higher_is_better(metric: str) -> bool:
    """ELBOs and active units grow as a model gets better; losses, NLLs and KLs shrink."""
    name = metric.rsplit("/", 1)[-1]
    return "elbo" in name or name == "active_units"


# --------------------------------------------------------------------------- reading runs


def read_metrics_csv(path: Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """``metrics.csv`` → ``({metric: [(step, value), ...]}, number of NaN/Inf values)``.

    Empty cells (a metric not logged on that row) are skipped; rows are kept in file order.
    """
    history: dict[str, list[tuple[int, float]]] = {}
    nonfinite = 0
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step_text = row.get("step") or ""
            step = int(float(step_text)) if step_text else -1
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if not math.isfinite(value):
                    nonfinite += 1
                history.setdefault(key, []).append((step, value))
    return history, nonfinite


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+"), value


@dataclass
class Run:
    """One finished run: its dir, overrides, final metrics and logged history."""

    path: Path
    overrides: dict[str, str]
    results: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    nonfinite: int = 0

    @classmethod
    def read(cls, results_path: Path) -> Run:
        run_dir = results_path.parent
        results = {str(k): float(v) for k, v in json.loads(results_path.read_text()).items()}
        overrides: dict[str, str] = {}
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        if overrides_path.is_file():
            for text in yaml.safe_load(overrides_path.read_text()) or []:
                key, value = _parse_override(str(text))
                overrides[key] = value
        history: dict[str, list[tuple[int, float]]] = {}
        nonfinite = sum(1 for v in results.values() if not math.isfinite(v))
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.is_file():
            history, logged_nonfinite = read_metrics_csv(metrics_path)
            nonfinite += logged_nonfinite
        return cls(run_dir, overrides, results, history, nonfinite)

    def identity(self, seed_key: str) -> tuple[tuple[str, str], ...]:
        """The overrides that say what the run is, without ``seed_key`` and plumbing."""
        return tuple(
            sorted(
                (k, v) for k, v in self.overrides.items() if k != seed_key and not _is_plumbing(k)
            )
        )


def _is_plumbing(key: str) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in PLUMBING)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run (a dir with ``results.json``) at or below ``paths``, each once, sorted by path."""
    found: dict[Path, Run] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run dir")
        candidates = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for results in candidates:
            if results.name != "results.json":
                continue
            resolved = results.resolve()
            if resolved not in found:
                found[resolved] = Run.read(results)
    return sorted(found.values(), key=lambda run: str(run.path))


# --------------------------------------------------------------------------- steps to reach


@dataclass(frozen=True)
class Reach:
    """A target for a metric: the first step at which ``metric`` is ``>=`` (or ``<=``) value."""

    metric: str
    value: float
    at_least: bool

    @property
    def label(self) -> str:
        return f"steps to {self.metric}{'>=' if self.at_least else '<='}{self.value:g}"


def parse_reach(text: str) -> Reach:
    """``val/elbo=-30`` (direction from the metric: ELBOs go up, NLLs down), ``val/elbo>=-30``,
    ``test/nll<=25``."""
    for op, at_least in ((">=", True), ("<=", False), ("=", None)):
        if op in text:
            metric, _, value = text.partition(op)
            try:
                number = float(value)
            except ValueError:
                break
            direction = higher_is_better(metric) if at_least is None else at_least
            return Reach(metric.strip(), number, direction)
    raise ValueError(
        f"--reach {text!r}: expected METRIC=VALUE, METRIC>=VALUE or METRIC<=VALUE, "
        "e.g. val/elbo=-30"
    )


def steps_to_reach(history: Sequence[tuple[int, float]], reach: Reach) -> int | None:
    """The first logged step at which the metric reached the target; ``None`` if it never did."""
    for step, value in history:
        if (value >= reach.value) if reach.at_least else (value <= reach.value):
            return step
    return None


# --------------------------------------------------------------------------- groups


@dataclass
class Group:
    """Runs that differ only in their seed."""

    identity: tuple[tuple[str, str], ...]
    runs: list[Run]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.identity) or "(defaults)"

    def values(self, metric: str) -> list[float]:
        return [run.results[metric] for run in self.runs if metric in run.results]

    def stat(self, metric: str) -> tuple[float, float] | None:
        """``(mean, sample std)`` of ``metric`` over the runs (std 0 for one run)."""
        return _mean_std(self.values(metric))

    def reach_steps(self, reach: Reach) -> list[int | None]:
        return [steps_to_reach(run.history.get(reach.metric, []), reach) for run in self.runs]

    @property
    def nonfinite(self) -> int:
        return sum(run.nonfinite for run in self.runs)


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def group_runs(runs: Sequence[Run], seed_key: str | None = "seed") -> list[Group]:
    """Pool runs whose overrides differ only in ``seed_key``; ``None`` keeps every run apart."""
    if seed_key is None:
        return [Group((*run.identity(""), ("run", str(run.path))), [run]) for run in runs]
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for run in runs:
        identity = run.identity(seed_key)
        groups.setdefault(identity, Group(identity, [])).runs.append(run)
    return list(groups.values())


def sort_groups(groups: list[Group], metric: str, reverse: bool = False) -> list[Group]:
    """Best first by ``metric``'s mean (highest ELBO, lowest NLL); groups without it last."""
    best_high = higher_is_better(metric)

    def key(group: Group) -> tuple[int, float]:
        stat = group.stat(metric)
        if stat is None or math.isnan(stat[0]):
            return (1, 0.0)
        return (0, -stat[0] if best_high else stat[0])

    ordered = sorted(groups, key=key)
    if reverse:
        present = [g for g in ordered if key(g)[0] == 0][::-1]
        ordered = present + [g for g in ordered if key(g)[0] == 1]
    return ordered


# --------------------------------------------------------------------------- rows


def _varying_keys(groups: Sequence[Group]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between groups, and those shared by all."""
    keys: list[str] = []
    for group in groups:
        for key, _ in group.identity:
            if key not in keys and key != "run":
                keys.append(key)
    varying, common = [], {}
    for key in keys:
        values = {dict(group.identity).get(key) for group in groups}
        if len(values) > 1:
            varying.append(key)
        else:
            common[key] = str(values.pop())
    return varying, common


def rows(groups: Sequence[Group], metrics: Sequence[str], reaches: Sequence[Reach]) -> list[dict]:
    """One plain dict per group (what ``--json`` writes)."""
    out = []
    for group in groups:
        row: dict[str, Any] = {
            "overrides": dict(group.identity),
            "runs": [str(run.path) for run in group.runs],
            "n": len(group.runs),
            "metrics": {},
            "reach": {},
            "nonfinite": group.nonfinite,
        }
        for metric in metrics:
            stat = group.stat(metric)
            row["metrics"][metric] = {
                "mean": None if stat is None else stat[0],
                "std": None if stat is None else stat[1],
                "values": group.values(metric),
            }
        for reach in reaches:
            steps = group.reach_steps(reach)
            reached = [s for s in steps if s is not None]
            stat = _mean_std([float(s) for s in reached])
            row["reach"][reach.label] = {
                "mean": None if stat is None else stat[0],
                "std": None if stat is None else stat[1],
                "steps": steps,
            }
        out.append(row)
    return out


def _fmt(stat: Mapping[str, Any], n: int, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    if n > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def _reach_fmt(entry: Mapping[str, Any]) -> str:
    steps = entry["steps"]
    reached = sum(s is not None for s in steps)
    if not reached:
        return "never"
    text = _fmt(entry, reached, digits=0)
    return text if reached == len(steps) else f"{text} ({reached}/{len(steps)})"


def write_csv(table: Sequence[Mapping[str, Any]], handle: io.TextIOBase | Any) -> None:
    """Flat CSV: override columns, ``n``, ``<metric>_mean``/``_std``, reach columns, nonfinite."""
    override_keys: list[str] = []
    for row in table:
        override_keys += [k for k in row["overrides"] if k not in override_keys]
    metric_keys = list(table[0]["metrics"]) if table else []
    reach_keys = list(table[0]["reach"]) if table else []
    header = [*override_keys, "n"]
    for key in [*metric_keys, *reach_keys]:
        header += [f"{key}_mean", f"{key}_std"]
    header.append("nonfinite")
    writer = csv.writer(handle)
    writer.writerow(header)
    for row in table:
        line: list[Any] = [row["overrides"].get(k, "") for k in override_keys] + [row["n"]]
        for section, keys in (("metrics", metric_keys), ("reach", reach_keys)):
            for key in keys:
                entry = row[section][key]
                line += ["" if entry["mean"] is None else entry["mean"]]
                line += ["" if entry["std"] is None else entry["std"]]
        line.append(row["nonfinite"])
        writer.writerow(line)


def print_table(
    groups: Sequence[Group],
    table: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    reaches: Sequence[Reach],
    title: str,
) -> None:
    from rich.console import Console
    from rich.table import Table

    varying, common = _varying_keys(groups)
    caption = " ".join(f"{k}={v}" for k, v in common.items())
    rich_table = Table(title=title, caption=f"all runs: {caption}" if caption else None)
    for key in varying:
        rich_table.add_column(key)
    if any(key == "run" for group in groups for key, _ in group.identity):
        rich_table.add_column("run")
    rich_table.add_column("n", justify="right")
    for metric in metrics:
        rich_table.add_column(metric, justify="right")
    for reach in reaches:
        rich_table.add_column(reach.label, justify="right")
    rich_table.add_column("NaN/Inf", justify="right")
    for group, row in zip(groups, table):
        identity = dict(group.identity)
        cells = [identity.get(key, "") for key in varying]
        if "run" in identity:
            cells.append(identity["run"])
        cells.append(str(row["n"]))
        cells += [_fmt(row["metrics"][m], row["n"]) for m in metrics]
        cells += [_reach_fmt(row["reach"][r.label]) for r in reaches]
        cells.append(str(row["nonfinite"]))
        rich_table.add_row(*cells)
    Console().print(rich_table)


# --------------------------------------------------------------------------- plots


def plot_curves(groups: Sequence[Group], metric: str, output: Path) -> Path:
    """Learning curves of ``metric`` (from each run's ``metrics.csv``) in one PNG: one line per
    run, one colour per group. Returns ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying, _ = _varying_keys(groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = 0
    for index, group in enumerate(groups):
        colour = colours[index % len(colours)]
        identity = dict(group.identity)
        name = " ".join(f"{k}={identity[k]}" for k in varying if k in identity) or group.label
        for run_index, run in enumerate(group.runs):
            points = run.history.get(metric, [])
            if not points:
                continue
            steps, values = zip(*points)
            label = f"{name} (n={len(group.runs)})" if run_index == 0 else None
            ax.plot(steps, values, color=colour, alpha=0.85, label=label, marker=".")
            plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"--plot {metric}: no run logged {metric!r} in its metrics.csv")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-vae-compare",
        description="Compare lit-vae runs (run dirs or multirun dirs) by their final metrics.",
    )
    parser.add_argument("dirs", nargs="+", help="run dirs, multirun dirs or results.json files")
    parser.add_argument("--sort", metavar="METRIC", help="best first by this metric")
    parser.add_argument("--reverse", action="store_true", help="worst first")
    parser.add_argument(
        "--metrics", metavar="M1,M2", help=f"columns (default: {','.join(DEFAULT_METRICS)})"
    )
    parser.add_argument(
        "--reach",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="first step at which the metric reached the value (repeatable)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs with this override (repeatable)",
    )
    parser.add_argument("--seed-key", default="seed", help="override pooled over (mean ± std)")
    parser.add_argument("--runs", action="store_true", help="one row per run, no pooling")
    parser.add_argument("--top", type=int, metavar="N", help="keep the first N rows")
    parser.add_argument("--csv", metavar="PATH", help="write the table as CSV ('-': stdout)")
    parser.add_argument("--json", metavar="PATH", help="write the table as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="METRIC", help="learning curves of METRIC to a PNG")
    parser.add_argument("--plot-file", metavar="PNG", help="where --plot writes")
    return parser


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    runs = find_runs(args.dirs)
    for condition in args.where:
        key, sep, value = condition.partition("=")
        if not sep:
            raise SystemExit(f"--where {condition!r}: expected KEY=VALUE")
        runs = [run for run in runs if run.overrides.get(key) == value]
    if not runs:
        print(f"no runs (no results.json) under {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    reaches = [parse_reach(text) for text in args.reach]
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    else:
        present = {key for run in runs for key in run.results}
        metrics = [m for m in DEFAULT_METRICS if m in present]
    groups = group_runs(runs, None if args.runs else args.seed_key)
    if args.sort:
        groups = sort_groups(groups, args.sort, reverse=args.reverse)
    if args.top:
        groups = groups[: args.top]
    table = rows(groups, metrics, reaches)

    if args.csv:
        buffer = io.StringIO()
        write_csv(table, buffer)
        _write(args.csv, buffer.getvalue())
    if args.json:
        _write(args.json, json.dumps(table, indent=2) + "\n")
    if "-" not in (args.csv, args.json):
        print_table(groups, table, metrics, reaches, title=f"{len(runs)} runs")
    if args.plot:
        output = Path(args.plot_file or f"curves-{args.plot.replace('/', '_')}.png")
        print(f"wrote {plot_curves(groups, args.plot, output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
