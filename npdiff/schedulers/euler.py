"""EulerDiscreteScheduler: Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2).

Matches diffusers' EulerDiscreteScheduler step for step: linear sigma interpolation between training
timesteps, optional Karras sigmas, final sigma 0 or sigma_min, and the optional "churn" that adds
noise before a step (s_churn > 0, noise from the generator exactly where diffusers draws it).
"""

import numpy as np

from npdiff.schedulers.base import SchedulerOutput, draw_noise
from npdiff.schedulers.sigma_base import SigmaSchedulerBase


class EulerDiscreteScheduler(SigmaSchedulerBase):
    """x_{i+1} = x_i + (x_i - x0_hat) / sigma_hat * (sigma_{i+1} - sigma_hat)."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    _ONLY = {
        "interpolation_type": ("linear",),
        "use_beta_sigmas": (False,),
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def _final_sigma(self):
        if self.config["final_sigmas_type"] == "sigma_min":
            alpha_bar_0 = self.alphas_cumprod[0]
            return np.sqrt((np.float32(1.0) - alpha_bar_0) / alpha_bar_0)
        return 0.0

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
             s_noise=1.0, generator=None):
        """One Euler step from sigma_i to sigma_{i+1}; returns prev_sample and pred_original_sample."""
        self._begin_step(model_output, timestep, sample)
        sigma = self.sigmas[self._step_index]

        # 1. churn: raise the noise level to sigma_hat = sigma * (1 + gamma) with fresh noise
        if s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        else:
            gamma = 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            noise = draw_noise(model_output.shape, generator, like=model_output)       # [B,C,H,W]
            eps = noise * np.float32(s_noise)
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)

        # 2. denoised estimate x_0 from the model output
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma, sigma_hat)

        # 3. ODE derivative dx/dsigma and one Euler step to the next sigma
        derivative = (sample - pred_original_sample) / sigma_hat                      # [B,C,H,W]
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt                                        # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

