"""What every scheduler shares: the config, the beta schedule, the step output, and the noise.

Config handling follows diffusers' ConfigMixin, so a model folder's scheduler/scheduler_config.json
loads the same way and `Other.from_config(scheduler.config)` switches sampler like diffusers:

  - each class lists diffusers' `__init__` keywords and defaults in `_DEFAULTS`;
  - `from_config(dict)` takes the keys the class knows, ignores "_"-prefixed and unknown keys, and
    drops the keys listed in "_use_default_values" (the ones the source scheduler did not get from
    its file, so the new class uses its own default, e.g. Euler's timestep_spacing "linspace");
  - `.config` holds the full set of arguments plus the unknown keys it was given (kept for a later
    switch of class, like diffusers' hidden config), "_class_name" and "_use_default_values".

Arrays: schedules are NumPy on the host; samples and model outputs may be NumPy or CuPy arrays and
each step computes with `xp = backend.array_module(sample)`. Scalars taken from the schedule are
float32, so float32 samples stay float32 (NumPy 2 keeps float32 * python float in float32).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.config_checks import check_component_config
from npdiff.schedulers import schedules


@dataclass
class SchedulerOutput:
    """The result of `step`: the sample at the next (less noisy) timestep and, where diffusers gives
    it, the model's current estimate of the clean sample x_0."""

    prev_sample: Any
    pred_original_sample: Any = None

    def to_tuple(self):
        """The fields that are set, in order (diffusers' `return_dict=False` / `output[0]`)."""
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]


class SchedulerConfig(dict):
    """A dict that also reads as attributes, like diffusers' FrozenDict: `config.beta_schedule`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None


class SchedulerBase:
    """Config, betas/alphas and input checks for all schedulers (subclasses set `_DEFAULTS`)."""

    _DEFAULTS: dict = {}
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    # config values a subclass does not implement: {key: (allowed values...)}
    _ONLY: dict = {}
    order = 1

    def __init__(self, **kwargs):
        unknown = sorted(k for k in kwargs if k not in self._DEFAULTS)
        if unknown:
            raise NpdiffError(
                f"{type(self).__name__}: unknown config key(s) {unknown}; known: {', '.join(self._DEFAULTS)}")
        values = dict(self._DEFAULTS)
        values.update(kwargs)
        self.config = SchedulerConfig(values)
        self.config["_class_name"] = type(self).__name__
        self.config["_use_default_values"] = [k for k in self._DEFAULTS if k not in kwargs]
        self._check_config()

        # 1. the training noise schedule, float32 like diffusers' torch tensors
        self.betas = schedules.make_betas(self.config)                                # [T]
        self.alphas = np.float32(1.0) - self.betas                                   # [T]
        self.alphas_cumprod = schedules.cumprod_float32(self.alphas)                  # [T]
        schedules.check_schedule_adds_noise(self.betas, self.alphas_cumprod)
        self.num_inference_steps = None

    # ----------------------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a scheduler_config.json dict (or another scheduler's `.config`).

        Keys this class does not know are ignored (and kept in `.config`), like diffusers does.
        """
        if not isinstance(config, dict):
            raise NpdiffError(f"from_config: config must be a dict, got {type(config).__name__}")
        used_defaults = set(config.get("_use_default_values", []))
        given = {k: v for k, v in config.items() if k not in used_defaults and not k.startswith("_")}
        given.update(overrides)
        known = {k: v for k, v in given.items() if k in cls._DEFAULTS}
        hidden = {k: v for k, v in given.items() if k not in cls._DEFAULTS}
        scheduler = cls(**known)
        scheduler.config.update(hidden)
        return scheduler

    def _check_config(self):
        cfg = self.config
        name = type(self).__name__
        check_component_config("scheduler", {k: v for k, v in cfg.items() if not k.startswith("_")}, name)
        if not isinstance(cfg["num_train_timesteps"], (int, np.integer)) or cfg["num_train_timesteps"] < 1:
            raise NpdiffError(f"{name}: num_train_timesteps must be an integer >= 1, "
                              f"got {cfg['num_train_timesteps']!r}")
        if cfg.get("trained_betas") is None and cfg["beta_schedule"] not in schedules.BETA_SCHEDULES:
            raise NpdiffError(f"{name}: beta_schedule must be one of {', '.join(schedules.BETA_SCHEDULES)}, "
                              f"got {cfg['beta_schedule']!r}")
        if cfg["prediction_type"] not in self._PREDICTION_TYPES:
            raise NpdiffError(f"{name}: prediction_type must be one of {', '.join(self._PREDICTION_TYPES)}, "
                              f"got {cfg['prediction_type']!r}")
        if cfg["timestep_spacing"] not in schedules.TIMESTEP_SPACINGS:
            raise NpdiffError(f"{name}: timestep_spacing must be one of "
                              f"{', '.join(schedules.TIMESTEP_SPACINGS)}, got {cfg['timestep_spacing']!r}")
        spacings = [key for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(key)]
        if len(spacings) > 1:
            raise NpdiffError(f"{name}: only one of {', '.join(spacings)} can be true")
        for key, allowed in self._ONLY.items():
            if cfg.get(key) not in allowed:
                raise NpdiffError(f"{name}: {key}={cfg.get(key)!r} is not implemented in npdiff; "
                                  f"supported: {', '.join(repr(a) for a in allowed)}")

    def _check_num_inference_steps(self, num_inference_steps):
        T = self.config["num_train_timesteps"]
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise NpdiffError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if num_inference_steps < 1 or num_inference_steps > T:
            raise NpdiffError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, "
                              f"got {num_inference_steps}")
        return int(num_inference_steps)

    def _check_step_inputs(self, model_output, sample):
        if tuple(model_output.shape) != tuple(sample.shape):
            raise NpdiffError(f"step: model_output shape {tuple(model_output.shape)} must equal "
                              f"sample shape {tuple(sample.shape)}")

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise NpdiffError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step")

    def __len__(self):
        return self.config["num_train_timesteps"]

    def __repr__(self):
        shown = {k: v for k, v in self.config.items() if not k.startswith("_")}
        return f"{type(self).__name__}({shown})"

    # ----------------------------------------------------------------------------- shared maths
    def _x0_and_eps(self, model_output, sample, alpha_prod_t):
        """The model's x_0 estimate and noise estimate at alpha_bar_t, per prediction type (DDIM, LCM, TCD)."""
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        sqrt_alpha_t, sqrt_beta_t = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = (sample - sqrt_beta_t * model_output) / sqrt_alpha_t          # [B,C,H,W]
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_alpha_t * pred_original_sample) / sqrt_beta_t
        else:  # v_prediction
            pred_original_sample = sqrt_alpha_t * sample - sqrt_beta_t * model_output
            pred_epsilon = sqrt_alpha_t * model_output + sqrt_beta_t * sample
        return pred_original_sample, pred_epsilon

    def _alpha_noise_add(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM/DDIM/PNDM add_noise)."""
        xp = backend.array_module(original_samples)
        timesteps = np.asarray(backend.to_numpy(timesteps)).reshape(-1).astype(np.int64)   # [B]
        alpha_bar = self.alphas_cumprod.astype(original_samples.dtype)[timesteps]          # [B]
        sqrt_alpha = np.sqrt(alpha_bar)                                                    # [B]
        sqrt_one_minus_alpha = np.sqrt(np.float32(1.0) - alpha_bar)                        # [B]
        expand = (-1,) + (1,) * (original_samples.ndim - 1)
        sqrt_alpha = xp.asarray(sqrt_alpha.reshape(expand))                                # [B,1,1,1]
        sqrt_one_minus_alpha = xp.asarray(sqrt_one_minus_alpha.reshape(expand))            # [B,1,1,1]
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise                # [B,C,H,W]



class IntegerTimestepScheduler(SchedulerBase):
    """What DDIM and DDPM share: integer timesteps, unscaled model input, unit initial noise.

    Before set_timesteps the schedule is every training timestep, descending, as in diffusers.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.init_noise_sigma = 1.0
        T = self.config["num_train_timesteps"]
        self.timesteps = np.arange(0, T)[::-1].astype(np.int64)                          # [T]

    def scale_model_input(self, sample, timestep=None):
        """These samplers feed the sample to the model unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps):
        """Choose the n inference timesteps (int64, descending) by the configured spacing."""
        n = self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = schedules.spaced_timesteps(
            self.config["timestep_spacing"], self.config["num_train_timesteps"], n,
            self.config["steps_offset"], integer=True)                                   # [n] int64


def draw_noise(shape, generator, like):
    """Standard normal noise of `shape` (float32, on `like`'s device), as diffusers' randn_tensor.

    generator: an npdiff.rng.TorchGenerator (same numbers as torch.Generator().manual_seed(seed)),
    anything else with `.randn(shape, dtype=)`, a numpy.random.Generator, a list of those (one per
    batch item, drawn in batch order like diffusers), or None (fresh, unseeded noise).
    """
    xp = backend.array_module(like)
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise NpdiffError(f"generator: a list needs one generator per batch item ({shape[0]}), "
                              f"got {len(generator)}")
        parts = [draw_noise((1,) + shape[1:], g, like) for g in generator]
        return xp.concatenate(parts, axis=0)                                   # [B,...]
    if generator is None:
        noise = np.random.default_rng().standard_normal(shape, dtype=np.float32)
    elif hasattr(generator, "randn"):
        noise = generator.randn(shape, dtype=np.float32)
    elif isinstance(generator, np.random.Generator):
        noise = generator.standard_normal(shape, dtype=np.float32)
    else:
        raise NpdiffError(f"generator: expected an npdiff.rng.TorchGenerator, an object with "
                          f".randn(shape, dtype), a numpy Generator or None, got {type(generator).__name__}")
    return xp.asarray(noise, dtype=xp.float32)
