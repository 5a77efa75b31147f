"""Learned-range variance (Improved DDPM) end to end: the step formula, export (eps and v outputs, step graph),
and the same samples from eager PyTorch, the ONNX eps graph and the ONNX step graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import make_random_checkpoint
from runtime.backends import open_model
from runtime.errors import DDPMError
from runtime.sampling import Chain, sample
from runtime.sampling.schedule import DiffusionConfig
from runtime.sampling.steps import DDPMCoefficients, ddpm_step, split_output

COSINE_LEARNED = DiffusionConfig(schedule="cosine", num_timesteps=50, variance_type="learned_range")


@pytest.mark.parametrize("steps", [None, "10"])
def test_v_at_the_ends_gives_the_fixed_variances(steps: str | None) -> None:
    """v = -1 is the clipped posterior variance (fixed_small), v = +1 is beta (fixed_large), on respaced tables too."""
    rng = np.random.default_rng(0)
    learned = Chain.build(COSINE_LEARNED, "ddpm", steps)
    x, eps, z = (rng.standard_normal((2, 1, 4, 4)) for _ in range(3))
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        ref = Chain.build(COSINE_LEARNED, "ddpm", steps, variance_type=fixed)
        out = np.concatenate([eps, np.full_like(eps, v)], axis=1)
        for k in range(len(learned)):
            np.testing.assert_allclose(learned.rule.update(learned, k, x, out, z), ref.rule.update(ref, k, x, eps, z),
                                       rtol=0, atol=1e-12)


def test_v_interpolates_log_variance() -> None:
    """v = 0: the noise scale is exp(0.25 (log beta + log posterior variance)), the geometric mean of the ends."""
    chain = Chain.build(COSINE_LEARNED, "ddpm", "10")
    s = chain.schedule
    x, eps = np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2))
    z = np.ones((1, 1, 2, 2))
    coeffs = DDPMCoefficients.tables(s, "learned_range")
    for k in range(1, len(chain)):
        mean = ddpm_step(x, eps, np.zeros_like(z), coeffs.row(k), clip=True)
        got = ddpm_step(x, eps, z, coeffs.row(k), clip=True, v=np.zeros_like(z)) - mean
        want = np.sqrt(np.sqrt(s.betas[k] * s.posterior_variance[k]))
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert ddpm_step(x, eps, z, coeffs.row(0), True, np.zeros_like(z)).sum() == 0.0  # no noise at t = 0


def test_split_output_and_refusals() -> None:
    out = np.arange(2 * 6 * 4).reshape(2, 6, 2, 2).astype(np.float32)
    eps, v = split_output(out, 3)
    assert eps.shape == v.shape == (2, 3, 2, 2) and (v == out[:, 3:]).all()
    assert split_output(out, 6)[1] is None
    with pytest.raises(DDPMError, match="returned 6 channels for 4-channel"):
        split_output(out, 4)
    with pytest.raises(DDPMError, match="no v output"):
        Chain.build(DiffusionConfig(), variance_type="learned_range")
    chain = Chain.build(COSINE_LEARNED, "ddpm", "5")
    with pytest.raises(DDPMError, match="needs the model's v output"):
        chain.rule.update(chain, 1, np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))


@pytest.fixture(scope="module")
def learned_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random learned-variance RGB checkpoint (cosine, T = 50) and its validated export."""
    from ddpm_export.pipeline import export_all

    d = tmp_path_factory.mktemp("learned")
    ckpt = make_random_checkpoint(d / "learned.pt", channels=3, image_size=16, diffusion=COSINE_LEARNED, seed=2)
    export_all(ckpt, d / "export", fp16=True, step_graph=True, max_batch=3, validate=True, engine=False)
    return ckpt, d / "export"


def test_export_has_eps_and_v_and_validates(learned_export: tuple[Path, Path]) -> None:
    import json

    _, out = learned_export
    graph = onnx.load(out / "model.onnx")
    assert [o.name for o in graph.graph.output] == ["eps", "v"]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["ddpm.outputs"] == "eps,v" and meta["ddpm.variance_type"] == "learned_range"
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"]
    summary = report["summary"]
    assert summary["eager_vs_fp32_v_max_abs"] <= 1e-4 and summary["step_vs_numpy_max_abs"] <= 1e-4
    assert summary["fp16_vs_fp32_v_rel_l2"] <= 1e-2


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", "10"), ("ddim", "10")])
def test_eager_onnx_and_step_graph_sample_alike(learned_export: tuple[Path, Path], sampler: str,
                                                steps: str | None) -> None:
    ckpt, out = learned_export
    chain = Chain.build(COSINE_LEARNED, sampler, steps)
    eager = sample(open_model(ckpt), chain, 3, seed=5)
    onnx_eps = sample(open_model(out / "model.onnx"), chain, 3, seed=5)
    assert eager.std() > 0.1
    np.testing.assert_allclose(onnx_eps, eager, rtol=0, atol=1e-4)
    if sampler == "ddpm" and steps is None:  # the step graph runs the full chain with v inside the graph
        stepped = sample(open_model(out / "model.step.onnx"), chain, 3, seed=5)
        np.testing.assert_allclose(stepped, eager, rtol=0, atol=1e-4)
