"""diffusers DDPM models in, exactly: the folder source, the cifar10-preset mapping, exported graphs and chains
against diffusers' own UNet2DModel and DDPMScheduler, and the one-line refusals. No network: random weights, configs
written here with `save_pretrained`."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from ddpm_export.pipeline import export_all  # noqa: E402
from runtime.backends import open_model  # noqa: E402
from runtime.run.cli import main as ddpm_run  # noqa: E402
from runtime.errors import DDPMError  # noqa: E402
from runtime.sampling.schedule import DiffusionConfig  # noqa: E402
from train.checkpoint import random_checkpoint  # noqa: E402
from train.diffusers_map import (from_diffusers, from_diffusers_config, from_diffusers_state_dict,  # noqa: E402
                                 to_diffusers, to_diffusers_config, to_diffusers_state_dict)
from train.model import UNet, count_parameters, preset_config, timestep_embedding  # noqa: E402
from train.sources import load_source  # noqa: E402
from train.sources.diffusers_source import load  # noqa: E402

# google/ddpm-cifar10-32's published UNet2DModel config (the paper's CIFAR-10 model) and its scheduler.
CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
    "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "center_input_sample": False,
    "mid_block_scale_factor": 1, "time_embedding_type": "positional",
}
CIFAR10_32_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                        "variance_type": "fixed_large", "clip_sample": True}
# google/ddpm-church-256's block structure (six levels, attention at 16 x 16, scheduler fixed_small).
CHURCH_256 = {
    **CIFAR10_32, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
CHURCH_256_SCHEDULER = {**CIFAR10_32_SCHEDULER, "variance_type": "fixed_small"}
# Reduced widths, same block structure: what the CPU tests can afford.
CIFAR10_SMALL = {**CIFAR10_32, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}
CHURCH_SMALL = {**CHURCH_256, "block_out_channels": [16, 16, 32, 32, 64, 64], "norm_num_groups": 8}
TINY = {**CIFAR10_32, "sample_size": 16, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def make_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with random weights everywhere (its zero-initialised tensors too), in eval mode."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    return unet.eval()


def write_pipeline(folder: Path, unet: UNet2DModel, scheduler: dict, **save) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(folder, **save)
    return folder


def diffusers_chain(unet: UNet2DModel, scheduler: DDPMScheduler, noise: np.ndarray,
                    monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """diffusers' DDPMPipeline loop (unet -> scheduler.step over scheduler.timesteps) fed our noise file: x_T first,
    then step j's draw (diffusers draws only for t > 0, and our t = 0 draw is the one it skips)."""
    draws = iter(noise[1:])  # step j's draw; the last (t = 0) is never asked for
    x = torch.from_numpy(noise[0].copy())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: on a busy 2-core machine two threads were 15x slower than one
    try:
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws)))
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    finally:
        torch.set_num_threads(threads)
    return x.numpy()


def run_samples(model: Path, tmp: Path, *args: object) -> tuple[np.ndarray, np.ndarray]:
    """ddpm-run's ancestral DDPM (the chain of diffusers' DDPMScheduler) on `model`: (samples, the noise it used)."""
    out, noise = tmp / "samples.npz", tmp / "noise.npy"
    ddpm_run([str(model), "--sampler", "ddpm", "--out", str(out), "--save-noise", str(noise), "--threads", "2",
              *map(str, args)])
    return np.load(out)["samples"], np.load(noise)


@pytest.fixture(scope="module")
def cifar10_32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, UNet2DModel]:
    """google/ddpm-cifar10-32's exact configs, random weights, saved as a pipeline folder."""
    unet = make_unet(CIFAR10_32)
    return write_pipeline(tmp_path_factory.mktemp("diffusers") / "ddpm-cifar10-32", unet, CIFAR10_32_SCHEDULER), unet


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("diffusers") / "tiny", make_unet(TINY), CIFAR10_32_SCHEDULER)


# --- the paper's CIFAR-10 model, exact config -------------------------------------------------------------------

@pytest.mark.slow
def test_cifar10_32_onnx_matches_diffusers_forward(cifar10_32, tmp_path):
    folder, unet = cifar10_32
    assert count_parameters(unet) == 35_746_307
    source = load_source(folder)
    assert source.diffusion == DiffusionConfig()  # linear 1e-4..0.02, T 1000, fixed_large, clip to [-1, 1]
    assert source.image_shape == (3, 32, 32) and source.source == "diffusers"
    export_all(source, tmp_path / "export", fp16=False, step_graph=False, max_batch=3, validate=False, engine=False)
    model = open_model(tmp_path / "export" / "model.onnx")
    assert model.info.extra["source"] == "diffusers" and model.info.source_sha256 == source.sha256
    gen = torch.Generator().manual_seed(1)
    cases = [torch.tensor([t]) for t in (0, 500, 999)] + [torch.tensor([0, 500, 999])]
    for t in cases:
        x = torch.randn(len(t), 3, 32, 32, generator=gen)
        with torch.no_grad():
            want = unet(x, t).sample.numpy()
        got = model.eps(x.numpy(), t.numpy())
        assert np.abs(got - want).max() <= 1e-4, t
        assert np.abs(want).mean() > 0.1  # a real output, not a zero-initialised layer


def test_cifar10_preset_config_is_google_ddpm_cifar10_32():
    preset = preset_config("cifar10", 32, 3)
    # The published config leaves dropout at diffusers' default 0.0 (eval mode ignores it); the paper trained at 0.1.
    assert from_diffusers_config(CIFAR10_32) == replace(preset, dropout=0.0)
    mapped = to_diffusers_config(preset)
    assert {k: mapped[k] for k in CIFAR10_32} == CIFAR10_32 and mapped["dropout"] == 0.1
    assert from_diffusers_config(mapped) == preset
    church = from_diffusers_config(CHURCH_256)
    assert (church.channel_mult, church.attention_resolutions, church.image_size) == ((1, 1, 2, 2, 4, 4), (16,), 256)
    with pytest.raises(DDPMError, match="no patch stem"):  # the quickstart's preset has no UNet2DModel twin
        to_diffusers_config(preset_config("fast", 28, 1))


@pytest.mark.parametrize("change, message", [
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"block_out_channels": [128, 192, 256, 256]}, "multiples"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "mirrored"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
])
def test_configs_that_do_not_map_are_refused(change, message):
    with pytest.raises(DDPMError, match=message) as exc:
        from_diffusers_config({**CIFAR10_32, **change})
    assert "\n" not in str(exc.value)


def _double(model: torch.nn.Module, embedding: torch.nn.Module | None = None) -> torch.nn.Module:
    """A float64 copy; both networks compute the sinusoidal timestep embedding in float32 (diffusers' frequencies
    differ from ours in the last float32 bit), so diffusers' is replaced by ours to compare the networks alone."""
    model = copy.deepcopy(model).double()
    if isinstance(model, UNet):
        model.temb.register_forward_pre_hook(lambda m, args: (args[0].double(),))
    else:
        model.time_proj.register_forward_hook(lambda m, args, out: timestep_embedding(args[0], out.shape[1]))
    return model


def _compare(ours: UNet, theirs: UNet2DModel) -> tuple[float, float]:
    """Max abs difference of the two networks' outputs in float32 and, with one embedding, in float64."""
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([0, 500, 999])
    with torch.no_grad():
        f32 = (ours(x, t) - theirs(x, t).sample).abs().max().item()
        f64 = (_double(ours)(x.double(), t) - _double(theirs)(x.double(), t).sample).abs().max().item()
        assert ours(x, t).abs().mean() > 0.1
    return f32, f64


@pytest.mark.slow
def test_cifar10_preset_weights_map_both_ways(cifar10_32):
    ckpt = random_checkpoint("cifar10", 3, 32)
    ours = UNet(ckpt.model_config)
    ours.load_state_dict(ckpt.ema)
    ours.eval()
    # Ours -> diffusers -> ours: the same tensors, bit for bit; the same function both ways.
    theirs = to_diffusers(ours)
    back = from_diffusers_state_dict(ours.config, to_diffusers_state_dict(ours.config, ckpt.ema))
    assert back.keys() == ckpt.ema.keys() and all(torch.equal(back[k], ckpt.ema[k]) for k in back)
    f32, f64 = _compare(ours, theirs)
    # float64: the mapping is exact; float32: two orders of summation (~1e-5 on |eps| up to ~5).
    assert f64 <= 1e-10 and f32 <= 1e-4, (f32, f64)
    # diffusers (the exact google config) -> ours -> diffusers.
    _, unet = cifar10_32
    mapped = from_diffusers(unet)
    assert mapped.config == replace(preset_config("cifar10", 32, 3), dropout=0.0)
    state = unet.state_dict()
    again = to_diffusers_state_dict(mapped.config, from_diffusers_state_dict(mapped.config, state))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in again)
    f32, f64 = _compare(mapped, unet)
    assert f64 <= 1e-10 and f32 <= 1e-4, (f32, f64)


def test_weights_that_do_not_fit_the_mapping_are_named():
    config = from_diffusers_config(TINY)
    state = make_unet(TINY).state_dict()
    state.pop("conv_out.bias")
    with pytest.raises(DDPMError, match="conv_out.bias"):
        from_diffusers_state_dict(config, state)
    state = make_unet(TINY).state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(DDPMError, match="extra.weight"):
        from_diffusers_state_dict(config, state)


# --- sampling chains against diffusers' DDPMScheduler --------------------------------------------------------------

@pytest.mark.slow
def test_full_chain_matches_diffusers_ddpm_loop(tmp_path, monkeypatch):
    """ddpm-run (ONNX Runtime, 1000 steps, float64 tables) vs diffusers' DDPMScheduler loop fed the same noise."""
    unet = make_unet(CIFAR10_SMALL)
    folder = write_pipeline(tmp_path / "pipe", unet, CIFAR10_32_SCHEDULER)
    export_all(load_source(folder), tmp_path / "export", fp16=False, step_graph=False, max_batch=2, validate=False,
               engine=False)
    ours, noise = run_samples(tmp_path / "export" / "model.onnx", tmp_path, "--n", 2, "--seed", 3)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(1000)
    theirs = diffusers_chain(unet, scheduler, noise, monkeypatch)
    # diffusers keeps float32 tables (cumprod in float32); that alone moves the result by ~1e-4 (see the report).
    assert np.abs(ours - theirs).max() <= 1e-3
    assert np.abs(theirs).max() > 0.5


def test_learned_range_respaced_chain_matches_diffusers(tmp_path, monkeypatch):
    """A learned-range model (2C outputs: eps then v, as diffusers splits them), respaced to 50 steps: diffusers'
    "leading" 50 steps are our ddim50, and both use the respaced betas for the variance range."""
    unet = make_unet({**TINY, "out_channels": 6})
    scheduler = {**CIFAR10_32_SCHEDULER, "variance_type": "learned_range", "clip_sample_range": 1.5}
    folder = write_pipeline(tmp_path / "pipe", unet, scheduler)
    source = load(folder)
    assert source.diffusion.variance_type == "learned_range" and source.diffusion.clip_range == 1.5
    assert source.info().outputs == ("eps", "v")
    export_all(source, tmp_path / "export", fp16=False, step_graph=False, max_batch=2, validate=False, engine=False)
    ours, noise = run_samples(tmp_path / "export" / "model.onnx", tmp_path, "--n", 2, "--steps", "ddim50")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(50)
    theirs = diffusers_chain(unet, sched, noise, monkeypatch)
    assert np.abs(ours - theirs).max() <= 1e-3


@pytest.mark.slow
def test_church_256_layout_exports_validates_and_samples(tmp_path):
    unet = make_unet(CHURCH_SMALL)
    folder = write_pipeline(tmp_path / "church", unet, CHURCH_256_SCHEDULER)
    source = load(folder)
    assert source.image_shape == (3, 256, 256) and source.diffusion.variance_type == "fixed_small"
    written = export_all(source, tmp_path / "export", fp16=True, step_graph=True, max_batch=2, validate=True,
                         engine=False)
    report = json.loads(written["validation"].read_text())
    assert report["passed"] is True
    samples, _ = run_samples(written["onnx"], tmp_path, "--n", 2, "--steps", 4)
    assert samples.shape == (2, 3, 256, 256) and np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


# --- sources that load, and refusals -----------------------------------------------------------------------------

def test_bare_unet_folder_with_scheduler_config_and_bin_weights(tiny_pipeline, tmp_path, capsys):
    unet = UNet2DModel.from_pretrained(tiny_pipeline / "unet")
    unet.save_pretrained(tmp_path / "bare", safe_serialization=False)
    assert (tmp_path / "bare" / "diffusion_pytorch_model.bin").is_file()
    capsys.readouterr()
    # no scheduler config: DDPMScheduler's defaults (fixed_small), said in one line
    assert load(tmp_path / "bare").diffusion == DiffusionConfig(variance_type="fixed_small")
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "no scheduler config" in note[0] and "fixed_small" in note[0]
    (tmp_path / "sched.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule":
                                                     "squaredcos_cap_v2", "num_train_timesteps": 4000,
                                                     "variance_type": "fixed_small", "clip_sample": False}))
    source = load(tmp_path / "bare", scheduler_config=tmp_path / "sched.json")
    assert source.diffusion == DiffusionConfig(schedule="cosine", num_timesteps=4000, variance_type="fixed_small",
                                               clip_denoised=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3000])
    with torch.no_grad():
        assert torch.equal(source.module(x, t), unet(x, t).sample)


def test_scheduler_betas_are_diffusers_betas():
    """diffusers' linear betas are not scaled by 1000 / T (ours are): the mapping makes them equal; its
    squaredcos_cap_v2 is our cosine."""
    from runtime.sampling.schedule import make_betas
    from train.sources.diffusers_source import diffusion_from_scheduler

    for T, schedule in ((1000, "linear"), (4000, "linear"), (250, "linear"), (4000, "squaredcos_cap_v2")):
        config = {"num_train_timesteps": T, "beta_schedule": schedule, "beta_start": 2e-4, "beta_end": 0.03}
        ours = make_betas(diffusion_from_scheduler(config))
        theirs = DDPMScheduler(**config).betas.numpy()
        assert np.abs(ours - theirs).max() <= 1e-7 * theirs.max(), (T, schedule)  # float32 vs float64 tables


@pytest.mark.parametrize("change, message", [
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"thresholding": True}, "thresholding"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"variance_type": "learned"}, "variance_type"),
    ({"variance_type": "fixed_small_log"}, "variance_type"),
    ({"variance_type": "fixed_large_log"}, "variance_type"),
    ({"variance_type": "learned_range"}, "outputs 3 channels"),  # a C-channel UNet has no v
    ({"_class_name": "ScoreSdeVeScheduler"}, "ScoreSdeVeScheduler"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}, "timestep_type"),
])
def test_scheduler_options_we_cannot_serve_are_refused(tiny_pipeline, tmp_path, change, message):
    path = tmp_path / "scheduler_config.json"
    config = json.loads((tiny_pipeline / "scheduler" / "scheduler_config.json").read_text())
    path.write_text(json.dumps({**config, **change}))
    with pytest.raises(DDPMError, match=message) as exc:
        load(tiny_pipeline, scheduler_config=path)
    assert "\n" not in str(exc.value)


def _broken_folders(tiny_pipeline: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Folders that must be refused, and a word their message must hold."""
    import os

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_pipeline, tmp / name))

    cases = {}
    no_config = copy("no-config")
    (no_config / "unet" / "config.json").unlink()
    cases["no config"] = (no_config, "config.json")
    no_weights = copy("no-weights")
    (no_weights / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    cases["no weights"] = (no_weights, "no weights")
    no_scheduler = copy("no-scheduler")
    shutil.rmtree(no_scheduler / "scheduler")
    cases["no scheduler"] = (no_scheduler, "scheduler")
    text = copy("text")
    index = json.loads((text / "model_index.json").read_text())
    (text / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"],
                                                       "tokenizer": ["transformers", "CLIPTokenizer"]}))
    cases["text pipeline"] = (text, "text_encoder")
    for name, change, word in (("class-cond", {"num_class_embeds": 10}, "class-conditional"),
                               ("cond-model", {"_class_name": "UNet2DConditionModel"}, "text-conditioned"),
                               ("fourier", {"time_embedding_type": "fourier"}, "Fourier")):
        folder = copy(name)
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
        cases[name] = (folder, word)
    misfit = copy("misfit")  # weights of a wider model under the tiny config
    make_unet({**TINY, "block_out_channels": [16, 48]}).save_pretrained(misfit / "unet")
    (misfit / "unet" / "config.json").write_text((tiny_pipeline / "unet" / "config.json").read_text())
    cases["misfit weights"] = (misfit, "size mismatch")

    class Payload:  # unpickling this calls open(marker, "w"): code execution
        def __reduce__(self):
            return open, (str(tmp / "pwned"), "w")

    evil = copy("evil")
    (evil / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Payload()}, evil / "unet" / "diffusion_pytorch_model.bin")
    assert not os.path.exists(tmp / "pwned")
    cases["code pickle"] = (evil, "pickle")
    return cases


def test_folders_we_cannot_serve_are_refused_in_one_line_and_nothing_is_written(tiny_pipeline, tmp_path, capsys):
    from ddpm_export.cli import main as ddpm_export

    for name, (folder, word) in _broken_folders(tiny_pipeline, tmp_path).items():
        out = tmp_path / f"{name}-out"
        with pytest.raises(SystemExit) as exc:
            ddpm_export([str(folder), "--out-dir", str(out), "--no-engine"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2, name
        assert len(err) == 1 and err[0].startswith("error: ") and word in err[0], (name, err)
        assert not out.exists(), name
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


# --- every CLI takes a diffusers folder or a cached hub id; other schedulers; the way back -----------------------

def _sample(model: Path | str, out: Path, *args: object) -> np.ndarray:
    ddpm_run([str(model), "--n", "2", "--seed", "3", "--out", str(out), "--threads", "2", *map(str, args)])
    return np.load(out)["samples"]


def test_ddpm_run_on_a_diffusers_folder_equals_its_export(tiny_pipeline, tmp_path):
    export = tmp_path / "export"
    export_all(load_source(tiny_pipeline), export, fp16=False, step_graph=False, max_batch=2, validate=False,
               engine=False)
    for args in (("--sampler", "ddpm", "--steps", "8"), ("--steps", "6")):  # ancestral, and the default solver
        eager = _sample(tiny_pipeline, tmp_path / f"eager{len(args)}.npz", *args)
        graph = _sample(export / "model.onnx", tmp_path / f"onnx{len(args)}.npz", *args)
        assert np.abs(eager - graph).max() <= 1e-4 and eager.std() > 0.1


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_pipelines_saved_with_other_schedulers_export_and_sample(scheduler, tmp_path):
    import diffusers

    cls = getattr(diffusers, scheduler)
    folder = tmp_path / scheduler
    DDPMPipeline(unet=make_unet(TINY), scheduler=cls(num_train_timesteps=500, beta_schedule="linear")) \
        .save_pretrained(folder)
    source = load_source(folder)
    # the training schedule of the config; the variance diffusers' DDPMScheduler would use (fixed_small)
    assert source.diffusion == DiffusionConfig(num_timesteps=500, beta_start=1e-4 * 500 / 1000,
                                               beta_end=0.02 * 500 / 1000, variance_type="fixed_small")
    written = export_all(source, tmp_path / "export", fp16=False, step_graph=False, max_batch=2, validate=True,
                         engine=False)
    samples = _sample(written["onnx"], tmp_path / "s.npz", "--steps", "5")
    assert samples.shape == (2, 3, 16, 16) and np.isfinite(samples).all()


def _cache_with(pipeline: Path, root: Path, repo: str = "acme/tiny-ddpm") -> Path:
    """A Hugging Face hub cache holding `pipeline` as `repo` at revision main, laid out as huggingface_hub lays it."""
    owner, name = repo.split("/")
    entry = root / f"models--{owner}--{name}"
    shutil.copytree(pipeline, entry / "snapshots" / "0123abcd")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return root


def test_a_hub_id_resolves_from_the_local_cache_only(tiny_pipeline, tmp_path, monkeypatch, capsys):
    from ddpm_export.cli import main as ddpm_export

    cache = _cache_with(tiny_pipeline, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert load_source("acme/tiny-ddpm").diffusion == load_source(tiny_pipeline).diffusion
    np.testing.assert_array_equal(_sample("acme/tiny-ddpm", tmp_path / "hub.npz", "--steps", "4"),
                                  _sample(tiny_pipeline, tmp_path / "folder.npz", "--steps", "4"))
    ddpm_export(["acme/tiny-ddpm", "--no-fp16", "--no-step-graph", "--no-validate", "--max-batch", "2"])
    assert (tmp_path / "tiny-ddpm-export" / "model.onnx").is_file()  # in the working folder, not in the cache
    assert not list(cache.rglob("*export*"))
    with pytest.raises(SystemExit) as exit_:
        ddpm_run(["acme/absent", "--out", str(tmp_path / "x.npz")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a local path nor a model in the Hugging Face cache" in err[0]


def test_to_diffusers_writes_a_pipeline_diffusers_loads_and_that_samples_like_ours(tmp_path):
    from ddpm_export.cli import main as ddpm_export
    from train.checkpoint import save_checkpoint

    diffusion = DiffusionConfig(num_timesteps=200, variance_type="fixed_small", clip_range=1.0)
    ckpt = save_checkpoint(tmp_path / "ours.pt", random_checkpoint("tiny", 3, 16, diffusion, seed=4))
    out = tmp_path / "pipeline"
    ddpm_export(["to-diffusers", str(ckpt), "--out", str(out)])
    pipeline = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipeline.scheduler, DDPMScheduler) and pipeline.scheduler.config.variance_type == "fixed_small"
    assert load_source(out).diffusion == diffusion  # the schedule round-trips exactly
    ours = load_source(ckpt).module
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 150])
    with torch.no_grad():
        assert (pipeline.unet(x, t).sample - ours(x, t)).abs().max() <= 1e-5
    np.testing.assert_allclose(_sample(out, tmp_path / "theirs.npz", "--sampler", "ddpm", "--steps", "10"),
                               _sample(ckpt, tmp_path / "ours.npz", "--sampler", "ddpm", "--steps", "10"),
                               rtol=0, atol=1e-4)
    with pytest.raises(SystemExit) as again:  # an existing folder is kept unless --force
        ddpm_export(["to-diffusers", str(ckpt), "--out", str(out)])
    assert again.value.code == 2
