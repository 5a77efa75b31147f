"""Write the improved-diffusion golden fixtures (tests/fixtures/improved_diffusion/) by running THEIR code once.

Nothing here is imported by the project or its tests: the tests only read the files this writes. It imports
openai/improved-diffusion from a checkout given on the command line (their package needs only torch and numpy for
what is used here). The committed fixtures were made from commit 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5
(2024-03-12, "Merge pull request #129", the head of their main branch), cloned from a mirror of the GitHub repository
into /tmp, with torch 2.13.0 on CPU; re-running reproduces every file bit for bit:

    git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion
    git -C /tmp/improved-diffusion checkout 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5
    .venv/bin/python scripts/golden/make_improved_diffusion_fixtures.py /tmp/improved-diffusion --force

The model: their UNetModel, image 16 x 16 x 3, num_channels 32, channel_mult (1, 1) (their create_model only builds
sizes 32/64/256, so the script builds UNetModel the way create_model does, with channel_mult given; our loader takes it
as --channel_mult), 1 res block per level, attention at 16 and 8 with 2 heads down / 4 heads up, scale-shift norm,
learn_sigma, dropout 0; diffusion: cosine, T = 50, rescale_timesteps True. Weights are random (torch seed 0), the
zero-initialised layers and the GroupNorm affines too, so eps and v are non-trivial functions of x_t and t.

Files:
- flags.json: the flags our `train.sources.improved_diffusion_source.load` takes (their names).
- model.safetensors: the UNet state dict, float32, their key names.
- state_dict_shapes.json: for the paper's released unconditional configs (README: cifar10_uncond, imagenet64_uncond,
  lsun_bedroom), {"flags": str, "num_parameters": int, "shapes": {key: shape}} of their create_model (no weights).
- golden.npz (float32 unless said):
    commit: str, the improved-diffusion commit.
    x_t [3, 3, 16, 16], t [3] int64 (original indices 0..49): inputs.
    eps, v [3, 3, 16, 16]: the model output through their diffusion's wrapped model (t rescaled to t * 1000 / 50),
      split as their p_mean_variance does (eps = channels 0..2, v = 3..5).
    mean, log_variance, pred_xstart [3, 3, 16, 16]: their p_mean_variance(model, x_t, t, clip_denoised=True) on the
      full 50-step schedule (learned-range variance).
    betas [50] float64: their cosine betas.
    chain_spacing: str "10" (their timestep_respacing); chain_timesteps [10] int64: the kept original timesteps,
      ascending; chain_betas [10] float64: their respaced betas.
    chain_noise [11, 2, 3, 16, 16]: the chain's noise in runtime/noise.py's order: [0] is x_T, [1 + j] the noise
      drawn at the j-th step taken (j = 0 is the first step, original t = 49; [10] is the t = 0 draw, which their
      p_sample multiplies by zero).
    chain_xs [11, 2, 3, 16, 16]: x_T then the sample after each step; chain_sample [2, 3, 16, 16] = chain_xs[-1]:
      their p_sample_loop_progressive(model, shape, noise=x_T, clip_denoised=True) (what p_sample_loop runs) on
      the 10-step respaced diffusion.
- nll_golden.npz: their calc_bpd_loop(model, x_start, clip_denoised=True) on the full T = 50 diffusion:
    images [4, 16, 16, 3] uint8 (NHWC, as data files store them; includes 0 and 255 pixels);
    x_start [4, 3, 16, 16] float32 = images / 127.5 - 1 in NCHW (their image_datasets scaling);
    noise [50, 4, 3, 16, 16] float16: noise[t] is the q_sample noise used at timestep t (stored as float16; the values
      fed to their code were exactly these, cast to float32);
    total_bpd [4], prior_bpd [4] float32;
    vb [4, 50], xstart_mse [4, 50], mse [4, 50] float32, indexed by timestep t ascending (their loop returns columns
      in loop order t = 49..0; this file flips them): vb[:, 0] is the decoder NLL at t = 0, vb[:, t > 0] the KL terms,
      all in bits/dim; total_bpd = vb.sum(1) + prior_bpd.
    clip_denoised: bool True; num_timesteps: int 50.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.errors import DDPMError
from runtime.fileio import atomic_write, atomic_write_bytes, check_writable

FLAGS = {
    "image_size": 16, "channel_mult": "1,1", "num_channels": 32, "num_res_blocks": 1, "num_heads": 2,
    "num_heads_upsample": 4, "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": True,
    "use_scale_shift_norm": True, "noise_schedule": "cosine", "diffusion_steps": 50, "rescale_timesteps": True,
}
RELEASED = {  # the paper's unconditional models (their README), for key/shape manifests
    "cifar10_uncond": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
    "imagenet64_uncond": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True",
    "lsun_bedroom": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
                    "--use_scale_shift_norm False --attention_resolutions 16",
}
CHAIN_SPACING, CHAIN_N, NLL_N = "10", 2, 4


def their_model(ud, flags: dict) -> torch.nn.Module:
    """Their UNetModel built as their create_model does, with channel_mult from the flags."""
    size = flags["image_size"]
    return ud.unet.UNetModel(
        in_channels=3, model_channels=flags["num_channels"], out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=tuple(size // int(r) for r in flags["attention_resolutions"].split(",")),
        dropout=flags["dropout"], channel_mult=tuple(int(m) for m in flags["channel_mult"].split(",")),
        num_heads=flags["num_heads"], num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"])


def randomise(model: torch.nn.Module) -> None:
    """Random values where their init leaves zeros or ones (output convs, norms), small output layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("out.2."):
                p.normal_(0.0, 0.02)
            elif any(part in f".{name}" for part in (".norm.", ".in_layers.0.", ".out_layers.0.", ".out.0.")):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif not p.abs().sum():
                p.normal_(0.0, 0.05)


class InjectRandn:
    """Replace torch.randn_like by a feed of prepared arrays, so their samplers use our recorded noise."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays, self.used, self.saved = list(arrays), 0, torch.randn_like

    def __call__(self, like: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(self.arrays[self.used], dtype=np.float32))
        assert out.shape == like.shape, (out.shape, like.shape)
        self.used += 1
        return out.to(like.device)

    def __enter__(self) -> "InjectRandn":
        torch.randn_like = self
        return self

    def __exit__(self, *exc) -> None:
        torch.randn_like = self.saved
        if exc[0] is None:
            assert self.used == len(self.arrays), f"their code drew {self.used} noise arrays, not {len(self.arrays)}"


def save_npz(path: Path, arrays: dict) -> None:
    def write(f) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write(path, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of github.com/openai/improved-diffusion")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/improved_diffusion"))
    parser.add_argument("--force", action="store_true", help="overwrite existing fixture files")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    import improved_diffusion as ud  # noqa: F401  (their package, from the checkout)
    import improved_diffusion.script_util as su
    import improved_diffusion.unet  # noqa: F401

    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    names = ["flags.json", "model.safetensors", "state_dict_shapes.json", "golden.npz", "nll_golden.npz"]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {n: check_writable(args.out / n, force=args.force) for n in names}
    torch.set_grad_enabled(False)

    torch.manual_seed(0)
    model = their_model(ud, FLAGS).eval()
    randomise(model)

    def diffusion(respacing: str):
        return su.create_gaussian_diffusion(
            steps=FLAGS["diffusion_steps"], learn_sigma=True, noise_schedule=FLAGS["noise_schedule"],
            rescale_timesteps=FLAGS["rescale_timesteps"], rescale_learned_sigmas=True, timestep_respacing=respacing)

    full, spaced = diffusion(""), diffusion(CHAIN_SPACING)
    rng = np.random.default_rng(12)
    shape = (3, 16, 16)

    # model outputs and one reverse-step's parameters
    x_t = rng.standard_normal((3, *shape), dtype=np.float32)
    t = np.array([0, 17, 49], dtype=np.int64)
    xt_t, t_t = torch.from_numpy(x_t), torch.from_numpy(t)
    out = full._wrap_model(model)(xt_t, t_t)
    pmv = full.p_mean_variance(model, xt_t, t_t, clip_denoised=True)

    # a learned-variance DDPM chain on the respaced diffusion, fed recorded noise
    chain_noise = rng.standard_normal((len(spaced.timestep_map) + 1, CHAIN_N, *shape), dtype=np.float32)
    with InjectRandn(list(chain_noise[1:])):
        xs = [torch.from_numpy(chain_noise[0])] + [
            step["sample"] for step in spaced.p_sample_loop_progressive(
                model, (CHAIN_N, *shape), noise=torch.from_numpy(chain_noise[0]), clip_denoised=True,
                device=torch.device("cpu"))]
    golden = {
        "commit": np.array(commit), "x_t": x_t, "t": t, "eps": out[:, :3].numpy(), "v": out[:, 3:].numpy(),
        "mean": pmv["mean"].numpy(), "log_variance": pmv["log_variance"].numpy(),
        "pred_xstart": pmv["pred_xstart"].numpy(), "betas": full.betas,
        "chain_spacing": np.array(CHAIN_SPACING), "chain_timesteps": np.array(spaced.timestep_map, dtype=np.int64),
        "chain_betas": spaced.betas, "chain_noise": chain_noise,
        "chain_xs": torch.stack(xs).numpy(), "chain_sample": xs[-1].numpy(),
    }

    # the variational bound, fed recorded noise (float16-representable values, to keep the file small)
    T = full.num_timesteps
    images = rng.integers(0, 256, size=(NLL_N, 16, 16, 3), dtype=np.uint8)
    images[0, :4] = 0
    images[1, :4] = 255
    x_start = np.ascontiguousarray(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    noise = rng.standard_normal((T, NLL_N, *shape)).astype(np.float16)
    with InjectRandn([noise[t].astype(np.float32) for t in reversed(range(T))]):  # their loop runs t = T-1 .. 0
        bpd = full.calc_bpd_loop(model, torch.from_numpy(x_start), clip_denoised=True)
    nll = {"images": images, "x_start": x_start, "noise": noise, "total_bpd": bpd["total_bpd"].numpy(),
           "prior_bpd": bpd["prior_bpd"].numpy(), "clip_denoised": np.array(True), "num_timesteps": np.array(T),
           **{k: bpd[k].flip(1).numpy() for k in ("vb", "xstart_mse", "mse")}}

    manifests = {}
    for name, flag_text in RELEASED.items():
        flags = dict(su.model_and_diffusion_defaults())
        tokens = flag_text.split()
        for key, value in zip(tokens[::2], tokens[1::2]):
            default = flags[key[2:]]
            flags[key[2:]] = su.str2bool(value) if isinstance(default, bool) else type(default)(value)
        with torch.device("meta"):
            released, _ = su.create_model_and_diffusion(**flags)
        sd = released.state_dict()
        manifests[name] = {"flags": flag_text, "num_parameters": sum(v.numel() for v in sd.values()),
                           "shapes": {k: list(v.shape) for k, v in sd.items()}}

    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(paths["model.safetensors"], save(state, metadata={"improved_diffusion_commit": commit}))
    atomic_write_bytes(paths["flags.json"], (json.dumps(FLAGS, indent=1) + "\n").encode())
    atomic_write_bytes(paths["state_dict_shapes.json"], json.dumps(manifests).encode())
    save_npz(paths["golden.npz"], golden)
    save_npz(paths["nll_golden.npz"], nll)
    print(f"wrote {', '.join(names)} to {args.out} from improved-diffusion {commit}; "
          f"eps |max| {np.abs(golden['eps']).max():.3f}, v range [{golden['v'].min():.3f}, {golden['v'].max():.3f}], "
          f"total bits/dim {nll['total_bpd']}")


if __name__ == "__main__":
    try:
        main()
    except DDPMError as exc:
        sys.exit(f"error: {exc}")
