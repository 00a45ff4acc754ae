"""KDPM2DiscreteScheduler: k-diffusion's DPM-Solver-2 ("DPM2"), a midpoint method in log-sigma.

Matches diffusers' KDPM2DiscreteScheduler step for step. Each step from sigma_i to sigma_{i+1} takes
two model evaluations: an Euler step to the geometric midpoint sigma_mid = sqrt(sigma_i * sigma_{i+1})
(exp of the mean of the logs), the model there, and that midpoint derivative applied from sigma_i.
As with Heun (heun.py) the pipeline loop does not change: the schedule interleaves the midpoint
timesteps,

    timesteps = [t0, t_mid1, t1, t_mid2, t2, ...]                          (2n-1 values)
    sigmas    = [s0, s1, s1, s2, s2, ..., 0, 0, 0]    sigmas_interpol: the midpoints, laid out alike

and `step` alternates between the two stages. `order = 2` (img2img: set_begin_index(2 * t_start)).
The midpoint timesteps are the fractional training timesteps of the midpoint sigmas, found in
log-sigma like Karras timesteps. Deterministic; the ancestral variant is kdpm2_ancestral.py.
"""

import numpy as np

from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerOutput
from npdiff.schedulers.sigma_base import SigmaSchedulerBase, scaled_for_model


def log_midpoint(sigmas, other):
    """exp((log(sigma) + log(other)) / 2) in float32, as torch's sigmas.log().lerp(other.log(), 0.5).exp().

    torch's lerp at weight 0.5 is end - (end - start) * 0.5; log(0) = -inf gives NaN or 0 at the ends,
    as in diffusers (those entries are never used)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_start, log_end = np.log(sigmas), np.log(other)                           # [n+1] float32
        return np.exp(log_end - (log_end - log_start) * np.float32(0.5))             # [n+1] float32


class KDPM2DiscreteScheduler(SigmaSchedulerBase):
    """DPM2: x_{i+1} = x_i + d(x_mid, sigma_mid) * (sigma_{i+1} - sigma_i)."""

    order = 2
    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _PREDICTION_TYPES = ("epsilon", "v_prediction")
    _ONLY = {"use_beta_sigmas": (False,)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # diffusers builds the full-length schedule at construction
        self.set_timesteps(self.config["num_train_timesteps"])

    # ----------------------------------------------------------------------------- schedule
    def _base_schedule(self, num_inference_steps):
        """(timesteps [n], sigmas [n+1] float32 with the final 0); Karras timesteps rounded as diffusers."""
        n = self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas = self._inference_sigmas(n)                                   # [n], [n]
        if self.config["use_karras_sigmas"]:
            timesteps = timesteps.round()                                               # [n] float64
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)                     # [n+1]
        return timesteps, sigmas

    def _midpoint_timesteps(self, sigmas_interpol, timesteps):
        """The fractional training timesteps of the midpoint sigmas, in the timesteps' dtype."""
        log_sigmas = np.log(schedules.training_sigmas(self.alphas_cumprod))             # [T] float32
        with np.errstate(invalid="ignore"):
            values = [schedules.sigma_to_t_float32(s, log_sigmas) for s in sigmas_interpol]  # n+1 values
        return np.array(values).astype(timesteps.dtype)                                 # [n+1]

    def set_timesteps(self, num_inference_steps):
        """n sigmas as Euler's plus their midpoints, and the interleaved 2n-1 timesteps."""
        timesteps, sigmas = self._base_schedule(num_inference_steps)                    # [n], [n+1]
        # 1. midpoints between each sigma and the one before it (index 0 is unused)
        sigmas_interpol = log_midpoint(sigmas, np.roll(sigmas, 1))                      # [n+1]
        self.sigmas = np.concatenate([schedules.doubled(sigmas), sigmas[-1:]])          # [2n+2]
        self.sigmas_interpol = np.concatenate([schedules.doubled(sigmas_interpol), sigmas_interpol[-1:]])
        # 2. [t0, t_mid1, t1, t_mid2, t2, ...]
        timesteps_interpol = self._midpoint_timesteps(sigmas_interpol, timesteps)       # [n+1]
        pairs = np.stack([timesteps_interpol[1:-1], timesteps[1:]], axis=-1)             # [n-1,2]
        self.timesteps = np.concatenate([timesteps[:1], pairs.reshape(-1)])             # [2n-1]
        self.sample = None
        self.reset_step_index()

    @property
    def state_in_first_order(self):
        """True when the next step is the first (Euler-to-midpoint) stage."""
        return self.sample is None

    def scale_model_input(self, sample, timestep):
        """sample / sqrt(sigma^2 + 1) at the stage's sigma (the midpoint in the second stage)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma = self.sigmas[self._step_index]
        else:
            sigma = self.sigmas_interpol[self._step_index]
        return scaled_for_model(sample, sigma)

    # ----------------------------------------------------------------------------- step
    def step(self, model_output, timestep, sample, generator=None):
        """One stage of a DPM2 step; returns prev_sample and pred_original_sample (generator unused)."""
        self._begin_step(model_output, timestep, sample)
        first_stage = self.state_in_first_order

        # 1. this step's sigma, midpoint and next sigma
        if first_stage:
            sigma = self.sigmas[self._step_index]
            sigma_interpol = self.sigmas_interpol[self._step_index + 1]
            sigma_next = self.sigmas[self._step_index + 1]
        else:
            sigma = self.sigmas[self._step_index - 1]
            sigma_interpol = self.sigmas_interpol[self._step_index]
            sigma_next = self.sigmas[self._step_index]

        # 2. denoised estimate x_0 at the sigma the model ran at
        sigma_input = sigma if first_stage else sigma_interpol
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma_input)

        # 3. first stage: Euler step to the midpoint; second stage: the midpoint derivative applied
        #    from the first stage's sample over the whole interval
        if first_stage:
            derivative = (sample - pred_original_sample) / sigma                        # [B,C,H,W]
            dt = sigma_interpol - sigma
            self.sample = sample
        else:
            derivative = (sample - pred_original_sample) / sigma_interpol               # [B,C,H,W]
            dt = sigma_next - sigma
            sample = self.sample
            self.sample = None
        prev_sample = sample + derivative * dt                                          # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
