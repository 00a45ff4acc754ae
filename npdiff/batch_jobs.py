"""Job files for `npdiff batch`: read and check every line, name each picture, recognise finished ones.

Two formats, chosen by the file's suffix:
  *.jsonl   one JSON object a line with the options of `npdiff generate` / `img2img` / `inpaint`
            (npdiff.recipe.OPTIONS: prompt, negative (or negative_prompt), seed, steps, guidance, sampler,
            height, width, strength, eta, prediction_type, vae_tiling) and the files a picture is made from:
            image (img2img), image + mask (inpaint), vae (a folder), lora ("FILE[:SCALE]" or a list of
            them), control ("CONTROLNET:IMAGE[:SCALE]" or a list of them, as --control) with
            npdiff.recipe.CONTROL_SETTINGS (canny, control_start, control_end, guess_mode, as --canny ...),
            refiner (an SDXL refiner, file or folder, with the option refiner_switch). Paths are relative to
            the job file's folder. Options left out take the batch's own (--steps, ...).
  anything  one prompt a line.
Blank lines and lines starting with '#' are skipped in both; a UTF-8 byte order mark at the start of the
file is not part of the first line. A line's seed defaults to its line number (1-based, as an editor
counts), so a rerun draws the same pictures.

Each line is checked before any model loads; a bad line (a wrong type, an unknown or duplicated key, a
missing file) becomes (line number, message naming the key) and the other lines go on. Then each line's
picture size is checked against the model's configs (npdiff/batch_sizes.py: the size rule, the attention
limit), before any worker loads its weights. A picture is
written as DIR/<line:06d>-seed<seed>.png, and counts as done only if that PNG opens, decodes to the end,
and stores the job's own parameters, the model named by the same name and hash (no local path is
stored, so none is compared).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from npdiff import paths
from npdiff.errors import NpdiffError, shorten
from npdiff.images import PNG_PARAMS_KEY
from npdiff.lora import check_scale
from npdiff.model_identity import model_name
from npdiff.picture_size import check_side
from npdiff.recipe import (
    CONTROL_SETTINGS,
    OPTION_BY_NAME,
    check_control_settings,
    check_value,
    defaults_for,
    parse_control_option,
    parse_lora_option,
)
from npdiff.schedulers import SCHEDULERS

# Keys a JSONL line may set -> what it is (an option of npdiff.recipe, or a file)
FILE_KEYS = ("image", "mask", "vae", "lora", "refiner", "control")
LINE_KEYS = {**{name: name for name in OPTION_BY_NAME}, "negative_prompt": "negative",
             "negative_prompt_2": "negative_2", **{name: name for name in FILE_KEYS},
             **{name: name for name in CONTROL_SETTINGS}}
# Options of `npdiff generate` that a line cannot set -> why.
NOT_PER_LINE = {
    "model": "the model is loaded once per worker: pass --model to npdiff batch",
    "out": "a batch names each picture <line>-seed<seed>.png in --out DIR",
    "device": "npdiff batch runs on the CPU (NumPy) backend",
    "backend": "npdiff batch runs on the CPU (NumPy) backend",
    "fp16": "npdiff batch runs on the CPU in float32",
    "precision": "every worker loads the model once, at one precision: pass --precision to npdiff batch",
    "save_steps": "npdiff batch writes only the final pictures",
    "save-steps": "npdiff batch writes only the final pictures",
    "reproduce": "give the options themselves (prompt, seed, steps, ...)",
}


@dataclass(frozen=True)
class Job:
    """One picture to make: a checked line of the job file, with the batch's defaults filled in."""

    line: int
    command: str  # "generate", "img2img" or "inpaint"
    options: dict  # npdiff.recipe option name -> value (None: the model's own sampler, size, ...)
    image: object = None  # img2img/inpaint: the picture's absolute path (read by the driver, never stored)
    mask: object = None  # inpaint: the mask's absolute path
    vae: object = None  # a VAE folder's absolute path, used instead of the model's
    loras: tuple = field(default_factory=tuple)  # ((absolute path, scale), ...), fused in this order
    refiner: object = None  # an SDXL refiner's absolute path (file or folder): it finishes the base's picture
    controls: tuple = field(default_factory=tuple)  # ((ControlNet's absolute path, picture's, scale), ...)
    control_settings: dict = None  # recipe.check_control_settings' settings when there are controls

    @property
    def seed(self):
        return self.options["seed"]

    @property
    def filename(self):
        return f"{self.line:06d}-seed{self.seed}.png"

    def expected_params(self, identity):
        """The parameters its PNG must store (keys as `npdiff generate` writes them); identity: the model's
        {"model": name, "model_hash": hash} (npdiff.recipe.model_png_identity).

        Options left to the model (sampler, size) are not compared: the model's name and hash are. An
        img2img or inpaint PNG stores nothing about its input pictures (as `npdiff img2img` writes it), so
        the pictures are not compared; LoRAs are compared by name and scale (stored_loras_match).
        """
        params = {"command": self.command, "prediction_type": None, "vae": None, "refiner": None, "precision": None,
                  **identity}
        for name, value in self.options.items():
            if value is not None:
                params[OPTION_BY_NAME[name].png_key] = value
        if self.vae is not None:
            params["vae"] = Path(self.vae).name
        if self.refiner is not None:  # named as the model is (its hash is compared by nobody: as a VAE's)
            params["refiner"] = model_name(self.refiner)
        return params

    def stored_loras_match(self, stored):
        """True when a PNG's stored "loras" name this job's LoRAs, in order, at the same scales."""
        wanted = [(Path(path).stem, scale) for path, scale in self.loras]
        stored = stored if isinstance(stored, list) else []
        return [(lora.get("name"), lora.get("scale")) for lora in stored if isinstance(lora, dict)] == wanted

    def stored_controls_match(self, stored):
        """True when a PNG's parameters name this job's ControlNets, in order, at the same scales and windows, with
        the same guess mode and module (the control pictures themselves are not stored, so not compared)."""
        nets = stored.get("controlnets") if isinstance(stored.get("controlnets"), list) else []
        found = [(net.get("name"), net.get("scale"), net.get("start"), net.get("end"), net.get("module"))
                 for net in nets if isinstance(net, dict)]
        if not self.controls:
            return not found
        settings = self.control_settings
        module = "canny" if settings["canny"] else None
        wanted = [(controlnet_name(net), scale, settings["control_start"], settings["control_end"], module)
                  for net, _, scale in self.controls]
        return found == wanted and stored.get("guess_mode") == settings["guess_mode"]


def controlnet_name(path):
    """What a PNG calls a ControlNet (npdiff.models.ControlNetModel.name): a file's stem, a folder's name."""
    path = Path(path)
    return path.stem if path.is_file() else path.name


# ---------------------------------------------------------------------------------------------
# Reading a job file
# ---------------------------------------------------------------------------------------------
def read_jobs(path, defaults):
    """-> (jobs, failures): the good lines as Jobs, the bad ones as {line number: message}.

    defaults: the batch's options for what a line leaves out ({option or file key: value}, None = unset).
    """
    path = Path(path)
    paths.path_kind(path, "job file")  # a FIFO, a device, a socket or a symlink loop: NpdiffError naming what it is
    if not path.is_file():
        raise NpdiffError(f"job file {path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the first line
    except UnicodeDecodeError as exc:
        raise NpdiffError(f"job file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise NpdiffError(f"job file {path}: cannot be read ({exc.strerror or exc})") from exc
    is_jsonl = path.suffix.lower() == ".jsonl"
    jobs, failures = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            options = parse_json_line(stripped) if is_jsonl else {"prompt": stripped}
            jobs.append(make_job(number, options, defaults, base_dir=path.parent))
        except NpdiffError as exc:
            failures[number] = str(exc)
    if not jobs and not failures:
        raise NpdiffError(f"job file {path} holds no jobs (only blank lines and # comments)")
    return jobs, failures


def refuse_duplicate_keys(pairs):
    """json object_pairs_hook: a key given twice is an error naming it (json.loads would keep the last)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise NpdiffError(f"key {shorten(key)} is given twice")
        seen[key] = value
    return seen


def parse_json_line(text):
    try:
        options = json.loads(text, object_pairs_hook=refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise NpdiffError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise NpdiffError("not a line of options: it nests too deeply") from exc
    except NpdiffError:  # a key given twice (refuse_duplicate_keys)
        raise
    except ValueError as exc:  # Python's int limit: json.loads refuses an integer of over 4300 digits
        raise NpdiffError("not a line of options: it holds an integer of over 4300 digits, which no option "
                          "is") from exc
    if not isinstance(options, dict):
        raise NpdiffError(f"expected a JSON object {{\"prompt\": ...}}, got {type(options).__name__}")
    return options


def make_job(number, options, defaults, base_dir):
    """One line's options + the batch's defaults -> a checked Job; NpdiffError names the key."""
    for key in options:
        if key in NOT_PER_LINE:
            raise NpdiffError(f"key {key!r} cannot be set per line: {NOT_PER_LINE[key]}")
        if key not in LINE_KEYS:
            raise NpdiffError(f"unknown key {shorten(key)} (known: {', '.join(sorted(LINE_KEYS))})")
    if "negative" in options and "negative_prompt" in options:
        raise NpdiffError("give 'negative' or 'negative_prompt', not both")
    given = {LINE_KEYS[key]: value for key, value in options.items() if value is not None}
    # 1. the files: what the command is, and each file relative to the job file
    image, mask = (find_file(given.get(key), key, base_dir) for key in ("image", "mask"))
    if mask is not None and image is None:
        raise NpdiffError("'mask' needs 'image' (the picture to repaint)")
    command = "inpaint" if mask is not None else "img2img" if image is not None else "generate"
    if "strength" in given and command == "generate":
        raise NpdiffError("'strength' needs 'image' (the starting picture of img2img or inpaint)")
    if command == "img2img" and ("height" in given or "width" in given):
        raise NpdiffError("'height'/'width' do not apply to img2img: the starting picture's size is used")
    vae = find_vae(given.get("vae", defaults.get("vae")), base_dir)
    loras = find_loras(given.get("lora", defaults.get("lora")), base_dir)
    refiner = find_refiner(given.get("refiner", defaults.get("refiner")), base_dir)
    controls, control_settings = find_controls(given, base_dir)
    # 2. the options: the line's, else the batch's, else the command's defaults; each value checked
    merged = {"seed": number, **defaults_for(command)}
    merged.update({name: value for name, value in defaults.items() if name in OPTION_BY_NAME and value is not None})
    merged.update({name: value for name, value in given.items() if name in OPTION_BY_NAME})
    checked = {}
    for name, option in OPTION_BY_NAME.items():
        if command not in option.commands:
            continue
        value = merged.get(name)
        checked[name] = None if value is None else check_value(name, value)
    if not checked["prompt"] or not checked["prompt"].strip():
        raise NpdiffError(f"'prompt' must be a non-empty string, got {shorten(checked['prompt'])}")
    check_sampler(checked["sampler"])
    for side in ("height", "width"):
        if checked.get(side) is not None and checked[side] % 8:
            raise NpdiffError(f"'{side}' must be a positive multiple of 8 (pixels), got {checked[side]!r}")
        if checked.get(side) is not None:  # past MAX_SIDE: refused here, not by a worker once the model loaded
            check_side(f"'{side}'", checked[side])
    if command != "generate" and not 0 < checked["strength"] <= 1:
        raise NpdiffError(f"'strength' must be a number in (0, 1], got {checked['strength']!r}")
    return Job(line=number, command=command, options=checked, image=image, mask=mask, vae=vae, loras=loras,
               refiner=refiner, controls=controls, control_settings=control_settings)


def check_sampler(name):

    if name is not None and name not in SCHEDULERS:
        raise NpdiffError(f"'sampler' {shorten(name)} is not one of {', '.join(sorted(SCHEDULERS))}")
    return name


def resolve(value, key, base_dir):
    """A file name from a line -> an absolute Path (relative names from the job file's folder)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise NpdiffError(f"'{key}' must be a file name, got {shorten(value)}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def path_kind(path, value, key):
    """"file", "folder" or None (nothing there); NpdiffError naming the key when the name cannot be looked up
    (too long, a loop of links, no permission)."""
    try:
        return "file" if path.is_file() else "folder" if path.is_dir() else None
    except OSError as exc:
        raise NpdiffError(f"'{key}' {shorten(value)}: cannot be looked up ({exc.strerror or exc})") from exc


def find_file(value, key, base_dir):
    """-> the absolute path of an existing regular file, or None when `value` is None."""
    if value is None:
        return None
    path = resolve(value, key, base_dir)
    kind = path_kind(path, value, key)
    if kind != "file":
        what = "it is a folder" if kind == "folder" else "no such file"
        raise NpdiffError(f"'{key}' {shorten(value)}: {what} ({shorten(str(path))})")
    return str(path.resolve())


def find_vae(value, base_dir):
    if value is None:
        return None
    path = resolve(value, "vae", base_dir)
    if path_kind(path, value, "vae") != "folder":
        raise NpdiffError(f"'vae' {shorten(value)}: no such folder ({shorten(str(path))})")
    return str(path.resolve())


def find_refiner(value, base_dir):
    """'refiner': an SDXL refiner, a .safetensors file or a diffusers folder -> its absolute path, or None."""
    if value is None:
        return None
    path = resolve(value, "refiner", base_dir)
    if path_kind(path, value, "refiner") is None:
        raise NpdiffError(f"'refiner' {shorten(value)}: no such file or folder ({shorten(str(path))})")
    return str(path.resolve())


def find_loras(value, base_dir):
    """'lora': "FILE[:SCALE]" or a list of them -> ((absolute path, scale), ...)."""
    if value is None:
        return ()
    specs = value if isinstance(value, list) else [value]
    loras = []
    for spec in specs:
        if not isinstance(spec, str):
            raise NpdiffError(f"'lora' must be \"FILE[:SCALE]\" or a list of them, got {shorten(value)}")
        name, scale = parse_lora_option(str(resolve(spec, "lora", base_dir)), "'lora'")
        path = find_file(name, "lora", base_dir)
        loras.append((path, check_scale(scale, path)))  # nan or 1e309: this line fails now, not in a worker
    return tuple(loras)


def find_controls(given, base_dir):
    """'control': "CONTROLNET:IMAGE[:SCALE]" or a list of them, and the CONTROL_SETTINGS keys ->
    (((net path, picture path, scale), ...), checked settings), or ((), None) for a line without a control."""
    settings = {name: given[name] for name in CONTROL_SETTINGS if name in given}
    value = given.get("control")
    if value is None:
        if settings:
            raise NpdiffError(f"{', '.join(repr(name) for name in settings)} without 'control': give the "
                              "ControlNet and its picture, \"CONTROLNET:IMAGE[:SCALE]\"")
        return (), None
    specs = value if isinstance(value, list) else [value]
    if not specs or not all(isinstance(spec, str) for spec in specs):
        raise NpdiffError(f"'control' must be \"CONTROLNET:IMAGE[:SCALE]\" or a non-empty list of them, got "
                          f"{shorten(value)}")
    controls = []
    for spec in specs:
        net, picture, scale = parse_control_option(spec, "'control'")
        net_path = resolve(net, "control", base_dir)
        if path_kind(net_path, net, "control") is None:
            raise NpdiffError(f"'control' {shorten(net)}: no such ControlNet file or folder ({shorten(str(net_path))})")
        controls.append((str(net_path.resolve()), find_file(picture, "control", base_dir), scale))
    return tuple(controls), check_control_settings(settings)


# ---------------------------------------------------------------------------------------------
# Is a picture already done?
# ---------------------------------------------------------------------------------------------
def is_done(path, job, identity):
    """True if `path` is a whole PNG (every pixel decodes) whose stored parameters are the job's, made with
    the model `identity` names (name and hash, npdiff.recipe.model_png_identity)."""
    from PIL import Image

    if not Path(path).is_file():
        return False
    try:
        with Image.open(path) as picture:
            picture.load()  # decode to the end: a truncated or corrupt file raises here
            stored = json.loads(picture.text[PNG_PARAMS_KEY])
            width, height = picture.size
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False
    if not isinstance(stored, dict):
        return False
    if job.options.get("height") not in (None, height) or job.options.get("width") not in (None, width):
        return False  # the pixels disagree with the size asked for
    expected = job.expected_params(identity)
    return (all(stored.get(key) == value for key, value in expected.items())
            and job.stored_loras_match(stored.get("loras")) and job.stored_controls_match(stored))
