"""HeunDiscreteScheduler: Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1).

Matches diffusers' HeunDiscreteScheduler step for step. Each step from sigma_i to sigma_{i+1} takes two
model evaluations: an Euler step to sigma_{i+1}, then the model at that point, and the average of
both derivatives applied from sigma_i (the trapezoidal rule). As in diffusers, the pipeline loop
does not change: the schedule lists every timestep after the first twice,

    timesteps = [t0, t1, t1, t2, t2, ...]   sigmas = [s0, s1, s1, s2, s2, ..., 0]   (2n-1 and 2n values)

and `step` alternates between the two stages (the first stage keeps sample, derivative and dt for the
second). `order = 2`, so img2img starts at set_begin_index(2 * t_start). The final step from the last
sigma to 0 is a single Euler step. Deterministic: no noise is drawn.
"""

import numpy as np

from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerOutput
from npdiff.schedulers.sigma_base import SigmaSchedulerBase


class HeunDiscreteScheduler(SigmaSchedulerBase):
    """Heun steps: x_{i+1} = x_i + (d_i + d'_{i+1}) / 2 * (sigma_{i+1} - sigma_i)."""

    order = 2
    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _ONLY = {"use_beta_sigmas": (False,)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # diffusers builds the full-length schedule at construction
        self.set_timesteps(self.config["num_train_timesteps"])

    def set_timesteps(self, num_inference_steps):
        """n timesteps and sigmas as Euler's, then every one after the first doubled (2n-1 timesteps)."""
        n = self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas = self._inference_sigmas(n)                                   # [n], [n]
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)                     # [n+1]
        self.sigmas = np.concatenate([schedules.doubled(sigmas[:-1]), sigmas[-1:]])     # [2n]
        self.timesteps = schedules.doubled(np.asarray(timesteps).astype(np.float32))    # [2n-1]
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self.reset_step_index()

    @property
    def state_in_first_order(self):
        """True when the next step is the first (Euler) stage of a Heun step."""
        return self.dt is None

    def step(self, model_output, timestep, sample, generator=None):
        """One stage of a Heun step; returns prev_sample and pred_original_sample (generator unused)."""
        self._begin_step(model_output, timestep, sample)
        first_stage = self.state_in_first_order

        # 1. the interval [sigma, sigma_next] of this Heun step; the model ran at sigma (first stage)
        #    or at sigma_next (second stage)
        if first_stage:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]
        sigma_input = sigma if first_stage else sigma_next

        # 2. denoised estimate x_0 at the model's sigma, optionally clipped
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma_input)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = pred_original_sample.clip(-limit, limit)              # [B,C,H,W]

        # 3. first stage: Euler step to sigma_next, remembered; second stage: the averaged derivative
        #    applied from the first stage's sample
        if first_stage:
            derivative = (sample - pred_original_sample) / sigma                        # [B,C,H,W]
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (sample - pred_original_sample) / sigma_next                   # [B,C,H,W]
            derivative = (self.prev_derivative + derivative) / np.float32(2.0)          # [B,C,H,W]
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None
        prev_sample = sample + derivative * dt                                          # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
