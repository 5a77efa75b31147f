"""The multistep solvers (DPM-Solver++(2M) ODE and SDE, UniPC-2 bh2): step-for-step parity with diffusers'
schedulers, convergence to the exact probability-flow ODE solution, the noise contract, and ddpm-run's errors."""

from __future__ import annotations

import json
from typing import Iterator
from unittest import mock

import numpy as np
import pytest

from runtime.run.cli import main
from runtime.errors import DDPMError
from runtime.sampling.noise import chain_noise
from runtime.sampling import Chain, EpsFn, sample
from runtime.sampling.schedule import DiffusionConfig, Schedule, solver_timesteps
from runtime.sampling import SOLVERS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = DiffusionConfig()
SHAPE = (1, 8, 8)
AC = Schedule.from_config(CONFIG).alphas_cumprod
MU, S = 0.3, 0.5  # per-pixel Gaussian data N(MU, S^2): its exact eps is known in closed form


def gaussian_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The exact eps of data N(MU, S^2): sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    ac = AC[t][:, None, None, None]
    a, s = np.sqrt(ac), np.sqrt(1.0 - ac)
    return (s * (x - a * MU) / (a * a * S * S + s * s)).astype(x.dtype)


def wavy_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The exact eps plus a smooth non-linear term, so the solvers' history weights matter and clipping bites."""
    return (gaussian_eps(x, t) + 0.1 * np.sin(2.0 * x + t[:, None, None, None] / 300.0)).astype(x.dtype)


def our_chain(sampler: str, steps: int | str | None, spacing: str | None, eps: EpsFn, noise: np.ndarray,
              clip: bool = False, eta: float | None = None, variance: str | None = None) -> list[np.ndarray]:
    """x after every step of our chain, walked with the runtime's host stepper."""
    chain = Chain.build(CONFIG, sampler, steps, eta, variance, clip_denoised=clip, spacing=spacing)
    stepper = chain.stepper(eps)
    state, out = stepper.start(noise[0]), []
    for j, k in enumerate(reversed(range(len(chain)))):
        state = stepper.step(state, k, np.full(len(noise[0]), chain.schedule.timesteps[k]), noise[j + 1])
        out.append(stepper.finish(state))
    return out


def diffusers_scheduler(sampler: str, steps: int | str | None, spacing: str | None, clip: bool, eta: float | None,
                        variance: str | None) -> tuple[object, dict]:
    """diffusers' scheduler for our sampler on the same timesteps, and the step() options that inject our noise.

    Clipping: diffusers' multistep schedulers have no clip_sample; thresholding with sample_max_value = 1 clamps
    the quantile to 1, which is exactly a static clip of x_0 to [-1, 1] (our clip_range 1)."""
    betas = dict(num_train_timesteps=CONFIG.num_timesteps, beta_start=CONFIG.beta_start, beta_end=CONFIG.beta_end,
                 beta_schedule="linear", prediction_type="epsilon")
    if sampler == "ddpm":  # any respacing: diffusers steps the timesteps our rule keeps
        scheduler = diffusers.DDPMScheduler(**betas, variance_type=variance or CONFIG.variance_type,
                                            clip_sample=clip, clip_sample_range=1.0)
        chain = Chain.build(CONFIG, sampler, steps, spacing=spacing)
        scheduler.set_timesteps(timesteps=[int(t) for t in chain.schedule.timesteps[::-1]])
        return scheduler, {}
    if sampler == "ddim":  # ddimK: the stride diffusers' "leading" spacing takes
        scheduler = diffusers.DDIMScheduler(**betas, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                                            timestep_spacing="leading")
        scheduler.set_timesteps(int(str(steps)[4:]))
        return scheduler, {"eta": eta or 0.0, "use_clipped_model_output": True}
    options = dict(**betas, timestep_spacing=spacing or "linspace", steps_offset=0, thresholding=clip,
                   sample_max_value=1.0, lower_order_final=True, final_sigmas_type="zero")
    if sampler == "unipc":
        scheduler = diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, **options)
    else:
        algorithm = "sde-dpmsolver++" if sampler == "sde-dpm++2m" else "dpmsolver++"
        scheduler = diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type=algorithm,
                                                          solver_type="midpoint", **options)
    scheduler.set_timesteps(int(steps))
    return scheduler, {}


def diffusers_chain(sampler: str, steps: int | str | None, spacing: str | None, eps: EpsFn, noise: np.ndarray,
                    clip: bool = False, eta: float | None = None, variance: str | None = None) -> list[np.ndarray]:
    """x after every step of diffusers' scheduler on the same eps function, with our noise injected (x_T, then step
    j's draw; diffusers' DDPM draws only for t > 0, and our t = 0 draw is the one it skips)."""
    from diffusers.schedulers import scheduling_ddpm

    scheduler, extra = diffusers_scheduler(sampler, steps, spacing, clip, eta, variance)
    x, out = torch.from_numpy(noise[0]), []
    for j, t in enumerate(scheduler.timesteps):
        draw = torch.from_numpy(noise[j + 1])
        model_out = torch.from_numpy(eps(x.numpy(), np.full(len(x), int(t))))
        noise_kw = {"variance_noise": draw} if sampler in ("ddim", "sde-dpm++2m") else {}
        with mock.patch.object(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: draw):
            x = scheduler.step(model_out, t, x, **extra, **noise_kw).prev_sample
        out.append(x.numpy())
    return out


def assert_parity(ours: list[np.ndarray], theirs: list[np.ndarray], step: float = 1e-5, final: float = 1e-4) -> None:
    assert len(ours) == len(theirs)
    per_step = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)]
    assert max(per_step) <= step, per_step
    assert per_step[-1] <= final


# (sampler, steps, spacing, eta, variance): every rule, respaced by its own rule or spaced as diffusers does. A DDPM
# chain whose last timestep is not 0 (trailing) ends at x_0 without noise here; diffusers' fixed_large adds beta_t
# noise on that last step, so that row compares fixed_small, whose last variance is 0 in both.
GRID = [("ddpm", None, None, None, None), ("ddpm", "50", None, None, "fixed_small"), ("ddpm", "10,5", None, None, None),
        ("ddpm", "20", "trailing", None, "fixed_small"), ("ddim", "ddim10", None, None, None), ("ddim", "ddim50", None, 0.5, None),
        ("ddim", "ddim20", None, 1.0, None)]
GRID += [(s, k, sp, None, None) for s in SOLVERS for k in (10, 20, 50) for sp in ("linspace", "leading", "trailing")]


@pytest.mark.parametrize("sampler,steps,spacing,eta,variance", GRID)
def test_chains_equal_diffusers_step_for_step(sampler, steps, spacing, eta, variance):
    """One harness for every rule. float32 state as in the runtime (our tables float64, diffusers' float32): the
    multistep solvers within 1e-5 at every step; the ancestral rules, whose diffusers tables recompute beta_t = 1 -
    ac[t] / ac[prev] in float32, within 1e-4 (the paper's samplers clip x_0, as diffusers does by default)."""
    ancestral = sampler in ("ddpm", "ddim")
    noise = chain_noise(seed=7, n=3, image_shape=SHAPE, num_steps=len(Chain.build(CONFIG, sampler, steps, eta,
                                                                                  spacing=spacing)))
    ours = our_chain(sampler, steps, spacing, wavy_eps, noise, ancestral, eta, variance)
    theirs = diffusers_chain(sampler, steps, spacing, wavy_eps, noise, ancestral, eta, variance)
    assert_parity(ours, theirs, *((1e-4, 1e-4) if ancestral else (1e-5, 1e-4)))
    assert ours[-1].dtype == np.float32  # float64 coefficients are Python floats: they keep the state's dtype
    assert np.abs(ours[-1] - noise[0]).max() > 0.1  # the chain did move


@pytest.mark.parametrize("sampler", SOLVERS)
def test_clipped_chains_equal_diffusers_thresholding_at_one(sampler):
    noise = chain_noise(seed=1, n=3, image_shape=SHAPE, num_steps=10)
    ours = our_chain(sampler, 10, "linspace", wavy_eps, noise, clip=True)
    assert_parity(ours, diffusers_chain(sampler, 10, "linspace", wavy_eps, noise, clip=True))
    unclipped = our_chain(sampler, 10, "linspace", wavy_eps, noise)
    assert np.abs(ours[-1]).max() <= 1.0 < np.abs(unclipped[-1]).max()  # the clip is active in this case


@pytest.fixture(scope="module")
def tiny_unet_eps() -> Iterator[EpsFn]:
    """A random tiny UNet on top of the exact eps. A random UNet alone is no denoiser: its chains grow to |x| ~ 500,
    where float32 rounding alone exceeds the absolute bounds; a trained model keeps x in the data range like this."""
    from train.checkpoint import random_checkpoint

    model = random_checkpoint("tiny", channels=1, image_size=32, seed=1).ema_model().eval()

    def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return gaussian_eps(x, t) + 0.5 * model(torch.from_numpy(x), torch.from_numpy(t)).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 2: one thread is fastest (and 30x faster than two on a loaded machine)
    yield eps
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_tiny_unet_chains_equal_diffusers(sampler, tiny_unet_eps):
    noise = chain_noise(seed=2, n=2, image_shape=(1, 32, 32), num_steps=10)
    assert_parity(our_chain(sampler, 10, "trailing", tiny_unet_eps, noise),
                  diffusers_chain(sampler, 10, "trailing", tiny_unet_eps, noise))


def exact_ode_solution(x_T: np.ndarray, t_from: int, t_to: int) -> np.ndarray:
    """The probability-flow ODE of Gaussian data is linear: (x_t - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2) is
    constant along it."""
    def scale(t: int) -> float:
        return float(np.sqrt(AC[t] * S * S + 1.0 - AC[t]))

    return np.sqrt(AC[t_to]) * MU + scale(t_to) / scale(t_from) * (x_T - np.sqrt(AC[t_from]) * MU)


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc"])
def test_deterministic_solvers_converge_to_the_exact_ode_solution(sampler):
    """Independent of diffusers: at t = 200, which 10, 20 and 40 linspace steps all visit, the error against the
    closed form shrinks at second order (DDIM, first order, for scale)."""
    x_T = chain_noise(seed=4, n=4, image_shape=SHAPE, num_steps=0)[0].astype(np.float64)

    def error(name: str, steps: int) -> float:
        landed = solver_timesteps(CONFIG.num_timesteps, steps, "linspace")[::-1][1:]  # where each step lands
        noise = np.zeros((steps + 1, *x_T.shape))
        noise[0] = x_T
        x = our_chain(name, steps, "linspace", gaussian_eps, noise)[landed.index(200)]
        return float(np.abs(x - exact_ode_solution(x_T, CONFIG.num_timesteps - 1, 200)).max())

    errors = [error(sampler, steps) for steps in (10, 20, 40)]
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors
    assert errors[1] < error("ddim", 20) / 5


def test_stochastic_solver_samples_follow_the_noise_contract():
    """Seeded per image: the same samples at any batch size; the per-step draws matter only to the SDE solver."""
    sde = Chain.build(CONFIG, "sde-dpm++2m", 10)
    whole = sample(wavy_eps, sde, 5, image_shape=SHAPE, seed=3)
    np.testing.assert_array_equal(sample(wavy_eps, sde, 5, image_shape=SHAPE, seed=3, batch_size=2), whole)
    noise = chain_noise(3, 5, SHAPE, 10)
    np.testing.assert_array_equal(sample(wavy_eps, sde, 5, image_shape=SHAPE, noise=noise), whole)
    noise[1:] = chain_noise(9, 5, SHAPE, 10)[1:]  # same x_T, other per-step draws
    assert np.abs(sample(wavy_eps, sde, 5, image_shape=SHAPE, noise=noise) - whole).max() > 0.05
    for name in ("dpm++2m", "unipc"):
        ode = Chain.build(CONFIG, name, 10)
        np.testing.assert_array_equal(sample(wavy_eps, ode, 5, image_shape=SHAPE, noise=noise),
                                      sample(wavy_eps, ode, 5, image_shape=SHAPE, seed=3))


@pytest.mark.parametrize("sampler", SOLVERS)
def test_learned_variance_output_is_split_and_v_ignored(sampler):
    def eps_and_v(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.concatenate([wavy_eps(x, t), np.full_like(x, 0.7)], axis=1)

    chain = Chain.build(CONFIG, sampler, 10)
    np.testing.assert_array_equal(sample(eps_and_v, chain, 3, image_shape=SHAPE, seed=1),
                                  sample(wavy_eps, chain, 3, image_shape=SHAPE, seed=1))


def test_spacings_are_diffusers_definitions():
    assert solver_timesteps(1000, 10, "linspace") == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    assert solver_timesteps(1000, 10, "leading") == [90, 180, 270, 360, 450, 540, 630, 720, 810, 900]
    assert solver_timesteps(1000, 10, "trailing") == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (1, 3, 7, 25, 100, 333):
            scheduler = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
            scheduler.set_timesteps(steps)
            assert solver_timesteps(1000, steps, spacing) == scheduler.timesteps.tolist()[::-1]
    with pytest.raises(DDPMError, match="repeats or drops"):
        solver_timesteps(1000, 1000, "linspace")  # rounding repeats a timestep: refused, not silently shortened
    with pytest.raises(DDPMError, match="unknown spacing"):
        solver_timesteps(1000, 10, "quadratic")


def fail_cli(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """ddpm-run expecting a user error: exit status 2 and exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_ddpm_run_solver_end_to_end_and_bad_input(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "s.npz"
    main([str(tiny_checkpoint), "--n", "3", "--sampler", "sde-dpm++2m", "--steps", "4", "--spacing", "trailing",
          "--out", str(out), "--threads", "1"])
    assert "sde-dpm++2m 4 steps" in capsys.readouterr().out
    with np.load(out) as f:
        assert f["samples"].shape == (3, 1, 32, 32) and np.isfinite(f["samples"]).all()
    bad = tmp_path / "bad.npz"
    assert "at least 3 steps" in fail_cli(capsys, tiny_checkpoint, "--sampler", "dpm++2m", "--steps", 2, "--out", bad)
    assert "spacing" in fail_cli(capsys, tiny_checkpoint, "--sampler", "unipc", "--steps", 10, "--spacing", "cosine",
                                 "--out", bad)
    assert "--eta" in fail_cli(capsys, tiny_checkpoint, "--sampler", "dpm++2m", "--steps", 10, "--eta", 0.5,
                               "--out", bad)
    assert "number K" in fail_cli(capsys, tiny_checkpoint, "--sampler", "unipc", "--steps", "ddim10", "--out", bad)
    assert not bad.exists()


def test_sweep_scores_cells_resumes_and_plots(tiny_checkpoint, tmp_path, capsys):
    from evaluation.cli import main as eval_main

    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_checkpoint), "--ref", "mnist", "--cell", "sde-dpm++2m:3", "--cell", "ddim:3", "--n",
            "8", "--seeds", "0,1", "--spread-max-calls", "3", "--threads", "1", "--out-dir", str(out)]
    eval_main(args)
    record = json.loads((out / "sweep.json").read_text())
    cells = {(r["sampler"], r["steps"], r["seed"]): r for r in record["cells"]}
    assert set(cells) == {("sde-dpm++2m", 3, 0), ("sde-dpm++2m", 3, 1), ("ddim", 3, 0), ("ddim", 3, 1)}
    assert all(r["fd"] > 0 and 0 <= r["confident"] <= 1 for r in cells.values())
    assert cells[("ddim", 3, 0)]["fd"] != cells[("ddim", 3, 1)]["fd"]  # the seeds draw different images
    floor = record["floor"]
    assert [f["seed"] for f in floor] == [0, 1] and floor[0]["fd"] < min(r["fd"] for r in cells.values())
    table = capsys.readouterr().out
    assert "| sde-dpm++2m | 3 |" in table and "real digits (noise floor)" in table
    assert (out / "sweep.md").read_text().strip() in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    eval_main(args + ["--cell", "unipc:3"])  # resumes: only the new cell is sampled
    err = capsys.readouterr().err
    assert "unipc 3 steps" in err and "ddim 3 steps" not in err
    assert len(json.loads((out / "sweep.json").read_text())["cells"]) == 6
    with pytest.raises(SystemExit) as exc:
        eval_main(args[:-2] + ["--n", "9", "--out-dir", str(out)])  # other settings: refused, not mixed
    assert exc.value.code == 2 and "other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["sweep", str(tiny_checkpoint), "--ref", "mnist", "--cell", "dpm++2m:2", "--out-dir",
                   str(tmp_path / "x")])
    assert "at least 3 steps" in capsys.readouterr().err


def test_sweep_with_one_power_of_ten_cell_plots(tiny_checkpoint, tmp_path, capsys):
    """One call count that is a power of ten (a degenerate log axis for a hand-drawn plot) still plots."""
    from evaluation.cli import main as eval_main

    out = tmp_path / "sweep"
    eval_main(["sweep", str(tiny_checkpoint), "--ref", "mnist", "--cell", "ddim:10", "--n", "8", "--seeds", "0",
               "--threads", "1", "--out-dir", str(out)])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in capsys.readouterr().err
