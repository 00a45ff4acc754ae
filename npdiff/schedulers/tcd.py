"""TCDScheduler: trajectory consistency distillation sampling (Zheng et al. 2024, strategic stochastic sampling).

Matches diffusers' TCDScheduler step for step. Like LCM (lcm.py, whose config and distillation
schedule it shares) each step estimates x_0, but instead of jumping to x_0 it moves along the
probability-flow ODE to an intermediate timestep s = floor((1 - gamma) * t_next), then adds fresh
noise to reach t_next:

    x_s       = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat                (the "predicted noised sample")
    x_{t'}    = sqrt(a_{t'} / a_s) x_s + sqrt(1 - a_{t'} / a_s) z,  z ~ N(0, I)

gamma is step()'s `eta` (diffusers' name; 0.3 by default, 0 = deterministic, 1 = like LCM). Noise is
drawn only when eta > 0 and not on the last step, as diffusers does. Note that diffusers'
StableDiffusionPipeline passes its own `eta` (default 0.0) to any step() that takes one, so through
that pipeline TCD is deterministic unless eta is given; npdiff's pipeline does the same.

One difference from LCM's schedule: with original_inference_steps passed to set_timesteps, diffusers'
TCD picks the steps from every training timestep 0 .. T*strength - 1 instead of the distillation
schedule; reproduced here.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.schedulers.base import draw_noise
from npdiff.schedulers.lcm import DistilledSchedulerBase


@dataclass
class TCDSchedulerOutput:
    """`step`'s result: the sample for the next timestep, and x_s (diffusers' names)."""

    prev_sample: Any
    pred_noised_sample: Any = None

    def to_tuple(self):
        return (self.prev_sample, self.pred_noised_sample)

    def __getitem__(self, index):
        return self.to_tuple()[index]


class TCDScheduler(DistilledSchedulerBase):
    """Strategic stochastic sampling: an ODE move to s = (1 - gamma) t_next, then noise up to t_next."""

    def _origin_timesteps(self, original_steps, strength, original_given):
        if original_given:
            # diffusers' TCD: an explicit original_inference_steps selects from all training timesteps
            return np.arange(0, int(self.config["num_train_timesteps"] * strength), dtype=np.int64)   # [m]
        return super()._origin_timesteps(original_steps, strength, original_given)

    def step(self, model_output, timestep, sample, eta=0.3, generator=None):
        """One TCD step from `timestep` to the next timestep of the schedule (eta = the paper's gamma)."""
        timestep = self._begin_step(model_output, timestep, sample)
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not 0 <= eta <= 1:
            raise NpdiffError(f"TCDScheduler.step: eta (gamma) must be in [0, 1], got {eta!r}")

        # 1. the next timestep t' (0 after the last) and the intermediate s = floor((1 - gamma) t'),
        #    a float32 product as in diffusers (a python float times an int64 tensor)
        prev_step_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else 0
        timestep_s = int(np.floor(np.float32(1 - eta) * np.float32(prev_timestep)))

        # 2. alpha_bar at t, t' and s
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_bar(prev_timestep)
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        beta_prod_s = np.float32(1.0) - alpha_prod_s

        # 3. x_0 and noise estimates, and the ODE solution at s
        pred_original_sample, pred_epsilon = self._x0_and_eps(model_output, sample, alpha_prod_t)
        pred_noised_sample = np.sqrt(alpha_prod_s) * pred_original_sample + np.sqrt(beta_prod_s) * pred_epsilon

        # 4. fresh noise from s up to t' (only with gamma > 0, not after the last step)
        prev_sample = pred_noised_sample
        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            noise = draw_noise(model_output.shape, generator, like=model_output)                  # [B,C,H,W]
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_sample = np.sqrt(ratio) * pred_noised_sample + np.sqrt(np.float32(1.0) - ratio) * noise

        self._step_index += 1
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)
