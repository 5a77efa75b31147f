"""Model-space images <-> uint8 pictures and grids, as PNG or any format Pillow writes, and the one preprocessing of
image files that training and evaluation share (NumPy + Pillow only)."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASETS = ("mnist", "cifar10", "folder")  # named image sets: ddpm-train learns from them, ddpm-eval compares with them


def fit_picture(img: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """`img` as uint8 C x H x W at `channels` (1: grey, 3: RGB) and `size` (H, W): the short side resized (bicubic),
    then centre-cropped. One preprocessing, so evaluation sees a folder exactly as training did."""
    img = img.convert("L" if channels == 1 else "RGB")
    h, w = size
    if img.size != (w, h):
        scale = max(w / img.size[0], h / img.size[1])
        nw, nh = max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - w) // 2, (nh - h) // 2
        img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_folder(data_dir: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Every picture under `data_dir` (recursively, sorted by path) through `fit_picture`: uint8 N x C x H x W."""
    return read_pictures(picture_files(data_dir), image_shape)


def picture_files(data_dir: Path) -> list[Path]:
    """The pictures under `data_dir`, recursively, sorted by path; none is one DDPMError."""
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DDPMError(f"{data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); point {{opt:data_dir}} at a folder "
                        "of pictures")
    return files


def read_pictures(files: list[Path], image_shape: tuple[int, int, int]) -> np.ndarray:
    """`files` through `fit_picture`: uint8 N x C x H x W. Decompression bombs (PIL's limit, and the warning zone up
    to twice it) and unreadable files are refused by name."""
    images = []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    images.append(fit_picture(img, image_shape[0], image_shape[1:]))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DDPMError(f"image {path} is too large to decode safely, a decompression bomb? "
                            f"({str(exc).split(',')[0]}); remove it or shrink it") from None
        except (UnidentifiedImageError, OSError, ValueError, MemoryError) as exc:
            raise DDPMError(f"cannot read image {path} ({type(exc).__name__}); remove or fix it") from None
    return np.stack(images)


def pad_center(images: np.ndarray, size: tuple[int, int], fill: float = 0) -> np.ndarray:
    """N x C x h x w images centred on an H x W background of `fill` (no larger than it): MNIST's 28 x 28 digits
    under a UNet that takes 32 x 32."""
    (h, w), (hi, wi) = size, images.shape[-2:]
    top, left = (h - hi) // 2, (w - wi) // 2
    return np.pad(images, ((0, 0), (0, 0), (top, h - hi - top), (left, w - wi - left)), constant_values=fill)


def to_model_space(images: np.ndarray, data_range: tuple[float, float] = (-1.0, 1.0),
                   dtype: type[np.floating] = np.float64) -> np.ndarray:
    """uint8 levels -> `dtype` floats in `data_range` (x / 127.5 - 1 for [-1, 1]); `to_uint8` reverses it."""
    lo, hi = data_range
    return images.astype(dtype) / dtype(255.0 / (hi - lo)) + dtype(lo)


def to_uint8(samples: np.ndarray, data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """N x C x H x W floats in `data_range` -> N x H x W x C uint8 (the layout image evaluators read)."""
    lo, hi = data_range
    scaled = (np.asarray(samples, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N x H x W x C uint8 images into one H' x W' x C picture with `pad` black pixels between."""
    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((pad + nrows * (h + pad), pad + ncols * (w + pad), c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def picture_format(path: str | os.PathLike) -> str:
    """The Pillow format `path`'s extension names (.png -> PNG, .jpg -> JPEG, ...): a picture is never written
    in a format other than the one its name says."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise DDPMError(f"cannot write a picture to {path}: Pillow writes no {ext or 'extension-less'} files; "
                        "name it .png (or .jpg, .bmp, .tif, .webp)")
    return fmt


def encode_picture(picture: np.ndarray, fmt: str) -> bytes:
    """An H x W x C (C in 1, 3) uint8 picture as the bytes of a `fmt` file."""
    pic = picture[..., 0] if picture.shape[-1] == 1 else picture
    buf = io.BytesIO()
    try:
        Image.fromarray(pic).save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DDPMError(f"Pillow cannot write this {pic.shape[1]} x {pic.shape[0]} picture as {fmt} ({exc}); "
                        "use .png") from None
    return buf.getvalue()


def check_grid_format(path: str | os.PathLike, n: int, image_shape: tuple[int, int, int]) -> None:
    """Fail before sampling, not after, if a grid of n C x H x W images cannot be written to `path`."""
    c, h, w = image_shape
    encode_picture(make_grid(np.zeros((n, h, w, c), np.uint8)), picture_format(path))


def save_picture(path: str | os.PathLike, picture: np.ndarray, *, replace: bool = True) -> Path:
    """Write an H x W x C uint8 picture, atomically, in the format the extension of `path` names."""
    return atomic_write_bytes(path, encode_picture(picture, picture_format(path)), replace=replace)


def save_png(path: str | os.PathLike, picture: np.ndarray, *, replace: bool = True) -> Path:
    """Write an H x W x C (C in 1, 3) uint8 picture as PNG, atomically."""
    return atomic_write_bytes(path, encode_picture(picture, "PNG"), replace=replace)


def save_grid(path: str | os.PathLike, samples: np.ndarray, ncols: int | None = None) -> Path:
    """N x C x H x W model-space samples in [-1, 1] -> PNG grid at `path`."""
    return save_png(path, make_grid(to_uint8(samples), ncols))
