"""The part Euler, Euler ancestral and LMS share: a sigma schedule walked by a step index.

These are the k-diffusion samplers. They work with x = x_0 + sigma * noise instead of the DDPM
scaling, so the model input is divided by sqrt(sigma^2 + 1) (`scale_model_input`) and the first
latents are scaled by `init_noise_sigma`. Like diffusers, the current position in the schedule is
a step index found from the first timestep seen, or set with `set_begin_index` (step_index.py).
"""

import numpy as np

from npdiff import backend
from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerBase
from npdiff.schedulers.step_index import StepIndexMixin


class SigmaSchedulerBase(StepIndexMixin, SchedulerBase):
    """Sigmas, timesteps, step index, input scaling and add_noise for the k-diffusion samplers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # 1. training sigmas, high to low, with a final 0 (what diffusers holds before set_timesteps)
        sigmas = schedules.training_sigmas(self.alphas_cumprod)[::-1]                   # [T]
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)]).astype(np.float32)  # [T+1]
        T = self.config["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float64)[::-1].astype(np.float32)  # [T]
        self.reset_step_index()

    # ----------------------------------------------------------------------------- schedule
    def _inference_sigmas(self, num_inference_steps):
        """(timesteps float32 [n], sigmas float64 [n]) before the final sigma is appended."""
        timesteps = schedules.spaced_timesteps(
            self.config["timestep_spacing"], self.config["num_train_timesteps"], num_inference_steps,
            self.config["steps_offset"], integer=False)                                   # [n] float32
        train_sigmas = schedules.training_sigmas(self.alphas_cumprod)                     # [T] float32
        log_sigmas = np.log(train_sigmas)                                                 # [T] float32
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)      # [n] float64
        kind = schedules.sigma_kind(self.config)
        if kind is not None:
            sigmas, timesteps = schedules.converted_sigmas(
                kind, sigmas, num_inference_steps, log_sigmas,
                self.config.get("sigma_min"), self.config.get("sigma_max"))               # [n], [n] float64
        return timesteps, sigmas

    def _final_sigma(self):
        return 0.0

    def set_timesteps(self, num_inference_steps):
        """Choose the n inference timesteps and their sigmas (plus a final sigma, 0 by default)."""
        n = self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas = self._inference_sigmas(n)
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)     # [n+1]
        self.sigmas = sigmas
        self.timesteps = np.asarray(timesteps).astype(np.float32)                       # [n]
        self.reset_step_index()

    @property
    def init_noise_sigma(self):
        """Scale of the first latents: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing."""
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return np.sqrt(max_sigma * max_sigma + np.float32(1.0))

    # ----------------------------------------------------------------------------- model input
    def scale_model_input(self, sample, timestep):
        """sample / sqrt(sigma^2 + 1): the input the UNet was trained on at this noise level."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return scaled_for_model(sample, self.sigmas[self._step_index])

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma_t * noise, sigma_t looked up for each item's timestep."""
        xp = backend.array_module(original_samples)
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = sigmas[self.add_noise_step_indices(timesteps)]                                # [B]
        sigma = xp.asarray(sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1)))         # [B,1,1,1]
        return original_samples + noise * sigma                                              # [B,C,H,W]

    def _x0_from_model_output(self, model_output, sample, sigma, sigma_hat=None):
        """The denoised estimate x_0 for each prediction type (k-diffusion parametrisation)."""
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            sigma_hat = sigma if sigma_hat is None else sigma_hat
            return sample - sigma_hat * model_output
        if prediction_type == "v_prediction":
            sigma_sq_plus_one = sigma * sigma + np.float32(1.0)
            c_out = -sigma / np.sqrt(sigma_sq_plus_one)
            return model_output * c_out + (sample / sigma_sq_plus_one)
        return model_output  # "sample": the model predicts x_0 itself


def scaled_for_model(sample, sigma):
    """sample / sqrt(sigma^2 + 1) (k-diffusion's c_in)."""
    return sample / np.sqrt(sigma * sigma + np.float32(1.0))                              # [B,C,H,W]
