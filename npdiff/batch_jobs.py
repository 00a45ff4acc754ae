"""Job files for `npdiff batch`: read and check every line, name each picture, recognise finished ones.

Two formats, chosen by the file's suffix:
  *.jsonl   one JSON object a line with the options of `npdiff generate` / `npdiff img2img`:
            prompt, negative (or negative_prompt), seed, steps, guidance, sampler, height, width,
            and image + strength for img2img. Options left out take the batch's own (--steps, ...).
  anything  one prompt a line.
Blank lines and lines starting with '#' are skipped in both. A line's seed defaults to its line
number (1-based, as an editor counts), so a rerun draws the same pictures.

Each line is checked before any model loads; a bad line becomes (line number, message naming the
key) and the other lines go on. A picture is written as DIR/<line:06d>-seed<seed>.png, and counts
as done only if that PNG opens, decodes to the end, and stores the job's own parameters, the model
named by the same name and hash (no local path is stored, so none is compared).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from npdiff.errors import NpdiffError
from npdiff.images import PNG_PARAMS_KEY

# Keys a JSONL line may set -> the option it is (negative_prompt is what the PNGs store).
LINE_KEYS = {"prompt": "prompt", "negative": "negative", "negative_prompt": "negative", "seed": "seed",
             "steps": "steps", "guidance": "guidance", "sampler": "sampler", "height": "height",
             "width": "width", "strength": "strength", "image": "image"}
# Options of `npdiff generate` that a line cannot set -> why.
NOT_PER_LINE = {
    "model": "the model is loaded once per worker: pass --model to npdiff batch",
    "out": "a batch names each picture <line>-seed<seed>.png in --out DIR",
    "device": "npdiff batch runs on the CPU (NumPy) backend",
    "backend": "npdiff batch runs on the CPU (NumPy) backend",
    "fp16": "npdiff batch runs on the CPU in float32",
    "save_steps": "npdiff batch writes only the final pictures",
    "save-steps": "npdiff batch writes only the final pictures",
    "reproduce": "give the options themselves (prompt, seed, steps, ...)",
}
MAX_SEED = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


@dataclass(frozen=True)
class Job:
    """One picture to make: a checked line of the job file, with the batch's defaults filled in."""

    line: int
    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    sampler: object = None  # a SCHEDULERS name, or None: the model's own
    height: object = None  # None: the model's size (text-to-image) or the picture's (img2img)
    width: object = None
    strength: object = None  # img2img only
    image: object = None  # img2img: the starting picture's absolute path (read by the driver, never stored)

    @property
    def command(self):
        return "img2img" if self.image is not None else "generate"

    @property
    def filename(self):
        return f"{self.line:06d}-seed{self.seed}.png"

    def expected_params(self, identity):
        """The parameters its PNG must store (keys as `npdiff generate` writes them); identity: the model's
        {"model": name, "model_hash": hash} (npdiff.cli.model_png_identity).

        Options left to the model (sampler, size) are not compared: the model's name and hash are. A batch
        fuses no LoRA and keeps the model's prediction type: "loras" and "prediction_type" must be absent
        (None) unless the identity holds one. An img2img PNG stores nothing about its input picture (as
        `npdiff img2img` writes it), so the picture is not compared.
        """
        params = {"prompt": self.prompt, "negative_prompt": self.negative, "seed": self.seed,
                  "steps": self.steps, "guidance_scale": self.guidance, "command": self.command,
                  "loras": None, "prediction_type": None, **identity}
        for key in ("sampler", "height", "width", "strength"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params


# ---------------------------------------------------------------------------------------------
# Reading a job file
# ---------------------------------------------------------------------------------------------
def read_jobs(path, defaults):
    """-> (jobs, failures): the good lines as Jobs, the bad ones as {line number: message}.

    defaults: dict of negative, steps, guidance, sampler, height, width, strength (the batch's options).
    """
    path = Path(path)
    if not path.is_file():
        raise NpdiffError(f"job file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise NpdiffError(f"job file {path} is not UTF-8 text: {exc}") from exc
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


def parse_json_line(text):
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NpdiffError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(options, dict):
        raise NpdiffError(f"expected a JSON object {{\"prompt\": ...}}, got {type(options).__name__}")
    return options


def make_job(number, options, defaults, base_dir):
    """One line's options (CLI names) + the batch's defaults -> a checked Job; NpdiffError names the key."""
    for key in options:
        if key in NOT_PER_LINE:
            raise NpdiffError(f"key {key!r} cannot be set per line: {NOT_PER_LINE[key]}")
        if key not in LINE_KEYS:
            raise NpdiffError(f"unknown key {key!r} (known: {', '.join(sorted(LINE_KEYS))})")
    if "negative" in options and "negative_prompt" in options:
        raise NpdiffError("give 'negative' or 'negative_prompt', not both")
    values = {LINE_KEYS[key]: value for key, value in options.items()}
    merged = {key: values.get(key, defaults.get(key)) for key in LINE_KEYS.values()}

    prompt = merged["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise NpdiffError(f"'prompt' must be a non-empty string, got {prompt!r}")
    negative = "" if merged["negative"] is None else merged["negative"]
    if not isinstance(negative, str):
        raise NpdiffError(f"'negative' must be a string, got {negative!r}")
    seed = number if merged["seed"] is None else merged["seed"]
    if not is_int(seed) or not 0 <= seed < MAX_SEED:
        raise NpdiffError(f"'seed' must be an integer in [0, 2**64), got {seed!r}")
    steps = merged["steps"]
    if not is_int(steps) or steps < 1:
        raise NpdiffError(f"'steps' must be an integer >= 1, got {steps!r}")
    guidance = merged["guidance"]
    if not is_number(guidance) or guidance < 0:
        raise NpdiffError(f"'guidance' must be a finite number >= 0, got {guidance!r}")
    sampler = check_sampler(merged["sampler"])
    height, width = (check_side(merged[key], key) for key in ("height", "width"))
    image, strength = check_img2img(options, merged, base_dir)
    if image is not None and (height is not None or width is not None):
        raise NpdiffError("'height'/'width' do not apply to img2img: the starting picture's size is used")
    return Job(line=number, prompt=prompt, negative=negative, seed=int(seed), steps=int(steps),
               guidance=float(guidance), sampler=sampler, height=height, width=width, strength=strength,
               image=image)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampler(name):
    from npdiff.schedulers import SCHEDULERS

    if name is not None and name not in SCHEDULERS:
        raise NpdiffError(f"'sampler' {name!r} is not one of {', '.join(sorted(SCHEDULERS))}")
    return name


def check_side(value, key):
    if value is None:
        return None
    if not is_int(value) or value <= 0 or value % 8:
        raise NpdiffError(f"'{key}' must be a positive multiple of 8 (pixels), got {value!r}")
    return int(value)


def check_img2img(options, merged, base_dir):
    """-> (absolute image path, strength) for an img2img line, (None, None) for text-to-image."""
    image = merged["image"]
    if image is None:
        if "strength" in options:
            raise NpdiffError("'strength' needs 'image' (the starting picture of img2img)")
        return None, None
    if not isinstance(image, str) or not image:
        raise NpdiffError(f"'image' must be a file name, got {image!r}")
    path = Path(image).expanduser()
    path = path if path.is_absolute() else base_dir / path  # relative to the job file's folder
    if not path.is_file():
        raise NpdiffError(f"'image' {image!r}: no such file ({path})")
    strength = merged["strength"]
    if not is_number(strength) or not 0 < strength <= 1:
        raise NpdiffError(f"'strength' must be a number in (0, 1], got {strength!r}")
    return str(path.resolve()), float(strength)


# ---------------------------------------------------------------------------------------------
# Is a picture already done?
# ---------------------------------------------------------------------------------------------
def is_done(path, job, identity):
    """True if `path` is a whole PNG (every pixel decodes) whose stored parameters are the job's, made with
    the model `identity` names (name and hash, npdiff.cli.model_png_identity)."""
    from PIL import Image

    if not Path(path).is_file():
        return False
    try:
        with Image.open(path) as picture:
            picture.load()  # decode to the end: a truncated or corrupt file raises here
            stored = json.loads(picture.text[PNG_PARAMS_KEY])
            width, height = picture.size
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if not isinstance(stored, dict):
        return False
    if job.height not in (None, height) or job.width not in (None, width):
        return False  # the pixels disagree with the size asked for
    return all(stored.get(key) == value for key, value in job.expected_params(identity).items())
