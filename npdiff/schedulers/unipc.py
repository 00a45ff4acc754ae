"""UniPCMultistepScheduler: the unified predictor-corrector of Zhao et al. 2023 ("UniPC").

Matches diffusers' UniPCMultistepScheduler step for step: predict_x0 (data prediction, the default)
or noise prediction, solver_type "bh2" (default) or "bh1", solver_order 1-3, lower_order_final,
disable_corrector, final_sigmas_type, Karras or exponential sigmas. Each `step`:

  1. converts the model output to x0 (or eps) at the current sigma;
  2. corrector UniC: with the new model output, re-does the previous step's update from the previous
     sample (`last_sample`), which refines the sample the model was just run on;
  3. predictor UniP: extrapolates from the corrected sample to the next sigma with the history.

Both updates share one form in lambda (h = lambda_t - lambda_s0, hh = -h for x0 prediction):

    x_t = (sigma_t/sigma_s0) x_s - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_k D_k

with D_k = (m_k - m0) / r_k the divided differences of the history at r_k = (lambda_k - lambda_s0)/h,
B(h) = e^hh - 1 (bh2) or hh (bh1), and rho solving R rho = b (R: powers of r_k; b: phi functions).
The schedule, history and add_noise are multistep_base.py's. Deterministic.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.schedulers.base import SchedulerOutput
from npdiff.schedulers.multistep_base import MultistepSchedulerBase


class UniPCMultistepScheduler(MultistepSchedulerBase):
    """UniPC: a UniC corrector then a UniP predictor per model evaluation."""

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
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    _ONLY = {
        "solver_order": (1, 2, 3),
        # diffusers maps the other solvers' names to bh2 (a config switched from DPM-Solver or DEIS)
        "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
        "predict_x0": (True, False),
        "solver_p": (None,),
        "thresholding": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "rescale_betas_zero_snr": (False,),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config["solver_type"] not in ("bh1", "bh2"):
            self.config["solver_type"] = "bh2"
        disabled = self.config["disable_corrector"]
        if not isinstance(disabled, (list, tuple)) or not all(isinstance(i, (int, np.integer)) for i in disabled):
            raise NpdiffError(f"UniPCMultistepScheduler: disable_corrector must be a list of step indices, "
                              f"got {disabled!r}")
        self.predict_x0 = self.config["predict_x0"]
        self._check_final_step()
        self.last_sample = None
        self.this_order = None

    def _check_final_step(self):
        """NpdiffError for configs whose last step to sigma 0 divides by h = inf (NaN in diffusers too)."""
        cfg = self.config
        if cfg["final_sigmas_type"] != "zero":
            return
        reason = None
        if cfg["solver_type"] == "bh1":
            reason = "solver_type='bh1'"
        elif not cfg["predict_x0"]:
            reason = "predict_x0=False"
        elif not cfg["lower_order_final"] and cfg["solver_order"] > 1:
            reason = "lower_order_final=False"
        if reason is not None:
            raise NpdiffError(f"UniPCMultistepScheduler: {reason} with final_sigmas_type='zero' makes the last "
                              f"step NaN (diffusers too); use final_sigmas_type='sigma_min'")

    def _final_sigma(self, sigmas, kind):
        if self.config["final_sigmas_type"] == "zero":
            return 0.0
        return sigmas[-1] if kind is not None else self._training_sigma_zero()

    def set_timesteps(self, num_inference_steps):
        super().set_timesteps(num_inference_steps)
        self.last_sample = None

    # ----------------------------------------------------------------------------- solver
    def convert_model_output(self, model_output, sample):
        """x0 (predict_x0) or the noise prediction eps, at the current sigma."""
        if self.predict_x0:
            return self._data_prediction(model_output, sample)
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            return model_output
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        if prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t                          # [B,C,H,W]
        return alpha_t * model_output + sigma_t * sample                                # v_prediction

    def _bh_terms(self, lambda_s0, h, history_indices, order):
        """(D1s, h_phi_1, B_h, R [order,order], b [order]) of a UniP/UniC update, float32.

        D1s[k-1] = (model_outputs[-(k+1)] - m0) / r_k, k = 1 .. order-1, where history_indices[k-1] is the
        schedule position of model_outputs[-(k+1)] and r_k = (lambda_k - lambda_s0) / h."""
        m0 = self.model_outputs[-1]
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._alpha_sigma_lambda(history_indices[k - 1])
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)                          # [B,C,H,W]
        rks.append(np.float32(1.0))
        rks = np.array(rks, dtype=np.float32)                                             # [order]

        # the phi-function right-hand side b and the Vandermonde-like R
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.float32(math.expm1(float(hh)))                                       # e^hh - 1
        h_phi_k = h_phi_1 / hh - np.float32(1)
        B_h = hh if self.config["solver_type"] == "bh1" else h_phi_1
        factorial_i = 1
        R, b = [], []
        for i in range(1, order + 1):
            R.append(rks ** (i - 1))
            b.append(h_phi_k * np.float32(factorial_i) / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - np.float32(1 / factorial_i)
        return D1s, h_phi_1, B_h, np.stack(R), np.array(b, dtype=np.float32)

    @staticmethod
    def _weighted_sum(weights, D1s):
        """sum_k weights[k] * D1s[k] (diffusers' einsum "k,bkc...->bc...")."""
        total = weights[0] * D1s[0]                                                      # [B,C,H,W]
        for weight, D1 in zip(weights[1:], D1s[1:]):
            total = total + weight * D1
        return total

    def _base_update(self, x, m0, index_t, index_s0, h_phi_1):
        """The first-order part (sigma_t/sigma_s0) x - alpha_t h_phi_1 m0 (x0) or its eps form."""
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index_t])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[index_s0])
        if self.predict_x0:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t               # [B,C,H,W]
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t                   # [B,C,H,W]

    def multistep_uni_p_bh_update(self, model_output, sample, order):
        """UniP: predict the sample at the next sigma from `sample` and the history."""
        i = self._step_index
        _, _, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, _, lambda_s0 = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s0
        D1s, h_phi_1, B_h, R, b = self._bh_terms(lambda_s0, h, [i - k for k in range(1, order)], order)
        x_t_, scale = self._base_update(sample, self.model_outputs[-1], i + 1, i, h_phi_1)
        if not D1s:
            return x_t_ - scale * B_h * 0
        if order == 2:
            rhos_p = np.array([0.5], dtype=np.float32)
        else:
            rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)           # [order-1]
        return x_t_ - scale * B_h * self._weighted_sum(rhos_p, D1s)                      # [B,C,H,W]

    def multistep_uni_c_bh_update(self, this_model_output, last_sample, this_sample, order):
        """UniC: redo the last step from `last_sample` with the new model output (this_model_output)."""
        i = self._step_index
        _, _, lambda_t = self._alpha_sigma_lambda(i)
        _, _, lambda_s0 = self._alpha_sigma_lambda(i - 1)
        h = lambda_t - lambda_s0
        D1s, h_phi_1, B_h, R, b = self._bh_terms(lambda_s0, h, [i - (k + 1) for k in range(1, order)], order)
        m0 = self.model_outputs[-1]
        x_t_, scale = self._base_update(last_sample, m0, i, i - 1, h_phi_1)
        if order == 1:
            rhos_c = np.array([0.5], dtype=np.float32)
        else:
            rhos_c = np.linalg.solve(R, b).astype(np.float32)                            # [order]
        D1_t = this_model_output - m0                                                   # [B,C,H,W]
        correction = rhos_c[-1] * D1_t
        if D1s:
            correction = self._weighted_sum(rhos_c[:-1], D1s) + correction
        return x_t_ - scale * B_h * correction                                          # [B,C,H,W]

    def step(self, model_output, timestep, sample, generator=None):
        """Corrector on the current sample, then predictor to the next sigma. Returns prev_sample only."""
        self._begin_step(model_output, timestep, sample)
        cfg = self.config

        # 1. convert the model output at the current sigma
        model_output_convert = self.convert_model_output(model_output, sample)

        # 2. UniC: correct the current sample with the new model output
        use_corrector = (self._step_index > 0 and self._step_index - 1 not in cfg["disable_corrector"]
                         and self.last_sample is not None)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(model_output_convert, self.last_sample, sample,
                                                    self.this_order)

        # 3. push the converted output on the history
        self._push_model_output(model_output_convert)

        # 4. the order of this step: lower near the end (lower_order_final) and while warming up
        if cfg["lower_order_final"]:
            this_order = min(cfg["solver_order"], len(self.timesteps) - self._step_index)
        else:
            this_order = cfg["solver_order"]
        self.this_order = min(this_order, self.lower_order_nums + 1)

        # 5. UniP: predict the next sample
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample, self.this_order)

        self._end_step()
        return SchedulerOutput(prev_sample=prev_sample)
