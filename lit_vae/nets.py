"""Encoder and decoder networks, registered by name.

Encoders map data to the parameters of the approximate posterior:

>>> enc = ENCODERS.build("mlp", input_shape=(1, 28, 28), output_dim=2 * 16)
>>> enc(torch.zeros(5, 1, 28, 28)).shape
torch.Size([5, 32])

Decoders map latents to the parameters of the likelihood ``p(x | z)``, for any number of leading
dimensions (importance-weighted bounds pass ``(samples, batch, latent_dim)``):

>>> dec = DECODERS.build("conv", latent_dim=16, output_shape=(1, 28, 28))
>>> dec(torch.zeros(3, 5, 16)).shape
torch.Size([3, 5, 1, 28, 28])

Every decoder has an output bias of shape ``output_shape`` that is added last, so that
:meth:`Decoder.init_output_bias` can start the decoder at the training mean (Burda et al., 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lit_vae.registry import Registry

__all__ = [
    "ACTIVATIONS",
    "DECODERS",
    "ENCODERS",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "Encoder",
    "LinearDecoder",
    "MLPDecoder",
    "MLPEncoder",
    "make_activation",
]

ENCODERS: Registry[Callable[..., Encoder]] = Registry("encoder")
DECODERS: Registry[Callable[..., Decoder]] = Registry("decoder")

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}
"""Activation names accepted by the networks' ``activation`` option."""


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATIONS`).

    Raises:
        ValueError: ``name`` is not in :data:`ACTIVATIONS`; the message lists the allowed names.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"activation={name!r} is not supported; allowed: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]()


# ----------------------------------------------------------------------------- option checks


def _positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
    return int(value)


def _int_list(option: str, value: Any, *, allow_empty: bool) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        # Hydra hands lists over as ``ListConfig``, which is a ``Sequence`` too.
        raise ValueError(f"{option} must be a list of integers >= 1, got {value!r}")
    items = list(value)
    if not items and not allow_empty:
        raise ValueError(f"{option} must be a non-empty list of integers >= 1, got {value!r}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, Integral) or item < 1:
            raise ValueError(f"{option} entries must be integers >= 1, got {value!r}")
    return [int(item) for item in items]


def _shape(option: str, value: Any, ndims: tuple[int, ...] = (1, 3)) -> tuple[int, ...]:
    allowed = " or ".join(f"{n} entries" for n in ndims)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{option} must be a shape with {allowed}, got {value!r}")
    if len(value) not in ndims:
        raise ValueError(f"{option} must have {allowed} ((D,) or (C, H, W)), got {value!r}")
    return tuple(_int_list(option, value, allow_empty=False))


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]``, with the activation between them."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        if i > 0:
            layers.append(make_activation(activation))
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def _downsampled(size: int) -> int:
    """Spatial size after a 3x3 convolution with stride 2 and padding 1: ``ceil(size / 2)``."""
    return (size - 1) // 2 + 1


# ----------------------------------------------------------------------------- base classes


class Encoder(nn.Module):
    """Maps data ``(*batch, *input_shape)`` to ``(*batch, output_dim)``.

    Attributes:
        input_shape: the shape of one example, ``(D,)`` or ``(C, H, W)``.
        output_dim: the number of outputs (the posterior head's parameter count).
    """

    def __init__(self, input_shape: Sequence[int], output_dim: int) -> None:
        super().__init__()
        self.input_shape = _shape("input_shape", input_shape)
        self.output_dim = _positive_int("output_dim", output_dim)

    def _check_input(self, x: Tensor) -> None:
        n = len(self.input_shape)
        if x.dim() < n or tuple(x.shape[x.dim() - n :]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (*batch, "
                f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )


class Decoder(nn.Module):
    """Maps latents ``(*batch, latent_dim)`` to likelihood parameters ``(*batch, *output_shape)``.

    Subclasses implement :meth:`decode`, the map for a flat batch ``(N, latent_dim)``, and the
    :attr:`output_bias` property; :meth:`forward` handles any number of leading dimensions.

    Attributes:
        latent_dim: the dimension of ``z``.
        output_shape: the shape of one example's likelihood parameters (the data shape).
    """

    def __init__(self, latent_dim: int, output_shape: Sequence[int]) -> None:
        super().__init__()
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.output_shape = _shape("output_shape", output_shape)

    def decode(self, z: Tensor) -> Tensor:
        """Decode a flat batch: ``(N, latent_dim) -> (N, *output_shape)``."""
        raise NotImplementedError

    def forward(self, z: Tensor) -> Tensor:
        """``(*batch, latent_dim) -> (*batch, *output_shape)``; ``*batch`` may be empty."""
        if z.dim() < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape (*batch, {self.latent_dim}), "
                f"got {tuple(z.shape)}"
            )
        batch = z.shape[:-1]
        out = self.decode(z.reshape(-1, self.latent_dim))
        return out.reshape(*batch, *self.output_shape)

    @property
    def output_bias(self) -> Tensor:
        """The bias added last, viewed with shape ``output_shape`` (shares storage)."""
        raise NotImplementedError

    def init_output_bias(self, value: Tensor) -> None:
        """Set the output bias to ``value`` (broadcastable to ``output_shape``).

        With the bias in place, a decoder whose last layer contributes nothing outputs exactly
        ``value``; pass the likelihood's ``output_bias_for(train_mean)`` to start the model at
        the training mean.
        """
        value = torch.as_tensor(value)
        try:
            target = value.expand(self.output_shape)
        except RuntimeError:
            raise ValueError(
                f"init_output_bias needs a value broadcastable to output_shape="
                f"{self.output_shape}, got shape {tuple(value.shape)}"
            ) from None
        with torch.no_grad():
            self.output_bias.copy_(target)


# ----------------------------------------------------------------------------- encoders


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
    """A fully connected encoder: flatten, ``Linear -> activation`` per hidden size, ``Linear``.

    Args:
        input_shape: the shape of one example, ``(D,)`` or ``(C, H, W)``.
        output_dim: the number of outputs.
        hidden_sizes: widths of the hidden layers (entries >= 1; empty gives an affine map).
        activation: a name from :data:`ACTIVATIONS`.

    Shapes:
        ``(*batch, *input_shape) -> (*batch, output_dim)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        output_dim: int,
        hidden_sizes: Sequence[int] = (512, 256),
        activation: str = "relu",
    ) -> None:
        super().__init__(input_shape, output_dim)
        hidden = _int_list("hidden_sizes", hidden_sizes, allow_empty=True)
        make_activation(activation)  # validate early
        self.hidden_sizes = hidden
        self.activation = activation
        sizes = [math.prod(self.input_shape), *hidden, self.output_dim]
        self.net = _mlp(sizes, activation)

    def forward(self, x: Tensor) -> Tensor:
        """``(*batch, *input_shape) -> (*batch, output_dim)``."""
        self._check_input(x)
        return self.net(x.flatten(start_dim=x.dim() - len(self.input_shape)))


@ENCODERS.register("conv")
class ConvEncoder(Encoder):
    """A convolutional encoder for images of any size.

    Each entry of ``channels`` adds a 3x3 convolution with stride 2 and padding 1 (halving
    ``H`` and ``W``, rounding up) followed by the activation; the feature map is flattened and
    passed through ``Linear(hidden_dim) -> activation -> Linear(output_dim)``. For ``(1, 28, 28)``
    and the default channels the map goes ``28 -> 14 -> 7``; for ``(1, 8, 8)`` it goes
    ``8 -> 4 -> 2``.

    Args:
        input_shape: ``(C, H, W)``.
        output_dim: the number of outputs.
        channels: output channels of the successive convolutions (entries >= 1, at least one).
        hidden_dim: width of the fully connected hidden layer (>= 1).
        activation: a name from :data:`ACTIVATIONS`.

    Shapes:
        ``(*batch, C, H, W) -> (*batch, output_dim)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        output_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__(input_shape, output_dim)
        if len(self.input_shape) != 3:
            raise ValueError(
                f"input_shape must be (C, H, W) for the conv encoder, got {self.input_shape}"
            )
        chans = _int_list("channels", channels, allow_empty=False)
        self.channels = chans
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        make_activation(activation)
        self.activation = activation

        c, h, w = self.input_shape
        convs: list[nn.Module] = []
        for out_c in chans:
            convs += [nn.Conv2d(c, out_c, 3, stride=2, padding=1), make_activation(activation)]
            c, h, w = out_c, _downsampled(h), _downsampled(w)
        self.conv = nn.Sequential(*convs)
        self.feature_shape = (c, h, w)
        self.head = nn.Sequential(
            nn.Linear(c * h * w, self.hidden_dim),
            make_activation(activation),
            nn.Linear(self.hidden_dim, self.output_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(*batch, C, H, W) -> (*batch, output_dim)``."""
        self._check_input(x)
        batch = x.shape[:-3]
        features = self.conv(x.reshape(-1, *self.input_shape))
        return self.head(features.flatten(start_dim=1)).reshape(*batch, self.output_dim)


# ----------------------------------------------------------------------------- decoders


@DECODERS.register("mlp")
class MLPDecoder(Decoder):
    """A fully connected decoder: ``Linear -> activation`` per hidden size, then ``Linear``.

    The last linear layer's bias is the output bias.

    Args:
        latent_dim: the dimension of ``z``.
        output_shape: the data shape, ``(D,)`` or ``(C, H, W)``.
        hidden_sizes: widths of the hidden layers, from the latent side (entries >= 1).
        activation: a name from :data:`ACTIVATIONS`.

    Shapes:
        ``(*batch, latent_dim) -> (*batch, *output_shape)``.
    """

    def __init__(
        self,
        latent_dim: int,
        output_shape: Sequence[int],
        hidden_sizes: Sequence[int] = (256, 512),
        activation: str = "relu",
    ) -> None:
        super().__init__(latent_dim, output_shape)
        hidden = _int_list("hidden_sizes", hidden_sizes, allow_empty=True)
        make_activation(activation)
        self.hidden_sizes = hidden
        self.activation = activation
        self.net = _mlp([self.latent_dim, *hidden, math.prod(self.output_shape)], activation)

    @property
    def last(self) -> nn.Linear:
        """The output layer."""
        layer = self.net[-1]
        assert isinstance(layer, nn.Linear)
        return layer

    def decode(self, z: Tensor) -> Tensor:
        """``(N, latent_dim) -> (N, *output_shape)``."""
        return self.net(z).reshape(-1, *self.output_shape)

    @property
    def output_bias(self) -> Tensor:
        return self.last.bias.view(self.output_shape)


@DECODERS.register("conv")
class ConvDecoder(Decoder):
    """A transposed-convolution decoder mirroring :class:`ConvEncoder`.

    ``Linear(hidden_dim) -> activation -> Linear -> activation`` produces a
    ``(channels[0], h, w)`` feature map, where ``h, w`` is the output size halved (rounding up)
    ``len(channels)`` times. Each following entry of ``channels`` adds a 3x3 transposed convolution
    with stride 2 and the activation, and a last transposed convolution (no bias) produces the
    ``C`` output channels; every transposed convolution doubles the size, with the output padding
    chosen to land exactly on the encoder's sizes (``7 -> 14 -> 28``, ``2 -> 4 -> 8``). A
    per-pixel bias parameter of shape ``output_shape`` is added last.

    Args:
        latent_dim: the dimension of ``z``.
        output_shape: ``(C, H, W)``.
        channels: channels of the successive feature maps from the latent side, i.e. the
            encoder's ``channels`` reversed (entries >= 1, at least one).
        hidden_dim: width of the fully connected hidden layer (>= 1).
        activation: a name from :data:`ACTIVATIONS`.

    Shapes:
        ``(*batch, latent_dim) -> (*batch, C, H, W)``.
    """

    def __init__(
        self,
        latent_dim: int,
        output_shape: Sequence[int],
        channels: Sequence[int] = (64, 32),
        hidden_dim: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__(latent_dim, output_shape)
        if len(self.output_shape) != 3:
            raise ValueError(
                f"output_shape must be (C, H, W) for the conv decoder, got {self.output_shape}"
            )
        chans = _int_list("channels", channels, allow_empty=False)
        self.channels = chans
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        make_activation(activation)
        self.activation = activation

        c_out, h, w = self.output_shape
        sizes = [(h, w)]  # spatial sizes from the output back to the smallest feature map
        for _ in chans:
            h, w = _downsampled(h), _downsampled(w)
            sizes.append((h, w))
        sizes.reverse()
        self.feature_shape = (chans[0], *sizes[0])

        self.head = nn.Sequential(
            nn.Linear(self.latent_dim, self.hidden_dim),
            make_activation(activation),
            nn.Linear(self.hidden_dim, math.prod(self.feature_shape)),
            make_activation(activation),
        )
        layers: list[nn.Module] = []
        out_channels = [*chans[1:], c_out]
        for i, (c_in, c) in enumerate(zip(chans, out_channels)):
            (h_in, w_in), (h_to, w_to) = sizes[i], sizes[i + 1]
            last = i == len(chans) - 1
            layers.append(
                nn.ConvTranspose2d(
                    c_in,
                    c,
                    3,
                    stride=2,
                    padding=1,
                    output_padding=(h_to - 2 * h_in + 1, w_to - 2 * w_in + 1),
                    bias=not last,
                )
            )
            if not last:
                layers.append(make_activation(activation))
        self.deconv = nn.Sequential(*layers)
        self.pixel_bias = nn.Parameter(torch.zeros(self.output_shape))

    def decode(self, z: Tensor) -> Tensor:
        """``(N, latent_dim) -> (N, C, H, W)``."""
        features = self.head(z).reshape(-1, *self.feature_shape)
        return self.deconv(features) + self.pixel_bias

    @property
    def output_bias(self) -> Tensor:
        return self.pixel_bias


@DECODERS.register("linear")
class LinearDecoder(Decoder):
    """A single affine map ``x_params = W z + b`` (probabilistic PCA with a Gaussian likelihood).

    Args:
        latent_dim: the dimension ``d`` of ``z``.
        output_shape: the data shape; ``D = prod(output_shape)``.

    Attributes:
        weight: ``W``, shape ``(D, d)``, initialised as :class:`torch.nn.Linear` does.
        bias: ``b``, shape ``(D,)``; the output bias.

    Shapes:
        ``(*batch, d) -> (*batch, *output_shape)``.
    """

    def __init__(self, latent_dim: int, output_shape: Sequence[int]) -> None:
        super().__init__(latent_dim, output_shape)
        layer = nn.Linear(self.latent_dim, math.prod(self.output_shape))
        self.weight = layer.weight
        self.bias = layer.bias

    def decode(self, z: Tensor) -> Tensor:
        """``(N, d) -> (N, *output_shape)``."""
        return F.linear(z, self.weight, self.bias).reshape(-1, *self.output_shape)

    @property
    def output_bias(self) -> Tensor:
        return self.bias.view(self.output_shape)
