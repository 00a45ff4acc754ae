"""LCMScheduler: multistep sampling of latent consistency models (Luo et al. 2023, algorithm 3).

Matches diffusers' LCMScheduler step for step. A consistency model maps any noisy x_t straight to
a clean estimate; sampling alternates "denoise" and "noise again to the next timestep":

    x0_hat    = the model's x_0 estimate at t (epsilon / sample / v parametrisation)
    denoised  = c_out(t) * x0_hat + c_skip(t) * x_t         (the consistency boundary condition)
    x_{t'}    = sqrt(a_{t'}) * denoised + sqrt(1 - a_{t'}) * z,  z ~ N(0, I)   (not after the last step)

Timesteps come from the distillation schedule: the `original_inference_steps` (50) timesteps
k-1, 2k-1, ..., T-1 (k = T // original_inference_steps) that the model was distilled on, from which
`num_inference_steps` are taken evenly by index, highest first (timestep_spacing and steps_offset are
config keys diffusers keeps but does not use here). Noise is drawn from the generator at every step
but the last, as diffusers does, so a TorchGenerator seeded like a CPU torch.Generator stays in step.

`DistilledSchedulerBase` holds what LCM and TCD (tcd.py) share: config, schedule, step index, add_noise.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.schedulers.base import SchedulerBase, draw_noise
from npdiff.schedulers.step_index import StepIndexMixin, as_scalar

SIGMA_DATA = np.float32(0.5)   # the data standard deviation of the consistency boundary condition


@dataclass
class LCMSchedulerOutput:
    """`step`'s result: the sample for the next timestep, and the denoised estimate (diffusers' names)."""

    prev_sample: Any
    denoised: Any = None

    def to_tuple(self):
        return (self.prev_sample, self.denoised)

    def __getitem__(self, index):
        return self.to_tuple()[index]


class DistilledSchedulerBase(StepIndexMixin, SchedulerBase):
    """Config, distillation timestep schedule, step index and add_noise shared by LCM and TCD."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    _ONLY = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # the "previous" alpha_bar after the last step: 1 (fully denoised) or alpha_bar_0
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        T = self.config["num_train_timesteps"]
        self.timesteps = np.arange(0, T)[::-1].astype(np.int64)                           # [T]
        self.custom_timesteps = False
        self.reset_step_index()

    def _check_config(self):
        super()._check_config()
        cfg, name = self.config, type(self).__name__
        steps = cfg["original_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
                or not 1 <= steps <= cfg["num_train_timesteps"]:
            raise NpdiffError(f"{name}: original_inference_steps must be an integer in [1, num_train_timesteps="
                              f"{cfg['num_train_timesteps']}], got {steps!r}")
        scaling = cfg["timestep_scaling"]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.number)) \
                or not math.isfinite(scaling) or scaling <= 0:
            raise NpdiffError(f"{name}: timestep_scaling must be a finite number > 0, got {scaling!r}")
        for key in ("clip_sample", "set_alpha_to_one"):
            if not isinstance(cfg[key], (bool, np.bool_)):
                raise NpdiffError(f"{name}: {key} must be true or false, got {cfg[key]!r}")

    def scale_model_input(self, sample, timestep=None):
        """Consistency models take the sample unscaled."""
        return sample

    # ----------------------------------------------------------------------------- schedule
    def _origin_timesteps(self, original_steps, strength, original_given):
        """The distillation schedule k-1, 2k-1, ... (ascending), cut to the first original_steps * strength."""
        k = self.config["num_train_timesteps"] // original_steps
        return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1      # [m]

    def set_timesteps(self, num_inference_steps=None, *, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        """Choose the inference timesteps (int64, descending) from the distillation schedule.

        num_inference_steps: how many of the original_inference_steps timesteps to use (evenly by index);
        timesteps: a custom descending list instead (then num_inference_steps must be None);
        strength: img2img in the consistency pipelines: the schedule covers only the first
                  original_inference_steps * strength timesteps (custom timesteps: the last part).
        """
        T = self.config["num_train_timesteps"]
        name = type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise NpdiffError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
                or not 0 < strength <= 1:
            raise NpdiffError(f"{name}.set_timesteps: strength must be in (0, 1], got {strength!r}")
        original_given = original_inference_steps is not None
        original_steps = original_inference_steps if original_given else self.config["original_inference_steps"]
        if isinstance(original_steps, bool) or not isinstance(original_steps, (int, np.integer)) \
                or not 1 <= original_steps <= T:
            raise NpdiffError(f"{name}.set_timesteps: original_inference_steps must be an integer in "
                              f"[1, num_train_timesteps={T}], got {original_steps!r}")
        # 1. the distillation schedule, ascending
        origin = self._origin_timesteps(int(original_steps), strength, original_given)      # [m]

        if timesteps is not None:
            # 2a. custom timesteps: descending integers below T; img2img keeps the last part (diffusers only
            #     warns about timesteps off the distillation schedule; they are accepted here too)
            timesteps = np.asarray(timesteps)
            if timesteps.ndim != 1 or len(timesteps) == 0 or timesteps.dtype.kind not in "iu":
                raise NpdiffError(f"{name}.set_timesteps: timesteps must be a non-empty list of integers, "
                                  f"got {timesteps.tolist()!r}")
            if np.any(np.diff(timesteps) >= 0):
                raise NpdiffError(f"{name}.set_timesteps: timesteps must be in descending order, "
                                  f"got {timesteps.tolist()}")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise NpdiffError(f"{name}.set_timesteps: timesteps must lie in [0, {T}), got {timesteps.tolist()}")
            timesteps = timesteps.astype(np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            t_start = max(self.num_inference_steps - init_timestep, 0)
            timesteps = timesteps[t_start * self.order:]
        else:
            # 2b. num_inference_steps of them, evenly spaced by index from the highest
            n = self._check_num_inference_steps(num_inference_steps)
            if len(origin) // n < 1:
                raise NpdiffError(f"{name}.set_timesteps: num_inference_steps={n} is more than "
                                  f"original_inference_steps x strength = {original_steps} x {strength} "
                                  f"= {len(origin)} timesteps; use at most {len(origin)} steps")
            if n > original_steps:
                raise NpdiffError(f"{name}.set_timesteps: num_inference_steps={n} cannot be larger than "
                                  f"original_inference_steps={original_steps}")
            self.num_inference_steps = n
            descending = origin[::-1]                                                        # [m]
            indices = np.floor(np.linspace(0, len(descending), num=n, endpoint=False)).astype(np.int64)
            timesteps = descending[indices]                                                  # [n]

        self.timesteps = np.ascontiguousarray(timesteps, dtype=np.int64)
        self.reset_step_index()

    # ----------------------------------------------------------------------------- shared maths
    def _alpha_bar(self, timestep):
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def _begin_step(self, model_output, timestep, sample):
        """Checks, and the step index (found from the timestep on the first step); -> the timestep as int."""
        self._require_timesteps()
        timestep = int(as_scalar(timestep))
        super()._begin_step(model_output, timestep, sample)
        return timestep

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self._alpha_noise_add(original_samples, noise, timesteps)


class LCMScheduler(DistilledSchedulerBase):
    """Latent consistency sampling: denoise to the boundary condition, then noise to the next timestep."""

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) at a discrete timestep, float32 as diffusers computes them from a timestep tensor:

        c_skip = sigma_data^2 / ((t s)^2 + sigma_data^2),  c_out = t s / sqrt((t s)^2 + sigma_data^2),
        s = timestep_scaling (large, so c_skip ~ 0 and c_out ~ 1 except at t = 0).
        """
        scaled_timestep = np.float32(timestep) * np.float32(self.config["timestep_scaling"])
        denominator = scaled_timestep * scaled_timestep + SIGMA_DATA * SIGMA_DATA
        c_skip = SIGMA_DATA * SIGMA_DATA / denominator
        c_out = scaled_timestep / np.sqrt(denominator)
        return c_skip, c_out

    def step(self, model_output, timestep, sample, generator=None):
        """One LCM step from `timestep` to the next timestep of the schedule."""
        timestep = self._begin_step(model_output, timestep, sample)

        # 1. the next timestep of the schedule (the last step stays at its own timestep)
        prev_step_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else timestep

        # 2. alpha_bar at t and at the next timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_bar(prev_timestep)
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev

        # 3. boundary-condition scalings
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)

        # 4. the model's x_0 estimate, clipped for pixel-space models
        pred_original_sample, _ = self._x0_and_eps(model_output, sample, alpha_prod_t)
        if self.config["clip_sample"]:
            xp = backend.array_module(sample)
            limit = self.config["clip_sample_range"]
            pred_original_sample = xp.clip(pred_original_sample, -limit, limit)

        # 5. the consistency model's output: denoised = c_out x0 + c_skip x_t
        denoised = c_out * pred_original_sample + c_skip * sample                              # [B,C,H,W]

        # 6. noise to the next timestep with fresh noise (not after the last step)
        if self._step_index != self.num_inference_steps - 1:
            noise = draw_noise(model_output.shape, generator, like=model_output)               # [B,C,H,W]
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
