"""SDXL's settings on the command line: the options, the refiner, and the checks made before any model loads.

  add_sdxl_options(parser)       --refiner, --refiner-switch, --aesthetic-score, --negative-aesthetic-score,
                                 --original-size, --target-size, --crops-coords-top-left and their negative_
                                 forms, --denoising-end (the values are checked by npdiff.sdxl_recipe, the
                                 recipe's options)
  add_denoising_start_option(p)  img2img's and inpaint's --denoising-start
  model_kind(path)               "sd", "sdxl" or "sdxl-refiner" from a model's layout alone (a folder's
                                 model_index.json and subfolders, a single file's safetensors header)
  check_sdxl_request(...)        an SDXL setting given to an SD 1.x/2.x model, a refiner that is a base, ...
                                 -> NpdiffError naming the option and the file, before anything loads
  load_refiner(path, sampler, precision)  the refiner as a StableDiffusionXLPipeline with the same sampler as the base
                                 -> sdxl_recipe.Refiner(pipe, identity); identity: its name and hash for the
                                 PNG ({"refiner": name, "refiner_hash": 10 hex digits}), never its path
"""

import json
from pathlib import Path

from npdiff.errors import NpdiffError, shorten
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.model_identity import model_hash, model_name
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline
from npdiff.pipeline_utils import model_family
from npdiff.sdxl_recipe import Refiner, check_sdxl_settings

REFINER_TEXT_ENCODER = "conditioner.embedders.0.model."  # a refiner file's OpenCLIP bigG (a base's is embedders.1)


def add_sdxl_options(p):
    """SDXL's own options of generate / img2img / inpaint (names as diffusers', values as webui writes sizes)."""
    p.add_argument("--refiner", default=None, metavar="FILE_OR_FOLDER",
                   help="SDXL: an SDXL refiner (folder or .safetensors) that finishes the base's picture, diffusers' "
                   "ensemble of experts; its name and hash are stored in the PNG")
    p.add_argument("--refiner-switch", type=float, default=None, metavar="F",
                   help="SDXL with --refiner: the fraction of the schedule the base runs before the refiner takes "
                   "over, in (0, 1) (webui's 'Refiner switch at'; default 0.8)")
    p.add_argument("--aesthetic-score", type=float, default=None, metavar="S",
                   help="SDXL refiner: the aesthetic score it is conditioned on (default 6)")
    p.add_argument("--negative-aesthetic-score", type=float, default=None, metavar="S",
                   help="SDXL refiner: the negative prompt's aesthetic score (default 2.5)")
    for name, what in (("original-size", "the size the picture is 'taken from' (default: the picture's)"),
                       ("target-size", "the size it is drawn for (default: the picture's)")):
        p.add_argument(f"--{name}", default=None, metavar="WxH", help=f"SDXL size conditioning: {what}")
        p.add_argument(f"--negative-{name}", default=None, metavar="WxH",
                       help=f"SDXL: --{name} for the negative prompt")
    p.add_argument("--crops-coords-top-left", default=None, metavar="X,Y",
                   help="SDXL crop conditioning: the top-left corner of the crop the picture seems cut from "
                   "(default 0,0)")
    p.add_argument("--negative-crops-coords-top-left", default=None, metavar="X,Y",
                   help="SDXL: --crops-coords-top-left for the negative prompt")
    p.add_argument("--denoising-end", type=float, default=None, metavar="F",
                   help="SDXL: stop after this fraction of the schedule, in (0, 1), and write the picture still "
                   "partly noisy, as diffusers' denoising_end decodes it (the base half of an ensemble of experts "
                   "by hand; --refiner does both halves in one run); stored in the PNG")


def add_denoising_start_option(p):
    """img2img's and inpaint's --denoising-start (generate starts from pure noise: it has no such option)."""
    p.add_argument("--denoising-start", type=float, default=None, metavar="F",
                   help="SDXL: start at this fraction of the schedule, in (0, 1), adding no noise to the picture "
                   "(diffusers' denoising_start: the picture is a --denoising-end one, noisy already; --strength "
                   "plays no part); stored in the PNG")


def model_kind(path):
    """"sdxl-refiner", "sdxl" or "sd" from the layout (pipeline_utils.model_family, then: a folder whose
    model_index.json asks for the aesthetic score or that has no text_encoder/, a file with a refiner's
    text encoder keys); nothing is loaded."""
    path = Path(path).expanduser()
    if model_family(path) != "sdxl":
        return "sd"
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        refiner = index.get("requires_aesthetics_score") if isinstance(index, dict) else None
        if refiner is None:
            refiner = not (path / "text_encoder").is_dir()
        return "sdxl-refiner" if refiner else "sdxl"
    keys = SafetensorsFile(str(path)).keys()
    return "sdxl-refiner" if any(key.startswith(REFINER_TEXT_ENCODER) for key in keys) else "sdxl"


def check_sdxl_request(command, keywords, model, refiner=None, control=False):
    """Before any model loads: keywords (recipe.pipeline_arguments) against the models at `model` and
    `refiner` (paths; refiner None: none given); NpdiffError naming the option and file (sdxl_recipe)."""
    refiner_kind = None
    if refiner is not None:
        if not Path(refiner).expanduser().exists():
            raise NpdiffError(f"--refiner {shorten(str(refiner))}: no such file or folder")
        refiner_kind = model_kind(refiner)
    try:
        check_sdxl_settings(command, keywords, model_kind(model), refiner_kind, control,
                            refiner_name=str(refiner))
    except NpdiffError as exc:
        raise NpdiffError(f"{exc} (--model {model})") from None


def load_refiner(path, sampler=None, precision="fp32"):
    """--refiner PATH -> sdxl_recipe.Refiner(pipeline, {"refiner": name, "refiner_hash": hash}); the pipeline
    samples with `sampler` (the base's --sampler; None: the refiner's own scheduler), at the base's precision."""
    pipe = StableDiffusionXLPipeline.from_pretrained(path, scheduler=sampler, precision=precision)
    return Refiner(pipe, {"refiner": model_name(path), "refiner_hash": model_hash(path)})
