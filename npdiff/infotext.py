"""AUTOMATIC1111's "parameters" text: what npdiff writes so other tools can read a picture's settings,
and how npdiff reads such text back (from its own pictures or other tools').

The text is three parts, as AUTOMATIC1111's webui writes it (modules/processing.py create_infotext):

    a red circle <lora:shapes:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

  1. the prompt (AUTOMATIC1111 keeps its <lora:name:scale> tags in it, so npdiff adds one per LoRA);
  2. "Negative prompt: ..." (left out when the negative prompt is empty, as AUTOMATIC1111 does);
  3. one line of "Key: value" pairs joined by ", ". A value holding a comma, colon or newline is
     written as a JSON string (AUTOMATIC1111's quote()), e.g. Lora hashes: "shapes: 0123456789ab".

Samplers are written with AUTOMATIC1111's names (SAMPLER_NAMES). DPM++ 2M with Karras sigmas is
written the way webui before 1.9 did, "Sampler: DPM++ 2M Karras", which webui 1.9+ still reads; the
1.9+ form "Sampler: DPM++ 2M, Schedule type: Karras" is read as well.

  format_infotext(params)  npdiff's generation parameters -> the text
  parse_infotext(text)     the text -> npdiff's parameters, plus "unmapped": the fields npdiff cannot
                           honour. What npdiff maps besides the basic settings: <lora:name:scale> tags (+
                           "Lora hashes") -> "loras"; "VAE" -> "vae"; "Clip skip" (webui's N) -> "clip_skip";
                           "Refiner: name [hash]" and "Refiner switch at" -> refiner, refiner_hash,
                           refiner_switch (SDXL; webui writes no field for the size and crop conditioning or
                           the aesthetic scores); the hires fix fields -> hires_*, and then "Denoising
                           strength" is the hires strength; without hires fix, "Denoising strength" marks a
                           webui img2img or inpaint picture ("mode": "img2img"). A sampler or hires upscaler
                           npdiff lacks is not an error here: it is kept as "unsupported_sampler" /
                           "unsupported_hires_upscaler", a problem only when no --sampler / --hires-upscaler
                           is given (the caller decides).
  other_tool(chunks)       the name of the tool that wrote a PNG's text chunks when npdiff cannot read its
                           settings (Fooocus, ComfyUI, InvokeAI, NovelAI), else None.
"""

import json
import math
import re

from npdiff.errors import NpdiffError, clip
from npdiff.hires_names import DEFAULT_HIRES_STRENGTH, HIRES_UPSCALERS, WEBUI_UPSCALERS

# npdiff scheduler name -> AUTOMATIC1111 sampler name. PNDM as used by Stable Diffusion (skip_prk_steps)
# is the PLMS sampler.
SAMPLER_NAMES = {
    "pndm": "PLMS",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_karras": "DPM2 Karras",
    "dpm2_a": "DPM2 a",
    "dpm2_a_karras": "DPM2 a Karras",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "deis": "DEIS",
    "lcm": "LCM",
    "tcd": "TCD",
}
NPDIFF_SAMPLERS = {a1111: ours for ours, a1111 in SAMPLER_NAMES.items()}
# webui 1.9+ writes the sigma schedule apart: (sampler, schedule type) -> npdiff name
SCHEDULE_TYPES = {(a1111[:-len(" Karras")], "Karras"): ours
                  for ours, a1111 in SAMPLER_NAMES.items() if a1111.endswith(" Karras")}
DEFAULT_SCHEDULE = "Automatic"  # the schedule type that means "the sampler's own"

# AUTOMATIC1111 fields npdiff uses: field -> (npdiff key, conversion)
FIELDS = {
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "Eta": ("eta", float),  # webui writes "Eta" for its ancestral samplers' eta, "Eta DDIM" for DDIM's
    "Eta DDIM": ("eta", float),
    "Clip skip": ("clip_skip", int),  # webui's N; npdiff keeps diffusers' k = N - 1 (None for N = 1)
    "Hires upscale": ("hires_scale", float),
    "Hires steps": ("hires_steps", int),
    "VAE": ("vae", str),  # a name only (webui's file name): the file must be given again with --vae
    "Refiner switch at": ("refiner_switch", float),  # SDXL: where the refiner takes over (with "Refiner")
    "Precision": ("precision", str),  # npdiff's own field: "bf16" (float32 is written as nothing)
}
IGNORED_QUIETLY = {"Version", "VAE hash"}  # fields that do not change the picture
HIRES_RESIZE = ("Hires resize-1", "Hires resize-2")  # webui's fixed hires size: 0 (unused) is quietly ignored

# AUTOMATIC1111's infotext pattern (modules/infotext_utils.py): "Key: value" or 'Key: "quoted, value"'
# (keys bounded to 100 characters, so a long line without ':' is scanned in linear time, not quadratic)
PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]{0,99}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
MAX_SETTINGS_LINE = 65536  # characters: a longer last line is prompt, never scanned for settings
SIZE_PATTERN = re.compile(r"^(\d{1,6})x(\d{1,6})$")  # no side has more than 6 digits
CHECKPOINT_TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{1,64})\]$")  # webui's short_title "name [hash]"
LORA_TAG = re.compile(r"<lora:([^>]*)>")  # webui's extra-network tag: <lora:NAME[:TE[:UNET[:DYN]]]>, or te=/unet=/dyn=


def quote(value):
    """AUTOMATIC1111's quote(): a value with a comma, colon or newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    """AUTOMATIC1111's unquote(): a JSON string back to its text; anything else unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(value):
    """7.0 -> "7", 7.5 -> "7.5": the shortest text that reads back as the same float."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _first(value):
    """A batch stores lists of prompts; a picture's text names its own, the first."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _denoising_strength(params):
    """webui's "Denoising strength": img2img's strength, or for a txt2img picture with hires fix the hires one."""
    strength = params.get("hires_strength") if params.get("hires_scale") is not None else params.get("strength")
    return None if strength is None else _number(strength)


# ---------------------------------------------------------------------------------------------
# npdiff parameters -> text
# ---------------------------------------------------------------------------------------------
def format_infotext(params):
    """npdiff's generation parameters (pipeline output .parameters + model name/hash) -> the text."""
    # 1. the prompt, with AUTOMATIC1111's <lora:name:scale> tag for each LoRA it does not name already
    prompt = str(_first(params.get("prompt", "")))
    loras = params.get("loras") or []
    tags = [f"<lora:{lora['name']}:{_number(lora['scale'])}>" for lora in loras]
    prompt = " ".join([prompt] + [tag for tag in tags if tag not in prompt]).strip()
    # 2. the negative prompt line, when there is one
    negative = str(_first(params.get("negative_prompt") or ""))
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    # 3. the settings line, in AUTOMATIC1111's order
    sampler = params.get("sampler")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": SAMPLER_NAMES.get(sampler, sampler),
        "CFG scale": None if params.get("guidance_scale") is None else _number(params["guidance_scale"]),
        "Seed": params.get("seed"),
        "Size": f"{params['width']}x{params['height']}" if params.get("width") and params.get("height") else None,
        "Model hash": params.get("model_hash"),
        "Model": params.get("model"),
        "VAE": params.get("vae"),
        "Denoising strength": _denoising_strength(params),
        "Clip skip": None if params.get("clip_skip") is None else params["clip_skip"] + 1,  # webui's N = k + 1
        "Hires upscale": None if params.get("hires_scale") is None else _number(params["hires_scale"]),
        "Hires steps": params.get("hires_steps") if params.get("hires_scale") is not None else None,
        "Hires upscaler": HIRES_UPSCALERS[params["hires_upscaler"]][1] if params.get("hires_scale") is not None
        and params.get("hires_upscaler") in HIRES_UPSCALERS else None,
        "Eta DDIM" if sampler == "ddim" else "Eta": _number(params["eta"]) if params.get("eta") else None,
        "Refiner": refiner_title(params),
        "Refiner switch at": _number(params["refiner_switch"]) if params.get("refiner")
        and params.get("refiner_switch") is not None else None,
        "Precision": params.get("precision"),
        "Lora hashes": ", ".join(f"{lora['name']}: {lora['sha256']}" for lora in loras) or None,
        "Version": f"npdiff {params['npdiff_version']}" if params.get("npdiff_version") else None,
    }
    fields.update(controlnet_fields(params))  # before Version, as webui's extension writes them
    fields["Version"] = fields.pop("Version")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines).strip()


def refiner_title(params):
    """webui's "Refiner" field: the SDXL refiner's "name [hash]" (its short_title), or None without a refiner."""
    if not params.get("refiner"):
        return None
    return f"{params['refiner']} [{params['refiner_hash']}]" if params.get("refiner_hash") else params["refiner"]


def controlnet_fields(params):
    """{"ControlNet 0": "Module: none, Model: name [hash], Weight: 1, ..."} per ControlNet, in the webui
    ControlNet extension's format (quoted as one value). npdiff resizes the control picture to the picture
    ("Just Resize"); guess mode is the extension's "ControlNet is more important"."""
    fields = {}
    nets = params.get("controlnets")
    nets = [net for net in nets if isinstance(net, dict)] if isinstance(nets, list) else []  # an edited PNG's junk
    for index, net in enumerate(nets):
        model = f"{net.get('name')} [{str(net.get('sha256') or '')[:8]}]"
        mode = "ControlNet is more important" if params.get("guess_mode") else "Balanced"
        fields[f"ControlNet {index}"] = (
            f"Module: {net.get('module') or 'none'}, Model: {model}, Weight: {_number(net.get('scale', 1.0))}, "
            f"Resize Mode: Just Resize, Guidance Start: {_number(net.get('start', 0.0))}, "
            f"Guidance End: {_number(net.get('end', 1.0))}, Control Mode: {mode}")
    return fields


# ---------------------------------------------------------------------------------------------
# text -> npdiff parameters
# ---------------------------------------------------------------------------------------------
def split_infotext(text):
    """-> (prompt, negative prompt, {field: value}) exactly as AUTOMATIC1111's parse_generation_parameters."""
    *lines, last_line = text.strip().split("\n")
    if len(last_line) > MAX_SETTINGS_LINE or len(PARAM_PATTERN.findall(last_line)) < 3:  # no settings line
        lines.append(last_line)
        last_line = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields = {key: unquote(value) if value[:1] == '"' else value for key, value in PARAM_PATTERN.findall(last_line)}
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields


def _sampler(fields):
    """-> (npdiff scheduler name or None, webui's name when npdiff lacks that sampler else None)."""
    name = fields.pop("Sampler", None)
    schedule = fields.pop("Schedule type", DEFAULT_SCHEDULE)
    if name is None:
        return None, None
    if schedule != DEFAULT_SCHEDULE:
        ours = SCHEDULE_TYPES.get((name, schedule))
        return (ours, None) if ours else (None, f"{name}, Schedule type: {schedule}")
    return (NPDIFF_SAMPLERS[name], None) if name in NPDIFF_SAMPLERS else (None, name)


def _hires_upscaler(fields, params):
    """webui's "Hires upscaler" -> params["hires_upscaler"] or, when npdiff lacks it, "unsupported_hires_upscaler"."""
    name = fields.pop("Hires upscaler", None)
    if name is None:
        return
    if name in WEBUI_UPSCALERS:
        params["hires_upscaler"] = WEBUI_UPSCALERS[name]
    else:
        params["unsupported_hires_upscaler"] = name


def lora_tag(arguments):
    """What webui reads from one <lora:...> tag (arguments: the text after "<lora:") -> (name, scale).

    As webui's Lora extension: NAME, then a text-encoder multiplier TE (1 when left out), a UNet multiplier UNET
    (TE when left out) and a rank DYN, given in that order or by name (te=, unet=, dyn=). npdiff fuses a LoRA at
    one scale for both networks, so TE and UNET must agree, and DYN is refused; NpdiffError names the tag."""
    name, *items = arguments.split(":")
    tag = f"<lora:{clip(arguments)}>"
    if not name.strip():
        raise NpdiffError(f"{tag}: the LoRA has no name")
    positional, named = [], {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            positional.append(item)
        elif key.strip() in ("te", "unet", "dyn"):
            named[key.strip()] = value
        else:
            raise NpdiffError(f"{tag}: unknown setting {clip(key.strip())!r} (webui's are te=, unet= and dyn=)")
    if len(positional) > 3:
        raise NpdiffError(f"{tag}: at most three settings follow the name (TE, UNET and DYN)")
    text_encoder = named.get("te", positional[0] if positional else "1")
    unet = named.get("unet", positional[1] if len(positional) > 1 else text_encoder)
    if named.get("dyn", positional[2] if len(positional) > 2 else None) is not None:
        raise NpdiffError(f"{tag}: a lower rank (dyn) is not supported; leave it out")
    scales = []
    for value in (text_encoder, unet):
        try:
            scales.append(float(value))
        except ValueError:
            raise NpdiffError(f"{tag}: the scale {clip(value)!r} is not a number") from None
        if not math.isfinite(scales[-1]):
            raise NpdiffError(f"{tag}: the scale must be finite")
    if scales[0] != scales[1]:
        raise NpdiffError(f"{tag}: npdiff fuses a LoRA at one scale for the text encoder and the UNet; give one "
                          f"(<lora:{clip(name)}:{_number(scales[1])}>)")
    return name, scales[0]


def _loras(prompt, fields):
    """The prompt's <lora:...> tags -> (prompt without them, [{"name", "scale", "sha256" or None}]), the
    hashes from "Lora hashes: name: hash, ..."; NpdiffError for a tag npdiff cannot follow (lora_tag)."""
    hashes = {}
    for entry in fields.pop("Lora hashes", "").split(","):
        name, sep, digest = entry.rpartition(":")
        if sep:
            hashes[name.strip()] = digest.strip()
    loras = []
    for arguments in LORA_TAG.findall(prompt):
        name, scale = lora_tag(arguments)
        loras.append({"name": name, "scale": scale, "sha256": hashes.get(name)})
    return LORA_TAG.sub("", prompt).strip(), loras


def parse_infotext(text):
    """AUTOMATIC1111 "parameters" text -> npdiff parameters (prompt, negative_prompt, steps, sampler,
    guidance_scale, seed, width, height, strength, eta, model, model_hash, loras, vae, clip_skip, hires_*,
    mode when present) and "unmapped": the "Key: value" texts npdiff cannot reproduce, for the caller to report."""
    if not isinstance(text, str) or not text.strip():
        raise NpdiffError("the 'parameters' text is empty")
    prompt, negative, fields = split_infotext(text)
    params = {"prompt": prompt, "negative_prompt": negative}
    if not fields.get("Version", "").startswith("npdiff"):
        params["prompt_syntax"] = "a1111"  # webui's text: its prompt was read with webui's (x:1.2) syntax
    # 1. LoRA tags steer AUTOMATIC1111's prompt but are not words: taken out, the files named by name and hash
    params["prompt"], loras = _loras(prompt, fields)
    if loras:
        params["loras"] = loras
    # 2. the sampler and the hires upscaler, by webui's names (one npdiff lacks: kept for the caller)
    sampler, unsupported = _sampler(fields)
    if sampler is not None:
        params["sampler"] = sampler
    if unsupported is not None:
        params["unsupported_sampler"] = unsupported
    _hires_upscaler(fields, params)
    # 3. the other fields
    unmapped = []
    for key, value in fields.items():
        if key == "Refiner":  # webui's "name [hash]": the refiner by name and hash, as the model
            match = CHECKPOINT_TITLE.match(value.strip())
            params["refiner"] = match.group(1) if match else value.strip()
            if match:
                params["refiner_hash"] = match.group(2).lower()
        elif key == "Size":
            match = SIZE_PATTERN.match(value)
            if match is None:
                raise NpdiffError(f"'Size: {clip(value)}' is not WIDTHxHEIGHT (at most 6 digits each)")
            params["width"], params["height"] = int(match.group(1)), int(match.group(2))
        elif key in FIELDS:
            name, convert = FIELDS[key]
            try:
                params[name] = convert(value)
            except ValueError as exc:
                raise NpdiffError(f"'{key}: {clip(value)}' is not a {convert.__name__}") from exc
        elif key not in IGNORED_QUIETLY and not (key in HIRES_RESIZE and value.strip() == "0"):
            unmapped.append(f"{clip(key)}: {clip(value)}")
    if "clip_skip" in params:
        params["clip_skip"] = params["clip_skip"] - 1 if params["clip_skip"] > 1 else None
        if params["clip_skip"] is None:
            del params["clip_skip"]
    # 4. "Denoising strength": the hires strength of a txt2img picture; without hires, an img2img/inpaint one's
    hires_keys = ("hires_scale", "hires_steps", "hires_upscaler", "unsupported_hires_upscaler")
    if any(key in params for key in hires_keys):
        strength = params.pop("strength", None)  # a hires picture's strength is the hires one, never img2img's
        if "hires_scale" in params:
            params["hires_strength"] = DEFAULT_HIRES_STRENGTH if strength is None else strength
        else:  # a fixed hires size ("Hires resize-1/2", said unmapped above) instead of a factor: not reproduced
            for key in hires_keys:
                params.pop(key, None)
    elif "strength" in params:
        params["mode"] = "img2img"  # webui's img2img or inpaint tab (the text does not say which)
    params["unmapped"] = unmapped
    return params


# ---------------------------------------------------------------------------------------------
# Pictures from tools whose settings npdiff cannot read
# ---------------------------------------------------------------------------------------------
def _json_object(text):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def other_tool(chunks):
    """A PNG's text chunks {keyword: text} -> the name of the tool that wrote them when it is one whose settings
    npdiff cannot read (Fooocus, ComfyUI, InvokeAI, NovelAI), else None (npdiff's or webui's text, or none)."""
    parameters = chunks.get("parameters", "")
    if parameters.lstrip().startswith("{") and _json_object(parameters) is not None:
        version = str(_json_object(parameters).get("version", ""))
        return "Fooocus" if version.startswith("Fooocus") or "fooocus_scheme" in chunks else "a JSON 'parameters' tool"
    if "prompt" in chunks and "workflow" in chunks:
        return "ComfyUI"
    if any(key in chunks for key in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream")):
        return "InvokeAI"
    if chunks.get("Software", "").startswith("NovelAI") or (
            "Comment" in chunks and "Description" in chunks and _json_object(chunks["Comment"]) is not None):
        return "NovelAI"
    return None
