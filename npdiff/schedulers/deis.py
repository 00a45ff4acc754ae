"""DEISMultistepScheduler: diffusion exponential integrator sampler (Zhang & Chen 2022), log-rho form.

Matches diffusers' DEISMultistepScheduler step for step (algorithm_type "deis", solver_type "logrho",
solver_order 1, 2 (default) or 3, lower_order_final, Karras or exponential sigmas). The model output
is turned into a noise prediction eps, and the update integrates the polynomial through the last
1-3 eps exactly in rho = sigma_t / alpha_t (the k-diffusion sigma):

    x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j),   c_j = integral of the Lagrange basis polynomial
                                                             of eps_j over [rho_s, rho_t] in log(rho)

The closed forms below are diffusers' `ind_fn` (the antiderivatives in log rho), evaluated in float32.
The schedule, history and add_noise are multistep_base.py's; the sigma after the last step is the
smallest training sigma (or the last Karras / exponential sigma repeated), never 0. Deterministic.
"""

import numpy as np

from npdiff.schedulers.base import SchedulerOutput
from npdiff.schedulers.multistep_base import MultistepSchedulerBase
from npdiff.schedulers.schedules import exp32


def _log(x):
    """Natural log of a float32 scalar, in float32 (diffusers' np.log on 0-d float32 tensors)."""
    return np.log(np.float32(x))


def second_order_antiderivative(t, b, c):
    """diffusers' second-order ind_fn(t, b, c) = t (log t - log c - 1) / (log b - log c)."""
    return t * (-_log(c) + _log(t) - np.float32(1)) / (_log(b) - _log(c))


def third_order_antiderivative(t, b, c, d):
    """diffusers' third-order ind_fn(t, b, c, d)."""
    log_t, log_b, log_c, log_d = _log(t), _log(b), _log(c), _log(d)
    numerator = t * (log_c * (log_d - log_t + np.float32(1)) - log_d * log_t + log_d + log_t * log_t
                     - np.float32(2) * log_t + np.float32(2))
    denominator = (log_b - log_c) * (log_b - log_d)
    return numerator / denominator


class DEISMultistepScheduler(MultistepSchedulerBase):
    """Multistep DEIS: exponential integrator over the last 1-3 noise predictions."""

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
        "algorithm_type": "deis",
        "solver_type": "logrho",
        "lower_order_final": True,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _ONLY = {
        "solver_order": (1, 2, 3),
        # diffusers maps the other solvers' names to DEIS's own (a config switched from DPM-Solver)
        "algorithm_type": ("deis", "dpmsolver", "dpmsolver++"),
        "solver_type": ("logrho", "midpoint", "heun", "bh1", "bh2"),
        "thresholding": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.config["algorithm_type"] = "deis"
        self.config["solver_type"] = "logrho"

    def _final_sigma(self, sigmas, kind):
        return sigmas[-1] if kind is not None else self._training_sigma_zero()

    # ----------------------------------------------------------------------------- solver
    def convert_model_output(self, model_output, sample):
        """The noise prediction eps (through x0, as diffusers computes it)."""
        x0_pred = self._data_prediction(model_output, sample)                         # [B,C,H,W]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        return (sample - alpha_t * x0_pred) / sigma_t                                  # [B,C,H,W]

    def _rho(self, index):
        """(alpha, rho = sigma_t / alpha_t) at schedule position `index`."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma / alpha

    def deis_first_order_update(self, model_output, sample):
        """DDIM in lambda: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self._step_index + 1)
        alpha_s, _, lambda_s = self._alpha_sigma_lambda(self._step_index)
        h = lambda_t - lambda_s
        return (alpha_t / alpha_s) * sample - (sigma_t * (exp32(h) - np.float32(1.0))) * model_output

    def multistep_deis_second_order_update(self, model_output_list, sample):
        """Linear interpolation of the last two eps, integrated in log rho."""
        alpha_t, rho_t = self._rho(self._step_index + 1)
        alpha_s0, rho_s0 = self._rho(self._step_index)
        _, rho_s1 = self._rho(self._step_index - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        f = second_order_antiderivative
        coef1 = f(rho_t, rho_s0, rho_s1) - f(rho_s0, rho_s0, rho_s1)
        coef2 = f(rho_t, rho_s1, rho_s0) - f(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)                # [B,C,H,W]

    def multistep_deis_third_order_update(self, model_output_list, sample):
        """Quadratic interpolation of the last three eps, integrated in log rho."""
        alpha_t, rho_t = self._rho(self._step_index + 1)
        alpha_s0, rho_s0 = self._rho(self._step_index)
        _, rho_s1 = self._rho(self._step_index - 1)
        _, rho_s2 = self._rho(self._step_index - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        f = third_order_antiderivative
        coef1 = f(rho_t, rho_s0, rho_s1, rho_s2) - f(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = f(rho_t, rho_s1, rho_s2, rho_s0) - f(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = f(rho_t, rho_s2, rho_s0, rho_s1) - f(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)   # [B,C,H,W]

    def step(self, model_output, timestep, sample, generator=None):
        """One multistep DEIS update. Returns prev_sample only (as diffusers); generator unused."""
        self._begin_step(model_output, timestep, sample)
        cfg = self.config
        n = len(self.timesteps)

        # 1. near the end with few steps, fall back to lower orders
        lower_order_final = (self._step_index == n - 1) and cfg["lower_order_final"] and n < 15
        lower_order_second = (self._step_index == n - 2) and cfg["lower_order_final"] and n < 15

        # 2. convert to a noise prediction and push it on the history
        model_output = self.convert_model_output(model_output, sample)
        self._push_model_output(model_output)

        # 3. the update of the order the history allows
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.deis_first_order_update(model_output, sample)
        elif cfg["solver_order"] == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample)

        self._end_step()
        return SchedulerOutput(prev_sample=prev_sample)
