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
                           honour ("Clip skip: 2", "Hires upscale: 2", ...). An unsupported sampler is an
                           NpdiffError naming it.
"""

import json
import re

from npdiff.errors import NpdiffError, clip, shorten

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
}
IGNORED_QUIETLY = {"Version"}  # fields that do not change the picture

# AUTOMATIC1111's infotext pattern (modules/infotext_utils.py): "Key: value" or 'Key: "quoted, value"'
# (keys bounded to 100 characters, so a long line without ':' is scanned in linear time, not quadratic)
PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]{0,99}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
MAX_SETTINGS_LINE = 65536  # characters: a longer last line is prompt, never scanned for settings
SIZE_PATTERN = re.compile(r"^(\d{1,6})x(\d{1,6})$")  # no side has more than 6 digits
LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)>")


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
        "Denoising strength": None if params.get("strength") is None else _number(params["strength"]),
        "Eta DDIM" if sampler == "ddim" else "Eta": _number(params["eta"]) if params.get("eta") else None,
        "Lora hashes": ", ".join(f"{lora['name']}: {lora['sha256']}" for lora in loras) or None,
        "Version": f"npdiff {params['npdiff_version']}" if params.get("npdiff_version") else None,
    }
    fields.update(controlnet_fields(params))  # before Version, as webui's extension writes them
    fields["Version"] = fields.pop("Version")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines).strip()


def controlnet_fields(params):
    """{"ControlNet 0": "Module: none, Model: name [hash], Weight: 1, ..."} per ControlNet, in the webui
    ControlNet extension's format (quoted as one value). npdiff resizes the control picture to the picture
    ("Just Resize"); guess mode is the extension's "ControlNet is more important"."""
    fields = {}
    for index, net in enumerate(params.get("controlnets") or []):
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
    """The npdiff scheduler name for the text's Sampler (+ Schedule type); NpdiffError when there is none."""
    name = fields.pop("Sampler", None)
    schedule = fields.pop("Schedule type", DEFAULT_SCHEDULE)
    if name is None:
        return None
    if schedule != DEFAULT_SCHEDULE:
        if (name, schedule) not in SCHEDULE_TYPES:
            raise NpdiffError(f"sampler {shorten(name)} with schedule type {shorten(schedule)} is not supported "
                              f"by npdiff; supported: {', '.join(sorted(NPDIFF_SAMPLERS))}, DPM++ 2M with Karras")
        return SCHEDULE_TYPES[(name, schedule)]
    if name not in NPDIFF_SAMPLERS:
        raise NpdiffError(f"sampler {shorten(name)} is not supported by npdiff; supported: "
                          f"{', '.join(sorted(NPDIFF_SAMPLERS))}")
    return NPDIFF_SAMPLERS[name]


def parse_infotext(text):
    """AUTOMATIC1111 "parameters" text -> npdiff parameters (prompt, negative_prompt, steps, sampler,
    guidance_scale, seed, width, height, strength, eta, model, model_hash when present) and "unmapped":
    the "Key: value" texts npdiff cannot reproduce, for the caller to report."""
    if not isinstance(text, str) or not text.strip():
        raise NpdiffError("the 'parameters' text is empty")
    prompt, negative, fields = split_infotext(text)
    params = {"prompt": prompt, "negative_prompt": negative}
    unmapped = []
    # LoRA tags steer AUTOMATIC1111's prompt but are not words: take them out and say they are needed
    tags = LORA_TAG.findall(prompt)
    if tags:
        params["prompt"] = LORA_TAG.sub("", prompt).strip()
        unmapped.append("LoRAs " + ", ".join(f"{clip(name)} (scale {clip(scale)})" for name, scale in tags))
    sampler = _sampler(fields)
    if sampler is not None:
        params["sampler"] = sampler
    for key, value in fields.items():
        if key == "Size":
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
        elif key not in IGNORED_QUIETLY and not (key == "Lora hashes" and tags):
            unmapped.append(f"{clip(key)}: {clip(value)}")
    params["unmapped"] = unmapped
    return params
