"""Full precision for the probabilistic parts of a mixed-precision step.

Under ``precision=bf16-mixed`` or ``16-mixed`` Lightning runs the step under
:func:`torch.autocast`, so matrix products run in half precision. lit-vae keeps the networks
there but computes the posterior, the prior, the KL and the likelihood in float32: the KL of a
head with ``σ = exp(s / 2)`` or a Cholesky factor loses nats to bfloat16's 8-bit mantissa, and
the ELBO is a sum of many such terms. The likelihoods do it in their ``nll``; the model uses
:func:`full_precision` and :func:`at_least_float32` for the rest. float64 stays float64.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

__all__ = ["at_least_float32", "full_precision"]


def full_precision(device: torch.device) -> AbstractContextManager[None]:
    """A region where autocast is off on ``device``: operations run in their inputs' dtype.

    Outside autocast this is a no-op context, which costs nothing per step.
    """
    if not torch.is_autocast_enabled(device.type):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when it is in a narrower floating type, else unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
