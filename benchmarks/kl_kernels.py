"""Forward + backward time of lit-vae's closed-form KL against ``torch.distributions``.

For each latent size ``d`` and posterior form, both contenders build the same ``q(z|x)`` from
the same leaf tensors of its parameters (``requires_grad``), as lit-vae's heads build it — the
diagonal ``DiagonalNormal(loc, scale, log_scale)`` of the ``log_var``/``log_std`` heads, the
``cholesky`` head's ``MultivariateNormal(loc, scale_tril)``, the ``low_rank`` head's
``LowRankMultivariateNormal(loc, cov_factor, cov_diag)`` (rank 2) — compute ``KL(q ‖ N(0, I))``
per sample and back-propagate its sum to the leaves; each contender's ``N(0, I)`` is built once,
outside the timed calls:

* **ours**: :func:`lit_vae.kl.kl_divergence` against the ``standard_normal`` prior, what
  ``LitVAE`` runs;
* **torch**: ``torch.distributions.kl_divergence`` against ``N(0, I)`` written the usual way for
  the form: ``Independent(Normal(0, 1))`` for the diagonal, ``MultivariateNormal(0, I)`` for the
  other two.

Errors are the largest relative error per sample against torch's own formula evaluated in
float64 on the same inputs. With ``--compile``, ``torch.compile`` of our forward + backward is
timed as well, after its compilation.

    python benchmarks/kl_kernels.py --dims 2 16 64 256 --batch 1024
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from common import (
    base_parser,
    interleaved_medians,
    markdown_table,
    pick_device,
    print_environment,
)
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.distributions import kl_divergence as torch_kl

from lit_vae.distributions import DiagonalNormal
from lit_vae.kl import kl_divergence
from lit_vae.priors import PRIORS

FORMS = ("diag", "full", "low_rank")
RANK = 2


def leaf_parameters(form: str, batch: int, dim: int, device: torch.device) -> list[Tensor]:
    """The parameters of ``q``, as leaves: ``loc``, ``scale``, ``log_scale`` ``(batch, d)``;
    ``scale_tril (batch, d, d)``; or ``cov_factor (batch, d, rank)`` and ``cov_diag (batch, d)``."""
    loc = 0.5 * torch.randn(batch, dim, device=device)
    if form == "diag":
        log_scale = 0.3 * torch.randn(batch, dim, device=device)
        params = [loc, log_scale.exp(), log_scale]
    elif form == "full":
        tril = torch.randn(batch, dim, dim, device=device).tril(-1) / dim**0.5
        diagonal = torch.rand(batch, dim, device=device) + 0.5
        params = [loc, tril + torch.diag_embed(diagonal)]
    else:
        factor = torch.randn(batch, dim, RANK, device=device) / dim**0.5
        params = [loc, factor, torch.rand(batch, dim, device=device) + 0.5]
    return [p.requires_grad_() for p in params]


def posterior(form: str, params: list[Tensor]) -> Distribution:
    """``q(z|x)`` as lit-vae's heads build it (no argument validation)."""
    if form == "diag":
        return DiagonalNormal(*params)
    if form == "full":
        return MultivariateNormal(params[0], scale_tril=params[1], validate_args=False)
    return LowRankMultivariateNormal(*params, validate_args=False)


def torch_standard(form: str, dim: int, like: Tensor) -> Distribution:
    """``N(0, I)`` written the usual way for the form."""
    zeros = like.new_zeros(dim)
    if form == "diag":
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return MultivariateNormal(zeros, scale_tril=eye)


def contenders(
    form: str, params: list[Tensor], compile_ours: bool
) -> dict[str, Callable[[], Tensor]]:
    dim = params[0].shape[-1]
    prior = PRIORS.build("standard_normal", latent_dim=dim).to(params[0].device, params[0].dtype)
    # both priors are built once, outside the timed calls: the KL's inputs are q and p
    ours_standard = prior()
    standard = torch_standard(form, dim, params[0])

    def ours_kl(*leaves: Tensor) -> Tensor:
        return kl_divergence(posterior(form, list(leaves)), ours_standard)

    def torch_kl_of(*leaves: Tensor) -> Tensor:
        return torch_kl(posterior(form, list(leaves)), standard)

    def step(kl: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            for leaf in params:
                leaf.grad = None
            value = kl(*params)
            value.sum().backward()
            return value

        return run

    calls = {"ours": step(ours_kl), "torch": step(torch_kl_of)}
    if compile_ours:
        calls["ours compiled"] = step(torch.compile(ours_kl, dynamic=False))
    return calls


def relative_error(value: Tensor, reference: Tensor) -> float:
    return float(((value.double() - reference) / reference.abs().clamp_min(1e-12)).abs().max())


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    print_environment(device)
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# batch {args.batch}, float32, forward + backward, median of {args.repeats} rounds")

    headers = [
        "d",
        "form",
        "ours ms",
        "torch ms",
        "speed-up",
        "rel. err ours",
        "rel. err torch",
    ]
    if args.compile:
        headers[4:4] = ["compiled ms", "compiled speed-up"]
    rows = []
    for dim in args.dims:
        for form in args.forms:
            params = leaf_parameters(form, args.batch, dim, device)
            calls = contenders(form, params, args.compile)
            seconds = interleaved_medians(calls, repeats=args.repeats, warmup=3, device=device)
            params64 = [p.detach().double().requires_grad_() for p in params]
            reference = contenders(form, params64, False)["torch"]().detach()
            errors = {
                name: relative_error(call().detach(), reference) for name, call in calls.items()
            }
            row = [
                dim,
                form,
                f"{seconds['ours'] * 1e3:.3f}",
                f"{seconds['torch'] * 1e3:.3f}",
                f"{seconds['torch'] / seconds['ours']:.1f}x",
                f"{errors['ours']:.1e}",
                f"{errors['torch']:.1e}",
            ]
            if args.compile:
                compiled = seconds["ours compiled"]
                row[4:4] = [f"{compiled * 1e3:.3f}", f"{seconds['torch'] / compiled:.1f}x"]
            rows.append(row)
            print(f"# d={dim} {form}: done", file=sys.stderr)
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
