"""What the multistep solvers share (DPM-Solver++ in dpm_solver.py, UniPC in unipc.py, DEIS in deis.py).

They step the VP form x_t = alpha_t x_0 + sigma_t eps with integer timesteps and unscaled model input,
keep the last `solver_order` converted model outputs, and work in the half log-SNR
lambda = log(alpha_t) - log(sigma_t). The schedule is kept as k-diffusion sigmas (sigma = sigma_t /
alpha_t) with one final sigma appended:

    alpha_t = 1 / sqrt(sigma^2 + 1),  sigma_t = sigma * alpha_t.

Their timesteps space n + 1 points and drop t = 0 ("linspace", "leading"); Karras or exponential
sigmas span all training sigmas and take the timesteps nearest to them. Scalars are float32 like
diffusers' 0-d torch tensors; log/exp are rounded from float64.
"""

import numpy as np

from npdiff import backend
from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerBase
from npdiff.schedulers.schedules import log32
from npdiff.schedulers.step_index import StepIndexMixin


class MultistepSchedulerBase(StepIndexMixin, SchedulerBase):
    """Schedule, model-output history, alpha/sigma/lambda and add_noise of the multistep solvers."""

    # diffusers' multistep solvers take the last position for a timestep that is not in the schedule
    ABSENT_TIMESTEP_IS_LAST = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # 1. training sigmas (ascending) and the full schedule, until set_timesteps
        self.sigmas = schedules.training_sigmas(self.alphas_cumprod)                    # [T] ascending
        self.init_noise_sigma = 1.0
        T = self.config["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()        # [T]
        self._reset_history()
        self.reset_step_index()

    def _reset_history(self):
        self.model_outputs = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    # ----------------------------------------------------------------------------- schedule
    def _last_timestep(self):
        """One past the highest timestep the spacing may use (DPM-Solver clips it by lambda)."""
        return self.config["num_train_timesteps"]

    def _round_converted_timesteps(self, kind):
        """Whether Karras / exponential timesteps are rounded before the cast to int64 (else truncated)."""
        return kind == "karras"

    def _final_sigma(self, sigmas, kind):
        """The sigma after the last step: 0 (fully denoised) by default; subclasses follow their config."""
        return 0.0

    def _training_sigma_zero(self):
        """The smallest training sigma, sqrt((1 - alpha_bar_0) / alpha_bar_0), float32."""
        alpha_bar_0 = self.alphas_cumprod[0]
        return np.sqrt((np.float32(1.0) - alpha_bar_0) / alpha_bar_0)

    def set_timesteps(self, num_inference_steps):
        """Choose n timesteps (int64) and their sigmas (+ final sigma) as diffusers does."""
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config

        # 1. timesteps by spacing
        timesteps = schedules.multistep_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n,
                                                  cfg["steps_offset"], self._last_timestep())   # [n] int64

        # 2. sigmas at those timesteps, or Karras / exponential sigmas and the timesteps nearest to them
        train_sigmas = schedules.training_sigmas(self.alphas_cumprod)                   # [T] float32
        log_sigmas = np.log(train_sigmas)                                               # [T] float32
        kind = schedules.sigma_kind(cfg)
        if kind is not None:
            sigmas, timesteps = schedules.converted_sigmas(
                kind, np.flip(train_sigmas), n, log_sigmas, cfg.get("sigma_min"), cfg.get("sigma_max"))
            if self._round_converted_timesteps(kind):
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # [n] float64

        # 3. the final sigma appended
        sigma_last = self._final_sigma(sigmas, kind)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)        # [n+1]
        self.timesteps = np.asarray(timesteps).astype(np.int64)                         # [n]
        self.num_inference_steps = len(self.timesteps)
        self._reset_history()
        self.reset_step_index()

    def scale_model_input(self, sample, timestep=None):
        """The multistep solvers feed the sample to the model unscaled."""
        return sample

    def _begin_step(self, model_output, timestep, sample):
        """set_timesteps must have run; then the checks and step index of every scheduler."""
        self._require_timesteps()
        super()._begin_step(model_output, timestep, sample)

    def _push_model_output(self, converted):
        """Shift the history by one and put the newest converted model output last."""
        for i in range(self.config["solver_order"] - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = converted

    def _end_step(self):
        if self.lower_order_nums < self.config["solver_order"]:
            self.lower_order_nums += 1
        self._step_index += 1

    # ----------------------------------------------------------------------------- VP quantities
    @staticmethod
    def _sigma_to_alpha_sigma_t(sigma):
        alpha_t = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        return alpha_t, sigma * alpha_t

    def _alpha_sigma_lambda(self, index):
        """alpha_t, sigma_t and lambda = log(alpha_t) - log(sigma_t) at schedule position `index`."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma, log32(alpha) - log32(sigma)

    def _data_prediction(self, model_output, sample):
        """x0 from the model output at the current sigma (epsilon, v_prediction or sample)."""
        prediction_type = self.config["prediction_type"]
        if prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        if prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t                          # [B,C,H,W]
        return alpha_t * sample - sigma_t * model_output                               # v_prediction

    def add_noise(self, original_samples, noise, timesteps):
        """x = alpha_t x_0 + sigma_t noise at each item's timestep (VP form of the sigma schedule)."""
        xp = backend.array_module(original_samples)
        sigma = self.sigmas.astype(original_samples.dtype)[self.add_noise_step_indices(timesteps)]  # [B]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)                             # [B], [B]
        expand = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha_t = xp.asarray(alpha_t.reshape(expand))                                      # [B,1,1,1]
        sigma_t = xp.asarray(sigma_t.reshape(expand))                                      # [B,1,1,1]
        return alpha_t * original_samples + sigma_t * noise                                # [B,C,H,W]
