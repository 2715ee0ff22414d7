"""Textbook float64 references for the heads, written independently of ``lit_vae``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import MultivariateNormal

SOFTPLUS_ONE = math.log(math.e - 1.0)


def reference_covariance(
    name: str, h: Tensor, latent_dim: int, **options: float
) -> tuple[Tensor, Tensor]:
    """``(loc (batch, d), covariance (batch, d, d))`` of the head ``name`` at raw output ``h``."""
    d = latent_dim
    loc = h[:, :d]
    rest = h[:, d:]
    if name == "log_var":
        variance = rest.exp()
    elif name == "log_std":
        variance = (2 * rest).exp()
    elif name == "std":
        variance = (F.softplus(rest + SOFTPLUS_ONE) + options.get("min_scale", 1e-4)) ** 2
    elif name == "var":
        variance = F.softplus(rest + SOFTPLUS_ONE) + options.get("min_var", 1e-8)
    elif name == "cholesky":
        rows = []
        k = 0
        for i in range(d):
            row = []
            for j in range(d):
                if j < i:
                    row.append(rest[:, k])
                    k += 1
                elif j == i:
                    row.append(
                        F.softplus(rest[:, k] + SOFTPLUS_ONE) + options.get("min_scale", 1e-4)
                    )
                    k += 1
                else:
                    row.append(torch.zeros_like(rest[:, 0]))
            rows.append(torch.stack(row, -1))
        scale_tril = torch.stack(rows, -2)
        return loc, scale_tril @ scale_tril.mT
    elif name == "low_rank":
        rank = int(options.get("rank", 2))
        factor = rest[:, : d * rank].reshape(-1, d, rank)
        diag = F.softplus(rest[:, d * rank :] + SOFTPLUS_ONE) + options.get("min_var", 1e-8)
        return loc, factor @ factor.mT + torch.diag_embed(diag)
    else:
        raise KeyError(name)
    return loc, torch.diag_embed(variance)


def reference_distribution(
    name: str, h: Tensor, latent_dim: int, **options: float
) -> MultivariateNormal:
    loc, covariance = reference_covariance(name, h, latent_dim, **options)
    return MultivariateNormal(loc, covariance_matrix=covariance)
