"""DDPMScheduler: ancestral sampling of denoising diffusion probabilistic models (Ho et al. 2020).

Matches diffusers' DDPMScheduler step for step, with the posterior mean of formula (7) and the
variance types "fixed_small" (beta tilde, what SD's DDPM config uses), "fixed_small_log" and
"fixed_large" (beta). Every step with t > 0 draws one standard normal of the model output's shape
from the generator, as diffusers does.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.schedulers import schedules
from npdiff.schedulers.base import IntegerTimestepScheduler, SchedulerOutput, draw_noise


class DDPMScheduler(IntegerTimestepScheduler):
    """x_{t-1} = c0 * x0_hat + ct * x_t + sqrt(variance) * z."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _ONLY = {
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.one = np.float32(1.0)

    def previous_timestep(self, timestep):
        """The next timestep of the schedule after `timestep` (-1 after the last one)."""
        if self.num_inference_steps:
            matches = schedules.index_of_timestep(self.timesteps, timestep)
            if len(matches) == 0:
                raise NpdiffError(f"timestep {timestep} is not in the scheduler's timesteps "
                                  f"{self.timesteps.tolist()[:4]}...; pass one of scheduler.timesteps")
            index = int(matches[0])
            return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])
        return timestep - 1

    def _get_variance(self, t):
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = np.float32(1.0) - alpha_prod_t / alpha_prod_t_prev
        # beta tilde_t of formula (7), kept away from 0 so its log exists
        variance = (np.float32(1.0) - alpha_prod_t_prev) / (np.float32(1.0) - alpha_prod_t) * current_beta_t
        variance = max(variance, np.float32(1e-20))
        variance_type = self.config["variance_type"]
        if variance_type == "fixed_small_log":
            return schedules.exp32(np.float32(0.5) * schedules.log32(variance))   # a standard deviation
        if variance_type == "fixed_large":
            return current_beta_t
        return variance

    def step(self, model_output, timestep, sample, generator=None):
        """One DDPM step from `timestep` to the previous timestep of the schedule."""
        self._check_step_inputs(model_output, sample)
        t = int(backend.to_numpy(timestep))
        prev_t = self.previous_timestep(t)

        # 1. alpha_bar and beta_bar at t and t_prev; the one-step alpha/beta between them
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = np.float32(1.0) - current_alpha_t

        # 2. predicted x_0, formula (15)
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif prediction_type == "sample":
            pred_original_sample = model_output
        else:  # v_prediction
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output

        # 3. clip x_0 (pixel-space models)
        xp = backend.array_module(sample)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = xp.clip(pred_original_sample, -limit, limit)

        # 4. posterior mean mu_t(x_t, x_0), formula (7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        current_sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 5. add noise (not at t = 0)
        if t > 0:
            variance_noise = draw_noise(model_output.shape, generator, like=model_output)  # [B,C,H,W]
            if self.config["variance_type"] == "fixed_small_log":
                std = self._get_variance(t)
            else:
                std = np.sqrt(self._get_variance(t))
            pred_prev_sample = pred_prev_sample + std * variance_noise                     # [B,C,H,W]

        return SchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self._alpha_noise_add(original_samples, noise, timesteps)
