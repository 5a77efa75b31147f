"""The image preprocessing that training and evaluation share (runtime.images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.images import fit_picture, pad_center, read_folder, to_model_space, to_uint8


def test_fit_picture_keeps_the_centre_of_the_long_side() -> None:
    columns = np.broadcast_to(np.arange(96, dtype=np.uint8), (32, 96))  # each column its own level
    picture = np.stack([columns, columns // 2, 255 - columns], axis=-1)
    fitted = fit_picture(Image.fromarray(np.ascontiguousarray(picture)), 3, (32, 32))
    assert fitted.shape == (3, 32, 32) and fitted.dtype == np.uint8
    np.testing.assert_array_equal(fitted, picture[:, 32:64].transpose(2, 0, 1))


def test_fit_picture_resizes_the_short_side_and_converts_channels() -> None:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    grey = fit_picture(picture, 1, (24, 24))
    assert grey.shape == (1, 24, 24)
    wide = fit_picture(picture, 3, (16, 40))
    assert wide.shape == (3, 16, 40)
    same = fit_picture(picture, 3, (48, 80))
    np.testing.assert_array_equal(same, np.asarray(picture).transpose(2, 0, 1))


def test_pad_center_puts_odd_margins_below_and_right() -> None:
    images = np.arange(2 * 1 * 27 * 27, dtype=np.float32).reshape(2, 1, 27, 27)
    padded = pad_center(images, (32, 30), fill=-1.0)
    assert padded.shape == (2, 1, 32, 30)
    np.testing.assert_array_equal(padded[:, :, 2:29, 1:28], images)
    border = np.ones((32, 30), bool)
    border[2:29, 1:28] = False
    assert np.all(padded[:, :, border] == -1.0)


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_model_space_is_undone_by_to_uint8(data_range: tuple[float, float], dtype: type[np.floating]) -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    floats = to_model_space(levels, data_range, dtype)
    assert floats.dtype == dtype and floats.min() == data_range[0] and floats.max() == data_range[1]
    np.testing.assert_array_equal(to_uint8(floats, data_range).transpose(0, 3, 1, 2), levels)


def test_training_and_evaluation_read_a_folder_alike(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from evaluation.data import load_images
    from train.data import load_dataset

    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(32, 32), (40, 57), (70, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    trained_on = load_dataset("folder", tmp_path).images.numpy()
    evaluated = load_images("folder", tmp_path, (3, 32, 32), None)
    assert evaluated.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(trained_on, to_model_space(evaluated, dtype=np.float32))
    np.testing.assert_array_equal(evaluated, read_folder(tmp_path, (3, 32, 32)))
