"""Hires fix, as AUTOMATIC1111's webui does it: a picture at the first size, upscaled, then redrawn in part.

    out = pipe("a red circle", height=512, width=512, seed=1, hires_scale=2, hires_strength=0.7)  # 1024x1024

The flow composes the pipeline's own calls; there is no second sampling loop:
  0. check the hires settings and the second size (the first size times hires_scale, rounded down to
     whole latent cells as webui does: int(side * scale) // f), before any work;
  1. text-to-image at the first size: pipe(..., output_type="latent") for a latent upscaler, the decoded
     picture for "lanczos";
  2. upscale: the latents with npdiff.kernels.resize (torch's interpolate: bilinear, nearest, nearest-exact,
     bicubic; no antialias, as webui's "Latent" modes), or the picture with PIL's Lanczos;
  3. image-to-image at hires_strength with hires_steps steps (0 or None: the first pass's count), from the
     upscaled latents as they are (no VAE encoder) or from the upscaled picture; hires_steps is img2img's
     num_inference_steps as diffusers counts it (int(hires_steps * strength) steps run; webui runs all
     hires_steps over a longer schedule, which no diffusers call does);
one generator runs on through 1 and 3, so the picture equals diffusers' txt2img(output_type="latent") ->
torch.nn.functional.interpolate -> img2img(image=latents) with the same torch.Generator continuing.
The output's parameters are those of the first pass (its size, steps and seed) with the hires settings;
webui writes them as "Hires upscale", "Hires steps", "Hires upscaler" and "Denoising strength".
"""

from dataclasses import dataclass

import numpy as np

from npdiff.errors import NpdiffError, shorten
from npdiff.hires_names import (
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    HIRES_UPSCALERS,
)
from npdiff.kernels.resample import resize
from npdiff.memory_estimate import PictureSizeError, check_attention_size
from npdiff.picture_size import check_size, size_rule
from npdiff.pipeline_utils import check_strength, make_generator
from npdiff.sampling_starts import check_denoising_steps


@dataclass(frozen=True)
class HiresSettings:
    scale: float
    strength: float = DEFAULT_HIRES_STRENGTH
    steps: int = 0  # 0: the first pass's count, as webui's "Hires steps: 0"
    upscaler: str = DEFAULT_HIRES_UPSCALER

    def parameters(self):
        return {"hires_scale": self.scale, "hires_strength": self.strength, "hires_steps": self.steps,
                "hires_upscaler": self.upscaler}


def check_hires(scale, strength=DEFAULT_HIRES_STRENGTH, steps=None, upscaler=DEFAULT_HIRES_UPSCALER):
    """The pipeline's hires_* arguments -> HiresSettings, or NpdiffError naming the bad one."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not 1 <= scale <= 16:
        raise NpdiffError(f"hires_scale must be a number in [1, 16], got {shorten(scale)}")
    strength = DEFAULT_HIRES_STRENGTH if strength is None else check_strength(strength)
    steps = 0 if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise NpdiffError(f"hires_steps must be an integer >= 0 (0: as many as the first pass), got {shorten(steps)}")
    upscaler = DEFAULT_HIRES_UPSCALER if upscaler is None else upscaler
    if upscaler not in HIRES_UPSCALERS:
        raise NpdiffError(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {shorten(upscaler)}")
    return HiresSettings(float(scale), float(strength), int(steps), upscaler)


def hires_size(pipe, height, width, scale):
    """-> (first (height, width), second (height, width)) in pixels: the second is webui's int(side * scale)
    rounded down to whole latent cells; both checked against the model's size rule."""
    factor = pipe.vae_scale_factor
    default_side = pipe.unet.config["sample_size"] * factor
    multiple, why = size_rule(pipe.unet.config, factor)
    first = check_size(default_side if height is None else height, default_side if width is None else width,
                       multiple, why)
    return first, second_size(pipe.unet.config, factor, first, scale)


def second_size(unet_config, factor, first, scale):
    """The second pass's (height, width) for a first pass of `first` pixels: webui's int(side * scale) rounded
    down to whole latent cells of `factor` pixels, checked against the model's size rule and attention limit
    (a PictureSizeError names hires_scale and the size as what to lower). Needs the model's configs only."""
    second = tuple(int(side * scale) // factor * factor for side in first)  # whole latent cells
    turns = (f"hires_scale {scale:g} turns {first[1]}x{first[0]} into {second[1]}x{second[0]}, which the model "
             "cannot take")
    try:
        check_size(*second, *size_rule(unet_config, factor))
        check_attention_size(unet_config, factor, *second)  # the second pass's size, before the first runs
    except PictureSizeError as exc:
        raise PictureSizeError(f"{turns}: {exc.problem}", ("hires_scale", "size")) from None
    except NpdiffError as exc:
        raise NpdiffError(f"{turns}: {exc}") from None
    return second


def upscale(first_output, second_size, upscaler, factor):
    """Step 2: the first pass's latents [B,4,h,w] -> [B,4,H/f,W/f], or its pictures -> one picture HxW."""
    mode, _ = HIRES_UPSCALERS[upscaler]
    height, width = second_size
    if mode is not None:
        return resize(first_output.latents, (height // factor, width // factor), mode)  # [B,4,h,w] -> [B,4,H/f,W/f]
    from PIL import Image

    return first_output.images[0].resize((width, height), Image.LANCZOS)  # webui's "Lanczos" upscaler


def hires_fix(pipe, settings, first_call, second_call, output_type="pil"):
    """Steps 0-3 of the module docstring. first_call: pipe(...)'s keyword arguments (height, width, seed,
    generator, num_inference_steps and what both calls share); second_call: pipe.img2img(...)'s besides
    image, strength, steps and the generator (the prompts, guidance, ...). -> the second call's output, with
    the first pass's size, steps and seed and the hires settings in its parameters."""
    # 0. the settings and both sizes, before any work
    first_call = dict(first_call)
    (height, width), second_size = hires_size(pipe, first_call.pop("height"), first_call.pop("width"),
                                              settings.scale)
    batch = len(first_call["prompt"]) if isinstance(first_call["prompt"], (list, tuple)) else 1
    if settings.upscaler == "lanczos" and batch * first_call.get("num_images_per_prompt", 1) != 1:
        raise NpdiffError("hires_upscaler 'lanczos' upscales one picture; use a latent upscaler for a batch")
    steps = first_call["num_inference_steps"]
    if isinstance(steps, int):  # a bad steps value is the first pass's own error
        check_denoising_steps(settings.steps or steps, settings.strength)  # the second pass keeps a step
    generator, seed = make_generator(first_call.pop("seed"), first_call.pop("generator"))
    # 1. text-to-image at the first size
    latent_upscaler = HIRES_UPSCALERS[settings.upscaler][0] is not None
    first = pipe(**first_call, height=height, width=width, generator=generator,
                 output_type="latent" if latent_upscaler else "pil")
    # 2. upscale
    upscaled = upscale(first, second_size, settings.upscaler, pipe.vae_scale_factor)
    # 3. image-to-image at the second size, the generator running on
    second = pipe.img2img(**second_call, image=upscaled, strength=settings.strength,
                          num_inference_steps=settings.steps or steps, generator=generator, output_type=output_type)
    parameters = dict(second.parameters, seed=seed, steps=steps, height=height, width=width, mode="txt2img",
                      **settings.parameters())
    parameters.pop("strength", None)
    second.parameters = parameters
    second.seed = seed
    return second
