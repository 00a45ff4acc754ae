"""DPMSolverMultistepScheduler: DPM-Solver++ (Lu et al. 2022), the "DPM++ 2M" sampler.

Matches diffusers' DPMSolverMultistepScheduler step for step for algorithm_type "dpmsolver++"
(data prediction), solver_order 1, 2 (the default, "2M") or 3, solver_type "midpoint" or "heun",
with or without Karras sigmas ("DPM++ 2M Karras"), lower_order_final and final_sigmas_type.

Notation: for sigma (the k-diffusion noise level) alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma *
alpha_t, lambda = log(alpha_t) - log(sigma_t) (half log-SNR); h = lambda_next - lambda_now.
Scalars are float32 like diffusers' 0-d torch tensors; log/exp are rounded from float64.
"""

import numpy as np

from npdiff import backend
from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerBase, SchedulerOutput
from npdiff.schedulers.schedules import exp32, log32


class DPMSolverMultistepScheduler(SchedulerBase):
    """Multistep DPM-Solver++: x0 predictions from the last 1-3 steps extrapolated in lambda."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _ONLY = {
        "solver_order": (1, 2, 3),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "thresholding": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None,),
        "rescale_betas_zero_snr": (False,),
        "use_dynamic_shifting": (False,),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # 1. log-SNR per training step (for lambda_min_clipped) and training sigmas
        alpha_t = np.sqrt(self.alphas_cumprod)                                          # [T]
        sigma_t = np.sqrt(np.float32(1.0) - self.alphas_cumprod)                        # [T]
        self.lambda_t = np.log(alpha_t) - np.log(sigma_t)                               # [T]
        self.sigmas = schedules.training_sigmas(self.alphas_cumprod)                    # [T] ascending
        self.init_noise_sigma = 1.0
        T = self.config["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()        # [T]
        self.model_outputs = [None] * self.config["solver_order"]
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------- schedule
    def set_timesteps(self, num_inference_steps):
        """Choose n timesteps (int64) and their sigmas (+ final sigma) as diffusers does."""
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        T = cfg["num_train_timesteps"]

        # 1. timesteps by spacing; DPM-Solver spaces n+1 points and drops the last
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], cfg["lambda_min_clipped"]))
        last_timestep = T - clipped_idx
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
            timesteps = schedules.check_offset_timesteps(timesteps + cfg["steps_offset"], T, cfg["steps_offset"])
        else:  # trailing
            step_ratio = T / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64) - 1

        # 2. sigmas at those timesteps, or Karras sigmas and the timesteps nearest to them
        train_sigmas = schedules.training_sigmas(self.alphas_cumprod)                   # [T] float32
        log_sigmas = np.log(train_sigmas)                                               # [T] float32
        if cfg["use_karras_sigmas"]:
            descending = np.flip(train_sigmas)
            sigmas = schedules.karras_sigmas(descending[-1].item(), descending[0].item(), n)  # [n]
            timesteps = np.array([schedules.sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # [n] float64

        # 3. the final sigma: 0 (fully denoised) or the smallest training sigma
        if cfg["final_sigmas_type"] == "sigma_min":
            alpha_bar_0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((np.float32(1.0) - alpha_bar_0) / alpha_bar_0)
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)        # [n+1]
        self.timesteps = np.asarray(timesteps).astype(np.int64)                         # [n]
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * cfg["solver_order"]
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------- step index
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        """Start at schedule position `begin_index` (img2img), instead of finding it from the timestep."""
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Position of `timestep`; the second match if repeated; the last position if absent (diffusers)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        candidates = schedules.index_of_timestep(schedule, timestep)
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1] if len(candidates) > 1 else candidates[0])

    def _init_step_index(self, timestep):
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(np.asarray(backend.to_numpy(timestep)).item())
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample, timestep=None):
        """DPM-Solver feeds the sample to the model unscaled."""
        return sample

    # ----------------------------------------------------------------------------- solver
    @staticmethod
    def _sigma_to_alpha_sigma_t(sigma):
        alpha_t = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        return alpha_t, sigma * alpha_t

    def _alpha_sigma_lambda(self, index):
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma, log32(alpha) - log32(sigma)

    def convert_model_output(self, model_output, sample):
        """The data prediction x0 that DPM-Solver++ extrapolates."""
        prediction_type = self.config["prediction_type"]
        if prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        if prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output                               # v_prediction

    def dpm_solver_first_order_update(self, model_output, sample):
        """DPM-Solver++(1), i.e. DDIM in lambda: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) x0."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(self._step_index)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp32(-h) - np.float32(1.0))) * model_output

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample):
        """DPM-Solver++(2M): first-order term plus a finite-difference correction D1."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self._step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self._step_index - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (np.float32(1.0) / r0) * (m0 - m1)                               # [B,C,H,W]
        exp_minus_h_minus_1 = exp32(-h) - np.float32(1.0)
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * exp_minus_h_minus_1) * D0
        if self.config["solver_type"] == "midpoint":
            return x_t - (np.float32(0.5) * (alpha_t * exp_minus_h_minus_1)) * D1
        return x_t + (alpha_t * (exp_minus_h_minus_1 / h + np.float32(1.0))) * D1     # heun

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample):
        """DPM-Solver++(3M): adds a second finite difference D2."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self._step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self._step_index - 1)
        _, _, lambda_s2 = self._alpha_sigma_lambda(self._step_index - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        one = np.float32(1.0)
        D0 = m0
        D1_0, D1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)                    # [B,C,H,W]
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (one / (r0 + r1)) * (D1_0 - D1_1)
        exp_minus_h_minus_1 = exp32(-h) - one
        return ((sigma_t / sigma_s0) * sample
                - (alpha_t * exp_minus_h_minus_1) * D0
                + (alpha_t * (exp_minus_h_minus_1 / h + one)) * D1
                - (alpha_t * ((exp_minus_h_minus_1 + h) / (h * h) - np.float32(0.5))) * D2)

    def step(self, model_output, timestep, sample, generator=None):
        """One multistep update. Returns prev_sample only (diffusers gives no pred_original_sample)."""
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n = len(self.timesteps)

        # 1. near the end, fall back to lower orders (stabler for few steps; needed for sigma 0)
        lower_order_final = (self._step_index == n - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero")
        lower_order_second = (self._step_index == n - 2) and cfg["lower_order_final"] and n < 15

        # 2. convert to a data prediction and push it on the history
        model_output = self.convert_model_output(model_output, sample)
        for i in range(cfg["solver_order"] - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

        # 3. the update of the order the history allows
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample)
        elif cfg["solver_order"] == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample)

        if self.lower_order_nums < cfg["solver_order"]:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x = alpha_t x_0 + sigma_t noise at each item's timestep (VP form of the sigma schedule)."""
        xp = backend.array_module(original_samples)
        timesteps = np.asarray(backend.to_numpy(timesteps)).reshape(-1)
        if self._begin_index is None:
            step_indices = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            step_indices = [self._step_index] * timesteps.shape[0]
        else:
            step_indices = [self._begin_index] * timesteps.shape[0]
        sigma = self.sigmas.astype(original_samples.dtype)[step_indices]                   # [B]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)                             # [B], [B]
        expand = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha_t = xp.asarray(alpha_t.reshape(expand))                                      # [B,1,1,1]
        sigma_t = xp.asarray(sigma_t.reshape(expand))                                      # [B,1,1,1]
        return alpha_t * original_samples + sigma_t * noise                                # [B,C,H,W]
