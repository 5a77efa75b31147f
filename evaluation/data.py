"""Real images for evaluation, as uint8 N x C x H x W at a model's image shape (no torch on the lean paths).

Sources: an `.npz` with `arr_0` (uint8 N x H x W x C, what `ddpm-run` writes and image evaluators read), a folder of
pictures, and the datasets of `train.data` (mnist: the 1,000 test digits held out of training; cifar10: the
python-format `test_batch`), which are imported lazily and need the eval extra.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from runtime.errors import DDPMError
from runtime.images import DATASETS, pad_center, read_folder
from runtime.resources import require_memory
from runtime.run.shards import SampleFile


def _train_data():  # type: ignore[no-untyped-def]
    try:
        import train.data as data
    except ImportError:
        raise DDPMError("the mnist and cifar10 readers need the eval extra (pip install 'ddpm-deploy[eval]'); "
                        "or pass an .npz (arr_0: uint8 N x H x W x C) or {opt:data} folder") from None
    return data


def mnist_digits() -> np.ndarray:
    """The 1,000 MNIST test digits that `ddpm-train --dataset mnist` holds out (`train.data.mnist_split`):
    uint8 N x 1 x 28 x 28, classes mixed."""
    digits, _ = _train_data().mnist_split("test")
    return digits[:, None]


def cifar10_test(data_dir: Path) -> np.ndarray:
    """The 10,000 CIFAR-10 test images (`test_batch`, never seen by `ddpm-train`): uint8 N x 3 x 32 x 32."""
    path = data_dir / "test_batch"
    if not path.is_file():
        raise DDPMError(f"{data_dir} has no test_batch; point {{opt:data_dir}} at the extracted cifar-10-batches-py folder")
    return _train_data().cifar10_batch(path)[0]


def npz_images(path: Path) -> np.ndarray:
    """arr_0 of an .npz (uint8 N x H x W x C) as N x C x H x W; its header is checked (`SampleFile.open`) and its
    size against the memory available before anything is read."""
    file = SampleFile.open(path)
    require_memory(2 * file.n * math.prod(file.image_shape), f"{path} ({file.n} images)",
                   "pass fewer images (a smaller .npz)")
    with np.load(path, allow_pickle=False) as f:
        return np.ascontiguousarray(f["arr_0"].transpose(0, 3, 1, 2))


def _to_shape(images: np.ndarray, image_shape: tuple[int, int, int], what: str) -> np.ndarray:
    """Pad smaller images with background (MNIST 28 -> 32, as training does); refuse other mismatches."""
    c, h, w = image_shape
    n, ci, hi, wi = images.shape
    if ci != c:
        raise DDPMError(f"{what} has {ci}-channel images, the model takes {c} channels")
    if (hi, wi) != (h, w):
        if hi > h or wi > w or (h - hi) % 2 or (w - wi) % 2:
            raise DDPMError(f"{what} has {hi} x {wi} images, the model takes {h} x {w}")
        images = pad_center(images, (h, w))
    return images


def load_images(data: str, data_dir: Path | None, image_shape: tuple[int, int, int], n: int | None,
                first: int = 0) -> np.ndarray:
    """`n` images (all the rest when None) of `data` (mnist, cifar10, folder or a .npz path) from image `first` on,
    at `image_shape`."""
    if data == "mnist":
        images, what = mnist_digits(), "mnist"
    elif data in ("cifar10", "folder"):
        if data_dir is None:
            raise DDPMError(f"{{opt:data}} {data} needs {{opt:data_dir}} PATH")
        if not data_dir.is_dir():
            raise DDPMError(f"data folder {data_dir} does not exist or is not a folder; pass an existing {{opt:data_dir}}")
        images = cifar10_test(data_dir) if data == "cifar10" else read_folder(data_dir, image_shape)
        what = f"{data_dir}"
    elif data.lower().endswith(".npz"):
        path = Path(data)
        if not path.is_file():
            raise DDPMError(f"data file {path} not found")
        images, what = npz_images(path), str(path)
    else:
        raise DDPMError(f"unknown data {data!r}; use {', '.join(DATASETS)} (with {{opt:data_dir}}) or an .npz file")
    if first >= len(images):
        raise DDPMError(f"{{opt:first}} {first} skips all {len(images)} images of {what}; use {{opt:first}} {len(images) - 1} "
                        "or less")
    left = len(images) - first
    if n is not None:
        if n < 1:
            raise DDPMError(f"{{opt:n}} must be >= 1, got {n}")
        if n > left:
            after = f" after the first {first}" if first else ""
            raise DDPMError(f"{{opt:n}} {n} is more than the {left} images of {what}{after}; use {{opt:n}} {left} or less")
    images = images[first:len(images) if n is None else first + n]
    return _to_shape(images, image_shape, what)
