"""Samplers in pure NumPy, matching diffusers' schedulers step for step (same names and methods).

    from npdiff.schedulers import make_scheduler, scheduler_from_config
    scheduler = scheduler_from_config(json.load(open("model/scheduler/scheduler_config.json")))
    scheduler = make_scheduler("dpmpp_2m_karras", scheduler.config)   # switch sampler, keep betas
    scheduler.set_timesteps(20)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noise_pred = unet(scheduler.scale_model_input(latents, t), t, text)
        latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample

Each class takes diffusers' config keywords (see its `_DEFAULTS`); `from_config(dict)` reads a
scheduler_config.json dict. Stochastic steps draw noise with `generator.randn(shape,
dtype=np.float32)` where diffusers calls randn_tensor, so an npdiff.rng.TorchGenerator seeded like
torch.Generator().manual_seed(seed) gives diffusers' noise.
"""

from npdiff.errors import NpdiffError
from npdiff.schedulers.base import SchedulerConfig, SchedulerOutput
from npdiff.schedulers.ddim import DDIMScheduler
from npdiff.schedulers.ddpm import DDPMScheduler
from npdiff.schedulers.deis import DEISMultistepScheduler
from npdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from npdiff.schedulers.euler import EulerDiscreteScheduler
from npdiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from npdiff.schedulers.heun import HeunDiscreteScheduler
from npdiff.schedulers.kdpm2 import KDPM2DiscreteScheduler
from npdiff.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from npdiff.schedulers.lcm import LCMScheduler
from npdiff.schedulers.lms import LMSDiscreteScheduler
from npdiff.schedulers.pndm import PNDMScheduler
from npdiff.schedulers.tcd import TCDScheduler
from npdiff.schedulers.unipc import UniPCMultistepScheduler


class SchedulerPreset:
    """A scheduler class with some config values fixed (e.g. DPM++ 2M with Karras sigmas).

    Builds like the class: `preset(**config)` or `preset.from_config(config)`; the fixed values win.
    """

    def __init__(self, scheduler_class, **fixed):
        self.scheduler_class = scheduler_class
        self.fixed = fixed
        self.__name__ = scheduler_class.__name__

    def __call__(self, **config):
        return self.scheduler_class(**{**config, **self.fixed})

    def from_config(self, config, **overrides):
        return self.scheduler_class.from_config(config, **{**overrides, **self.fixed})

    def __repr__(self):
        fixed = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return f"SchedulerPreset({self.scheduler_class.__name__}, {fixed})"


SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "lms": LMSDiscreteScheduler,
    "lms_karras": SchedulerPreset(LMSDiscreteScheduler, use_karras_sigmas=True),
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,            # two UNet evaluations per step
    "dpm2": KDPM2DiscreteScheduler,           # two UNet evaluations per step
    "dpm2_karras": SchedulerPreset(KDPM2DiscreteScheduler, use_karras_sigmas=True),
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
    "dpm2_a_karras": SchedulerPreset(KDPM2AncestralDiscreteScheduler, use_karras_sigmas=True),
    # a preset with more fixed values comes after the one it extends (scheduler_name takes the last match)
    "dpmpp_2m": SchedulerPreset(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++"),
    "dpmpp_2m_karras": SchedulerPreset(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++",
                                       use_karras_sigmas=True),
    "dpmpp_2m_sde": SchedulerPreset(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"),
    "dpmpp_2m_sde_karras": SchedulerPreset(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++",
                                           use_karras_sigmas=True),
    "unipc": UniPCMultistepScheduler,
    "deis": DEISMultistepScheduler,
    "lcm": LCMScheduler,    # for LCM-distilled UNets (or an LCM-LoRA), 2-8 steps
    "tcd": TCDScheduler,    # for TCD-distilled UNets; step(eta=gamma)
}

SCHEDULER_CLASSES = {
    cls.__name__: cls
    for cls in (PNDMScheduler, DDIMScheduler, DDPMScheduler, LMSDiscreteScheduler, EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler,
                KDPM2AncestralDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                DEISMultistepScheduler, LCMScheduler, TCDScheduler)
}


def make_scheduler(name, config=None):
    """The sampler `name` (a key of SCHEDULERS) built from a model's scheduler config.

    The config's beta schedule, num_train_timesteps, steps_offset, prediction_type ... are kept while
    the class changes, as with diffusers' `Scheduler.from_config(pipe.scheduler.config)`.
    """
    if name not in SCHEDULERS:
        raise NpdiffError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(dict(config or {}))


def scheduler_from_config(config):
    """The scheduler class named by config["_class_name"], built from the rest of the config."""
    if not isinstance(config, dict):
        raise NpdiffError(f"scheduler config must be a dict, got {type(config).__name__}")
    class_name = config.get("_class_name")
    if class_name not in SCHEDULER_CLASSES:
        raise NpdiffError(f"scheduler config: _class_name {class_name!r} is not a known scheduler; "
                          f"known: {', '.join(SCHEDULER_CLASSES)}")
    return SCHEDULER_CLASSES[class_name].from_config(config)


__all__ = [
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler",
    "PNDMScheduler", "TCDScheduler", "UniPCMultistepScheduler",
    "SCHEDULERS", "SCHEDULER_CLASSES",
    "SchedulerConfig", "SchedulerOutput", "SchedulerPreset", "make_scheduler", "scheduler_from_config",
]
