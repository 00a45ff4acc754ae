"""What a picture is made from, and the one way every entry point makes it.

`npdiff generate` / `img2img` / `inpaint`, `--reproduce`, `npdiff batch` (and a server) all go through here,
so a picture made one way is byte for byte the picture made another:

  OPTIONS                        the one map between the names of an option: on the command line (and in a
                                 batch line), as the pipeline's keyword, and as the key in the PNG
  defaults_for(command)          the options a command falls back to (inpaint repaints from pure noise)
  parse_lora_option(spec)        "FILE[:SCALE]" -> (FILE, SCALE)
  parse_control_option(spec)     "CONTROLNET:IMAGE[:SCALE]" -> (CONTROLNET, IMAGE, SCALE)
  CONTROL_SETTINGS               the ControlNet settings beside --control / a line's "control" (--control-start
                                 or "control_start", ...), check_control_settings and control_for_render
  load_vae(folder)               a --vae folder (AutoencoderKL or TAESD), as its config.json names it
  use_vae_tiling(pipe, on)       the vae_tiling option (decode and encode in tiles) on a loaded pipeline
  model_png_identity(model, pt)  how a PNG names the model: name and short hash, never a path
  png_parameters(...)            what a picture's PNG stores
  options_from_png(stored, src)  a PNG's stored parameters -> options, every value checked (a PNG is input
                                 from anywhere: malformed metadata is an NpdiffError, never a traceback)
  render(pipe, command, ...)     one call of pipe / pipe.img2img / pipe.inpaint -> Rendered(png bytes,
                                 params, output); it writes no file, the callers do

render() needs nothing of the pipeline but its three calls with keyword arguments, so it serves any
pipeline that has them. Loading the model, the sampler, LoRAs and a VAE is the caller's work (each entry
point loads them its own way: once per process, once per worker); render() takes the pipeline as it is.
"""

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from npdiff.errors import NpdiffError, shorten
from npdiff.hires_names import HIRES_UPSCALERS
from npdiff.images import save_png
from npdiff.loading import read_config
from npdiff.loading.weights import PRECISIONS
from npdiff.model_identity import model_hash, model_name
from npdiff.models import AutoencoderKL, AutoencoderTiny
from npdiff.option_numbers import integral, is_int, is_number  # batch_jobs, serve_schemas import them from here
from npdiff.pipeline_utils import INSTALLED_MODEL_DIR, PACKAGE_DIR, SHIPPED_MODEL_NAME
from npdiff.preprocess import canny
from npdiff.sdxl_recipe import (
    CROP_KEYWORDS,
    FRACTION_KEYWORDS,
    SCORE_KEYWORDS,
    SIZE_KEYWORDS,
    check_sdxl_settings,
    check_sdxl_value,
    pipe_kind,
    render_with_refiner,
)


@dataclass(frozen=True)
class Option:
    name: str  # on the command line (--name, dashes for underscores) and in a batch line
    keyword: object  # the pipeline call's keyword; None: chosen when the pipeline is loaded
    png_key: str  # the key in the PNG's parameters (npdiff's JSON chunk)
    commands: tuple  # the commands that take it


ALL = ("generate", "img2img", "inpaint")
OPTIONS = (
    Option("prompt", "prompt", "prompt", ALL),
    Option("negative", "negative_prompt", "negative_prompt", ALL),
    Option("prompt_2", "prompt_2", "prompt_2", ALL),  # SDXL's second text encoder (StableDiffusionXLPipeline)
    Option("negative_2", "negative_prompt_2", "negative_prompt_2", ALL),
    Option("steps", "num_inference_steps", "steps", ALL),
    Option("guidance", "guidance_scale", "guidance_scale", ALL),
    Option("seed", "seed", "seed", ALL),
    Option("eta", "eta", "eta", ALL),
    Option("height", "height", "height", ("generate", "inpaint")),  # img2img: the picture's own size
    Option("width", "width", "width", ("generate", "inpaint")),
    Option("strength", "strength", "strength", ("img2img", "inpaint")),
    Option("sampler", None, "sampler", ALL),
    Option("prediction_type", None, "prediction_type", ALL),
    Option("clip_skip", "clip_skip", "clip_skip", ALL),  # webui's N here; the keyword and PNG: diffusers' N - 1
    Option("prompt_syntax", "prompt_syntax", "prompt_syntax", ALL),
    Option("hires_scale", "hires_scale", "hires_scale", ("generate",)),
    Option("hires_strength", "hires_strength", "hires_strength", ("generate",)),
    Option("hires_steps", "hires_steps", "hires_steps", ("generate",)),
    Option("hires_upscaler", "hires_upscaler", "hires_upscaler", ("generate",)),
    Option("vae_tiling", None, "vae_tiling", ALL),  # pipe.enable_vae_tiling(): tiles change the pixels slightly
    # SDXL's own (npdiff/sdxl_recipe.py checks them): size and crop conditioning, a refiner's aesthetic scores,
    # and where the refiner takes over (render() runs the refiner from there; the refiner itself is loaded by the
    # caller, as the model is)
    *(Option(name, name, name, ALL) for name in SIZE_KEYWORDS + CROP_KEYWORDS + SCORE_KEYWORDS),
    Option("refiner_switch", "refiner_switch", "refiner_switch", ALL),
    Option("denoising_start", "denoising_start", "denoising_start", ("img2img", "inpaint")),  # diffusers' cuts
    Option("denoising_end", "denoising_end", "denoising_end", ALL),
    Option("precision", None, "precision", ALL),  # "fp32" or "bf16", chosen when the model is loaded
)
HIRES_OPTIONS = ("hires_strength", "hires_steps", "hires_upscaler")  # they need hires_scale
SDXL_VALUES = SIZE_KEYWORDS + CROP_KEYWORDS + SCORE_KEYWORDS + FRACTION_KEYWORDS
# --reproduce fills in exactly these. The model, LoRAs, a VAE and the input pictures are never taken from a
# PNG: it names them only by name and hash, and a path read from a file is never opened.
OPTION_BY_NAME = {option.name: option for option in OPTIONS}

DEFAULTS = {"negative": "", "steps": 30, "guidance": 7.5, "strength": 0.8, "eta": 0.0}
INPAINT_DEFAULTS = dict(DEFAULTS, strength=1.0)  # diffusers' inpainting default: repaint from pure noise
PREDICTION_TYPES = ("epsilon", "v_prediction")
PROMPT_SYNTAXES = ("plain", "a1111")


def defaults_for(command):
    return INPAINT_DEFAULTS if command == "inpaint" else DEFAULTS


# ---------------------------------------------------------------------------------------------
# Checking values (from a command line, a batch line or a PNG); what is an integer or a number: option_numbers
# ---------------------------------------------------------------------------------------------
def check_prompt_text(text, what):
    """A prompt must be a string without NUL: PNG text chunks cannot hold one (the format forbids it)."""
    if not isinstance(text, str):
        raise NpdiffError(f"{what} must be a string, got {shorten(text)}")
    if "\x00" in text:
        raise NpdiffError(f"{what} holds a NUL character (at position {text.index(chr(0))}); a PNG's text "
                          "cannot store one: remove it")
    return text


def check_value(name, value, where=None):
    """One option's value, as read from a batch line or a PNG ("where" names it): NpdiffError if unusable."""
    prefix = f"{where}: " if where else ""

    def refuse(expected):
        raise NpdiffError(f"{prefix}{name!r} must be {expected}, got {shorten(value)}")

    if name in ("prompt", "negative", "prompt_2", "negative_2"):
        return check_prompt_text(value, f"{prefix}{name!r}")
    if name in ("steps", "seed", "height", "width"):
        number = integral(value)  # 64.0 -> 64; the message quotes the value as given
        if not is_int(number) or number < (0 if name == "seed" else 1) or number >= 2**64:
            refuse("an integer >= 1" if name != "seed" else "an integer in [0, 2**64)")
        return number
    if name in ("guidance", "strength", "eta"):
        if not is_number(value) or value < 0:
            refuse("a finite number >= 0")
        return float(value)
    if name == "sampler":
        if not isinstance(value, str):
            refuse("a sampler name (a string)")
        return value
    if name == "prediction_type":
        if value not in PREDICTION_TYPES:
            refuse(" or ".join(PREDICTION_TYPES))
        return value
    if name == "precision":
        if value not in PRECISIONS:
            refuse(" or ".join(PRECISIONS))
        return value
    if name == "prompt_syntax":
        if value not in PROMPT_SYNTAXES:
            refuse(" or ".join(PROMPT_SYNTAXES))
        return value
    if name in ("clip_skip", "hires_steps"):  # Clip skip: webui's N >= 1 (1: the last layer); hires_steps 0: same
        number = integral(value)
        if not is_int(number) or number < (1 if name == "clip_skip" else 0) or number > 10**6:
            refuse("an integer >= 1" if name == "clip_skip" else "an integer >= 0")
        return number
    if name == "hires_scale":
        if not is_number(value) or not 1 <= value <= 16:
            refuse("a number in [1, 16]")
        return float(value)
    if name == "hires_strength":
        if not is_number(value) or not 0 < value <= 1:
            refuse("a number in (0, 1]")
        return float(value)
    if name == "vae_tiling":
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    if name == "hires_upscaler":
        if value not in HIRES_UPSCALERS:
            refuse("one of " + ", ".join(HIRES_UPSCALERS))
        return value
    if name in SDXL_VALUES:
        return check_sdxl_value(name, value, where)
    raise NpdiffError(f"{prefix}unknown option {name!r}")


def parse_lora_option(spec, what="--lora"):
    """"FILE[:SCALE]" -> (FILE, SCALE); the scale defaults to 1."""
    if not isinstance(spec, str) or not spec:
        raise NpdiffError(f"{what}: expected FILE or FILE:SCALE, got {shorten(spec)}")
    head, sep, tail = spec.rpartition(":")
    try:
        whole_name_is_a_file = Path(spec).is_file()  # "a:b.safetensors" is a file name with a colon
    except OSError:  # a name too long to look up: not a file
        whole_name_is_a_file = False
    if whole_name_is_a_file or not sep or not head or tail.startswith(("/", "\\")):
        return spec, 1.0
    try:
        return head, float(tail)
    except ValueError:
        raise NpdiffError(f"{what} {shorten(spec)}: expected FILE or FILE:SCALE, and {shorten(tail)} is not a "
                          "number") from None


def parse_control_option(spec, what="--control"):
    """"FILE:IMAGE[:SCALE]" -> (FILE, IMAGE, SCALE): a ControlNet (file or folder), its control picture, its
    scale (default 1)."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise NpdiffError(f"{what}: expected CONTROLNET:IMAGE or CONTROLNET:IMAGE:SCALE, got {shorten(spec)}")
    net, _, rest = spec.partition(":")
    image, scale = parse_lora_option(rest, what)  # IMAGE[:SCALE], as a LoRA's FILE[:SCALE]
    if not net or not image:
        raise NpdiffError(f"{what} {shorten(spec)}: expected CONTROLNET:IMAGE[:SCALE]")
    return net, image, scale


# The settings that go with the ControlNets of --control / a batch line's "control", and their defaults: the
# same names on the command line (dashes: --control-start) and in a batch line (control_start)
CONTROL_SETTINGS = {"control_start": 0.0, "control_end": 1.0, "canny": False, "guess_mode": False}


def check_control_settings(settings, where=None):
    """{CONTROL_SETTINGS name: value or None} -> every setting checked, the defaults for the others; NpdiffError
    naming the setting (and `where`, e.g. a batch line) for a wrong one."""
    prefix = f"{where}: " if where else ""
    checked = dict(CONTROL_SETTINGS)
    for name, value in settings.items():
        if name not in CONTROL_SETTINGS:
            raise NpdiffError(f"{prefix}unknown ControlNet setting {shorten(name)}")
        if value is None:
            continue
        if isinstance(CONTROL_SETTINGS[name], bool):
            if not isinstance(value, bool):
                raise NpdiffError(f"{prefix}{name!r} must be true or false, got {shorten(value)}")
        elif not is_number(value) or not 0 <= value <= 1:
            raise NpdiffError(f"{prefix}{name!r} must be a fraction of the steps in [0, 1], got {shorten(value)}")
        checked[name] = value if isinstance(value, bool) else float(value)
    if checked["control_start"] >= checked["control_end"]:
        raise NpdiffError(f"{prefix}control_start ({checked['control_start']}) must be below control_end "
                          f"({checked['control_end']})")
    return checked


def control_for_render(pictures, scales, settings):
    """The control pictures as loaded (one per net), their scales and check_control_settings' settings ->
    render()'s `control`; with canny each picture's Canny edge map (white edges on black, RGB) is used."""
    if settings["canny"]:
        pictures = [canny(picture) for picture in pictures]
    return {"images": list(pictures), "scales": list(scales), "start": settings["control_start"],
            "end": settings["control_end"], "guess_mode": settings["guess_mode"],
            "module": "canny" if settings["canny"] else None}


def load_vae(folder):
    """--vae FOLDER: a diffusers AutoencoderKL or AutoencoderTiny (TAESD) folder, as its config.json names it."""

    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    if not Path(folder).is_dir():
        raise NpdiffError(f"--vae {folder}: no such folder")
    class_name = read_config(folder).get("_class_name")
    if class_name not in classes:
        raise NpdiffError(f"--vae {folder}: config.json names _class_name {shorten(class_name)}; expected one "
                          f"of {', '.join(classes)}")
    return classes[class_name].from_pretrained(folder)


def use_vae_tiling(pipe, on):
    """The vae_tiling option on a loaded pipeline: on -> pipe.enable_vae_tiling() (an AutoencoderKL only,
    else NpdiffError), off or None -> disable_vae_tiling()."""
    if on:
        pipe.enable_vae_tiling()
    else:
        pipe.disable_vae_tiling()


# ---------------------------------------------------------------------------------------------
# What a PNG stores, and reading it back
# ---------------------------------------------------------------------------------------------
def model_png_identity(model, prediction_type=None):
    """How a PNG names the model at `model` (a folder or file): {"model": name, "model_hash": 10 hex}
    (npdiff.model_identity), + "prediction_type" when one was chosen instead of the model's own; never its path."""

    installed = Path(model).resolve() == (PACKAGE_DIR / INSTALLED_MODEL_DIR).resolve()  # its folder's own name
    identity = {"model": SHIPPED_MODEL_NAME if installed else model_name(model), "model_hash": model_hash(model)}
    if prediction_type:  # chosen on the command line (SD 2.x base): --reproduce needs it again
        identity["prediction_type"] = prediction_type
    return identity


def png_parameters(parameters, command, identity, vae=None):
    """What a picture's PNG stores: the pipeline's parameters, the command, the model by name and hash
    (model_png_identity) and a --vae by its folder's name; never a local path."""
    params = dict(parameters, command=command, **identity)
    if vae:
        params["vae"] = Path(vae).resolve().name
    return params


def check_stored_loras(loras, source):
    """A PNG's "loras": a list of {"name", "scale", "sha256"}; -> the list, or NpdiffError naming the PNG."""
    if loras is None:
        return []
    if not isinstance(loras, list) or not all(isinstance(lora, dict) for lora in loras):
        raise NpdiffError(f"{source}: 'loras' must be a list of {{\"name\", \"scale\", \"sha256\"}} objects, got "
                          f"{shorten(loras)}")
    for lora in loras:
        if not isinstance(lora.get("name"), str) or not is_number(lora.get("scale")):
            raise NpdiffError(f"{source}: a LoRA entry needs a string 'name' and a number 'scale', got "
                              f"{shorten(lora)}")
    return loras


def options_from_png(stored, source):
    """A PNG's parameters (images.read_png_params) -> {option name: value} of what it records, each checked,
    and the identity fields checked too; NpdiffError naming `source` and the key for a malformed value."""
    options = {}
    for option in OPTIONS:
        value = stored.get(option.png_key)
        if option.name == "clip_skip" and is_int(value):
            value = value + 1  # the PNG keeps diffusers' k; the option is webui's N = k + 1
        if value is not None:
            options[option.name] = check_value(option.name, value, f"{source}: stored parameter")
    for key in ("model", "model_hash", "vae", "refiner", "refiner_hash", "command", "mode"):  # names, as text
        if stored.get(key) is not None and not isinstance(stored[key], str):
            raise NpdiffError(f"{source}: stored {key!r} must be a string, got {shorten(stored[key])}")
    check_stored_loras(stored.get("loras"), source)
    unmapped = stored.get("unmapped") or []
    if not isinstance(unmapped, list):
        raise NpdiffError(f"{source}: stored 'unmapped' must be a list, got {shorten(unmapped)}")
    return options


# ---------------------------------------------------------------------------------------------
# Making the picture
# ---------------------------------------------------------------------------------------------
@dataclass
class Rendered:
    png: bytes  # the PNG file, parameters included
    params: dict  # what it stores
    output: object  # the pipeline's output (.images, .latents, .seed, .parameters)


def pipeline_arguments(command, options):
    """-> the keyword arguments of `command`'s pipeline call: `options` (option names; None = unset) over
    defaults_for(command). NpdiffError for an unknown command, an option the command does not take, or a
    prompt the PNG could not store."""
    if command not in ALL:
        raise NpdiffError(f"unknown command {command!r}; known: {', '.join(ALL)}")
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in OPTION_BY_NAME:
            raise NpdiffError(f"unknown option {name!r}")
        if command not in OPTION_BY_NAME[name].commands:
            raise NpdiffError(f"{command} does not take {name!r}")
    for name in ("clip_skip", "prompt_syntax", "hires_scale") + HIRES_OPTIONS + SDXL_VALUES:  # before any model loads
        if name in given:
            given[name] = check_value(name, given[name])
    merged = {**defaults_for(command), **given}
    if merged.get("hires_scale") is None and any(merged.get(name) is not None for name in HIRES_OPTIONS):
        raise NpdiffError(f"{', '.join(name for name in HIRES_OPTIONS if merged.get(name) is not None)} "
                          "without hires_scale: give hires_scale too (the hires fix's upscale factor)")
    if merged.get("clip_skip") is not None:
        merged["clip_skip"] = merged["clip_skip"] - 1 or None  # webui's N -> diffusers' N - 1 (1: no skip)
    check_prompt_text(merged.get("prompt"), "the prompt")
    check_prompt_text(merged.get("negative"), "the negative prompt")
    keywords = {}
    for name, value in merged.items():
        option = OPTION_BY_NAME[name]
        if option.keyword is not None and command in option.commands:
            keywords[option.keyword] = value
    return keywords


def sdxl_arguments(pipe, keywords, command="generate", refiner=None, control=False):
    """SDXL's settings only for an SDXL pipeline, a refiner only after a base (npdiff.sdxl_recipe; NpdiffError
    otherwise); with SDXL an empty negative prompt is none at all, so that force_zeros_for_empty_prompt guides
    against zeros as diffusers' SDXL does by default."""
    check_sdxl_settings(command, keywords, pipe_kind(pipe), None if refiner is None else pipe_kind(refiner.pipe),
                        bool(control))
    is_sdxl = pipe_kind(pipe) != "sd"
    if is_sdxl and keywords.get("negative_prompt") == "":
        keywords = dict(keywords, negative_prompt=None)
    return keywords


def render(pipe, command, options, picture=None, mask=None, identity=None, vae=None, callback=None,
           callback_steps=1, control=None, refiner=None):
    """Make one picture: -> Rendered(PNG bytes, the parameters it stores, the pipeline's output).

    command: "generate", "img2img" (needs `picture`) or "inpaint" (`picture` and `mask`, white = repaint);
    options: {option name: value} (OPTIONS' names, None = the default); identity: model_png_identity of the
    loaded model; vae: the path of a VAE loaded instead of the model's (its folder name is stored);
    control: for a ControlNet pipeline, {"images": one picture per net, "scales", "start", "end", "guess_mode",
    "module": what made the pictures from the user's (e.g. "canny") or None}; refiner: an SDXL refiner
    (sdxl_recipe.Refiner) that finishes an SDXL base's picture from options["refiner_switch"] (default 0.8).
    The pipeline is used as loaded (sampler, LoRAs, VAE). Nothing is written to disk.
    """

    # 1. the call's arguments, checked before any work
    keywords = sdxl_arguments(pipe, pipeline_arguments(command, options), command, refiner, control)
    if command != "generate" and picture is None:
        raise NpdiffError(f"{command} needs a picture")
    if command == "inpaint" and mask is None:
        raise NpdiffError("inpaint needs a mask (white = repaint)")
    progress = {"callback": callback, "callback_steps": callback_steps}
    if control:  # a ControlNet pipeline: its pictures and settings, diffusers' keywords
        picture_keyword = "image" if command == "generate" else "control_image"
        progress.update({picture_keyword: control["images"], "controlnet_conditioning_scale": control["scales"],
                         "control_guidance_start": control["start"], "control_guidance_end": control["end"],
                         "guess_mode": control["guess_mode"]})
    # 2. the picture
    if refiner is not None:  # base + refiner, diffusers' ensemble of experts
        output = render_with_refiner(pipe, refiner, command, keywords, picture, callback, callback_steps, mask)
    elif command == "generate":
        output = pipe(**keywords, **progress)
    elif command == "img2img":
        output = pipe.img2img(image=picture, **keywords, **progress)
    else:
        output = pipe.inpaint(image=picture, mask_image=mask, **keywords, **progress)
    if control and control.get("module"):  # the control pictures were made from the given ones (--canny)
        for net in output.parameters.get("controlnets", []):
            net["module"] = control["module"]
    # 3. its PNG, in memory
    params = png_parameters(output.parameters, command, identity or {}, vae)
    buffer = BytesIO()
    save_png(output.images[0], buffer, params)
    return Rendered(png=buffer.getvalue(), params=params, output=output)
