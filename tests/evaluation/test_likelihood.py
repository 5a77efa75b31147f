"""The bits/dim math of evaluation.likelihood: each piece against an independent computation, the loop on an oracle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evaluation.likelihood import (BitsPerDim, approx_standard_normal_cdf, bits_per_dim,
                                discretized_gaussian_log_likelihood, normal_kl, prior_bpd)
from runtime.sampling.noise import SeededNoise
from runtime.sampling.schedule import DiffusionConfig, Schedule, sampling_schedule

LEVELS = np.arange(256) / 127.5 - 1.0


def test_normal_kl_matches_numerical_integral() -> None:
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = np.linspace(-12, 12, 200001)
    logp = -0.5 * (math.log(2 * math.pi) + lv1 + (x - m1) ** 2 / math.exp(lv1))
    logq = -0.5 * (math.log(2 * math.pi) + lv2 + (x - m2) ** 2 / math.exp(lv2))
    f = np.exp(logp) * (logp - logq)
    integral = float(((f[1:] + f[:-1]) * np.diff(x)).sum() / 2)  # trapezoid rule (np.trapezoid needs numpy 2)
    assert abs(float(normal_kl(m1, lv1, m2, lv2)) - integral) < 1e-8
    assert float(normal_kl(m1, lv1, m1, lv1)) == 0.0


def test_cdf_approximation_is_close_to_erf() -> None:
    x = np.linspace(-5, 5, 1001)
    exact = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert np.abs(approx_standard_normal_cdf(x) - exact).max() < 2e-4


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.02)), (0.7, math.log(0.3)), (-0.99, math.log(1e-3))])
def test_decoder_bins_are_a_distribution_over_256_levels(mean: float, log_scale: float) -> None:
    x = LEVELS[None, :]
    logp = discretized_gaussian_log_likelihood(x, np.full_like(x, mean), np.full_like(x, log_scale))
    probs = np.exp(logp)
    floored = probs <= 1.0001e-12
    assert abs(probs[~floored].sum() - 1.0) < 1e-6  # the bins tile the line, the edges take the tails
    # an interior bin is the integral of the Gaussian over [x - 1/255, x + 1/255] (tanh CDF: ~1e-4 close)
    i = int(np.argmin(np.abs(LEVELS - mean)))
    if 0 < i < 255:
        s = math.exp(log_scale)
        exact = 0.5 * (math.erf((LEVELS[i] + 1 / 255 - mean) / (s * math.sqrt(2)))
                       - math.erf((LEVELS[i] - 1 / 255 - mean) / (s * math.sqrt(2))))
        assert abs(probs[0, i] - exact) < 5e-4


def test_prior_term_closed_form() -> None:
    schedule = Schedule.from_config(DiffusionConfig())
    x0 = np.zeros((2, 1, 4, 4))
    x0[1] = 1.0
    ac = schedule.alphas_cumprod[-1]
    want0 = 0.5 * (-1 - math.log(1 - ac) + (1 - ac)) / math.log(2)
    want1 = want0 + 0.5 * ac / math.log(2)
    # -1 - log(1 - ac) + (1 - ac) ~ ac^2 / 2 cancels to 1e-9: compare in absolute bits, far below any reported digit
    np.testing.assert_allclose(prior_bpd(x0, schedule), [want0, want1], rtol=0, atol=1e-15)


def _oracle(x_star: np.ndarray, schedule: Schedule, v: float | None = None):
    """The exact eps of a data distribution that is one image x_star: x_0 is always recovered exactly."""
    index = {int(t): k for k, t in enumerate(schedule.timesteps)}

    def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        k = index[int(t[0])]
        e = (x_t - schedule.sqrt_alphas_cumprod[k] * x_star) / schedule.sqrt_one_minus_alphas_cumprod[k]
        e = e.astype(np.float32)
        return e if v is None else np.concatenate([e, np.full_like(e, v)], axis=1)

    return eps


def _digit_like(n: int, shape=(1, 6, 6)) -> np.ndarray:
    rng = np.random.default_rng(5)
    return LEVELS[rng.integers(0, 256, size=(n, *shape))]


@pytest.mark.parametrize("steps", [None, "10"])
def test_oracle_model_bound_is_prior_plus_decoder(steps: str | None) -> None:
    """With x_0 known exactly and fixed_small variance every KL term vanishes; the decoder is a Gaussian of the
    posterior's step-1 variance centred on the pixel, i.e. a known bin probability."""
    config = DiffusionConfig(num_timesteps=50, variance_type="fixed_small")
    schedule = sampling_schedule(config, steps)
    x_star = _digit_like(1)
    x0 = np.repeat(x_star, 3, axis=0)
    bpd = bits_per_dim(_oracle(x_star, schedule), x0, schedule, "fixed_small", 1.0, SeededNoise(0, 0, 3, (1, 6, 6)))
    assert bpd.vb.shape == (3, len(schedule))
    assert np.abs(bpd.vb[:, 1:]).max() < 1e-7
    sigma = math.exp(0.5 * schedule.posterior_log_variance_clipped[0])
    inner = approx_standard_normal_cdf(np.array(1 / 255 / sigma))
    p = np.where(np.abs(x_star) > 0.999, inner, 2 * inner - 1)  # edge levels take the tail beyond
    decoder = -np.log2(p).mean()
    np.testing.assert_allclose(bpd.decoder, decoder, rtol=1e-5)
    np.testing.assert_allclose(bpd.total, bpd.prior + bpd.decoder, rtol=1e-12)
    assert np.abs(bpd.xstart_mse).max() < 1e-8


def test_learned_range_ends_equal_the_fixed_tables() -> None:
    """v = -1 is the clipped posterior log-variance (fixed_small), v = +1 is log beta (fixed_large except at t=0)."""
    config = DiffusionConfig(num_timesteps=100)
    schedule = Schedule.from_config(config)
    x0 = _digit_like(2)

    def noisy(v: float | None):
        def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
            e = np.random.default_rng(int(t[0])).standard_normal(x_t.shape).astype(np.float32) * 0.5
            return e if v is None else np.concatenate([e, np.full_like(e, v)], axis=1)
        return eps

    def run(fn, vt: str) -> BitsPerDim:
        return bits_per_dim(fn, x0, schedule, vt, 1.0, SeededNoise(3, 0, 2, (1, 6, 6)))

    low, small = run(noisy(-1.0), "learned_range"), run(noisy(None), "fixed_small")
    np.testing.assert_allclose(low.vb, small.vb, rtol=1e-10, atol=1e-12)
    high, large = run(noisy(1.0), "learned_range"), run(noisy(None), "fixed_large")
    np.testing.assert_allclose(high.vb[:, 1:], large.vb[:, 1:], rtol=1e-10)
    assert not np.allclose(high.vb[:, 0], large.vb[:, 0])  # t = 0: log beta_0 vs the fixed_large replacement


def test_result_does_not_depend_on_the_batch_split() -> None:
    config = DiffusionConfig(num_timesteps=100)
    schedule = Schedule.from_config(config)
    x0 = _digit_like(5)

    def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return (0.3 * x_t + 0.01 * t[:, None, None, None]).astype(np.float32)

    whole = bits_per_dim(eps, x0, schedule, "fixed_large", 1.0, SeededNoise(7, 0, 5, (1, 6, 6)))
    parts = BitsPerDim.concat([bits_per_dim(eps, x0[a:b], schedule, "fixed_large", 1.0, SeededNoise(7, a, b - a,
                                                                                                      (1, 6, 6)))
                               for a, b in ((0, 2), (2, 5))])
    np.testing.assert_array_equal(whole.total, parts.total)
    np.testing.assert_array_equal(whole.vb, parts.vb)
    other = bits_per_dim(eps, x0, schedule, "fixed_large", 1.0, SeededNoise(8, 0, 5, (1, 6, 6)))
    assert not np.array_equal(whole.vb, other.vb)
    assert whole.summary()["bits_per_dim"] == pytest.approx(float(whole.total.mean()))


FIXTURES = Path(__file__).parents[1] / "fixtures" / "improved_diffusion"


class _PerTimestepNoise:
    """The fixture's q_sample noise, noise[t] for t = T-1 down to 0: the order bits_per_dim draws in."""

    def __init__(self, noise: np.ndarray):
        self.noise, self.t = noise.astype(np.float32), len(noise)

    def draw(self) -> np.ndarray:
        self.t -= 1
        return self.noise[self.t]


def test_bound_matches_improved_diffusion_calc_bpd_loop() -> None:
    """Their calc_bpd_loop on their learned-range model (fixture made by scripts/golden/, their code, same noise):
    our loop around the imported module gives every term and the total within 1e-4 bits/dim."""
    torch = pytest.importorskip("torch")
    from train.sources import load_source

    golden = np.load(FIXTURES / "nll_golden.npz")
    source = load_source(FIXTURES / "model.safetensors", flags=FIXTURES / "flags.json")
    assert source.diffusion.variance_type == "learned_range"
    torch.set_num_threads(1)

    def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return source.module(torch.from_numpy(x_t), torch.from_numpy(t)).numpy()

    schedule = Schedule.from_config(source.diffusion)
    x0 = golden["images"].transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(x0, golden["x_start"], atol=1e-7)
    clip = source.diffusion.clip_range if bool(golden["clip_denoised"]) else None
    ours = bits_per_dim(eps, x0, schedule, "learned_range", clip, _PerTimestepNoise(golden["noise"]))
    assert ours.vb.shape == golden["vb"].shape
    np.testing.assert_allclose(ours.vb, golden["vb"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.prior, golden["prior_bpd"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.total, golden["total_bpd"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.xstart_mse, golden["xstart_mse"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.mse, golden["mse"], atol=1e-4, rtol=1e-4)
