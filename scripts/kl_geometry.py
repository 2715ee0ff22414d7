"""The KL penalty and its gradient as functions of each diagonal head's raw output.

For one latent dim with ``μ = 0`` and ``p = N(0, 1)``, the head's raw output ``r`` sets ``σ``
and the penalty is ``KL = −log σ + (σ² − 1)/2``. This script evaluates it through lit-vae's own
heads and ``kl_divergence``, takes the gradient with autograd, checks both against the closed
forms of ``docs/kl_heads.md`` (float64), prints a few values and draws
``docs/img/kl_geometry.png``.

    python scripts/kl_geometry.py [--output docs/img/kl_geometry.png]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_vae.distributions import StandardNormal
from lit_vae.kl import kl_divergence
from lit_vae.posteriors import POSTERIORS

HEADS = ("log_var", "log_std", "std", "var")
SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1
MIN_SCALE = 1e-4  # the std head's default floor on σ
MIN_VAR = 1e-8  # the var head's default floor on σ²


def _log_var(r: Tensor) -> tuple[Tensor, Tensor]:
    # s = log σ²: KL = ½(eˢ − 1 − s), dKL/ds = ½(eˢ − 1)
    return 0.5 * (r.exp() - 1.0 - r), 0.5 * (r.exp() - 1.0)


def _log_std(r: Tensor) -> tuple[Tensor, Tensor]:
    # s = log σ: KL = ½(e²ˢ − 1) − s, dKL/ds = e²ˢ − 1
    return 0.5 * ((2 * r).exp() - 1.0) - r, (2 * r).exp() - 1.0


def _std(r: Tensor) -> tuple[Tensor, Tensor]:
    # σ = softplus(r + c) + ε: KL = ½(σ² − 1) − log σ, dKL/dr = (σ − 1/σ)·sigmoid(r + c)
    scale = F.softplus(r + SOFTPLUS_ONE) + MIN_SCALE
    penalty = 0.5 * (scale.square() - 1.0) - scale.log()
    return penalty, (scale - 1.0 / scale) * torch.sigmoid(r + SOFTPLUS_ONE)


def _var(r: Tensor) -> tuple[Tensor, Tensor]:
    # v = σ² = softplus(r + c) + ε: KL = ½(v − 1 − log v), dKL/dr = ½(1 − 1/v)·sigmoid(r + c)
    variance = F.softplus(r + SOFTPLUS_ONE) + MIN_VAR
    penalty = 0.5 * (variance - 1.0 - variance.log())
    return penalty, 0.5 * (1.0 - 1.0 / variance) * torch.sigmoid(r + SOFTPLUS_ONE)


CLOSED_FORMS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "log_var": _log_var,
    "log_std": _log_std,
    "std": _std,
    "var": _var,
}
"""Head name → ``raw (n,) -> (KL (n,), dKL/draw (n,))`` at ``μ = 0``, as in the docs."""


def penalty_and_gradient(head: str, raw: Tensor) -> tuple[Tensor, Tensor]:
    """KL and its gradient w.r.t. the raw output through lit-vae's head, ``μ = 0``; float64."""
    module = POSTERIORS.build(head, latent_dim=1)
    raw = raw.detach().to(torch.float64).clone().requires_grad_()
    h = torch.stack([torch.zeros_like(raw), raw], dim=-1)  # (n, 2): [μ, raw]
    prior = StandardNormal(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    penalty = kl_divergence(module(h), prior)
    (gradient,) = torch.autograd.grad(penalty.sum(), raw)
    return penalty.detach(), gradient


def plot(raw: Tensor, output: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for head in HEADS:
        penalty, gradient = penalty_and_gradient(head, raw)
        left.plot(raw.numpy(), penalty.numpy(), label=head)
        right.plot(raw.numpy(), gradient.numpy(), label=head)
    left.set_ylim(-0.5, 8.0)
    left.set_title("KL(N(0, σ²) ‖ N(0, 1)) against the raw output")
    right.set_ylim(-1.5, 6.0)
    right.set_title("dKL / d(raw output)")
    for axes in (left, right):
        axes.axhline(0.0, color="grey", linewidth=0.5)
        axes.axvline(0.0, color="grey", linewidth=0.5)
        axes.set_xlabel("raw output r (σ = 1 at r = 0 for every head)")
        axes.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/img/kl_geometry.png"))
    args = parser.parse_args(argv)

    raw = torch.linspace(-8.0, 4.0, 601, dtype=torch.float64)
    for head in HEADS:
        penalty, gradient = penalty_and_gradient(head, raw)
        closed_penalty, closed_gradient = CLOSED_FORMS[head](raw)
        torch.testing.assert_close(penalty, closed_penalty, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gradient, closed_gradient, atol=1e-10, rtol=1e-10)

    points = torch.tensor([-8.0, -4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    print("| head | " + " | ".join(f"r = {p:g}" for p in points.tolist()) + " |")
    print("|---" * (len(points) + 1) + "|")
    for head in HEADS:
        penalty, gradient = penalty_and_gradient(head, points)
        cells = [f"{k:.3g} / {g:.3g}" for k, g in zip(penalty.tolist(), gradient.tolist())]
        print(f"| `{head}` KL / dKL/dr | " + " | ".join(cells) + " |")
    print(f"wrote {plot(raw, args.output)}")


if __name__ == "__main__":
    main()
