"""The eps-UNet presets: the paper's parameter count and forward shapes at odd batch sizes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runtime.errors import DDPMError  # noqa: E402
from train.model import UNet, count_parameters, preset_config  # noqa: E402


def test_cifar10_preset_has_the_papers_parameter_count_and_runs() -> None:
    torch.manual_seed(0)
    model = UNet(preset_config("cifar10", 32, 3)).eval()
    assert count_parameters(model) == 35_746_307
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("batch, channels", [(1, 1), (3, 3)])
def test_forward_shapes(preset: str, batch: int, channels: int) -> None:
    torch.manual_seed(0)
    model = UNet(preset_config(preset, 32, channels)).eval()
    with torch.no_grad():
        for p in model.parameters():  # wake the zero-initialised output layers so the output depends on t
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(batch, channels, 32, 32)
        out = model(x, torch.arange(batch) * 400)
        again = model(x, torch.arange(batch) * 400 + 1)
    assert out.shape == (batch, channels, 32, 32) and torch.isfinite(out).all()
    assert not torch.equal(out, again)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(DDPMError, match="unknown preset"):
        preset_config("huge", 32, 3)
