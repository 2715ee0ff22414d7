"""W&B sweep files that ship with lit-vae; ``python -m lit_vae.sweeps`` prints their paths.

wandb sweep "$(python -m lit_vae.sweeps heads_grid)"     # prints the sweep id
wandb agent <entity>/<project>/<sweep id>
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["SWEEPS_DIR", "main", "sweep_file", "sweep_names"]

SWEEPS_DIR = Path(__file__).resolve().parent


def sweep_names() -> list[str]:
    """The names of the shipped sweep files, e.g. ``["beta_latent_bayes", "heads_grid"]``."""
    return sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))


def sweep_file(name: str) -> Path:
    """The path of the shipped sweep file ``name`` (without ``.yaml``)."""
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"sweep {name!r}: allowed: {', '.join(sweep_names())}")
    return path


def main(argv: list[str] | None = None) -> int:
    """Print the paths of the named sweep files (all of them when none is named)."""
    names = sys.argv[1:] if argv is None else argv
    for name in names or sweep_names():
        print(sweep_file(name))
    return 0
