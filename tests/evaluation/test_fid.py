"""FID equals pytorch-fid's own computation (its network, preprocessing and distance) on the same image sets and
weights; streaming statistics equal np.cov; reference statistics are cached. Random Inception weights: the
distances mean nothing, their equality is what is checked."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid")

from PIL import Image  # noqa: E402

from evaluation import fid  # noqa: E402

torch, inception, fid_score = fid._libraries()  # pytorch-fid itself, importable beside a CPU-only torch


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights file with the FID network's exact keys and shapes: pytorch-fid builds its network and asks
    for the weights; we answer with that network's own freshly initialised state."""
    torch.manual_seed(0)

    def own_state(*args: object, **kwargs: object) -> dict:
        return sys._getframe(1).f_locals["inception"].state_dict()

    with mock.patch.object(inception, "load_state_dict_from_url", own_state):
        net = inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _images(n: int, seed: int, channels: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, channels))
    return np.clip(base + rng.normal(0, 40 + 20 * seed, (n, size, size, channels)), 0, 255).astype(np.uint8)


def _write_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.slow
def test_our_fid_equals_pytorch_fid(weights: Path, tmp_path: Path, channels: int) -> None:
    a, b = _images(30, 1, channels), _images(26, 2, channels)
    state = torch.load(weights, weights_only=True)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        theirs = fid_score.calculate_fid_given_paths([str(_write_pngs(a, tmp_path / "a")),
                                                      str(_write_pngs(b, tmp_path / "b"))],
                                                     batch_size=50, device="cpu", dims=2048, num_workers=0)
    net = fid.load_inception(weights)
    ours = fid.frechet(fid.statistics(net, [a[:13], a[13:]])[:2], fid.statistics(net, [b])[:2])
    assert theirs > 0 and abs(ours - theirs) <= 1e-6 * theirs, (ours, theirs)


def test_streamed_statistics_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (301, 16))
    stats = fid.FeatureStats()
    for part in np.array_split(x, 7):
        stats.add(part)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_reference_statistics_are_cached(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def compute() -> tuple[np.ndarray, np.ndarray, int]:
        calls.append(1)
        return np.ones(3), np.eye(3), 7

    key = fid.reference_key({"data": "x"}, 7, weights)
    first, again = fid.cached_statistics(key, compute), fid.cached_statistics(key, compute)
    assert len(calls) == 1 and again[2] == 7 and np.array_equal(first[1], again[1])
    assert fid.reference_key({"data": "x"}, 8, weights) != key  # another n: another entry


def test_weights_that_are_not_the_fid_network_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(fid.DDPMError, match="does not hold the FID Inception weights"):
        fid.load_inception(path)
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(fid.DDPMError, match="not a loadable weights file"):
        fid.load_inception(tmp_path / "text.pth")


@pytest.mark.slow
def test_quality_scores_shards_as_their_merged_file_and_caches_the_reference(weights: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`ddpm-eval quality` on the shards of a run gives the FID of the merged file (streamed statistics); the folder
    reference is computed once, and keyed anew when one of its files changes; n is printed and a small n warned
    about."""
    from evaluation.cli import main as ddpm_eval
    from runtime.run.cli import main as ddpm_run
    from conftest import cheap_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    model = cheap_model(tmp_path / "cheap.onnx", (3, 16, 16))
    for rank in range(2):
        ddpm_run([str(model), "-n", "3", "--batch-size", "2", "--steps", "3", "--out", str(tmp_path / "s.npz"),
                  "--shard", f"{rank}/2", "-q"])
    shards = [str(tmp_path / f"s.shard{rank}-of-2.npz") for rank in range(2)]
    ddpm_run(["merge", *shards, "--out", str(tmp_path / "merged.npz")])
    ref = _write_pngs(_images(2, 3, 3, 16), tmp_path / "ref")
    capsys.readouterr()
    reports = {}
    for name, files in (("shards", shards), ("merged", [str(tmp_path / "merged.npz")])):
        ddpm_eval(["quality", *files, "--ref", str(ref), "--inception-weights", str(weights), "--json",
                   str(tmp_path / f"{name}.json")])
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
        out, err = capsys.readouterr()
        assert f"FID {reports[name]['fid']:.3f}: n = 3 samples vs n = 2 images of {ref}" in out
        assert err.strip() == "warning: FID at n < 2048 is dominated by bias; compare only at equal n"
    assert reports["shards"]["n"] == reports["merged"]["n"] == 3 and reports["shards"]["ref_n"] == 2
    assert reports["shards"]["fid"] > 0
    assert reports["shards"]["fid"] == pytest.approx(reports["merged"]["fid"], rel=1e-6)
    assert len(list(fid.cache_dir().iterdir())) == 1  # both runs used one cached reference
    identity, n, _ = fid.reference(ref, (3, 16, 16))
    os.utime(ref / "000.png", ns=(0, 0))
    assert fid.reference_key(fid.reference(ref, (3, 16, 16))[0], n, weights) != fid.reference_key(identity, n, weights)


@pytest.mark.parametrize("args,message", [
    ([], "FID needs --inception-weights PATH"),
    (["--inception-weights", "WEIGHTS", "--ref", "/nonexistent"], "--ref /nonexistent is neither mnist, a folder"),
    (["--inception-weights", "OTHER"], "does not hold the FID Inception weights"),
])
def test_quality_refusals_are_one_line(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       args: list[str], message: str) -> None:
    from evaluation.cli import main as ddpm_eval

    samples, ref = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(samples, arr_0=_images(3, 1))
    np.savez(ref, arr_0=_images(3, 2))
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    names = {"WEIGHTS": str(weights), "OTHER": str(tmp_path / "other.pth")}
    with pytest.raises(SystemExit) as exc:
        ddpm_eval(["quality", str(samples), "--ref", str(ref), *[names.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
