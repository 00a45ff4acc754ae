"""Noise-schedule arithmetic the samplers share: betas, timestep spacing, sigmas, float32 scalars.

Everything here runs on the host in NumPy: schedules are a few thousand numbers, computed once per
`set_timesteps`. The goal is the same float32 values diffusers gets from torch, bit for bit where
we can, because step-for-step agreement depends on it:

  - torch.linspace(float32) on CPU computes element i as fma(step, i, start) below the halfway point
    and fma(-step, n-1-i, end) above it, with step = (end - start) / (n - 1) in float32.
    `torch_linspace_float32` does that (an exact float64 product, one rounding to float32).
  - torch.cumprod on a float32 CPU tensor accumulates in float64 and rounds each output.
  - torch `x ** 0.5` and `x ** 2` on float32 run as sqrt(x) and x * x; we write them that way.
  - log/exp of a float32 scalar: we evaluate in float64 and round (`log32`, `exp32`); torch's
    float32 libm differs from that by at most one ulp on some inputs.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------
# float32 scalars
# ---------------------------------------------------------------------------------------------

def f32(x):
    """A float32 scalar (the dtype of diffusers' 0-d schedule tensors)."""
    return np.float32(x)


def log32(x):
    """log of a float32 scalar, evaluated in float64 and rounded; log(0) = -inf like torch."""
    x = float(x)
    if x > 0.0:
        return np.float32(math.log(x))
    return np.float32(-np.inf) if x == 0.0 else np.float32(np.nan)


def exp32(x):
    """exp of a float32 scalar, evaluated in float64 and rounded; overflow gives inf like torch."""
    try:
        return np.float32(math.exp(float(x)))
    except OverflowError:
        return np.float32(np.inf)


# ---------------------------------------------------------------------------------------------
# betas and alphas
# ---------------------------------------------------------------------------------------------

def torch_linspace_float32(start, end, steps):
    """torch.linspace(start, end, steps, dtype=torch.float32) on CPU, value for value.

    start/end are rounded to float32 first, step = (end - start) / (steps - 1) in float32, and each
    element is one fused multiply-add from the nearer end. The product step * k (24-bit step times
    an integer below 2**29) is exact in float64, and so is the sum for the ranges schedules use, so
    a single rounding to float32 reproduces the fused operation.
    """
    start = np.float32(start)
    end = np.float32(end)
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32(np.float32(end - start) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)                          # [steps]
    halfway = steps // 2
    from_start = np.float64(start) + np.float64(step) * index           # [steps] float64
    from_end = np.float64(end) - np.float64(step) * (steps - 1 - index)  # [steps] float64
    values = np.where(index < halfway, from_start, from_end)            # [steps]
    return values.astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps, max_beta=0.999):
    """The "squaredcos_cap_v2" (GLIDE cosine) betas: computed in float64, stored as float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64).astype(np.float32)


def make_betas(config):
    """float32 betas [num_train_timesteps] from a scheduler config (trained_betas win if given)."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64).astype(np.float32)
        if betas.ndim != 1 or betas.shape[0] != n:
            raise NpdiffError(
                f"trained_betas: expected {n} values (num_train_timesteps), got shape {betas.shape}")
        return betas
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return torch_linspace_float32(config["beta_start"], config["beta_end"], n)
    if schedule == "scaled_linear":
        root_betas = torch_linspace_float32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        return root_betas * root_betas                                   # [n] float32
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise NpdiffError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")


def cumprod_float32(values):
    """torch.cumprod of a float32 CPU tensor: a float64 running product, each output rounded."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def check_schedule_adds_noise(betas, alphas_cumprod):
    """NpdiffError unless every training step's alpha_bar lies strictly inside (0, 1) in float32.

    A beta below ~6e-8 makes 1 - beta round to 1: that step adds no noise, its sigma is 0 and the sigma
    samplers divide by it (log(0), 0/0). A beta of 1 removes all signal: alpha_bar reaches 0 and sigma is
    infinite. Real schedules run from ~1e-4 to ~0.02, so both are a broken config, refused by name.
    """
    if not np.all(np.isfinite(betas)):
        raise NpdiffError("scheduler config: the betas are not all finite numbers")
    if not alphas_cumprod[0] < 1.0:
        raise NpdiffError(f"beta_start: {float(betas[0]):g} adds no noise in float32 (1 - beta rounds to 1, so "
                          "sigma is 0); noise schedules start near 1e-4")
    if not alphas_cumprod[-1] > 0.0:
        raise NpdiffError(f"beta_end: {float(betas[-1]):g} leaves no signal (alpha_bar reaches 0, so sigma is "
                          "infinite); noise schedules end near 0.02")


def training_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) in float32, t = 0 .. T-1 (ascending)."""
    one = np.float32(1.0)
    return np.sqrt((one - alphas_cumprod) / alphas_cumprod)             # [T] float32


# ---------------------------------------------------------------------------------------------
# timestep spacing (diffusers' Table 2 of "Common Diffusion Noise Schedules ... Are Flawed")
# ---------------------------------------------------------------------------------------------

def check_offset_timesteps(timesteps, num_train_timesteps, steps_offset, allowed_past_end=0):
    """NpdiffError when steps_offset pushes "leading" timesteps past the last training step: integer
    schedulers (DDIM/DDPM/PNDM/DPM-Solver) index the schedule with them (allowed_past_end=0); sigma ones
    interpolate and clamp, which is harmless for one timestep (LMS builds its full-length schedule with
    SD's steps_offset 1 at construction, as diffusers does) but makes equal sigmas for two or more."""
    if int(np.sum(np.asarray(timesteps) > num_train_timesteps - 1)) > allowed_past_end:
        raise NpdiffError(f"scheduler config: steps_offset {steps_offset} gives timestep {float(np.max(timesteps)):g}, "
                          f"past the last training step {num_train_timesteps - 1}; SD configs use 0 or 1")
    return timesteps


def spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset, integer):
    """Descending timesteps as DDIM/DDPM (integer=True, int64) or Euler/LMS (integer=False, float32).

    The two families differ only for "linspace": integer schedulers round, sigma schedulers keep the
    fractional timesteps and interpolate sigmas between training steps.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        values = np.linspace(0, T - 1, n)[::-1]                          # [n] float64
        return values.round().astype(np.int64) if integer else values.astype(np.float32)
    if spacing == "leading":
        step_ratio = T // n
        values = (np.arange(0, n) * step_ratio).round()[::-1]            # [n] int64
        values = values.astype(np.int64) if integer else values.astype(np.float32)
        values = values + (values.dtype.type(steps_offset))
        return check_offset_timesteps(values, T, steps_offset, allowed_past_end=0 if integer else 1)
    if spacing == "trailing":
        step_ratio = T / n
        values = np.round(np.arange(T, 0, -step_ratio))                  # [n] float64
        values = values.astype(np.int64) if integer else values.astype(np.float32)
        return values - values.dtype.type(1)
    raise NpdiffError(f"timestep_spacing: expected one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")


# ---------------------------------------------------------------------------------------------
# sigmas for the k-diffusion samplers (Euler, Euler ancestral, LMS, DPM-Solver++ with Karras)
# ---------------------------------------------------------------------------------------------

def sigma_to_t(sigma, log_sigmas):
    """The (fractional) training timestep whose sigma is `sigma`: linear in log-sigma.

    Same arithmetic as diffusers' `_sigma_to_t` (float64, log_sigmas as given).
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]                        # [T, ...]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def sigma_to_t_float32(sigma, log_sigmas):
    """`sigma_to_t` for one float32 sigma, every operation in float32.

    diffusers' DPM2 schedulers pass torch tensors to `_sigma_to_t` for the midpoint timesteps, so
    there the arithmetic stays in float32 (log_sigmas float32, w and t float32)."""
    log_sigmas = np.asarray(log_sigmas, dtype=np.float32)
    log_sigma = np.log(np.maximum(np.float32(sigma), np.float32(1e-10)))
    dists = log_sigma - log_sigmas                                       # [T] float32
    low_idx = min(int(np.cumsum(dists >= 0).argmax()), log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), np.float32(0), np.float32(1))
    return (np.float32(1) - w) * np.float32(low_idx) + w * np.float32(high_idx)


def karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho), descending, float64."""
    ramp = np.linspace(0, 1, num_inference_steps)                       # [n]
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho     # [n] float64


def index_of_timestep(schedule_timesteps, timestep):
    """Positions of `timestep` in the schedule (diffusers compares with ==)."""
    return np.flatnonzero(np.asarray(schedule_timesteps) == timestep)


def exponential_sigmas(sigma_min, sigma_max, num_inference_steps):
    """Sigmas evenly spaced in log(sigma), descending, float64 (diffusers' use_exponential_sigmas)."""
    log_sigmas = np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps)  # [n]
    return np.exp(log_sigmas)                                                              # [n] float64


SIGMA_KINDS = ("karras", "exponential")


def sigma_kind(config):
    """"karras", "exponential" or None: which sigma spacing replaces the timesteps' own sigmas."""
    if config.get("use_karras_sigmas"):
        return "karras"
    if config.get("use_exponential_sigmas"):
        return "exponential"
    return None


def converted_sigmas(kind, in_sigmas, num_inference_steps, log_sigmas, sigma_min=None, sigma_max=None):
    """Karras or exponential sigmas between in_sigmas[-1] and in_sigmas[0] (or the configured sigma_min /
    sigma_max), and the fractional training timesteps they fall on; -> (sigmas [n], timesteps [n]) float64.

    in_sigmas: descending; the k-diffusion samplers pass the sigmas of their inference timesteps, the
    multistep solvers all training sigmas (diffusers does each so)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    if kind == "karras":
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)                  # [n]
    else:
        sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps)             # [n]
    timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])                    # [n]
    return sigmas, timesteps


def multistep_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset, last_timestep=None):
    """The int64 timesteps of the multistep solvers (DPM-Solver++, UniPC, DEIS), descending.

    "linspace" and "leading" space n + 1 points and drop the last (t = 0); last_timestep (DPM-Solver's
    lambda_min_clipped) shortens the range, num_train_timesteps by default."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)           # [n]
    if spacing == "leading":
        step_ratio = last // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)  # [n]
        return check_offset_timesteps(timesteps + steps_offset, T, steps_offset)
    if spacing == "trailing":
        step_ratio = T / n
        return np.arange(last, 0, -step_ratio).round().astype(np.int64) - 1                # [n]
    raise NpdiffError(f"timestep_spacing: expected one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")


def doubled(values):
    """[v0, v1, v1, v2, v2, ...]: every value after the first twice, for the two-stage samplers (Heun,
    DPM2) whose second stage runs at the same schedule position (diffusers' repeat_interleave(2))."""
    values = np.asarray(values)
    return np.concatenate([values[:1], np.repeat(values[1:], 2)])
