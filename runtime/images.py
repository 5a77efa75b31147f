"""Model-space images <-> uint8 pictures and grids, as PNG or any format Pillow writes (NumPy + Pillow only)."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_folder(data_dir: Path, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Every picture under `data_dir` (recursively, sorted by path) through `convert`, stacked. Decompression bombs
    (PIL's limit, and the warning zone up to twice it) and unreadable files are refused by name."""
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DDPMError(f"{data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); point {{opt:data_dir}} at a folder "
                        "of pictures")
    images = []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    images.append(convert(img))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DDPMError(f"image {path} is too large to decode safely, a decompression bomb? "
                            f"({str(exc).split(',')[0]}); remove it or shrink it") from None
        except (UnidentifiedImageError, OSError, ValueError, MemoryError) as exc:
            raise DDPMError(f"cannot read image {path} ({type(exc).__name__}); remove or fix it") from None
    return np.stack(images)


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
