"""The diffusion schedule: every table of Ho et al. (2020), computed once in float64, in NumPy.

This module is the single source of truth for the schedule math. `train` casts these tables to torch at use,
`ddpm_export` bakes them into the step graph, and the runtime samplers index them: nobody recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from runtime.errors import DDPMError

SCHEDULES = ("linear", "cosine")
LEARNED_RANGE = "learned_range"  # Improved DDPM: the model outputs v beside eps and the variance interpolates with it
VARIANCE_TYPES = ("fixed_small", "fixed_large", LEARNED_RANGE)


def is_learned(variance_type: str) -> bool:
    """The reverse variance comes from the model's v output (2C output channels), not from a fixed table."""
    return variance_type == LEARNED_RANGE


@dataclass(frozen=True)
class DiffusionConfig:
    """What defines the forward process and the reverse step; stored in checkpoints and model files."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: str = "fixed_large"  # the paper's CIFAR-10 setting
    clip_denoised: bool = True
    clip_range: float = 1.0  # x_0 is clipped to [-clip_range, clip_range] when clip_denoised

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise DDPMError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.variance_type not in VARIANCE_TYPES:
            raise DDPMError(f"unknown variance type {self.variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}")
        if int(self.num_timesteps) < 2:
            raise DDPMError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise DDPMError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0.0 < float(self.clip_range) < float("inf"):
            raise DDPMError(f"clip_range must be a positive finite number, got {self.clip_range}")

    @property
    def learned_variance(self) -> bool:
        """The model outputs v beside eps (2C channels) and the reverse variance interpolates with it."""
        return is_learned(self.variance_type)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DDPMError(f"unknown diffusion config keys {sorted(unknown)}; is the file from another tool?")
        types = {"schedule": str, "num_timesteps": int, "beta_start": float, "beta_end": float,
                 "variance_type": str, "clip_denoised": _to_bool, "clip_range": float}
        return cls(**{k: types[k](v) for k, v in d.items()})


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def make_betas(config: DiffusionConfig) -> np.ndarray:
    """Beta_t for t = 0..T-1 (float64). Linear ends are scaled by 1000/T as in Improved DDPM."""
    T = config.num_timesteps
    if config.schedule == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * config.beta_start, scale * config.beta_end, T, dtype=np.float64)
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Schedule:
    """All per-step tables (float64, length K = number of sampling steps).

    `timesteps[k]` is the original timestep index the model is called with at step k; for the full schedule it is k,
    for a respaced one it is the kept index (Improved DDPM respacing).
    """

    betas: np.ndarray = field(repr=False)
    timesteps: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) < 1 or np.any(b <= 0) or np.any(b >= 1):
            raise DDPMError("betas must be a 1-D array with every value in (0, 1)")
        object.__setattr__(self, "betas", b)
        object.__setattr__(self, "timesteps", np.asarray(self.timesteps, dtype=np.int64))
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # log of the posterior variance with element 0 (which is 0) replaced by element 1
        clipped = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
        tables = {
            "alphas": alphas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": clipped,
            "log_betas": np.log(b),  # the learned-range upper end (Improved DDPM), unclipped
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        for name, table in tables.items():
            table.setflags(write=False)
            object.__setattr__(self, name, table)

    # Derived tables, set in __post_init__.
    alphas: np.ndarray = field(init=False, repr=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    log_betas: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "Schedule":
        betas = make_betas(config)
        return cls(betas=betas, timesteps=np.arange(len(betas)))

    def __len__(self) -> int:
        return len(self.betas)

    def log_variance(self, variance_type: str) -> np.ndarray:
        """Reverse-step log-variance per step: fixed_small = clipped posterior, fixed_large = log beta (elt 0 fixed).
        learned_range depends on the model's v output: see `runtime.sampling.steps.learned_log_variance`."""
        if variance_type == "fixed_small":
            return self.posterior_log_variance_clipped
        if variance_type == "fixed_large":
            if len(self.betas) == 1:
                return np.log(self.betas)
            return np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        if is_learned(variance_type):
            raise DDPMError("learned_range variance depends on the model's v output; it has no fixed table")
        raise DDPMError(f"unknown variance type {variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}")

    def respace(self, kept: Sequence[int]) -> "Schedule":
        """Keep only the steps in `kept` (indices into this schedule), rebuilding betas so that the cumulative
        products at the kept steps are unchanged: new_beta = 1 - ac[i] / ac[previous kept]."""
        kept = sorted(set(int(k) for k in kept))
        if not kept or kept[0] < 0 or kept[-1] >= len(self):
            raise DDPMError(f"respaced steps must lie in 0..{len(self) - 1}")
        new_betas, last = [], 1.0
        for i in kept:
            ac = self.alphas_cumprod[i]
            new_betas.append(1.0 - ac / last)
            last = ac
        return Schedule(betas=np.array(new_betas), timesteps=self.timesteps[kept])


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which of T timesteps to keep for `spacing` steps (Improved DDPM's rule).

    `spacing` is an int K or "K" (K steps, one section), "ddimK" (uniform stride), or "K1,K2,..." (section counts).
    """
    T = num_timesteps
    spec = str(spacing).strip()
    if spec.startswith("ddim"):
        try:
            want = int(spec[4:])
        except ValueError:
            raise DDPMError(f"bad {{opt:steps}} {spec!r}; write e.g. ddim50") from None
        for stride in range(1, T):
            if len(range(0, T, stride)) == want:
                return list(range(0, T, stride))
        raise DDPMError(f"cannot take exactly {want} evenly strided steps from {T}; choose another step count")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise DDPMError(f"bad {{opt:steps}} {spec!r}; give a step count like 50, ddim50, or section counts "
                        "like 10,15,20")
    size, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count < 1 or count > length:
            raise DDPMError(f"cannot take {count} steps from a section of {length} timesteps; use 1..{length}")
        stride = 1 if count == 1 else (length - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += length
    return kept


def sampling_schedule(config: DiffusionConfig, steps: int | str | None = None) -> Schedule:
    """The schedule a sampler walks: the full T steps, or respaced to `steps` (see `space_timesteps`)."""
    full = Schedule.from_config(config)
    if steps is None or str(steps) == str(config.num_timesteps):
        return full
    return full.respace(space_timesteps(config.num_timesteps, steps))


SPACINGS = ("linspace", "leading", "trailing")


def solver_timesteps(num_timesteps: int, steps: int | str, spacing: str = "linspace") -> list[int]:
    """The K timesteps a multistep solver calls the model at, ascending, spaced as diffusers' DPM-Solver and UniPC
    schedulers space them (Lin et al. 2023, table 2, with steps_offset 0); the chain ends at sigma = 0 after the
    smallest. linspace: round(linspace(0, T-1, K+1))[1:]; leading: (1..K) * (T // (K+1)); trailing:
    round(arange(T, 0, -T/K)) - 1."""
    if spacing not in SPACINGS:
        raise DDPMError(f"unknown spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    try:
        T, K = int(num_timesteps), int(str(steps).strip())
    except ValueError:
        raise DDPMError(f"{spacing} spacing needs the step count as a number K, got {steps!r} (ddimK and "
                        "section counts respace {opt:sampler} ddpm or ddim)") from None
    if not 1 <= K <= T:
        raise DDPMError(f"cannot take {K} steps from {T} timesteps; use 1..{T}")
    if spacing == "linspace":
        kept = np.linspace(0, T - 1, K + 1).round()[1:]
    elif spacing == "leading":
        kept = np.arange(1, K + 1) * (T // (K + 1))
    else:
        kept = np.arange(T, 0, -T / K).round()[::-1] - 1
    kept = [int(t) for t in kept]
    if len(kept) != K or len(set(kept)) != K or kept[0] < 0:
        raise DDPMError(f"{spacing} spacing of {K} steps over {T} timesteps repeats or drops timesteps; choose "
                        "fewer steps or another spacing")
    return kept


def half_log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 * log(ac / (1 - ac)), the time variable of DPM-Solver and UniPC."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(ac) - np.log1p(-ac))


def spaced_schedule(config: DiffusionConfig, steps: int | str, spacing: str = "linspace") -> Schedule:
    """The schedule a multistep solver walks: K timesteps spaced by `spacing` (see `solver_timesteps`)."""
    return Schedule.from_config(config).respace(solver_timesteps(config.num_timesteps, steps, spacing))
