"""The eps-UNet presets: the paper's parameter count, forward shapes at odd batch sizes, the patch stem."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runtime.errors import DDPMError  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train.model import ModelConfig, UNet, count_parameters, preset_config, preset_image_size  # noqa: E402


def _wake(model: UNet) -> UNet:
    """Perturb every weight, the zero-initialised output layers too, so the output depends on x and t."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_cifar10_preset_has_the_papers_parameter_count_and_runs() -> None:
    torch.manual_seed(0)
    model = UNet(preset_config("cifar10", 32, 3)).eval()
    assert count_parameters(model) == 35_746_307
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["tiny", "small", "fast"])
@pytest.mark.parametrize("batch, channels", [(1, 1), (3, 3)])
def test_forward_shapes(preset: str, batch: int, channels: int) -> None:
    torch.manual_seed(0)
    model = _wake(UNet(preset_config(preset, 32, channels)))
    with torch.no_grad():
        x = torch.randn(batch, channels, 32, 32)
        out = model(x, torch.arange(batch) * 400)
        again = model(x, torch.arange(batch) * 400 + 1)
    assert out.shape == (batch, channels, 32, 32) and torch.isfinite(out).all()
    assert not torch.equal(out, again)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(DDPMError, match="unknown preset"):
        preset_config("huge", 32, 3)


def test_patch_stem_is_the_plain_unet_on_folded_pixels() -> None:
    """patch_size 2 on 16 x 16 x 3 = the plain UNet on the 8 x 8 x 12 pixel_unshuffle of the image, with the same
    weights (the state dicts are interchangeable) and attention placed by the 8 x 8 grid."""
    torch.manual_seed(0)
    common = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0,
                  num_groups=4)
    patched = _wake(UNet(ModelConfig(image_size=16, in_channels=3, out_channels=3, patch_size=2, **common)))
    plain = UNet(ModelConfig(image_size=8, in_channels=12, out_channels=12, **common)).eval()
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        out = patched(x, t)
        ref = F.pixel_shuffle(plain(F.pixel_unshuffle(x, 2), t), 2)
    assert out.shape == x.shape and out.std() > 0.05
    assert torch.equal(out, ref)


def test_patch_size_is_checked_and_old_configs_load_without_it() -> None:
    with pytest.raises(DDPMError, match="patch_size 3 must be >= 1 and divide image_size 28"):
        ModelConfig(image_size=28, patch_size=3, channel_mult=(1,))
    with pytest.raises(DDPMError, match="28 / patch_size 2 must be divisible by 2\\^2"):
        ModelConfig(image_size=28, patch_size=2, channel_mult=(1, 2, 2))
    config = preset_config("fast", 28, 1)
    assert ModelConfig.from_dict(config.to_dict()) == config and config.grid_size == 14
    legacy = preset_config("small", 28, 1).to_dict()
    legacy.pop("patch_size")  # checkpoints written before the field existed
    assert ModelConfig.from_dict(legacy).patch_size == 1
    assert [preset_image_size("fast", s) for s in (28, 30, 32)] == [28, 32, 32]  # patch 2 x 2 levels: multiples of 4
