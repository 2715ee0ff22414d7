"""The yardstick of ``throughput.py``: a VAE trained by a plain, hand-written PyTorch loop.

It computes the loss ``LitVAE`` trains with (``log_var`` head, Bernoulli decoder, β = 1):
per sample, ``BCE-with-logits`` summed over pixels plus the closed-form KL to ``N(0, I)``
summed over latent dims; mean over the batch. Batches are slices of an in-memory tensor, the
optimizer is ``torch.optim.Adam`` with its defaults. It needs nothing but torch, so the pythae
benchmark venv imports it too.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HandVAE", "hand_epoch", "mlp"]


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear -> activation`` between consecutive ``sizes``, no activation after the last."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class HandVAE(nn.Module):
    """``data_dim``-``hidden``-``2·latent_dim`` encoder, mirrored decoder, ``log_var`` head."""

    def __init__(self, data_dim: int, hidden: list[int], latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = mlp([data_dim, *hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden), data_dim])

    def loss(self, x: Tensor) -> Tensor:
        """``x (batch, data_dim)`` in [0, 1] → the negative ELBO, mean over the batch."""
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (log_var.exp() + mean.square() - 1.0 - log_var).sum(-1)
        return (recon + kl).mean()


def hand_epoch(
    model: HandVAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """One pass over ``x (n, data_dim)`` in a random order, one optimizer step per batch."""
    order = torch.randperm(x.shape[0], generator=generator, device=generator.device)
    for start in range(0, x.shape[0], batch_size):
        batch = x[order[start : start + batch_size]]
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()
