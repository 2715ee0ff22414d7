"""Encoders and decoders: shapes, output bias, gradients, option checks and the model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lit_vae
from lit_vae.nets import (
    ACTIVATIONS,
    DECODERS,
    ENCODERS,
    ConvDecoder,
    Decoder,
    LinearDecoder,
    MLPDecoder,
    make_activation,
)
from lit_vae.registry import UnknownNameError

MODEL_CONFIGS = sorted((Path(lit_vae.__file__).parent / "conf" / "model").glob("*.yaml"))
SMALL = {"hidden_sizes": [16, 8]}
SMALL_CONV = {"channels": [4, 8], "hidden_dim": 16}


def small_options(name: str, *, decoder: bool = False) -> dict:
    if name == "mlp":
        return dict(SMALL)
    if name == "conv":
        return {**SMALL_CONV, "channels": [8, 4]} if decoder else dict(SMALL_CONV)
    return {}


def last_weight(decoder: Decoder) -> torch.Tensor:
    """The weight of the layer that feeds the output bias."""
    if isinstance(decoder, MLPDecoder):
        return decoder.last.weight
    if isinstance(decoder, ConvDecoder):
        layer = decoder.deconv[-1]
        assert isinstance(layer, nn.ConvTranspose2d)
        return layer.weight
    assert isinstance(decoder, LinearDecoder)
    return decoder.weight


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (784,)),
        ("mlp", (1, 28, 28)),
        ("mlp", (1, 8, 8)),
        ("conv", (1, 28, 28)),
        ("conv", (1, 8, 8)),
        ("conv", (3, 7, 5)),
    ],
)
def test_encoder_output_shape(name: str, shape: tuple[int, ...]) -> None:
    enc = ENCODERS.build(name, input_shape=shape, output_dim=6, **small_options(name))
    assert enc(torch.randn(5, *shape)).shape == (5, 6)
    assert enc(torch.randn(2, 3, *shape)).shape == (2, 3, 6)


def test_conv_encoder_feature_sizes() -> None:
    assert ENCODERS.build("conv", input_shape=(1, 28, 28), output_dim=4).feature_shape == (
        64,
        7,
        7,
    )
    assert ENCODERS.build("conv", input_shape=(1, 8, 8), output_dim=4).feature_shape == (64, 2, 2)
    enc = ENCODERS.build("conv", input_shape=(1, 8, 8), output_dim=4, channels=[4, 4, 4])
    assert enc.feature_shape == (4, 1, 1)


def test_default_mlp_encoder_layers() -> None:
    enc = ENCODERS.build("mlp", input_shape=(1, 28, 28), output_dim=10)
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 512),
        (512, 256),
        (256, 10),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in enc.modules()) == 2


@pytest.mark.parametrize("name", ["mlp", "conv", "linear"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (2, 5, 6)])
@pytest.mark.parametrize("batch", [(), (4,), (3, 4)])
def test_decoder_output_shape(name: str, shape: tuple[int, ...], batch: tuple[int, ...]) -> None:
    dec = DECODERS.build(
        name, latent_dim=3, output_shape=shape, **small_options(name, decoder=True)
    )
    assert dec(torch.randn(*batch, 3)).shape == (*batch, *shape)


@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_flat_decoder_output_shape(name: str) -> None:
    dec = DECODERS.build(name, latent_dim=2, output_shape=(7,), **small_options(name))
    assert dec(torch.randn(3, 4, 2)).shape == (3, 4, 7)


def test_decoder_treats_leading_dims_as_a_batch() -> None:
    dec = DECODERS.build("conv", latent_dim=3, output_shape=(1, 8, 8), **SMALL_CONV)
    z = torch.randn(3, 4, 3)
    out = dec(z)
    torch.testing.assert_close(out[1], dec(z[1]))
    torch.testing.assert_close(out[2, 3], dec(z[2, 3]))


@pytest.mark.parametrize("name", ["mlp", "conv", "linear"])
def test_init_output_bias_is_the_output_when_last_layer_is_silent(name: str) -> None:
    shape = (1, 8, 8)
    dec = DECODERS.build(name, latent_dim=3, output_shape=shape, **small_options(name))
    bias = torch.randn(shape)
    dec.init_output_bias(bias)
    torch.testing.assert_close(dec.output_bias.detach(), bias)
    with torch.no_grad():
        last_weight(dec).zero_()
    out = dec(torch.randn(2, 5, 3))
    torch.testing.assert_close(out, bias.expand(2, 5, *shape), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "conv", "linear"])
def test_output_bias_is_a_trainable_parameter(name: str) -> None:
    dec = DECODERS.build(name, latent_dim=3, output_shape=(1, 4, 4), **small_options(name))
    dec.init_output_bias(torch.tensor(0.25))  # broadcasts
    assert torch.all(dec.output_bias == 0.25)
    assert dec.output_bias.requires_grad
    assert any(dec.output_bias.data_ptr() == p.data_ptr() for p in dec.parameters())
    with pytest.raises(ValueError, match="output_shape"):
        dec.init_output_bias(torch.zeros(3, 4, 4))


def test_linear_decoder_is_affine_in_true_parameters() -> None:
    dec = DECODERS.build("linear", latent_dim=2, output_shape=(5,))
    assert dec.weight.shape == (5, 2)
    assert dec.bias.shape == (5,)
    w, b = torch.randn(5, 2), torch.randn(5)
    with torch.no_grad():
        dec.weight.copy_(w)
        dec.bias.copy_(b)
    z = torch.randn(3, 4, 2)
    torch.testing.assert_close(dec(z), z @ w.T + b)
    assert {n for n, _ in dec.named_parameters()} == {"weight", "bias"}


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_gradients_reach_every_encoder_parameter(name: str) -> None:
    enc = ENCODERS.build(
        name, input_shape=(1, 8, 8), output_dim=4, activation="tanh", **small_options(name)
    )
    enc(torch.randn(6, 1, 8, 8)).square().sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["mlp", "conv", "linear"])
def test_gradients_reach_every_decoder_parameter(name: str) -> None:
    opts = small_options(name, decoder=True)
    if name != "linear":
        opts["activation"] = "tanh"
    dec = DECODERS.build(name, latent_dim=3, output_shape=(1, 8, 8), **opts)
    z = torch.randn(2, 6, 3, requires_grad=True)
    dec(z).square().sum().backward()
    assert z.grad is not None
    for pname, p in dec.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds(activation: str) -> None:
    assert isinstance(make_activation(activation), nn.Module)
    enc = ENCODERS.build("mlp", input_shape=(3,), output_dim=2, activation=activation)
    dec = DECODERS.build("conv", latent_dim=2, output_shape=(1, 4, 4), activation=activation)
    assert torch.isfinite(dec(enc(torch.randn(2, 3)))).all()


def test_unknown_activation_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="activation") as err:
        ENCODERS.build("mlp", input_shape=(3,), output_dim=2, activation="swish")
    for name in ACTIVATIONS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("registry", "name", "options", "option"),
    [
        ("enc", "mlp", {"hidden_sizes": [8, 0]}, "hidden_sizes"),
        ("enc", "mlp", {"hidden_sizes": 8}, "hidden_sizes"),
        ("enc", "mlp", {"hidden_sizes": ["8"]}, "hidden_sizes"),
        ("dec", "mlp", {"hidden_sizes": [True]}, "hidden_sizes"),
        ("dec", "mlp", {"activation": "sigmoid"}, "activation"),
        ("enc", "conv", {"channels": []}, "channels"),
        ("enc", "conv", {"channels": [4, -1]}, "channels"),
        ("dec", "conv", {"channels": [4.5]}, "channels"),
        ("enc", "conv", {"hidden_dim": 0}, "hidden_dim"),
        ("dec", "conv", {"hidden_dim": 0}, "hidden_dim"),
        ("enc", "conv", {"input_shape": (64,)}, "input_shape"),
        ("dec", "conv", {"output_shape": (64,)}, "output_shape"),
        ("enc", "mlp", {"input_shape": (1, 28)}, "input_shape"),
        ("enc", "mlp", {"input_shape": (1, 0, 28)}, "input_shape"),
        ("enc", "mlp", {"output_dim": 0}, "output_dim"),
        ("dec", "linear", {"latent_dim": 0}, "latent_dim"),
        ("dec", "linear", {"output_shape": ()}, "output_shape"),
    ],
)
def test_bad_options_name_the_option(registry: str, name: str, options: dict, option: str) -> None:
    if registry == "enc":
        kwargs = {"input_shape": (1, 8, 8), "output_dim": 4, **options}
        with pytest.raises(ValueError, match=option):
            ENCODERS.build(name, **kwargs)
    else:
        kwargs = {"latent_dim": 2, "output_shape": (1, 8, 8), **options}
        with pytest.raises(ValueError, match=option):
            DECODERS.build(name, **kwargs)


def test_wrong_input_shapes_raise() -> None:
    enc = ENCODERS.build("conv", input_shape=(1, 8, 8), output_dim=4, **SMALL_CONV)
    with pytest.raises(ValueError, match=r"\(\*batch, 1, 8, 8\)"):
        enc(torch.randn(2, 1, 28, 28))
    dec = DECODERS.build("mlp", latent_dim=3, output_shape=(4,), **SMALL)
    with pytest.raises(ValueError, match=r"\(\*batch, 3\)"):
        dec(torch.randn(2, 4))


def test_unknown_network_name_lists_registered_names() -> None:
    with pytest.raises(UnknownNameError, match="conv, linear, mlp"):
        DECODERS.build("resnet", latent_dim=2, output_shape=(4,))
    assert ENCODERS.names() == ["conv", "mlp"]


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_model_configs_build(path: Path, shape: tuple[int, ...]) -> None:
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"encoder", "decoder"}
    enc = ENCODERS.from_config(cfg.encoder, "model.encoder", input_shape=shape, output_dim=8)
    dec = DECODERS.from_config(cfg.decoder, "model.decoder", latent_dim=4, output_shape=shape)
    x = torch.rand(3, *shape)
    z = enc(x)[:, :4]
    assert dec(z).shape == x.shape
    assert dec(torch.randn(2, 3, 4)).shape == (2, 3, *shape)


def test_model_config_names() -> None:
    assert [p.stem for p in MODEL_CONFIGS] == ["conv", "linear", "mlp"]
    linear = OmegaConf.load(MODEL_CONFIGS[1])
    assert linear.encoder.name == "mlp"
    assert linear.decoder.name == "linear"
