"""Epoch times of pythae's ``VAE`` + ``BaseTrainer``, interleaved with the hand-written loop.

Runs inside the pythae benchmark venv (``throughput.py`` starts it); prints one JSON line
``{"pythae": [seconds per epoch, ...], "hand": [...]}``. The networks are those of
:mod:`hand_loop` (784-200-200-50, ReLU); pythae's decoder ends in a sigmoid, as its ``bce``
reconstruction loss expects.

    python pythae_epochs.py X.pt --epochs 5 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import torch
from hand_loop import HandVAE, hand_epoch, mlp
from pythae.data.datasets import BaseDataset
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.trainers import BaseTrainer, BaseTrainerConfig
from pythae.trainers.training_callbacks import TrainingCallback
from torch import Tensor


class Encoder(BaseEncoder):  # type: ignore[misc]
    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.net = mlp([data_dim, 200, 200, 2 * latent_dim])

    def forward(self, x: Tensor) -> ModelOutput:
        mean, log_var = self.net(x.flatten(1)).chunk(2, dim=-1)
        return ModelOutput(embedding=mean, log_covariance=log_var)


class Decoder(BaseDecoder):  # type: ignore[misc]
    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.net = mlp([latent_dim, 200, 200, data_dim])

    def forward(self, z: Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))


class InterleavedEpochs(TrainingCallback):  # type: ignore[misc]
    """Times each pythae epoch, then runs and times one hand-loop epoch."""

    def __init__(self, hand_step: object) -> None:
        self.hand_step = hand_step
        self.pythae: list[float] = []
        self.hand: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, training_config: object, **kwargs: object) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, training_config: object, **kwargs: object) -> None:
        self.pythae.append(time.perf_counter() - self._start)
        start = time.perf_counter()
        self.hand_step()  # type: ignore[operator]
        self.hand.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a .pt file holding (n, 784) images in [0, 1]")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=".")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")

    x: Tensor = torch.load(args.data)
    device = torch.device(args.device)
    data_dim, latent_dim = x.shape[1], 50

    hand = HandVAE(data_dim, [200, 200], latent_dim).to(device)
    hand_optimizer = torch.optim.Adam(hand.parameters(), lr=1e-3)
    x_device = x.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    clock = InterleavedEpochs(
        lambda: hand_epoch(hand, hand_optimizer, x_device, args.batch_size, generator)
    )

    config = VAEConfig(input_dim=(data_dim,), latent_dim=latent_dim, reconstruction_loss="bce")
    model = VAE(
        config, encoder=Encoder(data_dim, latent_dim), decoder=Decoder(data_dim, latent_dim)
    )
    trainer_config = BaseTrainerConfig(
        output_dir=args.output_dir,
        num_epochs=args.epochs,
        learning_rate=1e-3,
        per_device_train_batch_size=args.batch_size,
        optimizer_cls="Adam",
        steps_saving=None,
        no_cuda=device.type != "cuda",
    )
    trainer = BaseTrainer(
        model=model,
        train_dataset=BaseDataset(x, torch.zeros(x.shape[0])),
        training_config=trainer_config,
        callbacks=[clock],
    )
    trainer.train()
    print(json.dumps({"pythae": clock.pythae, "hand": clock.hand}))


if __name__ == "__main__":
    main()
