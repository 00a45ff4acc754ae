"""SDXL's own settings in a recipe (npdiff/recipe.py), and base + refiner as one picture.

  SDXL_OPTION_FLAGS            the pipeline keyword of each SDXL-only setting -> its command-line flag (the
                               recipe's option names, dashed), for messages in the user's terms
  check_sdxl_value(name, v)    one SDXL option's value from a command line, a batch line or a PNG -> the
                               value the pipeline and the PNG use, or None when `name` is not an SDXL option:
                                 sizes (original_size, target_size, negative_*): "WxH" (width first, as
                                   webui's Size) or [height, width] (diffusers' order, as the PNG stores it)
                                 crops_coords_top_left (and negative_): "X,Y" (from the left, from the top)
                                   or [top, left] (diffusers' order)
                                 aesthetic_score, negative_aesthetic_score: a finite number
                                 refiner_switch, denoising_start, denoising_end: a fraction of the
                                   schedule strictly between 0 and 1
  check_sdxl_settings(...)     what a call asks for against what the model and the refiner are: an SDXL
                               setting given to an SD 1.x/2.x model, a refiner that is no refiner, a switch
                               without a refiner, ... -> NpdiffError before any work
  pipe_kind(pipe)              "sd", "sdxl" (a base) or "sdxl-refiner", from a loaded pipeline
  Refiner(pipe, identity)      a loaded refiner and how the PNG names it ({"refiner": name, "refiner_hash"})
  render_with_refiner(...)     diffusers' "ensemble of experts", webui's "Refiner switch at": the base runs
                               the schedule down to `refiner_switch` (denoising_end, latents out), the refiner
                               the rest from those latents (denoising_start; inpainting: its inpaint with the
                               same mask); -> the refiner's output with the parameters of the whole picture

The ensemble is diffusers' (the schedule is cut at a timestep), not webui's (which switches models at a step
of one sampler run): the same settings draw diffusers' picture, not webui's.
"""

import re
from collections import namedtuple

from npdiff.errors import NpdiffError, shorten
from npdiff.option_numbers import integral, is_int, is_number

DEFAULT_REFINER_SWITCH = 0.8  # webui's "Refiner switch at" default, diffusers' high_noise_frac example
SIZE_KEYWORDS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
CROP_KEYWORDS = ("crops_coords_top_left", "negative_crops_coords_top_left")
SCORE_KEYWORDS = ("aesthetic_score", "negative_aesthetic_score")
WINDOW_KEYWORDS = ("denoising_start", "denoising_end")  # diffusers' cuts of the schedule (without a refiner)
FRACTION_KEYWORDS = ("refiner_switch",) + WINDOW_KEYWORDS
SDXL_OPTION_FLAGS = {
    "prompt_2": "--prompt-2", "negative_prompt_2": "--negative-2",
    **{keyword: "--" + keyword.replace("_", "-")
       for keyword in SIZE_KEYWORDS + CROP_KEYWORDS + SCORE_KEYWORDS + FRACTION_KEYWORDS},
}
FRACTION_MEANINGS = {
    "refiner_switch": "the fraction of the schedule the base runs before the refiner takes over; webui's "
                      "'Refiner switch at'",
    "denoising_start": "the fraction of the schedule already run: start there, adding no noise",
    "denoising_end": "the fraction of the schedule to run before stopping",
}
MAX_SIZE = 10**6  # pixels a side: far past any picture, small enough to stay an exact float32
SIZE_TEXT = re.compile(r"^\s*(\d{1,7})\s*[xX]\s*(\d{1,7})\s*$")
CORNER_TEXT = re.compile(r"^\s*(\d{1,7})\s*,\s*(\d{1,7})\s*$")
# what the refiner's img2img call takes of the recipe's keywords (its text encoder reads `prompt`)
REFINER_KEYWORDS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "num_inference_steps",
                    "guidance_scale", "seed", "eta", "clip_skip", "prompt_syntax") + SIZE_KEYWORDS + CROP_KEYWORDS

Refiner = namedtuple("Refiner", ["pipe", "identity"])


def flag(keyword):
    """"original_size" -> "--original-size / original_size": how a message names a setting."""
    return f"{SDXL_OPTION_FLAGS.get(keyword, '--' + keyword.replace('_', '-'))} / {keyword}"


def _pair(value, name, pattern, text_form, list_form, swap, smallest):
    """A pair from text (pattern, read (a, b) and stored (b, a) when `swap`) or a 2-list of integers (an integral
    float such as 1024.0 is that int, as for every integer option) -> [int, int]."""
    if isinstance(value, str):
        match = pattern.match(value)
        if match is None:
            raise NpdiffError(f"{name!r} must be {text_form} or {list_form}, got {shorten(value)}")
        first, second = int(match.group(1)), int(match.group(2))
        pair = [second, first] if swap else [first, second]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(integral(v)) for v in value):
        pair = [integral(value[0]), integral(value[1])]  # 1024.0 -> 1024, the one rule (option_numbers)
    else:
        raise NpdiffError(f"{name!r} must be {text_form} or {list_form}, got {shorten(value)}")
    if not all(smallest <= v <= MAX_SIZE for v in pair):
        raise NpdiffError(f"{name!r}: each number must be in [{smallest}, {MAX_SIZE}], got {shorten(value)}")
    return pair


def check_sdxl_value(name, value, where=None):
    """An SDXL option's value -> what the pipeline takes (see the module doc); None when `name` is no SDXL option."""
    label = f"{where}: {name}" if where else name
    if name in SIZE_KEYWORDS:  # "WxH" -> [H, W]
        return _pair(value, label, SIZE_TEXT, "WIDTHxHEIGHT", "[height, width]", swap=True, smallest=1)
    if name in CROP_KEYWORDS:  # "X,Y" -> [top, left] = [Y, X]
        return _pair(value, label, CORNER_TEXT, "X,Y (pixels from the left, from the top)", "[top, left]",
                     swap=True, smallest=0)
    if name in SCORE_KEYWORDS + FRACTION_KEYWORDS:
        number_ok = is_number(value)
        if name in FRACTION_KEYWORDS and not (number_ok and 0 < value < 1):
            named = f"{where}: {flag(name)}" if where else flag(name)
            raise NpdiffError(f"{named} must be a number strictly between 0 and 1 ({FRACTION_MEANINGS[name]}), "
                              f"got {shorten(value)}")
        if not number_ok:
            raise NpdiffError(f"{label!r} must be a finite number (webui's default: 6 for the aesthetic score, 2.5 "
                              f"for the negative one), got {shorten(value)}")
        return float(value)
    return None


def pipe_kind(pipe):
    """"sd" (no second text encoder), "sdxl-refiner" (aesthetic-score conditioning) or "sdxl" (a base)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return "sd"
    return "sdxl-refiner" if getattr(pipe, "requires_aesthetics_score", False) else "sdxl"


KIND_NAMES = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL base model", "sdxl-refiner": "an SDXL refiner"}


def check_sdxl_settings(command, keywords, model_kind, refiner_kind=None, control=False, refiner_name="the refiner"):
    """keywords: the pipeline call's (recipe.pipeline_arguments); model_kind / refiner_kind: pipe_kind's words
    (refiner_kind None: no refiner). NpdiffError naming the setting for what cannot be done; nothing is loaded."""
    given = {name for name, value in keywords.items() if value is not None}
    # 1. an SD 1.x/2.x model takes no SDXL setting
    if model_kind == "sd":
        for keyword in SDXL_OPTION_FLAGS:
            if keyword in given:
                raise NpdiffError(f"{flag(keyword)} is for SDXL models (a second text encoder); this model has one")
        if refiner_kind is not None:
            raise NpdiffError("--refiner is for SDXL base models; this model is an SD 1.x/2.x model")
    # 2. denoising_start / denoising_end: one window of the schedule, by no other setting's way of cutting it
    check_window_settings(keywords, given, refiner_kind, control)
    # 3. the refiner: an SDXL refiner after an SDXL base
    if refiner_kind is None:
        if "refiner_switch" in given:
            raise NpdiffError(f"{flag('refiner_switch')} needs --refiner FILE_OR_FOLDER (the SDXL refiner to "
                              "switch to)")
        scores = sorted(given & set(SCORE_KEYWORDS))
        if scores and (model_kind != "sdxl-refiner" or command == "generate"):
            raise NpdiffError(f"{flag(scores[0])} conditions an SDXL refiner (its img2img or inpaint); give "
                              "--refiner FILE_OR_FOLDER after a base, or a refiner as --model to npdiff img2img")
        return
    if refiner_kind != "sdxl-refiner":
        raise NpdiffError(f"--refiner: {refiner_name} is {KIND_NAMES[refiner_kind]}, not an SDXL refiner (a UNet "
                          "conditioned on the aesthetic score, text_encoder_2 alone)")
    if model_kind == "sdxl-refiner":
        raise NpdiffError("--refiner follows an SDXL base, and --model is an SDXL refiner itself: give the base "
                          "model as --model")
    if keywords.get("hires_scale") is not None or control:
        raise NpdiffError(f"--refiner cannot be combined with {'--hires-scale' if not control else '--control'}")


def check_window_settings(keywords, given, refiner_kind, control):
    """denoising_start below denoising_end; neither beside --refiner (its switch cuts the schedule), the hires
    fix (its first pass runs the whole schedule) or --control (its pipeline runs the whole schedule)."""
    window = [keyword for keyword in WINDOW_KEYWORDS if keyword in given]
    if not window:
        return
    if len(window) == 2 and keywords["denoising_start"] >= keywords["denoising_end"]:
        raise NpdiffError(f"{flag('denoising_start')} {keywords['denoising_start']} must be smaller than "
                          f"{flag('denoising_end')} {keywords['denoising_end']}")
    if refiner_kind is not None:
        raise NpdiffError(f"{flag(window[0])} cannot be combined with --refiner: --refiner-switch says where the "
                          "base stops and the refiner starts")
    if keywords.get("hires_scale") is not None or control:
        raise NpdiffError(f"{flag(window[0])} cannot be combined with "
                          f"{'--hires-scale' if not control else '--control'}")


def _offset_callback(callback, callback_steps, offset):
    """The pipeline's callback(step, t, latents) at every step, passed on at the user's every `callback_steps`
    with the step counted from `offset`; -> (wrapper, {"calls": n} counting the steps seen)."""
    seen = {"calls": 0}

    def wrapper(step, timestep, latents):
        seen["calls"] += 1
        if callback is not None and (step + offset) % callback_steps == 0:
            callback(step + offset, timestep, latents)

    return wrapper, seen


def render_with_refiner(pipe, refiner, command, keywords, picture=None, callback=None, callback_steps=1,
                        mask=None):
    """base + refiner (module doc): pipe runs `command` ("generate", "img2img" of `picture`, or "inpaint" of
    `picture` where `mask` is white) down to keywords["refiner_switch"] (default 0.8) and returns latents; the
    refiner runs the rest (its img2img, or its inpaint of those latents with the same mask and size) -> its
    output, whose parameters are the base's with the switch, the refiner's scores and its identity (no
    denoising_end: the switch says it)."""
    keywords = dict(keywords)
    switch = keywords.pop("refiner_switch", None) or DEFAULT_REFINER_SWITCH
    scores = {name: keywords.pop(name) for name in SCORE_KEYWORDS if keywords.get(name) is not None}
    # 1. the base: the first part of the schedule, latents still noisy
    base_callback, seen = _offset_callback(callback, callback_steps, 0)
    cut = {"denoising_end": switch, "output_type": "latent", "callback": base_callback, "callback_steps": 1}
    if command == "generate":
        base = pipe(**keywords, **cut)
    elif command == "img2img":
        base = pipe.img2img(image=picture, **keywords, **cut)
    else:
        base = pipe.inpaint(image=picture, mask_image=mask, **keywords, **cut)
    # 2. the refiner: the rest, from the base's latents (no noise added: they are noisy already)
    refiner_callback, _ = _offset_callback(callback, callback_steps, seen["calls"])
    same = {name: keywords[name] for name in REFINER_KEYWORDS if name in keywords}
    finish = {"image": base.latents, "denoising_start": switch, **same, **scores, "callback": refiner_callback,
              "callback_steps": 1}
    if command == "inpaint":  # the same mask, read at the size the base worked at (the latents' size in pixels)
        scale = refiner.pipe.vae_scale_factor
        height, width = base.latents.shape[2] * scale, base.latents.shape[3] * scale  # [B,4,h,w] -> H, W
        output = refiner.pipe.inpaint(mask_image=mask, height=height, width=width, **finish)
    else:
        output = refiner.pipe.img2img(**finish)
    # 3. the parameters of the whole picture
    parameters = {name: value for name, value in base.parameters.items() if name != "denoising_end"}
    parameters["refiner_switch"] = switch
    parameters.update({name: output.parameters[name] for name in SCORE_KEYWORDS if name in output.parameters})
    parameters.update(refiner.identity)
    output.parameters = parameters
    return output
