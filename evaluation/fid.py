"""FID as the field computes it: pytorch-fid's InceptionV3 (the TensorFlow FID graph), its preprocessing and its
Frechet distance, so our numbers compare with papers'. The weights file is the user's
(pt_inception-2015-12-05-6726825d.pth): pytorch-fid would download it, we hand it the file instead.

Features are reduced to (mean, covariance) batch by batch, so no image set needs to be in memory at once (samples
are read from their .npz, or from all shards of a sharded ddpm-run, a batch at a time); the statistics of a
reference set are cached per (reference files, n, weights) under the user's cache folder. pytorch-fid computes FID
only: no Inception Score, no KID.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from unittest import mock

import numpy as np

from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes, file_sha256
from runtime.images import picture_files, read_pictures
from runtime.run.shards import SampleFile, SampleSet

DIMS = 2048  # pool_3 features, the FID standard
BATCH = 50  # pytorch-fid's default batch
# Below this many images the 2048 x 2048 covariance is rank-deficient and FID is dominated by its own bias.
MIN_RELIABLE_N = DIMS


def _libraries() -> tuple[Any, Any, Any]:
    try:
        import torch

        import train  # noqa: F401  (makes torchvision importable beside a CPU-only torch: train.torch_compat)
        from pytorch_fid import fid_score, inception
    except ImportError:
        raise DDPMError("FID needs pytorch-fid and torch: pip install 'ddpm-deploy[eval]'") from None
    return torch, inception, fid_score


def load_inception(weights: str | os.PathLike) -> Any:
    """pytorch-fid's InceptionV3 returning pool_3 features, with the weights read from `weights`
    (weights_only=True); a missing or foreign file is one DDPMError."""
    torch, inception, _ = _libraries()
    path = Path(weights)
    if not path.is_file():
        raise DDPMError(f"Inception weights {path} not found; pass pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth with {opt:inception_weights}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or unsafe files
        raise DDPMError(f"{path} is not a loadable weights file ({type(exc).__name__}); pass pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth") from None
    try:
        with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DDPMError(f"{path} does not hold the FID Inception weights ({first})") from None
    return net.eval()


def features(net: Any, images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """[N, 2048] float64 pool_3 features of uint8 N x H x W x C images, fed as pytorch-fid feeds its files:
    RGB (one channel repeated), scaled to [0, 1]; the network resizes to 299 itself."""
    torch, _, _ = _libraries()
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DDPMError(f"FID takes N x H x W x C uint8 images (C = 1 or 3), got {images.dtype} {images.shape}")
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH])).permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1).float().div(255)
            out.append(net(x)[0].squeeze(3).squeeze(2).double().numpy())
    return np.concatenate(out) if out else np.empty((0, DIMS))


class FeatureStats:
    """Mean and covariance of features added batch by batch: np.mean and np.cov(rowvar=False) of all of them,
    accumulated in float64 around the first batch's mean (so sums of squares do not cancel)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum = self.outer = np.zeros(0)

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        if not len(batch):
            return
        if self.shift is None:
            self.shift = batch.mean(axis=0)
            self.sum, self.outer = np.zeros(batch.shape[1]), np.zeros((batch.shape[1],) * 2)
        centred = batch - self.shift
        self.sum += centred.sum(axis=0)
        self.outer += centred.T @ centred
        self.n += len(batch)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2 or self.shift is None:
            raise DDPMError(f"FID needs at least 2 images per set, got {self.n}")
        m = self.sum / self.n
        return self.shift + m, (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


def statistics(net: Any, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the features of uint8 NHWC image batches, one batch in memory at a time."""
    stats = FeatureStats()
    for batch in batches:
        stats.add(features(net, batch))
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """pytorch-fid's Frechet distance between two (mu, sigma)."""
    _, _, fid_score = _libraries()
    with mock.patch("builtins.print"):  # its note about a singular product is ours to report, not to print
        return float(fid_score.calculate_frechet_distance(a[0], a[1], b[0], b[1]))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm-deploy" / "fid-stats"


def reference_key(identity: dict[str, Any], n: int, weights: str | os.PathLike) -> str:
    """Cache key of a reference set's statistics: what the set is (`identity`: files with sizes and dates, or a
    dataset name), how many images, and which weights."""
    text = json.dumps({"ref": identity, "n": n, "weights": file_sha256(weights)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_statistics(key: str, compute: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """The statistics stored under `key`, or `compute()`'s, stored for next time (a cache that cannot be written is
    only slower)."""
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["mu"], f["sigma"], int(f["n"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed and replaced
    mu, sigma, n = compute()
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, n=n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except (OSError, DDPMError):
        pass
    return mu, sigma, n


def reference(ref: Path, shape: tuple[int, int, int]) -> tuple[dict[str, Any], int, Callable[[], Iterator[np.ndarray]]]:
    """A reference set: its identity for the cache (a folder: its pictures' sorted names with sizes and mtimes, and
    the `shape` C x H x W they are read at, the samples'; an .npz: its sha256), its size, and its images as uint8
    N x H x W x C batches."""
    if ref.is_dir():
        files = picture_files(ref)
        stats = [(p.relative_to(ref).as_posix(), p.stat()) for p in files]
        identity = {"folder": [[name, st.st_size, st.st_mtime_ns] for name, st in stats], "shape": list(shape)}

        def batches() -> Iterator[np.ndarray]:
            for start in range(0, len(files), BATCH):
                yield read_pictures(files[start:start + BATCH], shape).transpose(0, 2, 3, 1)

        return identity, len(files), batches
    if ref.suffix.lower() == ".npz" and ref.is_file():
        real = SampleFile.open(ref)
        return {"npz": file_sha256(ref)}, real.n, lambda: real.chunks("arr_0", BATCH)
    raise DDPMError(f"{{opt:ref}} {ref} is neither mnist, a folder of images nor an .npz file")


def score(samples: SampleSet, ref: Path, weights: str | os.PathLike | None) -> dict[str, Any]:
    """FID of `samples` against the real images of `ref` (statistics cached), with both set sizes."""
    if weights is None:
        raise DDPMError("FID needs {opt:inception_weights} PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
                        "nothing is downloaded")
    h, w, c = samples.image_shape
    identity, ref_n, batches = reference(ref, (c, h, w))
    net = load_inception(weights)
    mu, sigma, n = statistics(net, samples.chunks("arr_0", BATCH))
    ref_mu, ref_sigma, ref_n = cached_statistics(reference_key(identity, ref_n, weights),
                                                 lambda: statistics(net, batches()))
    return {"fid": frechet((mu, sigma), (ref_mu, ref_sigma)), "n": n, "ref_n": ref_n}
