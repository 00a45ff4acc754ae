"""LMSDiscreteScheduler: the linear multistep method on the sigma ODE (k-diffusion's sample_lms).

The step combines the last (up to 4) ODE derivatives d_j with weights

    c_j = integral from sigma_i to sigma_{i+1} of  prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) dtau,

the integral of the Lagrange basis polynomial through the previous sigmas. diffusers integrates it
numerically with scipy.integrate.quad (epsrel 1e-4); npdiff has no scipy at run time and does not
need it: the integrand is a polynomial of degree <= 3, so `numpy.polynomial` integrates it exactly
(in float64, from the float32 sigmas). The coefficients agree with diffusers' to float32 precision.
"""

import numpy as np
from numpy.polynomial import Polynomial

from npdiff.schedulers.base import SchedulerOutput
from npdiff.schedulers.sigma_base import SigmaSchedulerBase


class LMSDiscreteScheduler(SigmaSchedulerBase):
    """Linear multistep (order 4 by default), as in the fast.ai Stable Diffusion lesson."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _ONLY = {"use_beta_sigmas": (False,)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.derivatives = []
        # diffusers builds the full-length schedule at construction
        self.set_timesteps(self.config["num_train_timesteps"])

    def set_timesteps(self, num_inference_steps):
        super().set_timesteps(num_inference_steps)
        self.derivatives = []

    def get_lms_coefficient(self, order, t, current_order):
        """Exact integral of the Lagrange basis polynomial `current_order` over [sigma_t, sigma_{t+1}]."""
        sigmas = self.sigmas.astype(np.float64)
        node = sigmas[t - current_order]
        other_nodes = [sigmas[t - k] for k in range(order) if k != current_order]
        denominator = 1.0
        for other in other_nodes:
            denominator *= node - other
        basis = Polynomial.fromroots(other_nodes) / denominator if other_nodes else Polynomial([1.0])
        antiderivative = basis.integ()
        return float(antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t]))

    def step(self, model_output, timestep, sample, order=4, generator=None):
        """One LMS step; returns prev_sample and pred_original_sample (deterministic: generator unused)."""
        self._begin_step(model_output, timestep, sample)
        sigma = self.sigmas[self._step_index]

        # 1. denoised estimate x_0 from the model output
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma)

        # 2. ODE derivative, kept for the multistep formula (newest last, at most `order`)
        derivative = (sample - pred_original_sample) / sigma                           # [B,C,H,W]
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # 3. linear multistep coefficients; like diffusers, the order follows the step index, and
        #    zip() below uses only as many coefficients as there are stored derivatives
        order = min(self._step_index + 1, order)
        lms_coeffs = [self.get_lms_coefficient(order, self._step_index, j) for j in range(order)]

        # 4. x_{i+1} = x_i + sum_j c_j d_{i-j}
        update = 0
        for coeff, past_derivative in zip(lms_coeffs, reversed(self.derivatives)):
            update = update + np.float32(coeff) * past_derivative
        prev_sample = sample + update                                                  # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
