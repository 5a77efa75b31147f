"""The schedule tables against independent float64 loops, the paper's check values, cosine and respacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import DDPMError
from runtime.sampling.schedule import DiffusionConfig, Schedule, sampling_schedule, space_timesteps


def loop_tables(betas: list[float]) -> dict[str, list[float]]:
    """The Ho et al. tables written out with plain Python floats, one element at a time."""
    out: dict[str, list[float]] = {k: [] for k in ("ac", "ac_prev", "post_var", "coef1", "coef2", "recip",
                                                   "recipm1")}
    prod = 1.0
    for b in betas:
        prev = prod
        prod *= 1.0 - b
        out["ac"].append(prod)
        out["ac_prev"].append(prev)
        out["post_var"].append(b * (1.0 - prev) / (1.0 - prod))
        out["coef1"].append(b * math.sqrt(prev) / (1.0 - prod))
        out["coef2"].append((1.0 - prev) * math.sqrt(1.0 - b) / (1.0 - prod))
        out["recip"].append(math.sqrt(1.0 / prod))
        out["recipm1"].append(math.sqrt(1.0 / prod - 1.0))
    return out


def test_linear_tables_match_loops_and_reference_values() -> None:
    T = 1000
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    s = Schedule.from_config(DiffusionConfig())
    ref = loop_tables(betas)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-13)
    for name, table in [("ac", s.alphas_cumprod), ("ac_prev", s.alphas_cumprod_prev),
                        ("post_var", s.posterior_variance), ("coef1", s.posterior_mean_coef1),
                        ("coef2", s.posterior_mean_coef2), ("recip", s.sqrt_recip_alphas_cumprod),
                        ("recipm1", s.sqrt_recipm1_alphas_cumprod)]:
        np.testing.assert_allclose(table, ref[name], rtol=1e-11, atol=1e-300, err_msg=name)
    assert s.alphas_cumprod[999] == pytest.approx(4.035829765375676e-05, rel=1e-12)
    assert s.posterior_variance[1] == pytest.approx(5.4531876613021935e-05, rel=1e-12)
    assert s.posterior_variance[999] == pytest.approx(0.0199999835, rel=1e-8)
    # clipped log-variance: element 0 (a zero variance) takes element 1's value
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(ref["post_var"][1]), rel=1e-12)
    np.testing.assert_allclose(s.log_variance("fixed_large")[1:], np.log(betas[1:]), rtol=1e-12)
    assert s.log_variance("fixed_large")[0] == pytest.approx(math.log(ref["post_var"][1]), rel=1e-12)


def test_linear_ends_scale_with_T() -> None:
    s = Schedule.from_config(DiffusionConfig(num_timesteps=250))
    assert s.betas[0] == pytest.approx(4e-4, rel=1e-12) and s.betas[-1] == pytest.approx(0.08, rel=1e-12)


def test_cosine_schedule() -> None:
    T = 100
    abar = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = [min(1.0 - abar[i + 1] / abar[i], 0.999) for i in range(T)]
    s = Schedule.from_config(DiffusionConfig(schedule="cosine", num_timesteps=T))
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12)
    assert s.betas[-1] == 0.999  # the clip is what keeps the last step finite
    np.testing.assert_allclose(s.alphas_cumprod[:-1], np.array(abar[1:T]) / abar[0], rtol=1e-9)


@pytest.mark.parametrize("T, spec, expected", [
    (1000, "10", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
    (6, "3", [0, 2, 5]),  # stride 2.5: round(2.5) = 2 (halves go to even)
    (10, "3,3,2", [0, 2, 3, 4, 5, 6, 7, 9]),  # sections of 4, 3, 3 (the first T mod 3 one longer)
    (100, "10,10", [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 55, 61, 66, 72, 77, 83, 88, 94, 99]),
    (1000, "ddim10", list(range(0, 1000, 100))),
    (1000, "ddim7", list(range(0, 1000, 143))),  # the first stride giving exactly 7 steps
    (1000, "ddim1000", list(range(1000))),
])
def test_respacing_rules(T: int, spec: str, expected: list[int]) -> None:
    assert space_timesteps(T, spec) == expected


@pytest.mark.parametrize("spec", ["0", "11,x", "ddimx", "2000"])
def test_bad_spacing_is_a_user_error(spec: str) -> None:
    with pytest.raises(DDPMError):
        space_timesteps(1000, spec)


def test_respaced_schedule_keeps_cumulative_products() -> None:
    config = DiffusionConfig()
    full = Schedule.from_config(config)
    s = sampling_schedule(config, 50)
    kept = space_timesteps(1000, 50)
    assert list(s.timesteps) == kept and len(s) == 50
    np.testing.assert_allclose(s.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    prev = [1.0] + [full.alphas_cumprod[i] for i in kept[:-1]]
    np.testing.assert_allclose(s.betas, [1 - full.alphas_cumprod[i] / p for i, p in zip(kept, prev)], rtol=1e-10)
