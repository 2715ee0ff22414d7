"""A user's regularizer, reached from a config by ``_target_`` (the subprocess runs with this
checkout on ``PYTHONPATH``)."""

from __future__ import annotations

from typing import Any

from torch.distributions import Distribution

from lit_vae.kl import kl_divergence
from lit_vae.regularizers import Penalty, Regularizer


class CyclicalKL(Regularizer):
    """β·KL with a cyclical β schedule of ``k`` cycles over ``period`` steps, rising over the
    fraction ``R`` of each cycle (Fu et al., 2019). Its constructor checks its options the
    project's way, so a bad one reaches the command line as one line."""

    def __init__(self, beta: float = 1.0, R: float = 0.5, k: int = 4, period: int = 100) -> None:  # noqa: N803
        super().__init__()
        if not 0.0 < R <= 1.0:
            raise ValueError(f"regularizer.R={R!r}: must be in (0, 1]")
        if k < 1:
            raise ValueError(f"regularizer.k={k!r}: must be an integer >= 1")
        self.beta, self.R, self.k, self.period = beta, R, k, period

    def forward(self, q: Distribution, p: Distribution, z: Any, step: int) -> Penalty:
        cycle = max(1, self.period // self.k)
        weight = self.beta * min(1.0, (step % cycle) / cycle / self.R)
        kl = kl_divergence(q, p, z=z)
        return Penalty(weight * kl, kl, {"beta": weight})
