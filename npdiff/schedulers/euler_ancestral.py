"""EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise up to sigma_to.

Matches diffusers' EulerAncestralDiscreteScheduler step for step, including the noise: every step
(the last one too, where sigma_up = 0) draws one standard normal of the model output's shape from
the generator, so a TorchGenerator seeded like torch.Generator().manual_seed(seed) stays in step.
"""

import numpy as np

from npdiff.schedulers.base import SchedulerOutput, draw_noise
from npdiff.schedulers.sigma_base import SigmaSchedulerBase


class EulerAncestralDiscreteScheduler(SigmaSchedulerBase):
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral, eta = 1)."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _PREDICTION_TYPES = ("epsilon", "v_prediction")
    _ONLY = {"rescale_betas_zero_snr": (False,)}

    def step(self, model_output, timestep, sample, generator=None):
        """One ancestral step from sigmas[i] to sigmas[i+1]; returns prev_sample and pred_original_sample."""
        self._begin_step(model_output, timestep, sample)
        sigma = self.sigmas[self._step_index]

        # 1. denoised estimate x_0 from the model output
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma)

        # 2. split the move to sigma_to into a deterministic part (down) and fresh noise (up):
        #    sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2, sigma_down^2 = sigma_to^2 - sigma_up^2
        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_from_sq = sigma_from * sigma_from
        sigma_to_sq = sigma_to * sigma_to
        sigma_up = np.sqrt(sigma_to_sq * (sigma_from_sq - sigma_to_sq) / sigma_from_sq)
        # sigma_to^2 - sigma_up^2 = sigma_to^4 / sigma_from^2 can round a hair below 0 when sigma_from is
        # huge (cosine schedule, t near T): clamp at 0 where diffusers would return NaN
        sigma_down = np.sqrt(max(sigma_to_sq - sigma_up * sigma_up, np.float32(0.0)))

        # 3. Euler step to sigma_down
        derivative = (sample - pred_original_sample) / sigma                          # [B,C,H,W]
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt                                        # [B,C,H,W]

        # 4. add noise of size sigma_up (drawn at every step, as diffusers does)
        noise = draw_noise(model_output.shape, generator, like=model_output)          # [B,C,H,W]
        prev_sample = prev_sample + noise * sigma_up                                  # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
