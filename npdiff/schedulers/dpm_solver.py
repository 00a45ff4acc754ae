"""DPMSolverMultistepScheduler: DPM-Solver++ (Lu et al. 2022), the "DPM++ 2M" sampler.

Matches diffusers' DPMSolverMultistepScheduler step for step for algorithm_type "dpmsolver++"
(data prediction) and "sde-dpmsolver++" ("DPM++ 2M SDE": the same extrapolation with e^-h damping
and fresh noise every step), solver_order 1, 2 (the default, "2M") or 3, solver_type "midpoint" or
"heun", Karras or exponential sigmas ("DPM++ 2M Karras"), lower_order_final and final_sigmas_type.
The schedule, history and add_noise are multistep_base.py's.

Notation: for sigma (the k-diffusion noise level) alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma *
alpha_t, lambda = log(alpha_t) - log(sigma_t) (half log-SNR); h = lambda_next - lambda_now.
Scalars are float32 like diffusers' 0-d torch tensors; log/exp are rounded from float64.
"""

import numpy as np

from npdiff.schedulers.base import SchedulerOutput, draw_noise
from npdiff.schedulers.multistep_base import MultistepSchedulerBase
from npdiff.schedulers.schedules import exp32


class DPMSolverMultistepScheduler(MultistepSchedulerBase):
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
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_type": ("midpoint", "heun"),
        "thresholding": (False,),
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
        # 1. half log-SNR per training step, for lambda_min_clipped
        alpha_t = np.sqrt(self.alphas_cumprod)                                          # [T]
        sigma_t = np.sqrt(np.float32(1.0) - self.alphas_cumprod)                        # [T]
        self.lambda_t = np.log(alpha_t) - np.log(sigma_t)                               # [T]

    # ----------------------------------------------------------------------------- schedule
    def _last_timestep(self):
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], self.config["lambda_min_clipped"]))
        return self.config["num_train_timesteps"] - clipped_idx

    def _round_converted_timesteps(self, kind):
        return kind == "karras" and self.config["beta_schedule"] != "squaredcos_cap_v2"

    def _final_sigma(self, sigmas, kind):
        return self._training_sigma_zero() if self.config["final_sigmas_type"] == "sigma_min" else 0.0

    # ----------------------------------------------------------------------------- solver
    def convert_model_output(self, model_output, sample):
        """The data prediction x0 that DPM-Solver++ extrapolates."""
        return self._data_prediction(model_output, sample)

    def dpm_solver_first_order_update(self, model_output, sample, noise=None):
        """DPM-Solver++(1), i.e. DDIM in lambda: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) x0;
        the SDE variant: x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) x0 + sigma_t sqrt(1 - e^-2h) z."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(self._step_index)
        h = lambda_t - lambda_s
        if noise is None:
            return (sigma_t / sigma_s) * sample - (alpha_t * (exp32(-h) - np.float32(1.0))) * model_output
        one_minus_exp_2h = np.float32(1.0) - exp32(np.float32(-2.0) * h)
        return ((sigma_t / sigma_s * exp32(-h)) * sample
                + (alpha_t * one_minus_exp_2h) * model_output
                + (sigma_t * np.sqrt(one_minus_exp_2h)) * noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample, noise=None):
        """DPM-Solver++(2M): first-order term plus a finite-difference correction D1 (SDE: plus noise)."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self._step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self._step_index - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (np.float32(1.0) / r0) * (m0 - m1)                               # [B,C,H,W]
        midpoint = self.config["solver_type"] == "midpoint"
        if noise is None:
            exp_minus_h_minus_1 = exp32(-h) - np.float32(1.0)
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * exp_minus_h_minus_1) * D0
            if midpoint:
                return x_t - (np.float32(0.5) * (alpha_t * exp_minus_h_minus_1)) * D1
            return x_t + (alpha_t * (exp_minus_h_minus_1 / h + np.float32(1.0))) * D1  # heun
        one_minus_exp_2h = np.float32(1.0) - exp32(np.float32(-2.0) * h)
        x_t = (sigma_t / sigma_s0 * exp32(-h)) * sample + (alpha_t * one_minus_exp_2h) * D0
        if midpoint:
            x_t = x_t + (np.float32(0.5) * (alpha_t * one_minus_exp_2h)) * D1
        else:
            x_t = x_t + (alpha_t * (one_minus_exp_2h / (np.float32(-2.0) * h) + np.float32(1.0))) * D1
        return x_t + (sigma_t * np.sqrt(one_minus_exp_2h)) * noise

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample, noise=None):
        """DPM-Solver++(3M): adds a second finite difference D2 (SDE: plus noise)."""
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
        if noise is None:
            exp_minus_h_minus_1 = exp32(-h) - one
            return ((sigma_t / sigma_s0) * sample
                    - (alpha_t * exp_minus_h_minus_1) * D0
                    + (alpha_t * (exp_minus_h_minus_1 / h + one)) * D1
                    - (alpha_t * ((exp_minus_h_minus_1 + h) / (h * h) - np.float32(0.5))) * D2)
        two_h = np.float32(2.0) * h
        one_minus_exp_2h = one - exp32(np.float32(-2.0) * h)
        return ((sigma_t / sigma_s0 * exp32(-h)) * sample
                + (alpha_t * one_minus_exp_2h) * D0
                + (alpha_t * (one_minus_exp_2h / (-two_h) + one)) * D1
                + (alpha_t * ((one_minus_exp_2h - two_h) / (two_h * two_h) - np.float32(0.5))) * D2
                + (sigma_t * np.sqrt(one_minus_exp_2h)) * noise)

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None):
        """One multistep update. Returns prev_sample only (diffusers gives no pred_original_sample).

        sde-dpmsolver++ draws one standard normal of the model output's shape from `generator` at every
        step (or takes `variance_noise`), where diffusers draws it."""
        self._begin_step(model_output, timestep, sample)
        cfg = self.config
        n = len(self.timesteps)

        # 1. near the end, fall back to lower orders (stabler for few steps; needed for sigma 0)
        lower_order_final = (self._step_index == n - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero")
        lower_order_second = (self._step_index == n - 2) and cfg["lower_order_final"] and n < 15

        # 2. convert to a data prediction and push it on the history
        model_output = self.convert_model_output(model_output, sample)
        self._push_model_output(model_output)

        # 3. the SDE variant's noise for this step
        noise = None
        if cfg["algorithm_type"] == "sde-dpmsolver++":
            if variance_noise is None:
                noise = draw_noise(model_output.shape, generator, like=model_output)      # [B,C,H,W]
            else:
                self._check_step_inputs(variance_noise, sample)
                noise = variance_noise

        # 4. the update of the order the history allows
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample, noise)
        elif cfg["solver_order"] == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample, noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample, noise)

        self._end_step()
        return SchedulerOutput(prev_sample=prev_sample)
