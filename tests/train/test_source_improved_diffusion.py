"""improved-diffusion checkpoints: our UNet and loader against golden outputs of THEIR code
(tests/fixtures/improved_diffusion, written by scripts/golden/make_improved_diffusion_fixtures.py), and the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.errors import DDPMError  # noqa: E402
from runtime.sampling.schedule import Schedule, sampling_schedule  # noqa: E402
from runtime.sampling.steps import DDPMCoefficients, ddpm_step  # noqa: E402
from train.improved_unet import ImprovedUNet  # noqa: E402
from train.sources import load_source  # noqa: E402
from train.sources.improved_diffusion_source import diffusion_config, load, parse_flags, unet_config  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "fixtures" / "improved_diffusion"
FLAGS = FIXTURES / "flags.json"
GOLDEN = dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "model.safetensors"))


@pytest.fixture(scope="module")
def checkpoint(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture weights as improved-diffusion saves them: a plain state dict in a .pt."""
    path = tmp_path_factory.mktemp("idiff") / "ema_0.9999_000000.pt"
    torch.save(state, path)
    return path


def _outputs(source, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return source.module(torch.from_numpy(x_t), torch.from_numpy(t)).numpy()


def _one_line_error(exc: pytest.ExceptionInfo[DDPMError], *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("weights", ["pt", "safetensors"])
def test_eps_and_v_match_their_model(checkpoint: Path, weights: str) -> None:
    path = checkpoint if weights == "pt" else FIXTURES / "model.safetensors"
    source = load_source(path, flags=FLAGS)
    assert source.source == "improved-diffusion" and source.image_shape == (3, 16, 16)
    assert source.diffusion.variance_type == "learned_range" and source.info().outputs == ("eps", "v")
    out = _outputs(source, GOLDEN["x_t"], GOLDEN["t"])
    assert out.shape == (3, 6, 16, 16)
    assert np.abs(out[:, :3] - GOLDEN["eps"]).max() <= 1e-4
    assert np.abs(out[:, 3:] - GOLDEN["v"]).max() <= 1e-4
    assert np.abs(GOLDEN["eps"]).max() > 0.1 and np.ptp(GOLDEN["v"]) > 0.1  # a model that computes something


def test_released_configs_have_their_keys_and_shapes() -> None:
    """The paper's released unconditional models: our UNet built from their flags has exactly their state dict."""
    manifests = json.loads((FIXTURES / "state_dict_shapes.json").read_text())
    assert set(manifests) == {"cifar10_uncond", "imagenet64_uncond", "lsun_bedroom"}
    for name, manifest in manifests.items():
        with torch.device("meta"):
            model = ImprovedUNet(unet_config(parse_flags(manifest["flags"])))
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == manifest["shapes"], name
        assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"], name


def test_schedules_match_theirs() -> None:
    diffusion = diffusion_config(parse_flags(FLAGS))
    assert (diffusion.schedule, diffusion.num_timesteps, diffusion.clip_denoised) == ("cosine", 50, True)
    np.testing.assert_allclose(Schedule.from_config(diffusion).betas, GOLDEN["betas"], rtol=1e-12, atol=0)
    chain = sampling_schedule(diffusion, str(GOLDEN["chain_spacing"]))
    np.testing.assert_array_equal(chain.timesteps, GOLDEN["chain_timesteps"])
    np.testing.assert_allclose(chain.betas, GOLDEN["chain_betas"], rtol=1e-12, atol=0)


def test_learned_variance_step_matches_their_p_mean_variance() -> None:
    """Our DDPM step on their eps and v: mean (zero noise) and log-variance (unit noise) equal theirs."""
    schedule = Schedule.from_config(diffusion_config(parse_flags(FLAGS)))
    tables = DDPMCoefficients.tables(schedule, "learned_range")
    for i, k in enumerate(GOLDEN["t"]):
        x, eps, v = (GOLDEN[key][i:i + 1].astype(np.float64) for key in ("x_t", "eps", "v"))
        mean = ddpm_step(x, eps, np.zeros_like(x), tables.row(int(k)), True, v)
        np.testing.assert_allclose(mean[0], GOLDEN["mean"][i], atol=1e-5)
        if k > 0:  # no noise is added at t = 0
            scale = ddpm_step(x, eps, np.ones_like(x), tables.row(int(k)), True, v) - mean
            np.testing.assert_allclose(np.log(scale[0]) * 2, GOLDEN["log_variance"][i], atol=1e-5)


def test_chain_on_eager_module_matches_their_p_sample_loop(checkpoint: Path) -> None:
    from runtime.backends import open_model
    from runtime.sampling import Chain, sample

    model = open_model(checkpoint, flags=FLAGS)
    chain = Chain.build(model.info.diffusion, "ddpm", steps=str(GOLDEN["chain_spacing"]))
    out = sample(model, chain, 2, noise=GOLDEN["chain_noise"])
    assert np.abs(out - GOLDEN["chain_sample"]).max() <= 1e-3


@pytest.mark.slow
def test_chain_through_onnxruntime_matches_their_p_sample_loop(checkpoint: Path, tmp_path: Path) -> None:
    from ddpm_export.pipeline import export_all
    from runtime.backends import open_model
    from runtime.sampling import Chain, sample

    written = export_all(load(checkpoint, FLAGS), tmp_path / "export", fp16=False, step_graph=False, max_batch=3,
                         validate=False, engine=False)
    model = open_model(written["onnx"])
    assert model.info.outputs == ("eps", "v") and model.info.diffusion.variance_type == "learned_range"
    out = model.eps(GOLDEN["x_t"], GOLDEN["t"])
    assert np.abs(out[:, :3] - GOLDEN["eps"]).max() <= 1e-4 and np.abs(out[:, 3:] - GOLDEN["v"]).max() <= 1e-4
    chain = Chain.build(model.info.diffusion, "ddpm", steps=str(GOLDEN["chain_spacing"]))
    out = sample(model, chain, 2, noise=GOLDEN["chain_noise"])
    assert np.abs(out - GOLDEN["chain_sample"]).max() <= 1e-3


def test_flag_forms_agree(tmp_path: Path) -> None:
    from_json = parse_flags(FLAGS)
    given = json.loads(FLAGS.read_text())
    text = " ".join(f"--{k} {v}" for k, v in given.items()) + " --lr 1e-4 --batch_size=128"  # training flags: ignored
    assert parse_flags(text) == from_json == parse_flags(given)
    assert from_json["learn_sigma"] is True and from_json["num_heads_upsample"] == 4
    assert from_json["rescale_learned_sigmas"] is True  # their default where not given


def test_variance_types_follow_their_flags() -> None:
    def variance(**flags: object) -> str:
        return diffusion_config(parse_flags(flags)).variance_type

    assert variance(learn_sigma=True, sigma_small=True) == "learned_range"
    assert variance(sigma_small=True) == "fixed_small"
    assert variance() == "fixed_large"
    assert diffusion_config(parse_flags("--clip_denoised False")).clip_denoised is False


def test_rescale_timesteps(checkpoint: Path) -> None:
    """rescale_timesteps feeds the UNet t * 1000 / T: with T = 50, t = 1 rescaled is the UNet at 20.0."""
    flags = json.loads(FLAGS.read_text())
    rescaled = load(checkpoint, flags)
    raw = load(checkpoint, {**flags, "rescale_timesteps": False})
    x = GOLDEN["x_t"][:1]
    np.testing.assert_allclose(_outputs(rescaled, x, np.array([1])), _outputs(raw, x, np.array([20])), atol=1e-6)
    assert np.abs(_outputs(rescaled, x, np.array([1])) - _outputs(raw, x, np.array([1]))).max() > 1e-3


def test_timestep_respacing_is_recorded_not_applied(checkpoint: Path) -> None:
    source = load(checkpoint, {**json.loads(FLAGS.read_text()), "timestep_respacing": "25"})
    assert source.diffusion.num_timesteps == 50
    assert "--steps 25" in source.provenance["improved_diffusion.timestep_respacing"]
    assert len(source.sha256) == 64


def test_class_conditional_is_refused(checkpoint: Path, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(DDPMError) as exc:
        load(checkpoint, {**json.loads(FLAGS.read_text()), "class_cond": True})
    _one_line_error(exc, "class-conditional")
    path = tmp_path / "cond.pt"
    torch.save({**state, "label_emb.weight": torch.zeros(1000, 128)}, path)
    with pytest.raises(DDPMError) as exc:
        load(path, FLAGS)
    _one_line_error(exc, "class-conditional", "label_emb")


@pytest.mark.parametrize("change, needles", [
    ({"learn_sigma": False}, ["2 with other shapes", "out.2.weight [6, 32, 3, 3] vs [3, 32, 3, 3]"]),
    ({"num_res_blocks": 2}, ["missing", "input_blocks.2.0.in_layers.0.weight", "more"]),
    ({"attention_resolutions": "8"}, ["unexpected", "input_blocks.1.1.norm.weight"]),
])
def test_weights_that_do_not_fit_the_flags_name_the_tensors(checkpoint: Path, change: dict, needles: list[str]) \
        -> None:
    with pytest.raises(DDPMError) as exc:
        load(checkpoint, {**json.loads(FLAGS.read_text()), **change})
    _one_line_error(exc, "does not fit the flags", *needles)


class _RunsCode:
    """A pickle that would create a folder when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(DDPMError) as exc:
        load(path, FLAGS)
    _one_line_error(exc, "refusing", "run code")
    assert not marker.exists()


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"certainly not a checkpoint")
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "step": 3}, nested)
    cases = ((junk, "not a torch checkpoint"), (nested, "not a state dict"), (tmp_path / "nope.pt", "not found"))
    for path, needle in cases:
        with pytest.raises(DDPMError) as exc:
            load(path, FLAGS)
        _one_line_error(exc, needle)


@pytest.mark.parametrize("flags, needles", [
    ("--image_size 32 --use_new_attention_order True", ["unknown", "--use_new_attention_order"]),
    ("--learn_sigma maybe", ["--learn_sigma", "bool"]),
    ("--num_channels 12.5", ["--num_channels", "int"]),
    ("--image_size", ["has no value"]),
    ("--image_size 32 stray", ["expected a --flag", "stray"]),
    ("--predict_xstart True", ["predict_xstart"]),
    ("--noise_schedule sigmoid", ["--noise_schedule", "linear and cosine"]),
    ("--image_size 48", ["--channel_mult"]),
    ("--image_size 32 --num_channels 48", ["divisible by 32"]),
    ("--image_size 32 --num_heads 3", ["heads"]),
    ({"image_size": 32, "channel_mult": "1,x"}, ["--channel_mult"]),
    ("no-such-flags.json", ["neither a flag string"]),
])
def test_bad_flags_are_one_line_errors(checkpoint: Path, flags: str | dict, needles: list[str]) -> None:
    with pytest.raises(DDPMError) as exc:
        load(checkpoint, flags)
    _one_line_error(exc, *needles)


def test_bad_flags_file(tmp_path: Path, checkpoint: Path) -> None:
    bad = tmp_path / "flags.json"
    bad.write_text("{not json")
    with pytest.raises(DDPMError) as exc:
        load(checkpoint, bad)
    _one_line_error(exc, "not valid JSON")


@pytest.mark.parametrize("make, needle", [("evil", "refusing"), ("unfit", "does not fit the flags")])
def test_export_cli_refuses_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          state: dict[str, torch.Tensor], make: str, needle: str) -> None:
    from ddpm_export.cli import main

    path = tmp_path / "model.pt"
    torch.save({"payload": _RunsCode(tmp_path / "pwned")} if make == "evil" else state, path)
    flags = "--image_size 16 --channel_mult 1,1 --num_channels 32 --num_res_blocks 1 --learn_sigma False"
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--flags", flags, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_their_weights_without_flags_get_a_hint_naming_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             state: dict[str, torch.Tensor]) -> None:
    from runtime.run.cli import main

    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--out", str(tmp_path / "s.npz")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "improved-diffusion" in lines[0] and "--flags" in lines[0]
    assert not (tmp_path / "s.npz").exists()
