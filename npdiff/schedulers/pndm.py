"""PNDMScheduler: pseudo numerical methods for diffusion models (Liu et al. 2022), SD's default.

Matches diffusers' PNDMScheduler step for step. Two phases:
  - PRK (pseudo Runge-Kutta) warm-up: 3 steps of 4 model calls each, on a half-spaced schedule;
    skipped when skip_prk_steps=True, which is what Stable Diffusion's config sets.
  - PLMS (pseudo linear multistep): one model call per step, combining the last 4 noise estimates
    with Adams-Bashforth weights. With PRK skipped, the first two calls are a pseudo-Heun start
    (crowsonkb's PLMS from latent-diffusion), so the schedule repeats the second timestep once.
Every step moves the sample with the "transfer" formula (9) of the paper (`_get_prev_sample`).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.schedulers.base import SchedulerBase, SchedulerOutput


class PNDMScheduler(SchedulerBase):
    """F-PNDM: Runge-Kutta warm-up, then 4th-order linear multistep on the noise estimates."""

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    _PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.timesteps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self._reset_state()

    def _reset_state(self):
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []

    def scale_model_input(self, sample, timestep=None):
        """PNDM feeds the sample to the model unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps):
        """Build the PRK and PLMS timestep lists (int64) for n inference steps."""
        n = self._check_num_inference_steps(num_inference_steps)
        T = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        self.num_inference_steps = n

        # 1. n base timesteps, ascending (PNDM keeps them ascending, unlike the other schedulers)
        if spacing == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)                        # [n]
        elif spacing == "leading":
            base = (np.arange(0, n) * (T // n)).round() + self.config["steps_offset"]     # [n]
        else:  # trailing
            base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1          # [n]
        self._timesteps = base

        # 2. PRK warm-up on the last 4 base steps (each visited at t, t - T/n/2, t - T/n/2, t - T/n),
        #    then PLMS on the rest; or PLMS only, with the second timestep repeated
        if self.config["skip_prk_steps"]:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if n < self.pndm_order:
                raise NpdiffError(f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= "
                                  f"{self.pndm_order} (the Runge-Kutta warm-up), got {n}")
            half_step = T // n // 2
            prk = np.array(base[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, half_step]), self.pndm_order)
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        # 3. every timestep indexes the training schedule: refuse one past its end (a huge steps_offset,
        #    or the PRK warm-up's half steps on top of the last training step) before any UNet call
        if self.timesteps.size and int(self.timesteps.max()) > T - 1:
            raise NpdiffError(f"PNDMScheduler: timestep_spacing {spacing!r}, steps_offset "
                              f"{self.config['steps_offset']} and {n} steps give timestep "
                              f"{int(self.timesteps.max())}, past the last training step {T - 1}; "
                              "SD configs use steps_offset 0 or 1")
        self._reset_state()

    def step(self, model_output, timestep, sample, generator=None):
        """One PRK or PLMS step, whichever phase the scheduler is in. No pred_original_sample
        (diffusers gives none for PNDM). PNDM is deterministic: `generator` is accepted and unused."""
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        timestep = int(backend.to_numpy(timestep))
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self.step_prk(model_output, timestep, sample)
        return self.step_plms(model_output, timestep, sample)

    def step_prk(self, model_output, timestep, sample):
        """Runge-Kutta warm-up: calls 0..3 of each group are the 4 stages, weights 1/6, 1/3, 1/3, 1/6."""
        T = self.config["num_train_timesteps"]
        # 1. where this stage steps to: half a step (stages 0, 2) or no further (stages 1, 3)
        diff_to_prev = 0 if self.counter % 2 else T // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        # 2. accumulate the Runge-Kutta combination of the noise estimates
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + np.float32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + np.float32(1 / 3) * model_output
        else:
            model_output = self.cur_model_output + np.float32(1 / 6) * model_output
            self.cur_model_output = 0

        # 3. every stage starts from the sample at the beginning of the group
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output, timestep, sample):
        """Linear multistep on the stored noise estimates (orders 1..4 as they become available)."""
        T = self.config["num_train_timesteps"]
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise NpdiffError("PNDMScheduler: PLMS steps need the 12 Runge-Kutta warm-up steps first "
                              "(skip_prk_steps=False); call step on every timestep in order")

        # 1. previous timestep; the pseudo-Heun second call re-evaluates at the first timestep
        prev_timestep = timestep - T // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + T // self.num_inference_steps

        # 2. combine noise estimates: Heun start, then Adams-Bashforth of order 2, 3, 4
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / np.float32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (np.float32(3) * self.ets[-1] - self.ets[-2]) / np.float32(2)
        elif len(self.ets) == 3:
            model_output = (np.float32(23) * self.ets[-1] - np.float32(16) * self.ets[-2]
                            + np.float32(5) * self.ets[-3]) / np.float32(12)
        else:
            model_output = np.float32(1 / 24) * (np.float32(55) * self.ets[-1] - np.float32(59) * self.ets[-2]
                                                 + np.float32(37) * self.ets[-3] - np.float32(9) * self.ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        """Formula (9): x_{t-d} from x_t and a noise estimate (v-prediction converted to noise first)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev

        if self.config["prediction_type"] == "v_prediction":
            model_output = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        # sqrt(alpha_{t-d} / alpha_t): the x_t coefficient of (9)
        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        # the denominator of the noise term of (9)
        model_output_denom_coeff = (alpha_prod_t * np.sqrt(beta_prod_t_prev)
                                    + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev))
        return (sample_coeff * sample
                - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff)  # [B,C,H,W]

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self._alpha_noise_add(original_samples, noise, timesteps)
