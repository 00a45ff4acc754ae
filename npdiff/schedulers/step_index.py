"""Where a scheduler is in its schedule: the step index, the begin index, and how both are found.

One mechanism for every scheduler that walks its schedule by position (the k-diffusion samplers,
the multistep solvers DPM-Solver++ / UniPC / DEIS, LCM and TCD), as diffusers does it:

  - the step index is None until the first `scale_model_input` or `step`; it is then the begin
    index if the pipeline set one (img2img starts mid-schedule: pipelines call
    `scheduler.set_begin_index(t_start * scheduler.order)`), else the position of the timestep;
  - `index_for_timestep` takes the second match when the timestep appears twice (Heun and DPM2 repeat
    timesteps; starting on the second copy does not skip a sigma); a timestep that is not in the
    schedule is an NpdiffError, except for the multistep solvers, where diffusers takes the last
    position instead (`ABSENT_TIMESTEP_IS_LAST = True`);
  - `add_noise` uses, per item, the timestep's position (no begin index), else the current step index,
    else the begin index (`add_noise_step_indices`).

Subclasses call `reset_step_index()` whenever the schedule changes (construction, set_timesteps).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.schedulers import schedules


class StepIndexMixin:
    """step_index / begin_index / set_begin_index / index_for_timestep with diffusers' rules."""

    ABSENT_TIMESTEP_IS_LAST = False

    def reset_step_index(self):
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        """The position in the schedule of the next step (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self):
        """The position the pipeline said sampling starts at (None: found from the first timestep)."""
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        """Start at schedule position `begin_index` (img2img), instead of finding it from the timestep."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) \
                or not 0 <= int(begin_index) < len(self.timesteps):
            raise NpdiffError(f"set_begin_index: begin_index must be an integer in [0, {len(self.timesteps)}), "
                              f"got {begin_index!r}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Position of `timestep` in the schedule; the second match if it appears twice (diffusers)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = schedules.index_of_timestep(schedule, timestep)
        if len(indices) == 0:
            if self.ABSENT_TIMESTEP_IS_LAST:
                return len(self.timesteps) - 1
            raise NpdiffError(f"timestep {timestep!r} is not in the scheduler's timesteps "
                              f"(first {np.asarray(schedule)[:3].tolist()}...); pass one of scheduler.timesteps")
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep):
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(as_scalar(timestep))
        else:
            self._step_index = self._begin_index

    def _begin_step(self, model_output, timestep, sample):
        """Checks, and the step index from the timestep (or begin index) on the first step."""
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)

    def add_noise_step_indices(self, timesteps):
        """Which schedule position add_noise uses for each timestep (diffusers' rule, begin_index aware)."""
        timesteps = np.asarray(backend.to_numpy(timesteps)).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]


def as_scalar(timestep):
    """A timestep as a Python number (accepts python numbers, 0-d/1-element arrays)."""
    value = np.asarray(backend.to_numpy(timestep))
    if value.size != 1:
        raise NpdiffError(f"timestep must be a single value, got shape {value.shape}")
    return value.reshape(()).item() if value.dtype.kind in "iuf" else value
