"""webui's request and response shapes for `npdiff serve` (AUTOMATIC1111's /sdapi/v1), checked and mapped
onto npdiff's recipe options (npdiff.recipe): no web framework here, only dicts in and dicts out.

  parse_json_body(raw)                    request bytes -> a JSON object; NaN/Infinity and non-objects refused
  picture_request(body, kind, lora_dir)   a txt2img / img2img body -> PictureRequest (every field checked,
                                          fields npdiff does not use listed in .ignored; the SDXL refiner's
                                          refiner_checkpoint / refiner_switch_at and webui's SDXL settings in
                                          override_settings, checked against the models by serve_refiner)
  decode_base64_picture(text, field)      webui's base64 picture (with or without a data: URL prefix) -> bytes
  response_info(request, results, ...)    webui's "info" JSON text of a finished request
  webui_parameters(params)                npdiff's PNG parameters -> webui's png-info "parameters" keys

Errors are RequestError(status, field, message): the routes turn them into webui's error shape.
"""

import base64
import binascii
import json
import math
import random
import re
from dataclasses import dataclass, field

from npdiff.errors import NpdiffError, shorten
from npdiff.hires_names import DEFAULT_HIRES_STRENGTH, HIRES_UPSCALERS, WEBUI_UPSCALERS
from npdiff.infotext import (
    DEFAULT_SCHEDULE,
    LORA_TAG,
    NPDIFF_SAMPLERS,
    SAMPLER_NAMES,
    SCHEDULE_TYPES,
    format_infotext,
    lora_tag,
)
from npdiff.picture_size import MAX_SIDE  # the memory estimate refuses most sizes well below it
from npdiff.recipe import OPTION_BY_NAME, check_value, integral
from npdiff.schedulers import SCHEDULERS
from npdiff.sdxl_recipe import DEFAULT_REFINER_SWITCH

MAX_STEPS = 1000
MAX_PICTURES = 64  # batch_size * n_iter
SEED_LIMIT = 2**32  # webui's seeds are 32-bit; -1 draws one
MAX_CROP = 10**6  # pixels: the recipe's limit for a size or crop corner
MAX_SCORE = 10**6  # an aesthetic score: any finite number (webui's field has no range); this keeps it sane

# webui fields npdiff reads: webui name -> recipe option name
USED_FIELDS = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "cfg_scale": "guidance",
               "seed": "seed", "eta": "eta", "width": "width", "height": "height"}
OTHER_USED = {"sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "override_settings",
              "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at"}
IMG2IMG_USED = {"init_images", "mask", "denoising_strength", "inpainting_mask_invert"}
# webui's fields npdiff does not act on, with webui's defaults: listed in the info when set to anything else.
# The hires fix's fields are acted on when enable_hr is true (add_hires_fields), except a fixed second size.
WEBUI_DEFAULTS = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "firstphase_width": 0, "firstphase_height": 0, "styles": [], "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "s_churn": 0, "s_tmax": 0,
    "s_tmin": 0, "s_noise": 1, "script_name": None, "script_args": [], "alwayson_scripts": {},
    "resize_mode": 0, "image_cfg_scale": 1.5, "mask_blur": 4, "mask_blur_x": 4, "mask_blur_y": 4,
    "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0, "include_init_images": False,
    "initial_noise_multiplier": 1, "infotext": None,
    "comments": {}, "disable_extra_networks": False, "force_task_id": None, "sampler_index": None,
    "send_images": True, "save_images": False,  # npdiff serve always sends its pictures and saves none
}
HIRES_USED = {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength"}
# What to lower when a picture is too large (memory_estimate.PictureSizeError), named as the request's JSON keys
SIZE_HINTS = {"size": "lower width/height", "hires_scale": "lower hr_scale",
              "image": "send a smaller init_images[0] (img2img works at its size)"}
# override_settings npdiff acts on: webui's Clip skip (1 = the last layer), the recipe's clip_skip option; webui's
# SDXL settings: the crop corner (every SDXL model), the aesthetic scores (a refiner) -> the recipe's options
SDXL_OVERRIDES = {"sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_high_aesthetic_score": 6.0,
                  "sdxl_refiner_low_aesthetic_score": 2.5}  # webui's defaults
OVERRIDES_USED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", *SDXL_OVERRIDES}
NO_REFINER = (None, "", "None", "none")  # webui's refiner_checkpoint values that mean no refiner
NAME_PATTERN = re.compile(r"^[^/\\\x00]{1,200}$")  # a model or LoRA name: no path separator, no NUL


class RequestError(NpdiffError):
    """A request npdiff serve refuses: HTTP `status`, the request `field` it is about, a message naming it."""

    def __init__(self, status, field_name, message):
        super().__init__(message)
        self.status = status
        self.field = field_name


def refuse(field_name, message, status=422):
    raise RequestError(status, field_name, f"{field_name}: {message}")


def _reject_constant(name):
    raise RequestError(400, "body", f"body: invalid JSON: {name} is not a number JSON allows")


def parse_json_body(raw):
    """The request's bytes -> a dict; RequestError 400 for invalid JSON, NaN/Infinity, or not an object."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(400, "body", "body: invalid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(400, "body", f"body: invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(422, "body", f"body: expected a JSON object, got a JSON {type(body).__name__}")
    return body


def check_name(value, field_name):
    """A model or LoRA name as the lists show it: a name, never a path."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or value in (".", "..") or value.startswith("."):
        refuse(field_name, f"must be a name from the server's list, not a path, got {shorten(value)}", 400)
    return value


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
@dataclass
class PictureRequest:
    kind: str  # "txt2img" or "img2img"
    command: str  # the recipe's command: "generate", "img2img" or "inpaint"
    options: dict  # recipe option name -> value; "seed" is the first picture's (webui: seed + i for the i-th)
    sampler: object  # an npdiff sampler name (SCHEDULERS), or None: the model's own
    pictures: int  # batch_size * n_iter
    loras: list  # [(name, scale)] from the prompt's <lora:name:scale> tags (removed from the prompt)
    model: object = None  # override_settings' sd_model_checkpoint, or None
    restore_model: bool = True  # override_settings_restore_afterwards: load the server's model again after
    init_image: bytes = None
    mask: bytes = None
    picture: object = None  # init_image decoded (PIL), by JobQueue.check
    mask_picture: object = None
    refiner: object = None  # refiner_checkpoint: an SDXL refiner's name in the server's list, or None
    sdxl_settings: dict = field(default_factory=dict)  # webui's SDXL settings as recipe options (serve_refiner)
    ignored: list = field(default_factory=list)  # "name=value" of fields npdiff does not act on
    echo: dict = field(default_factory=dict)  # the request, as webui echoes it in "parameters"


def _int_field(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    number = integral(value)  # 64.0 is 64, as on a batch line (npdiff.recipe.integral)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        refuse(name, f"must be an integer in [{low}, {high}], got {shorten(value)}")
    return number


def _number_field(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        refuse(name, f"must be a finite number in [{low}, {high}], got {shorten(value)}")
    return float(value)


def _text_field(body, name):
    value = body.get(name) or ""
    try:
        return check_value(OPTION_BY_NAME[USED_FIELDS[name]].name, value)
    except NpdiffError:
        refuse(name, f"must be a string without NUL characters, got {shorten(value)}")


def resolve_sampler(body):
    """sampler_name (webui's "Euler a", "DPM++ 2M Karras", or npdiff's "euler_a") + scheduler (webui 1.9+'s
    "Automatic" / "Karras") -> an npdiff sampler name, or None for the model's own."""
    name = body.get("sampler_name") or body.get("sampler_index")
    schedule = body.get("scheduler") or DEFAULT_SCHEDULE
    if name is None:
        return None
    if not isinstance(name, str):
        refuse("sampler_name", f"must be a sampler name (a string), got {shorten(name)}")
    if not isinstance(schedule, str):
        refuse("scheduler", f"must be a schedule type (a string), got {shorten(schedule)}")
    ours = NPDIFF_SAMPLERS.get(name) or (name if name in SCHEDULERS else None)
    if ours is None:
        refuse("sampler_name", f"unknown sampler {shorten(name)}; known: {', '.join(SAMPLER_NAMES.values())}")
    if schedule.lower() in (DEFAULT_SCHEDULE.lower(), ""):  # webui's names are "automatic", labels "Automatic"
        return ours
    if ours.endswith("_karras") and schedule.lower() == "karras":
        return ours
    karras = SCHEDULE_TYPES.get((SAMPLER_NAMES.get(ours), schedule.capitalize()))
    if karras is None:
        refuse("scheduler", f"schedule type {shorten(schedule)} is not available for {SAMPLER_NAMES[ours]!r}; "
                            f"npdiff knows {DEFAULT_SCHEDULE!r} and 'Karras' where the sampler has it")
    return karras


def prompt_loras(prompt):
    """webui's <lora:...> tags -> (prompt without them, [(name, scale)]) (infotext.lora_tag reads each tag)."""
    loras = []
    for arguments in LORA_TAG.findall(prompt):
        try:
            name, scale = lora_tag(arguments)
        except NpdiffError as exc:
            refuse("prompt", str(exc))
        check_name(name, "prompt <lora:...> name")
        loras.append((name, scale))
    cleaned = " ".join(LORA_TAG.sub(" ", prompt).split()) if loras else prompt
    return cleaned, loras


def check_lora_names(loras, paths):
    """RequestError 404 naming the prompt's first <lora:NAME:...> that is not among `paths` ({name: path} of
    --lora-dir): checked before the request is queued, and again when its job runs (the folder may change)."""
    for name, _ in loras:
        if name not in paths:
            raise RequestError(404, "prompt", f"prompt: <lora:{name}:...> names no LoRA in --lora-dir; known: "
                               f"{', '.join(paths) or 'none'}")


def ignored_fields(body, kind):
    """Fields npdiff does not act on, as "name=value", when set to something other than webui's default."""
    used = set(USED_FIELDS) | OTHER_USED | (IMG2IMG_USED if kind == "img2img" else set())
    if kind == "txt2img" and body.get("enable_hr"):
        used |= HIRES_USED
    listed = []
    for name, value in body.items():
        if name in used:
            continue
        if name == "denoising_strength" and not body.get("enable_hr"):
            continue  # txt2img: the hires pass's strength, unused without enable_hr
        if name in WEBUI_DEFAULTS and value == WEBUI_DEFAULTS[name]:
            continue
        listed.append(f"{name}={shorten(value, 40)}")
    return listed


def picture_request(body, kind):
    """A txt2img / img2img body -> PictureRequest; RequestError naming the field for anything unusable."""
    prompt, loras = prompt_loras(_text_field(body, "prompt"))
    options = {"prompt": prompt, "negative": _text_field(body, "negative_prompt"),
               "steps": _int_field(body, "steps", 20, 1, MAX_STEPS),
               "guidance": _number_field(body, "cfg_scale", 7.0, 0, 100),
               "eta": _number_field(body, "eta", 0.0, 0, 1),
               "prompt_syntax": "a1111"}  # webui's API: (word:1.2), [word], BREAK read as webui reads them
    seed = _int_field(body, "seed", -1, -1, SEED_LIMIT - 1)
    options["seed"] = random.randrange(SEED_LIMIT) if seed == -1 else seed
    pictures = _int_field(body, "batch_size", 1, 1, MAX_PICTURES) * _int_field(body, "n_iter", 1, 1, MAX_PICTURES)
    if pictures > MAX_PICTURES:
        refuse("batch_size", f"batch_size * n_iter must be at most {MAX_PICTURES}, got {pictures}")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        refuse("override_settings", f"must be an object, got {shorten(overrides)}")
    model = overrides.get("sd_model_checkpoint")
    if model is not None:
        model = check_name(model, "override_settings.sd_model_checkpoint")
    request = PictureRequest(kind=kind, command="generate", options=options, sampler=resolve_sampler(body),
                             pictures=pictures, loras=loras, model=model, ignored=ignored_fields(body, kind))
    request.ignored += [f"override_settings.{key}" for key in overrides if key not in OVERRIDES_USED]
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        options["clip_skip"] = _int_field(overrides, "CLIP_stop_at_last_layers", 1, 1, 12)
    request.restore_model = body.get("override_settings_restore_afterwards", True) is not False
    add_sdxl_overrides(request, overrides)
    add_refiner_fields(request, body)
    size = {"width": _int_field(body, "width", 512, 1, MAX_SIDE), "height": _int_field(body, "height", 512, 1, MAX_SIDE)}
    if kind == "txt2img":
        options.update(size)
        add_hires_fields(request, body)
    else:
        add_img2img_fields(request, body, size)
    request.echo = {key: value for key, value in body.items() if key not in ("init_images", "mask")}
    return request


def add_hires_fields(request, body):
    """txt2img with enable_hr: webui's hires fix fields -> the recipe's hires options (npdiff/hires.py):
    hr_scale, denoising_strength (the second pass's strength), hr_second_pass_steps (0: the first pass's),
    hr_upscaler (webui's latent names, "Lanczos", or npdiff's). A fixed second size (hr_resize_x/y) is listed
    as ignored: the scale decides."""
    if not body.get("enable_hr"):
        return
    options = request.options
    options["hires_scale"] = _number_field(body, "hr_scale", 2, 1, 8)
    options["hires_strength"] = _number_field(body, "denoising_strength", DEFAULT_HIRES_STRENGTH, 0, 1)
    options["hires_steps"] = _int_field(body, "hr_second_pass_steps", 0, 0, MAX_STEPS)
    upscaler = body.get("hr_upscaler", "Latent")
    ours = WEBUI_UPSCALERS.get(upscaler) or (upscaler if upscaler in HIRES_UPSCALERS else None)
    if ours is None:
        refuse("hr_upscaler", f"unknown upscaler {shorten(upscaler)}; npdiff has {', '.join(WEBUI_UPSCALERS)}")
    options["hires_upscaler"] = ours
    for name in ("hr_resize_x", "hr_resize_y"):
        if body.get(name):
            request.ignored.append(f"{name}={shorten(body[name], 40)} (npdiff's hires fix goes by hr_scale)")


def add_refiner_fields(request, body):
    """refiner_checkpoint (a name from the server's list; None, "" or "None": no refiner) and refiner_switch_at
    -> request.refiner and the recipe's refiner_switch: the fraction of the schedule the base runs, strictly
    between 0 and 1, 0.8 (webui's default) when not given. Without a refiner, a switch is listed as ignored."""
    name, switch = body.get("refiner_checkpoint"), body.get("refiner_switch_at")
    if name in NO_REFINER:
        if switch not in (None, 0):
            request.ignored.append(f"refiner_switch_at={shorten(switch, 40)} (no refiner_checkpoint)")
        return
    request.refiner = check_name(name, "refiner_checkpoint")
    if body.get("enable_hr"):
        refuse("refiner_checkpoint", "cannot be combined with enable_hr: npdiff's refiner finishes the base's "
                                     "schedule (diffusers' ensemble of experts), which the hires fix would run twice")
    if switch is None:
        switch = DEFAULT_REFINER_SWITCH
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch < 1:
        refuse("refiner_switch_at", f"must be a number strictly between 0 and 1 with a refiner_checkpoint (the "
                                    f"fraction of the schedule the base runs), got {shorten(switch)}")
    request.options["refiner_switch"] = float(switch)


def add_sdxl_overrides(request, overrides):
    """webui's SDXL settings in override_settings -> request.sdxl_settings (recipe options; serve_refiner applies
    them where webui does): sdxl_crop_top/left -> the crop corner of both prompts, the refiner's high / low
    aesthetic scores -> aesthetic_score / negative_aesthetic_score."""
    values = {}
    for key, default in SDXL_OVERRIDES.items():
        name = f"override_settings.{key}"
        if overrides.get(key) is None:
            continue
        if isinstance(default, int):
            values[key] = _int_field({name: overrides[key]}, name, default, 0, MAX_CROP)
        else:
            values[key] = _number_field({name: overrides[key]}, name, default, -MAX_SCORE, MAX_SCORE)
    if values.get("sdxl_crop_top") or values.get("sdxl_crop_left"):
        corner = [values.get("sdxl_crop_top", 0), values.get("sdxl_crop_left", 0)]  # [top, left], diffusers' order
        request.sdxl_settings.update(crops_coords_top_left=corner, negative_crops_coords_top_left=list(corner))
    for key, option in (("sdxl_refiner_high_aesthetic_score", "aesthetic_score"),
                        ("sdxl_refiner_low_aesthetic_score", "negative_aesthetic_score")):
        if key in values:
            request.sdxl_settings[option] = values[key]


def add_img2img_fields(request, body, size):
    """img2img: init_images[0] (base64), an optional mask (white = repaint) and denoising_strength."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        refuse("init_images", "img2img needs a list with one base64 picture")
    if len(images) > 1:
        request.ignored.append(f"init_images[1:] ({len(images) - 1} more; npdiff uses the first)")
    request.init_image = decode_base64_picture(images[0], "init_images[0]")
    request.options["strength"] = _number_field(body, "denoising_strength", 0.75, 0, 1)
    if request.options["strength"] == 0:
        refuse("denoising_strength", "must be > 0 (0 would change nothing)")
    if body.get("mask"):
        request.mask = decode_base64_picture(body["mask"], "mask")
        request.command = "inpaint"
        request.options.update(size)  # inpainting works at the requested size
        if body.get("inpainting_mask_invert"):
            request.ignored.append("inpainting_mask_invert (npdiff repaints where the mask is white)")
    else:
        request.command = "img2img"  # works at the picture's own size, as `npdiff img2img` does
        request.ignored.append("width/height (img2img keeps the picture's own size)")


def decode_base64_picture(text, field_name):
    """webui's base64 picture, with or without a "data:image/png;base64," prefix -> bytes."""
    if not isinstance(text, str) or not text:
        refuse(field_name, f"must be a base64 picture (a string), got {shorten(text)}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        refuse(field_name, "is not valid base64", 400)


def encode_base64(data):
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
def response_info(request, rendered_list, model_identity, interrupted):
    """webui's "info": a JSON text with the first picture's settings and the lists of all (all_seeds, infotexts)."""
    first = rendered_list[0].params if rendered_list else {}
    seeds = [rendered.params.get("seed") for rendered in rendered_list]
    info = {
        "prompt": request.options["prompt"], "all_prompts": [request.options["prompt"]] * len(rendered_list),
        "negative_prompt": request.options["negative"], "seed": seeds[0] if seeds else request.options["seed"],
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "sampler_name": SAMPLER_NAMES.get(first.get("sampler"), first.get("sampler")),
        "steps": request.options["steps"], "cfg_scale": request.options["guidance"],
        "width": first.get("width"), "height": first.get("height"),
        "denoising_strength": request.options.get("strength"), "batch_size": request.pictures, "n_iter": 1,
        "sd_model_name": model_identity.get("model"), "sd_model_hash": model_identity.get("model_hash"),
        "infotexts": [format_infotext(rendered.params) for rendered in rendered_list],
        "interrupted": interrupted, "npdiff_ignored": request.ignored,
        "npdiff_loras": [{"name": name, "scale": scale} for name, scale in request.loras],
    }
    return json.dumps(info)


def webui_parameters(params):
    """npdiff's PNG parameters -> webui's png-info "parameters" (parse_generation_parameters' keys)."""
    mapping = {"Prompt": params.get("prompt"), "Negative prompt": params.get("negative_prompt") or "",
               "Steps": params.get("steps"), "Sampler": SAMPLER_NAMES.get(params.get("sampler"), params.get("sampler")),
               "CFG scale": params.get("guidance_scale"), "Seed": params.get("seed"),
               "Size-1": params.get("width"), "Size-2": params.get("height"), "Model": params.get("model"),
               "Model hash": params.get("model_hash"), "Denoising strength": params.get("strength"),
               "Eta": params.get("eta")}
    return {key: value for key, value in mapping.items() if value is not None}
