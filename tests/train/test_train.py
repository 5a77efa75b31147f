"""Datasets, the training loop (learning, EMA, exact resume), checkpoints and the eager sampler."""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from runtime.errors import DDPMError  # noqa: E402
from runtime.sampling.noise import chain_noise  # noqa: E402
from runtime.sampling.schedule import DiffusionConfig, Schedule, sampling_schedule  # noqa: E402
from train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from train.data import Dataset, load_dataset, load_mnist, mnist_arrays, mnist_split, pad_to  # noqa: E402
from train.model import preset_config, preset_image_size  # noqa: E402
from train.sampler import sample, sample_model  # noqa: E402
from train.trainer import Trainer, TrainConfig, ema_decay_at  # noqa: E402


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_mnist()


def small_dataset(mnist: Dataset, flips: bool) -> Dataset:
    return Dataset("mnist", mnist.images[::50].clone(), allow_flips=flips)


def make_trainer(data: Dataset, dropout: float = 0.0, **kw) -> Trainer:
    model_config = replace(preset_config("tiny", data.images.shape[-1], data.channels), dropout=dropout)
    return Trainer(model_config, DiffusionConfig(), data, TrainConfig(**{"batch_size": 8, "warmup": 2, **kw}))


def test_mnist_loader(mnist: Dataset) -> None:
    x = mnist.images
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32  # MNIST's own size: no padding pixels
    assert x.min() == -1.0 and x.max() == 1.0
    assert not mnist.allow_flips
    assert np.bincount(mnist.labels).tolist() == [400] * 10
    # a '1' has far less ink than a '0'
    assert (x[mnist.labels == 1] > 0).float().mean() < 0.7 * (x[mnist.labels == 0] > 0).float().mean()


def test_mnist_test_digits_are_held_out_of_training(mnist: Dataset) -> None:
    """ddpm-eval nll --data mnist scores digits ddpm-train never saw: the split is disjoint, balanced and complete."""
    all_digits, _ = mnist_arrays()
    test, test_labels = mnist_split("test")
    train, _ = mnist_split("train")
    assert np.bincount(test_labels).tolist() == [100] * 10 and len(set(test_labels[:20].tolist())) > 5  # shuffled
    as_bytes = lambda images: {im.tobytes() for im in images}  # noqa: E731
    assert as_bytes(test).isdisjoint(as_bytes(train)) and as_bytes(test) | as_bytes(train) == as_bytes(all_digits)
    trained_on = as_bytes(np.round((mnist.images[:, 0].numpy() + 1) * 127.5).astype(np.uint8))
    assert trained_on == as_bytes(train)


def test_padding_only_where_the_preset_needs_it(mnist: Dataset) -> None:
    assert preset_image_size("small", 28) == 28 and preset_image_size("tiny", 28) == 28  # 28 -> 14 -> 7
    assert preset_image_size("cifar10", 28) == 32 and preset_image_size("cifar10", 32) == 32  # 4 levels: 8 | size
    assert pad_to(mnist, 28) is mnist
    padded = pad_to(mnist, 32)
    assert padded.images.shape == (4000, 1, 32, 32) and padded.labels is mnist.labels
    assert (padded.images[:, :, :2] == -1).all() and (padded.images[:, :, :, -2:] == -1).all()  # background
    assert torch.equal(padded.images[:, :, 2:30, 2:30], mnist.images)
    with pytest.raises(DDPMError, match="larger than the model's 16 x 16"):
        pad_to(mnist, 16)


def test_lr_schedules() -> None:
    data = Dataset("x", torch.zeros(2, 1, 8, 8), allow_flips=False)
    model_config = preset_config("tiny", 8, 1)

    def lr(schedule: str, step: int, total: int | None) -> float:
        config = TrainConfig(lr=1.0, warmup=10, lr_schedule=schedule)
        return Trainer(model_config, DiffusionConfig(), data, config).lr_at(step, total)

    for schedule in ("constant", "cosine"):
        assert lr(schedule, 0, 110) == pytest.approx(0.1) and lr(schedule, 9, 110) == pytest.approx(1.0)
    assert [lr("constant", s, 110) for s in (10, 60, 109)] == [1.0, 1.0, 1.0]
    assert [lr("cosine", s, 110) for s in (10, 60, 110)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert lr("cosine", 35, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr("cosine", 60, None) == 1.0  # no horizon known (a bare train_step): no decay
    with pytest.raises(DDPMError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def write_cifar(folder: Path, payload: object) -> None:
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(payload, protocol=2))


def test_cifar_loader_reads_batches_and_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_cifar(tmp_path, {b"data": data, b"labels": [3, 1, 4, 1]})
    ds = load_dataset("cifar10", tmp_path)
    assert ds.images.shape == (20, 3, 32, 32) and ds.allow_flips
    assert torch.allclose(ds.images[0, 2, 0, :3], torch.from_numpy(data[0, 2048:2051] / 127.5 - 1.0).float())
    assert ds.labels.tolist()[:4] == [3, 1, 4, 1]

    write_cifar(tmp_path, {b"data": Exploit()})
    with pytest.raises(DDPMError, match="refusing to load global (posix|nt|os).system"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_folder_loader(tmp_path: Path) -> None:
    with pytest.raises(DDPMError, match="holds no images"):
        load_dataset("folder", tmp_path)
    Image.new("RGB", (64, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "b.jpg")
    ds = load_dataset("folder", tmp_path)
    assert ds.images.shape == (2, 3, 32, 32) and ds.allow_flips
    assert torch.allclose(ds.images[0, :, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    (tmp_path / "c.png").write_bytes(b"not a picture")
    with pytest.raises(DDPMError, match="cannot read image"):
        load_dataset("folder", tmp_path)
    with pytest.raises(DDPMError, match="does not exist"):
        load_dataset("folder", tmp_path / "missing")


def test_ema_warmup() -> None:
    assert ema_decay_at(0.995, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.995, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.995, 10_000) == 0.995


def test_steps_lower_the_loss_on_a_fixed_batch(mnist: Dataset) -> None:
    trainer = make_trainer(small_dataset(mnist, False), lr=2e-3)
    batch = trainer.draw_batch()
    trainer.draw_batch = lambda: batch
    with torch.no_grad():
        before = float(trainer.loss(*batch))
    losses = [trainer.train_step() for _ in range(20)]
    assert losses[0] == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        assert float(trainer.loss(*batch)) < 0.7 * before
    # the EMA follows the weights with the warmed-up decay
    ema = next(trainer.ema.parameters())
    raw = next(trainer.model.parameters())
    assert not torch.equal(ema, raw) and (ema - raw).abs().max() < (raw.abs().max() + 1e-3)


def test_loss_is_l_simple_on_q_sample(mnist: Dataset) -> None:
    trainer = make_trainer(small_dataset(mnist, False))
    x0, t, noise = trainer.draw_batch()
    ac = Schedule.from_config(DiffusionConfig()).alphas_cumprod
    x_t = torch.stack([math.sqrt(ac[ti]) * x + math.sqrt(1 - ac[ti]) * n for x, ti, n in zip(x0, t.tolist(), noise)])
    with torch.no_grad():
        expected = ((trainer.model(x_t, t) - noise) ** 2).mean()
        assert float(trainer.loss(x0, t, noise)) == pytest.approx(float(expected), rel=1e-5)


def test_resume_continues_the_exact_loss_sequence(mnist: Dataset, tmp_path: Path) -> None:
    data = small_dataset(mnist, flips=True)  # flips and dropout exercise both RNG streams
    straight = make_trainer(data, dropout=0.1, seed=3)
    expected = straight.train(6)

    first = make_trainer(data, dropout=0.1, seed=3)
    head = first.train(3)
    save_checkpoint(tmp_path / "run.pt", first.checkpoint())
    torch.manual_seed(999)  # whatever happened in between must not matter
    second = make_trainer(data, dropout=0.1, seed=3)
    second.restore(load_checkpoint(tmp_path / "run.pt"))
    tail = second.train(6)
    assert head + tail == expected
    for a, b in zip(straight.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_is_weights_only(mnist: Dataset, tmp_path: Path) -> None:
    trainer = make_trainer(small_dataset(mnist, False))
    trainer.train(2)
    path = save_checkpoint(tmp_path / "c.pt", trainer.checkpoint())
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 2 and raw["data"]["channels"] == 1 and raw["train_config"]["batch_size"] == 8
    ckpt = load_checkpoint(path)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(ckpt.ema_model()(x, t), trainer.ema(x, t), atol=1e-6)
    assert all(v.is_contiguous() for v in ckpt.ema.values())
    other = Trainer(preset_config("small", 28, 1), DiffusionConfig(), trainer.dataset, trainer.config)
    with pytest.raises(DDPMError, match="different model"):
        other.restore(ckpt)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_sampler_matches_hand_computed_steps(tiny_checkpoint: Path, variance_type: str) -> None:
    model = load_checkpoint(tiny_checkpoint).ema_model()
    full = Schedule.from_config(DiffusionConfig())
    kept = [0, 500, 999]
    schedule = full.respace(kept)
    shape = (2, 1, 32, 32)
    noise = np.random.default_rng(0).standard_normal((len(kept) + 1, *shape)).astype(np.float32)
    got = sample(model, schedule, shape, variance_type, clip_denoised=True, noise=noise)

    # by hand, in float64, from the betas of the paper's linear schedule
    ac_full = np.cumprod([1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000)])
    ac = [ac_full[i] for i in kept]
    ac_prev = [1.0] + ac[:-1]
    betas = [1 - a / p for a, p in zip(ac, ac_prev)]
    post_var = [b * (1 - p) / (1 - a) for b, a, p in zip(betas, ac, ac_prev)]
    x = noise[0].astype(np.float64)
    for j, k in enumerate([2, 1, 0]):
        with torch.no_grad():
            eps = model(torch.from_numpy(x).float(), torch.full((2,), kept[k])).double().numpy()
        x0 = np.clip(math.sqrt(1 / ac[k]) * x - math.sqrt(1 / ac[k] - 1) * eps, -1, 1)
        mean = (betas[k] * math.sqrt(ac_prev[k]) / (1 - ac[k])) * x0 \
            + ((1 - ac_prev[k]) * math.sqrt(1 - betas[k]) / (1 - ac[k])) * x
        var = betas[k] if variance_type == "fixed_large" else post_var[k]
        x = mean + (math.sqrt(var) if k > 0 else 0.0) * noise[1 + j]
    np.testing.assert_allclose(got.numpy(), x, atol=2e-5)


def test_sample_model_draws_the_runtime_noise(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    model, diffusion = ckpt.ema_model(), ckpt.diffusion_config
    a = sample_model(model, diffusion, 2, steps=3, seed=1)
    assert a.shape == (2, 1, 32, 32) and np.array_equal(a, sample_model(model, diffusion, 2, 3, seed=1))
    # the torch loop fed the runtime's noise for seed 1 (image i: rng([1, i])) gives the same images
    ref = sample(model, sampling_schedule(diffusion, 3), (2, 1, 32, 32), diffusion.variance_type, True,
                 chain_noise(1, 2, (1, 32, 32), 3))
    np.testing.assert_allclose(a, ref.clamp(-1, 1).numpy(), atol=1e-5)
    assert np.abs(a - sample_model(model, diffusion, 2, 3, seed=2)).max() > 0.1
    with pytest.raises(DDPMError, match="injected noise has shape"):
        sample(model, Schedule.from_config(DiffusionConfig()).respace([0, 999]), (2, 1, 32, 32),
               noise=np.zeros((2, 2, 1, 32, 32)))


def test_digit_quality_separates_digits_from_junk() -> None:
    pytest.importorskip("sklearn")
    from evaluation.digit_quality import DigitQuality, classify, held_out_real

    real, labels = held_out_real()
    predicted, _ = classify(np.pad(real, ((0, 0), (2, 2), (2, 2), (0, 0))))  # as 32 x 32 samples
    assert np.mean(predicted == labels) > 0.85
    assert DigitQuality.of(real).confident_fraction > 0.75
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 1), dtype=np.uint8)
    assert DigitQuality.of(noise).confident_fraction == 0.0
    with pytest.raises(DDPMError, match="uint8"):
        classify(real.astype(np.float32))
