"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2020, eq. 12).

Matches diffusers' DDIMScheduler step for step. eta = 0 is the deterministic DDIM sampler; eta > 0
adds noise with standard deviation eta * sigma_t, drawn from the generator with the model output's
shape, only when eta > 0 (as diffusers does, so seeded generators stay in step).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.schedulers.base import IntegerTimestepScheduler, SchedulerOutput, draw_noise


class DDIMScheduler(IntegerTimestepScheduler):
    """x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    _ONLY = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # the "previous" alpha_bar of the last step: 1 (fully denoised) or alpha_bar_0
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _alpha_bar(self, timestep):
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep, prev_timestep):
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_bar(prev_timestep)
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (np.float32(1.0) - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
             generator=None, variance_noise=None):
        """One DDIM step from `timestep` to the previous inference timestep."""
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if eta < 0:
            raise NpdiffError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        if variance_noise is not None and generator is not None:
            raise NpdiffError("step: pass either generator or variance_noise, not both")
        timestep = int(backend.to_numpy(timestep))

        # 1. previous timestep (t - T/n) and the alpha_bar products at t and t_prev
        prev_timestep = timestep - self.config["num_train_timesteps"] // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_bar(prev_timestep)
        sqrt_alpha_t = np.sqrt(alpha_prod_t)
        sqrt_beta_t = np.sqrt(np.float32(1.0) - alpha_prod_t)

        # 2. predicted x_0 and predicted noise ("predicted x_0" of formula (12))
        pred_original_sample, pred_epsilon = self._x0_and_eps(model_output, sample, alpha_prod_t)

        # 3. clip x_0 (pixel-space models; SD's configs set clip_sample False)
        xp = backend.array_module(sample)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = xp.clip(pred_original_sample, -limit, limit)

        # 4. sigma_t = eta * sqrt(variance), formula (16)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = np.float32(eta) * np.sqrt(variance)
        if use_clipped_model_output:
            pred_epsilon = (sample - sqrt_alpha_t * pred_original_sample) / sqrt_beta_t

        # 5. "direction pointing to x_t" and x_{t-1} without noise, formula (12)
        # 1 - a_prev - sigma_t^2 >= 0 exactly, but with eta = 1 near t = T of the cosine schedule it is
        # ~1e-13 and can round below 0: clamp at 0 where diffusers would return NaN
        direction_sq = np.float32(1.0) - alpha_prod_t_prev - std_dev_t * std_dev_t
        direction_coeff = np.sqrt(max(direction_sq, np.float32(0.0)))
        pred_sample_direction = direction_coeff * pred_epsilon                          # [B,C,H,W]
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        # 6. noise of size sigma_t (only when eta > 0)
        if eta > 0:
            if variance_noise is None:
                variance_noise = draw_noise(model_output.shape, generator, like=model_output)
            prev_sample = prev_sample + std_dev_t * variance_noise                     # [B,C,H,W]

        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self._alpha_noise_add(original_samples, noise, timesteps)
