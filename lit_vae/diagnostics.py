"""Diagnostics of a trained VAE: active units, KL per latent dim, collapse, traversals, plots.

Functions here take tensors or a model and batches and return tensors or write PNG files; the
callbacks in :mod:`lit_vae.callbacks` call them during a run. Plots use matplotlib's
object-oriented API on the Agg canvas, so nothing touches ``pyplot``'s global backend.

* :func:`active_units` — Burda et al. (2016): unit ``u`` is active when
  ``Cov_x(E_q[z_u | x]) > threshold`` (0.01).
* :func:`kl_per_dimension` — ``KL(q(z_j|x) ‖ p(z_j))`` per sample and dim: the terms of the
  KL for diagonal posteriors; for full-covariance ones, the KL of each marginal, which sum to
  ``KL − TC(q) ≤ KL``.
* :func:`is_collapsed` — every dim's mean KL below a threshold.
* :func:`latent_traversal` — decode ``z = v·e_j`` for ``v`` on a grid around 0.
* :func:`plot_kl_per_dim`, :func:`plot_latent_scatter` — PNG files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributions import Distribution, LowRankMultivariateNormal, MultivariateNormal

from lit_vae.distributions import diagonal_parts

if TYPE_CHECKING:
    from lit_vae.module import LitVAE

__all__ = [
    "active_units",
    "active_units_from_moments",
    "is_collapsed",
    "kl_per_dimension",
    "latent_traversal",
    "mean_kl_per_dimension",
    "plot_kl_per_dim",
    "plot_latent_scatter",
    "posterior_means",
]


# ------------------------------------------------------------------------------- active units


def active_units_from_moments(mean: Tensor, mean_square: Tensor, threshold: float) -> Tensor:
    """Active units from ``mean = E_x[E_q[z_u]]`` and ``mean_square = E_x[E_q[z_u]²]``.

    Args:
        mean, mean_square: ``(latent,)``, over the data.
        threshold: a unit is active when ``mean_square − mean² > threshold``.

    Returns:
        ``(latent,)`` bool.
    """
    return (mean_square - mean.square()) > threshold


def active_units(posterior_means: Tensor, threshold: float = 0.01) -> Tensor:
    """Burda et al. (2016)'s active units from ``E_q[z|x]`` of ``n`` inputs, ``(n, latent)``:
    ``(latent,)`` bool, true where the (biased) variance over inputs exceeds ``threshold``."""
    means = posterior_means.detach().to(torch.float64)
    return active_units_from_moments(means.mean(0), means.square().mean(0), threshold)


def _x(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def posterior_means(model: LitVAE, batches: Iterable[Any]) -> tuple[Tensor, Tensor | None]:
    """``E_q[z|x]`` for every ``x`` in ``batches`` (tensors or ``(x, y)`` pairs):
    ``(n, latent)`` and the labels ``(n,)`` when the batches carry them."""
    means, labels = [], []
    for batch in batches:
        x = _x(batch).to(model.device)
        means.append(model.encode(x).mean)
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            labels.append(batch[1])
    return torch.cat(means), (torch.cat(labels) if labels else None)


# ------------------------------------------------------------------------------- KL per dim


def kl_per_dimension(q: Distribution, p: Distribution) -> Tensor:
    """``KL(q(z_j|x) ‖ p(z_j))`` for each latent dim ``j``: ``(batch, latent)``.

    For a diagonal ``q`` these sum to ``KL(q ‖ p)``. For ``MultivariateNormal`` and
    ``LowRankMultivariateNormal`` posteriors they are the KLs of the marginals
    ``N(μ_j, Σ_jj)``, which sum to ``KL(q ‖ p) − TC(q)``.

    Raises:
        ValueError: ``p`` is not a diagonal Gaussian (mixture, VampPrior).
    """
    prior = diagonal_parts(p)
    if prior is None:
        raise ValueError(
            f"the KL per latent dim needs a factorized Gaussian prior, got {type(p).__name__}"
        )
    loc_p, scale_p, log_scale_p = prior
    parts = diagonal_parts(q)
    if parts is not None:
        loc_q, scale_q, log_scale_q = parts
    elif isinstance(q, (MultivariateNormal, LowRankMultivariateNormal)):
        loc_q, variance = q.loc, q.variance
        scale_q, log_scale_q = variance.sqrt(), 0.5 * variance.log()
    else:
        raise ValueError(
            f"the KL per latent dim needs a Gaussian posterior, got {type(q).__name__}"
        )
    var_ratio = (scale_q / scale_p).square()
    mahalanobis = ((loc_q - loc_p) / scale_p).square()
    return 0.5 * (var_ratio + mahalanobis - 1.0) + (log_scale_p - log_scale_q)


@torch.no_grad()
def mean_kl_per_dimension(model: LitVAE, batches: Iterable[Any]) -> Tensor:
    """The mean over every ``x`` in ``batches`` of :func:`kl_per_dimension`, ``(latent,)``
    float64, in nats."""
    total: Tensor | None = None
    count = 0
    p = model.prior()
    for batch in batches:
        x = _x(batch).to(model.device)
        per_dim = kl_per_dimension(model.encode(x), p).to(torch.float64).sum(0)
        total = per_dim if total is None else total + per_dim
        count += x.shape[0]
    if total is None:
        raise ValueError("mean_kl_per_dimension: no batches")
    return total / count


def is_collapsed(kl_per_dim: Tensor, threshold: float = 0.01) -> bool:
    """Whether every latent dim's mean KL ``(latent,)`` is below ``threshold`` nats: the
    posterior has collapsed to the prior and the decoder ignores ``z``."""
    return bool((kl_per_dim < threshold).all())


# ------------------------------------------------------------------------------- traversals


@torch.no_grad()
def latent_traversal(
    model: LitVAE,
    num_steps: int = 9,
    span: float = 3.0,
    dims: Sequence[int] | None = None,
    base: Tensor | None = None,
) -> Tensor:
    """Decode ``z = base + v·e_j`` for ``v`` in ``linspace(−span, span, num_steps)``.

    Args:
        model: the VAE.
        num_steps: points per dim (≥ 2).
        span: the range ``[−span, span]`` around ``base`` (> 0; 3 prior standard deviations).
        dims: the latent dims to vary (all by default).
        base: the point ``(latent,)`` varied around; zeros (the prior mean) by default.

    Returns:
        means of ``p(x|z)``, ``(len(dims), num_steps, *data_shape)``.
    """
    if num_steps < 2 or not span > 0:
        raise ValueError(f"num_steps={num_steps!r} must be >= 2 and span={span!r} > 0")
    latent = model.latent_dim
    dims = list(range(latent)) if dims is None else [int(j) for j in dims]
    center = torch.zeros(latent) if base is None else base.detach().cpu()
    values = torch.linspace(-span, span, num_steps, dtype=center.dtype)
    z = center.expand(len(dims), num_steps, latent).clone()
    for row, j in enumerate(dims):
        z[row, :, j] = center[j] + values
    z = z.to(device=model.device, dtype=next(model.parameters()).dtype)
    return model.likelihood.mean(model.decoder(z))


# ------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_kl_per_dim(
    kl_per_dim: Tensor, path: str | Path, threshold: float | None = None, title: str = ""
) -> Path:
    """A bar chart of the mean KL per latent dim ``(latent,)`` as a PNG at ``path``; a dashed
    line marks ``threshold`` when given. Returns ``path``."""
    values = kl_per_dim.detach().cpu().double().numpy()
    figure = _figure(max(4.0, 0.3 * len(values) + 2.0), 3.0)
    axes = figure.add_subplot()
    axes.bar(range(len(values)), values, color="tab:blue")
    if threshold is not None:
        axes.axhline(threshold, color="tab:red", linestyle="--", label=f"{threshold:g} nats")
        axes.legend(loc="upper right")
    axes.set_xlabel("latent dim")
    axes.set_ylabel("KL (nats per sample)")
    axes.set_title(title or f"KL per latent dim, total {values.sum():.2f} nats")
    return _save(figure, path)


def plot_latent_scatter(
    z: Tensor, path: str | Path, labels: Tensor | None = None, title: str = ""
) -> Path:
    """``E_q[z|x]`` of a 2-D latent space, ``(n, 2)``, as a scatter coloured by ``labels``
    ``(n,)`` (one colour per class), written as a PNG at ``path``. Returns ``path``."""
    if z.dim() != 2 or z.shape[1] != 2:
        raise ValueError(f"plot_latent_scatter needs z of shape (n, 2), got {tuple(z.shape)}")
    points = z.detach().cpu().double().numpy()
    figure = _figure(5.0, 4.5)
    axes = figure.add_subplot()
    if labels is None:
        axes.scatter(points[:, 0], points[:, 1], s=4)
    else:
        classes = labels.detach().cpu().numpy()
        scatter = axes.scatter(points[:, 0], points[:, 1], c=classes, s=4, cmap="tab10")
        figure.colorbar(scatter, ax=axes, label="label")
    axes.set_xlabel("z₁")
    axes.set_ylabel("z₂")
    axes.set_title(title or "posterior means")
    return _save(figure, path)
