"""The closed forms of docs/kl_heads.md against lit-vae's heads, through scripts/kl_geometry.py."""

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kl_geometry() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kl_geometry", ROOT / "scripts" / "kl_geometry.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("head", ["log_var", "log_std", "std", "var"])
def test_closed_forms_match_autograd_through_the_heads(kl_geometry: ModuleType, head: str) -> None:
    raw = torch.linspace(-12.0, 6.0, 181, dtype=torch.float64)
    penalty, gradient = kl_geometry.penalty_and_gradient(head, raw)
    closed_penalty, closed_gradient = kl_geometry.CLOSED_FORMS[head](raw)
    torch.testing.assert_close(penalty, closed_penalty, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gradient, closed_gradient, atol=1e-10, rtol=1e-10)


def test_keras_form_equals_the_log_sigma_form(kl_geometry: ModuleType) -> None:
    s = torch.linspace(-5.0, 5.0, 11, dtype=torch.float64)  # s = log σ²
    mu = torch.linspace(-2.0, 2.0, 11, dtype=torch.float64)
    keras = -0.5 * (1 + s - mu.square() - s.exp())
    log_sigma = 0.5 * s
    textbook = -log_sigma + ((2 * log_sigma).exp() + mu.square()) / 2 - 0.5
    torch.testing.assert_close(keras, textbook)
    penalty, _ = kl_geometry.CLOSED_FORMS["log_var"](s)
    torch.testing.assert_close(penalty, keras - mu.square() / 2)


def test_asymptotic_slopes(kl_geometry: ModuleType) -> None:
    far_left = torch.tensor([-6.0], dtype=torch.float64)
    slopes = {h: float(kl_geometry.CLOSED_FORMS[h](far_left)[1]) for h in kl_geometry.HEADS}
    assert slopes["log_var"] == pytest.approx(-0.5, abs=2e-3)
    assert slopes["log_std"] == pytest.approx(-1.0, abs=1e-5)
    assert slopes["std"] == pytest.approx(-1.0, abs=0.05)
    assert slopes["var"] == pytest.approx(-0.5, abs=5e-3)
    far_right = torch.tensor([50.0], dtype=torch.float64)
    _, var_gradient = kl_geometry.CLOSED_FORMS["var"](far_right)
    assert float(var_gradient) == pytest.approx(0.5, abs=0.02)  # bounded for σ > 1
    _, std_gradient = kl_geometry.CLOSED_FORMS["std"](far_right)
    assert float(std_gradient) == pytest.approx(50.0 + math.log(math.e - 1), rel=0.01)


def test_script_writes_the_figure(kl_geometry: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "kl_geometry.png"
    kl_geometry.main(["--output", str(output)])
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (1200, 480)
