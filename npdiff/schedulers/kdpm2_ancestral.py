"""KDPM2AncestralDiscreteScheduler: DPM2 with ancestral noise ("DPM2 a", k-diffusion's sample_dpm_2_ancestral).

Matches diffusers' KDPM2AncestralDiscreteScheduler step for step, including the noise. Each step splits
the move from sigma_i to sigma_{i+1} like Euler ancestral (euler_ancestral.py):

    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)

then takes a DPM2 step (kdpm2.py) to sigma_down through the midpoint sqrt(sigma_i * sigma_down), and
adds noise of size sigma_up. The second stage of every step draws one standard normal of the model
output's shape from the generator, as diffusers does (none on the final Euler step to sigma 0).

Schedule layout: sigmas, sigmas_interpol, sigmas_up, sigmas_down are doubled like DPM2's, and the
timesteps are [t0, t_mid0, t1, t_mid1, t2, ...] (2n-1 values; here the midpoint belongs to the step
it follows).
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.schedulers import schedules
from npdiff.schedulers.base import SchedulerOutput, draw_noise
from npdiff.schedulers.kdpm2 import KDPM2DiscreteScheduler, log_midpoint
from npdiff.schedulers.sigma_base import scaled_for_model


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """DPM2 to sigma_down, then fresh noise of size sigma_up."""

    def set_timesteps(self, num_inference_steps):
        """n sigmas as Euler's, their ancestral split and midpoints, and the interleaved 2n-1 timesteps."""
        timesteps, sigmas = self._base_schedule(num_inference_steps)                    # [n], [n+1]
        # 1. the ancestral split of each step (the last entries, past sigma 0, are unused)
        sigmas_next = np.roll(sigmas, -1)                                               # [n+1]
        sigmas_next[-1] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            sigmas_sq, sigmas_next_sq = sigmas * sigmas, sigmas_next * sigmas_next
            sigmas_up = np.sqrt(sigmas_next_sq * (sigmas_sq - sigmas_next_sq) / sigmas_sq)  # [n+1]
            # sigma_next^2 - sigma_up^2 = sigma_next^4 / sigma^2 can round a hair below 0 when sigma is
            # huge (cosine schedule, t near T): clamp at 0 where diffusers would give NaN
            sigmas_down = np.sqrt(np.maximum(sigmas_next_sq - sigmas_up * sigmas_up, np.float32(0.0)))
        sigmas_down[-1] = 0.0
        self._check_steps_down(sigmas, sigmas_down)
        # 2. midpoints between each sigma and its sigma_down (the last two: 0)
        sigmas_interpol = log_midpoint(sigmas, sigmas_down)                             # [n+1]
        sigmas_interpol[-2:] = 0.0

        def laid_out(values):                                                           # [n+1] -> [2n+2]
            return np.concatenate([schedules.doubled(values), values[-1:]]).astype(np.float32)

        self.sigmas = laid_out(sigmas)
        self.sigmas_interpol = laid_out(sigmas_interpol)
        self.sigmas_up = laid_out(sigmas_up)
        self.sigmas_down = laid_out(sigmas_down)
        # 3. [t0, t_mid0, t1, t_mid1, t2, ...]
        timesteps_interpol = self._midpoint_timesteps(sigmas_interpol, timesteps)       # [n+1]
        pairs = np.stack([timesteps_interpol[:-2], timesteps[1:]], axis=-1)              # [n-1,2]
        self.timesteps = np.concatenate([timesteps[:1], pairs.reshape(-1)])             # [2n-1]
        self.sample = None
        self.reset_step_index()

    def _check_steps_down(self, sigmas, sigmas_down):
        """NpdiffError when a step before the last is so large that sigma_down rounds to 0 in float32 (its
        midpoint is then undefined: diffusers gives NaN timesteps and NaN pictures there)."""
        collapsed = np.flatnonzero(~(sigmas_down[:-2] > 0))
        if len(collapsed):
            i = int(collapsed[0])
            raise NpdiffError(f"KDPM2AncestralDiscreteScheduler: with {self.num_inference_steps} steps the step "
                              f"from sigma {float(sigmas[i]):.4g} to {float(sigmas[i + 1]):.4g} is too large: its "
                              f"sigma_down rounds to 0 in float32 (diffusers gives NaN); use more steps")

    def scale_model_input(self, sample, timestep):
        """sample / sqrt(sigma^2 + 1) at the stage's sigma (the midpoint in the second stage)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma = self.sigmas[self._step_index]
        else:
            sigma = self.sigmas_interpol[self._step_index - 1]
        return scaled_for_model(sample, sigma)

    def step(self, model_output, timestep, sample, generator=None):
        """One stage of a DPM2 ancestral step; returns prev_sample and pred_original_sample."""
        self._begin_step(model_output, timestep, sample)
        first_stage = self.state_in_first_order

        # 1. this step's sigma, midpoint, and ancestral split
        index = self._step_index if first_stage else self._step_index - 1
        sigma = self.sigmas[index]
        sigma_interpol = self.sigmas_interpol[index]
        sigma_up = self.sigmas_up[index]
        sigma_down = self.sigmas_down[self._step_index - 1]

        # 2. denoised estimate x_0 at the sigma the model ran at
        sigma_input = sigma if first_stage else sigma_interpol
        pred_original_sample = self._x0_from_model_output(model_output, sample, sigma_input)

        # 3. first stage: Euler step to the midpoint; second stage: the midpoint derivative applied
        #    from the first stage's sample down to sigma_down, then noise of size sigma_up
        if first_stage:
            derivative = (sample - pred_original_sample) / sigma                        # [B,C,H,W]
            self.sample = sample
            prev_sample = sample + derivative * (sigma_interpol - sigma)                # [B,C,H,W]
        else:
            derivative = (sample - pred_original_sample) / sigma_interpol               # [B,C,H,W]
            sample = self.sample
            self.sample = None
            prev_sample = sample + derivative * (sigma_down - sigma)                    # [B,C,H,W]
            noise = draw_noise(model_output.shape, generator, like=model_output)        # [B,C,H,W]
            prev_sample = prev_sample + noise * sigma_up                                # [B,C,H,W]

        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
