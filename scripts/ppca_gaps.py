"""The ELBO gap of each posterior head on PPCA data, where log p(x) is exact.

The decoder is fixed at the generating W, b and the likelihood at the true noise σ; an affine
encoder (``mlp`` with no hidden layer, which can represent the exact amortized posterior) is
trained on the model's own loss, then evaluated on the test split:

* ELBO gap = mean(log p(x) − ELBO) = mean KL(q(z|x) ‖ p(z|x)), the ELBO in closed form;
* IWAE gap = mean(log p(x) − log_likelihood(x, 1000)).

    python scripts/ppca_gaps.py                 # prints a markdown table (about 2 minutes)
    python scripts/ppca_gaps.py --steps 2000 --heads log_var cholesky
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_vae.data import PPCADataModule
from lit_vae.module import LitVAE
from lit_vae.ppca import best_diagonal_gap, fit_posterior, linear_gaussian_elbo, load_true_decoder

HEADS = ("log_var", "log_std", "std", "var", "cholesky", "low_rank")


def measure(
    datamodule: PPCADataModule, head: str, steps: int, lr: float, seed: int
) -> dict[str, float]:
    """Train the encoder for ``head`` and return its gaps (nats per sample) and the time."""
    torch.manual_seed(seed)
    model = LitVAE(
        data_shape=(datamodule.data_dim,),
        latent_dim=datamodule.latent_dim,
        encoder={"name": "mlp", "hidden_sizes": []},
        decoder={"name": "linear"},
        posterior={"name": head},
        likelihood={"name": "gaussian", "scale": datamodule.noise_std},
    ).double()
    load_true_decoder(model, datamodule)
    start = time.perf_counter()
    fit_posterior(model, datamodule.split("train")[0].double(), steps=steps, lr=lr, seed=seed)
    seconds = time.perf_counter() - start
    x = datamodule.split("test")[0].double()
    with torch.no_grad():
        exact = datamodule.exact_log_prob(x)
        elbo_gap = float((exact - linear_gaussian_elbo(model, x)).mean())
        iwae_gap = float((exact - model.log_likelihood(x, 1000)).mean())
    return {"elbo_gap": elbo_gap, "iwae_gap": iwae_gap, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest

    datamodule = PPCADataModule()
    floor = best_diagonal_gap(datamodule)
    print(
        f"PPCA: data_dim={datamodule.data_dim}, latent_dim={datamodule.latent_dim}, "
        f"noise_std={datamodule.noise_std}, seed 0; encoder mlp hidden_sizes=[], Adam "
        f"lr={args.lr} decaying linearly to 0 over {args.steps} steps, batch 500, float64"
    )
    print(f"best diagonal gap ½(Σ log Λ_jj − log det Λ) = {floor:.4f} nats\n")
    print("| head | ELBO gap (nats) | IWAE-1000 gap (nats) | floor of the family (nats) |")
    print("|---|---|---|---|")
    for head in args.heads:
        result = measure(datamodule, head, args.steps, args.lr, args.seed)
        family_floor = floor if head in ("log_var", "log_std", "std", "var") else 0.0
        print(
            f"| `{head}` | {result['elbo_gap']:.4f} | {result['iwae_gap']:.4f} | "
            f"{family_floor:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
