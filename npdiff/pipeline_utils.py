"""What the pipeline needs besides the sampling loop: finding and loading a model, choosing a
scheduler, checking arguments, and the output object.

  default_model_path()          the model npdiff ships ($NPDIFF_MODEL, weights/tiny-shapes in a source
                                checkout, npdiff/shipped_model in an installed package)
  load_components(path, ...)    a diffusers folder or a single-file .safetensors checkpoint ->
                                text encoder, tokenizer, UNet, VAE, scheduler config
  resolve_scheduler(...)        a name from npdiff.schedulers.SCHEDULERS, an instance, or the folder's own
  check_* functions             bad input -> NpdiffError naming the argument, expected and actual value
                                (picture sizes: npdiff/picture_size.py)
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.atomic_files import atomic_folder
from npdiff.cache_folder import cache_folder
from npdiff.clip_vocab import write_clip_tokenizer_folder
from npdiff.errors import NpdiffError
from npdiff.loading import load_pipeline_components
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.single_file_sdxl import is_sdxl_checkpoint
from npdiff.loading.weights import check_precision
from npdiff.models import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UNet2DConditionModel,
)
from npdiff.rng import TorchGenerator
from npdiff.schedulers import SCHEDULERS, make_scheduler, scheduler_from_config
from npdiff.tokenizer import CLIPTokenizer, check_prompt_text

SHIPPED_MODEL_NAME = "tiny-shapes"
# pyproject.toml installs weights/tiny-shapes/ as this folder of the package (package-dir mapping), so a
# plain non-editable `pip install .` carries the model too.
INSTALLED_MODEL_DIR = "shipped_model"
PACKAGE_DIR = Path(__file__).resolve().parent  # where the shipped model is looked for


@dataclass
class PipelineOutput:
    """What a pipeline call returns.

    images:     list of PIL images (output_type="pil"), float32 [B,H,W,3] in [0,1] ("np"), or None ("latent")
    latents:    the final latents, numpy float32 [B,4,h,w]
    seed:       the seed the noise came from (None when a generator or latents were passed in)
    parameters: what produced the images (prompt, seed, steps, sampler, ...): save_png stores it
    """

    images: object
    latents: np.ndarray
    seed: object = None
    parameters: dict = field(default_factory=dict)


class StopSampling(Exception):
    """Raised by a pipeline callback to end the sampling loop early and cleanly (a server's interrupt): the
    loop stops after the step just reported, and the call decodes and returns the latents it has, recording
    the steps actually run as "steps_done" in its parameters."""


# ---------------------------------------------------------------------------------------------
# Finding the model
# ---------------------------------------------------------------------------------------------
def default_model_path():
    """The model used when no path is given, looked for in this order:

      1. $NPDIFF_MODEL (a folder or a .safetensors file);
      2. weights/tiny-shapes beside the package, in a source checkout;
      3. npdiff/shipped_model inside the installed package (weights/tiny-shapes, installed).
    """
    package_dir = PACKAGE_DIR
    candidates = []
    if os.environ.get("NPDIFF_MODEL"):
        candidates.append(("$NPDIFF_MODEL", Path(os.environ["NPDIFF_MODEL"]).expanduser()))
    candidates.append(("source checkout", package_dir.parent / "weights" / SHIPPED_MODEL_NAME))
    candidates.append(("installed package", package_dir / INSTALLED_MODEL_DIR))
    for _, path in candidates:
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return path
    looked = "; ".join(f"{where}: {path}" for where, path in candidates)
    raise NpdiffError(f"no model path given and no shipped model found (looked at {looked}); "
                      "pass a diffusers folder or a .safetensors checkpoint, or set NPDIFF_MODEL")


def model_family(path):
    """-> "sdxl" or "sd" for a model folder or single file, from its layout alone (nothing loaded): an SDXL
    folder has text_encoder_2/, an SDXL single file keys under conditioner.embedders.* (only the safetensors
    header is read). Anything else is "sd" (and load_components says what is wrong with it)."""

    path = Path(path).expanduser()
    if path.is_dir():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return "sdxl" if is_sdxl_checkpoint(SafetensorsFile(str(path)).keys()) else "sd"
    return "sd"


def model_size_config(path):
    """-> (the UNet's config, the VAE's pixels per latent cell) of a model folder or single file, from its
    configs (a single file's: inferred from its tensors' names and shapes) without reading any weight: what
    size_rule and memory_estimate.check_attention_size need to check a picture size before the model loads."""
    parts = load_pipeline_components(Path(path).expanduser())
    unet_config, vae_config = parts["unet"][0], parts["vae"][0]
    return unet_config, 2 ** (len(vae_config["block_out_channels"]) - 1)


def model_tokenizer(path):
    """The tokenizer a model folder or single file loads with (its tokenizer/ folder, or what a single file falls
    back to), from its configs and the tokenizer's files: no weight is read (load_pipeline_components opens the
    weight files' headers only)."""
    return _tokenizer(path, None, load_pipeline_components(Path(path).expanduser()), "tokenizer")


def load_components(path, variant=None, tokenizer=None, prediction_type=None, family="sd", precision="fp32"):
    """-> dict(text_encoder, tokenizer, unet, vae, scheduler_config; text_encoder_2, tokenizer_2, model_index)
    from a folder or a single file.

    path: a diffusers folder (text_encoder/, tokenizer/, unet/, vae/, scheduler/) or a single-file
          SD 1.x/2.x .safetensors checkpoint, read by npdiff.loading.load_pipeline_components. The tokenizer
          comes from `tokenizer` (a folder) if given, else the model's tokenizer/ folder; a single file
          holds none, so then from a tokenizer/ folder beside the file, else the shipped model's, else
          the CLIP vocabulary rebuilt from the openai-clip package (all SD 1.x use the same one).
          The scheduler config is the folder's scheduler/scheduler_config.json, else SD 2.1's for an
          SD 2.x single file (v-prediction, npdiff.loading.single_file_sd2), else SDXL's for an SDXL
          model, else SD 1.5's (chosen by npdiff.loading.load_pipeline_components, which also applies
          prediction_type). SD 2.x single files pad with "!" (id 0): their fallback tokenizer does too, as
          does SDXL's tokenizer_2 (tokenizer_2/ folder, else beside the file, else openai-clip's padded with "!").
    prediction_type: "epsilon" or "v_prediction" replaces the scheduler config's (None: keep it).
    family: "sd" (SD 1.x/2.x: StableDiffusionPipeline) or "sdxl" (text_encoder_2 present: an SDXL base, or a
          refiner without text_encoder); a model of the other family is an NpdiffError naming the pipeline
          that loads it, before any network is built.
    precision: "fp32", "bf16" (the networks' Linear and Conv2d weights packed in bfloat16), "bf16x3" or "mixed"
          (some of the UNet's layers in bfloat16): npdiff/models/precision.py; checked before anything is read.
    """
    path = Path(path).expanduser()
    check_precision(precision)
    parts = load_pipeline_components(path, variant=variant, prediction_type=prediction_type)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if parts.get(name) is not None:
            parts[name][1].set_precision(precision)  # (config, Weights): the layers read it as they are built
    found = "sdxl" if parts.get("text_encoder_2") is not None else "sd"
    if found != family:
        loader = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[found]
        what = ("an SDXL model (it has a second text encoder, text_encoder_2)" if found == "sdxl"
                else "an SD 1.x/2.x model (it has no second text encoder, text_encoder_2)")
        raise NpdiffError(f"{path} is {what}; load it with npdiff.{loader}.from_pretrained({str(path)!r})")
    return {
        "text_encoder": _text_encoder(parts["text_encoder"], projection=False),
        "tokenizer": _tokenizer(path, tokenizer, parts, "tokenizer"),
        "text_encoder_2": _text_encoder(parts.get("text_encoder_2"), projection=True),
        "tokenizer_2": _tokenizer(path, None, parts, "tokenizer_2"),
        "unet": UNet2DConditionModel(*parts["unet"]),
        "vae": AutoencoderKL(*parts["vae"]),
        "scheduler_config": dict(parts["scheduler"]),
        "model_index": parts.get("model_index"),
    }


def _text_encoder(config_and_weights, projection):
    """CLIPTextModel, CLIPTextModelWithProjection (SDXL's text_encoder_2), or None when the model has none."""
    if config_and_weights is None:
        return None
    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model(*config_and_weights)


def _tokenizer(path, given, parts, name):
    """The tokenizer of text encoder `name` ("tokenizer" or "tokenizer_2"; None when that encoder is absent)."""
    encoder = parts.get("text_encoder" if name == "tokenizer" else "text_encoder_2")
    if given is not None:
        return CLIPTokenizer.from_pretrained(given)
    if encoder is None:
        return None
    if parts.get(name) is not None:
        return CLIPTokenizer.from_pretrained(parts[name])
    # SD 2.x's OpenCLIP and SDXL's second tokenizer pad with "!"
    openclip = name == "tokenizer_2" or (encoder[0].get("hidden_act") == "gelu" and not parts.get("text_encoder_2"))
    return _fallback_tokenizer(path, pad_token="!" if openclip else None, folder_name=name)


def _fallback_tokenizer(path, pad_token=None, folder_name="tokenizer"):
    """For a model without a tokenizer/ folder: beside it, the shipped model's, or openai-clip's.

    pad_token "!" (SD 2.x, SDXL's tokenizer_2): not the shipped model's (an SD 1.x tokenizer), openai-clip's
    padded with "!". folder_name: the folder looked for beside a single file (tokenizer_2 for SDXL's second).
    """
    beside = path.parent / folder_name
    if path.is_file() and beside.is_dir():
        return CLIPTokenizer.from_pretrained(beside)
    if pad_token is not None:
        return _tokenizer_from_openai_clip(pad_token)
    try:
        shipped = default_model_path()
        if shipped.is_dir() and (shipped / "tokenizer").is_dir() and shipped.resolve() != path.resolve():
            return CLIPTokenizer.from_pretrained(shipped / "tokenizer")
    except NpdiffError:
        pass
    return _tokenizer_from_openai_clip()


def tokenizer_cache_folder(pad_token=None):
    """Where the CLIP tokenizer rebuilt from openai-clip is kept (SD 2.x's, padded with "!", beside it)."""
    name = "clip-tokenizer" if pad_token is None else "clip-tokenizer-sd2"
    return cache_folder() / name


def _tokenizer_from_openai_clip(pad_token=None):
    """The SD 1.x tokenizer (SD 2.x's with pad_token "!") rebuilt from the openai-clip package's BPE file
    (kept in a cache folder).

    The cache is written whole or not at all (atomic_folder); a cache that is there but cannot be read
    (damaged by hand, a disk error) is rebuilt with a warning instead of failing every later load.
    """
    import functools
    import warnings

    cache = tokenizer_cache_folder(pad_token)
    if cache.exists():
        try:
            return CLIPTokenizer.from_pretrained(cache)
        except (NpdiffError, OSError) as exc:
            warnings.warn(f"the tokenizer cache {cache} is damaged ({exc}); rebuilding it", stacklevel=2)
    write = write_clip_tokenizer_folder if pad_token is None else functools.partial(write_clip_tokenizer_folder,
                                                                                       pad_token=pad_token)
    atomic_folder(cache, write)
    return CLIPTokenizer.from_pretrained(cache)


# ---------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------
def resolve_scheduler(scheduler, config):
    """-> (scheduler instance, its name) from a SCHEDULERS name, an instance, or None (the config's own)."""
    if scheduler is None:
        instance = scheduler_from_config(config)
        return instance, scheduler_name(instance)
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise NpdiffError(f"unknown scheduler {scheduler!r}; known: {', '.join(sorted(SCHEDULERS))}")
        return make_scheduler(scheduler, config), scheduler
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        raise NpdiffError(f"scheduler must be a name ({', '.join(sorted(SCHEDULERS))}) or a scheduler "
                          f"instance, got {type(scheduler).__name__}")
    return scheduler, scheduler_name(scheduler)


def scheduler_name(instance):
    """The SCHEDULERS name of an instance, else its class name.

    A preset (e.g. dpmpp_2m_karras = DPM-Solver++ with use_karras_sigmas=True) wins over its plain class
    when the instance's config has the preset's fixed values.
    """
    config = getattr(instance, "config", None) or {}
    found = None
    for name, entry in SCHEDULERS.items():
        cls = getattr(entry, "scheduler_class", entry)
        fixed = getattr(entry, "fixed", {})
        if type(instance) is cls and all(config.get(key) == value for key, value in fixed.items()):
            if found is None or fixed:
                found = name
    return found or type(instance).__name__


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise NpdiffError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_guidance(guidance_scale):
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
        raise NpdiffError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise NpdiffError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def vae_scale_factor(vae):
    """Pixels per latent cell: 2 ** (VAE blocks - 1) (diffusers' formula; an AutoencoderTiny reports its
    decoder blocks as block_out_channels, as diffusers' does)."""
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


def check_vae_fits(vae, unet_config, model_scale_factor):
    """A VAE set on a pipeline (`pipe.vae = AutoencoderTiny...`, --vae) must work in the latent space the
    UNet was trained in: as many pixels per latent cell as the model's own VAE (`model_scale_factor`;
    None: `vae` is the model's own) and the UNet's latent channels. Else NpdiffError, before any picture
    (a TAESD of another scale factor silently made 16x16 pictures from a 64x64 model). -> the VAE."""
    if not hasattr(vae, "decode") or not isinstance(getattr(vae, "config", None), dict):
        raise NpdiffError(f"vae must be an npdiff AutoencoderKL or AutoencoderTiny, got {type(vae).__name__}")
    name = type(vae).__name__
    scale = vae_scale_factor(vae)
    if model_scale_factor is not None and scale != model_scale_factor:
        ratio = max(scale, model_scale_factor) // min(scale, model_scale_factor)
        size = "small" if scale < model_scale_factor else "large"
        raise NpdiffError(f"this {name} turns {scale}x{scale} pixels into one latent cell, but the model's UNet "
                          f"works on latents of {model_scale_factor}x{model_scale_factor}-pixel cells (its own "
                          f"VAE's): its pictures would be {ratio} times too {size}; use a VAE made for this model "
                          "(TAESD 'taesd' for SD 1.x/2.x, 'taesdxl' for SDXL)")
    channels, unet_channels = vae.config.get("latent_channels"), unet_config.get("out_channels")
    if channels != unet_channels:
        raise NpdiffError(f"this {name} has {channels} latent channels, but the model's UNet makes "
                          f"{unet_channels}; use a VAE made for this model")
    return vae


def check_callback(callback, callback_steps):
    """callback: None or callable(step, timestep, latents); callback_steps: an integer >= 1. -> both."""
    if callback is not None and not callable(callback):
        raise NpdiffError(f"callback must be a function (step, timestep, latents) or None, got {callback!r}")
    return callback, check_positive_int(callback_steps, "callback_steps")


def check_eta(eta):
    """eta (DDIM's eta, TCD's gamma): a finite number in [0, 1]."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise NpdiffError(f"eta must be a number in [0, 1], got {eta!r}")
    if not math.isfinite(eta) or not 0 <= eta <= 1:
        raise NpdiffError(f"eta must be in [0, 1], got {eta!r}")
    return float(eta)


def check_output_type(output_type):
    if output_type not in ("pil", "np", "latent"):
        raise NpdiffError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    return output_type


def check_strength(strength):
    if not isinstance(strength, (int, float, np.floating)) or not (0 < strength <= 1):
        raise NpdiffError(f"strength must be in (0, 1], got {strength!r}")
    return float(strength)


def as_prompt_list(prompt, negative_prompt):
    """-> (prompts, negative prompts), lists of equal length; "" is the default negative prompt."""
    for what, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        many = isinstance(value, (list, tuple))
        for index, text in enumerate(value if many else [value]):
            if isinstance(text, (str, bytes, bytearray)):
                check_prompt_text(text, f"{what} {index}" if many else what)
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise NpdiffError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        negatives = list(negative_prompt)
    else:
        raise NpdiffError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    if len(negatives) != len(prompts):
        raise NpdiffError(f"negative_prompt has batch size {len(negatives)} but prompt has batch size "
                          f"{len(prompts)}; pass one negative prompt, or one per prompt")
    return prompts, negatives


def check_finite_latents(latents, step, total, timestep):
    """NpdiffError when sampling step `step` (0-based) made NaN or Inf latents: never a black picture."""
    xp = backend.array_module(latents)
    if not bool(xp.isfinite(latents).all()):
        raise NpdiffError(f"sampling step {step + 1} of {total} (timestep {float(timestep):g}) produced NaN or "
                          "infinite latents; the model's weights or config make non-finite numbers (or "
                          "guidance_scale is extreme), so no picture was made")


def check_finite_decoded(decoded):
    """NpdiffError when the VAE decoded NaN or Inf values (they would become a black picture)."""
    if not bool(backend.array_module(decoded).isfinite(decoded).all()):
        raise NpdiffError("the VAE decoded NaN or infinite values from finite latents; its weights or config "
                          "make non-finite numbers, so no picture was made")


SEED_RANGE = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)  # torch.manual_seed's


def make_generator(seed, generator):
    """-> (TorchGenerator, seed or None). A fresh random seed when neither is given (reported back)."""
    if seed is not None and generator is not None:
        raise NpdiffError("pass seed= or generator=, not both")
    if generator is not None:
        if not callable(getattr(generator, "randn", None)):
            raise NpdiffError(f"generator must be an npdiff.rng generator (TorchGenerator(seed), with a randn "
                              f"method), got {type(generator).__name__}; or pass seed=")
        return generator, None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise NpdiffError(f"seed must be an integer, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise NpdiffError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (what torch.manual_seed takes), "
                          f"got {seed}")
    return TorchGenerator(int(seed)), int(seed)
