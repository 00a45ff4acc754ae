"""The `npdiff` command line.

    npdiff generate PROMPT [--negative N] [--steps S] [--guidance G] [--seed X] [--sampler NAME] [--eta E]
                    [--height H --width W] [--model PATH] [--prediction-type epsilon|v_prediction]
                    [--vae FOLDER] [--vae-tiling] [--lora FILE[:SCALE]]... [--out FILE] [--save-steps K]
                    [--reproduce PNG] [--device cpu|cuda [--fp16]] [--backend numpy|cupy]
                                     text -> picture; the PNG carries its parameters (npdiff's JSON and
                                     AUTOMATIC1111's text; the model and LoRAs by name and hash, a --vae
                                     by folder name), and `--reproduce that.png --model M` makes it again
    npdiff img2img PROMPT --image IN [--strength S] [generate's options but --height/--width]
                                     picture + text -> picture
    npdiff inpaint PROMPT --image IN --mask MASK [--strength S] [generate's options]
                                     repaint the picture where the mask is white
    npdiff batch JOBS --out DIR [--workers N] [--ray ADDRESS] [defaults for the jobs: --model,
                    --negative, --steps, --guidance, --sampler, --height/--width, --strength]
                                     one picture per line of JOBS (prompts, or .jsonl of options),
                                     on N local processes or a Ray cluster; a rerun resumes
    npdiff serve [--model M] [--models-dir DIR] [--lora-dir DIR] [--host 127.0.0.1] [--port 7860]
                 [--api-auth USER:PASS] [--queue N]
                                     keep the model loaded; webui's /sdapi/v1 API and a page at /
                                     (the 'serve' extra; npdiff/serve.py)
    npdiff verify [--model PATH] [--steps N]
                                     npdiff against diffusers/transformers on the same weights:
                                     relative error per component and per block
    npdiff bench TOPIC [args...]     run benchmarks/TOPIC.py (sd15_kernels, rng, matmul, models, ...)

Each subcommand is one `add_<name>_command(subparsers)` function below that registers its parser and
the function that runs it.

Errors: bad input (an npdiff.NpdiffError: a file, option, size or value that cannot be used) prints one
line `npdiff: error: ...` on stderr, no traceback, and exits with status 2 (as argparse does for a bad
option); running out of memory anyway exits with status 1. Output paths are checked before the model
is loaded, and pictures are written atomically (npdiff/atomic_files.py): never a partial file.
"""

import argparse
import runpy
import sys
import time
from pathlib import Path

import npdiff
from npdiff import backend
from npdiff.atomic_files import atomic_write, check_destination, same_place
from npdiff.batch import add_batch_command
from npdiff.cli_controlnet import load_controls, warn_about_missing_controlnets
from npdiff.cli_options import DEVICE_BACKENDS, add_hires_options, add_sampling_options
from npdiff.cli_train import add_train_embedding_command, add_train_lora_command
from npdiff.errors import clip, shorten
from npdiff.images import StepRecorder, emergence_grid, load_image, read_png_params
from npdiff.loading.weights import PRECISIONS
from npdiff.lora import check_scale
from npdiff.memory_estimate import ATTENTION_EXAMPLES, MAX_ATTENTION_TOKENS, PictureSizeError
from npdiff.picture_size import MAX_SIDE, check_side
from npdiff.pipeline_controlnet_attach import attach_controlnets, load_controlnets
from npdiff.pipeline_sdxl import load_any_pipeline
from npdiff.pipeline_utils import default_model_path
from npdiff.recipe import (
    DEFAULTS,
    INPAINT_DEFAULTS,
    OPTIONS,
    defaults_for,
    load_vae,
    model_png_identity,
    options_from_png,
    parse_control_option,
    parse_lora_option,
    pipeline_arguments,
    render,
    use_vae_tiling,
)
from npdiff.recipe_reproduce import (
    controlnet_precisions,
    find_loras,
    problems_with_stored,
    refiner_mismatch,
    without_refiner_settings,
)
from npdiff.sampling_starts import check_picture_sides
from npdiff.sdxl_refiner import (
    add_denoising_start_option,
    check_sdxl_request,
    load_refiner,
)
from npdiff.serve import add_serve_command
from npdiff.verify import verify_model


# ---------------------------------------------------------------------------------------------
# npdiff bench TOPIC
# ---------------------------------------------------------------------------------------------
def find_benchmarks_dir():
    """benchmarks/ lives beside the package in a source checkout (it is not installed)."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    return None


# Topics whose script was renamed: the old command keeps working (benchmarks/kernels.py became sd15_kernels.py,
# since a script named kernels.py shadowed Hugging Face's `kernels` package for scripts run from benchmarks/).
BENCH_TOPIC_ALIASES = {"kernels": "sd15_kernels"}


def run_bench(args):
    folder = find_benchmarks_dir()
    if folder is None:
        sys.exit("npdiff bench: no benchmarks/ folder found; run it from an npdiff source checkout")
    topics = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    script = folder / f"{BENCH_TOPIC_ALIASES.get(args.topic, args.topic)}.py"
    if not script.is_file():
        sys.exit(f"npdiff bench: unknown topic {args.topic!r}; known: {', '.join(topics)}")
    sys.argv = [str(script), *args.bench_args]
    sys.path.insert(0, str(folder))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_bench_command(subparsers):
    p = subparsers.add_parser("bench", help="run a benchmark from benchmarks/ against PyTorch")
    p.add_argument("topic", help="benchmark name: a file benchmarks/<topic>.py")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(run=run_bench)


# ---------------------------------------------------------------------------------------------
# npdiff generate / img2img / inpaint
# ---------------------------------------------------------------------------------------------
def resolve_options(args, command):
    """Fill unset options: from the --reproduce PNG's parameters first (each value checked), then from the
    command's defaults (npdiff.recipe). Options given on the command line always win over the PNG. What the PNG
    asks for that npdiff cannot give is an error only when no option settles it (recipe_reproduce), else a
    warning. The PNG's parameters stay in args.stored (its model hash is compared once the model is known)."""

    stored = read_png_params(args.reproduce) if args.reproduce else {}
    from_png = options_from_png(stored, args.reproduce) if args.reproduce else {}
    from_png = without_refiner_settings(from_png, stored, args.refiner)  # a refiner named but not given
    given = {option.name: getattr(args, option.name, None) for option in OPTIONS}
    errors, warnings = [], []
    if args.reproduce:  # what a PNG's parameters say about this command (another mode, a missing sampler ...)
        errors, warnings = problems_with_stored(stored, dict(given, vae=args.vae, refiner=args.refiner), command,
                                                args.reproduce)
    if errors:
        raise npdiff.NpdiffError("; ".join(errors))
    add_loras_from_png(args, stored)
    warn_about_missing_controlnets(args, stored)
    # a net that ran at another precision than the model is loaded so again, unless --precision is given
    args.controlnet_precisions = controlnet_precisions(stored, args.reproduce) if given["precision"] is None else {}
    defaults = defaults_for(command)
    for option in OPTIONS:
        if command in option.commands and getattr(args, option.name, None) is None:
            setattr(args, option.name, from_png.get(option.name, defaults.get(option.name)))
    for warning in warnings:
        print(f"npdiff: warning: {warning}", file=sys.stderr)
    if stored.get("unmapped"):
        unmapped = "; ".join(clip(item) for item in stored["unmapped"][:20])
        print(f"npdiff: --reproduce {args.reproduce}: not reproduced (npdiff has no such setting): {unmapped}",
              file=sys.stderr)
    args.stored = stored
    for side in ("height", "width"):  # an impossible side is refused before the model loads (the rest after)
        if getattr(args, side, None) is not None:
            try:
                check_side(side, getattr(args, side))
            except npdiff.NpdiffError as exc:  # a side from the PNG: say where it came from
                if given.get(side) is not None or side not in from_png:
                    raise
                raise npdiff.NpdiffError(f"{args.reproduce}: stored parameter: {exc}") from None
    if not args.prompt:
        raise npdiff.NpdiffError("no prompt given (pass PROMPT, or --reproduce a PNG made by npdiff)")
    return args


def add_loras_from_png(args, stored):
    """A PNG names its LoRAs but never their paths: those in --lora-dir (hash checked) are added to --lora;
    the others are named in a warning that says to pass them with --lora."""
    given = {Path(parse_lora_option(spec)[0]).stem for spec in (getattr(args, "lora", None) or [])}
    found, warnings = find_loras(stored.get("loras") or [], getattr(args, "lora_dir", None), given)
    for path, scale in found:
        args.lora = (args.lora or []) + [f"{path}:{scale}"]
    for warning in warnings[:10]:
        print(f"npdiff: warning: {args.reproduce}: {warning}", file=sys.stderr)


def identify_model(args, model):
    """-> model_png_identity of the loaded model with --prediction-type; warns when --reproduce's PNG names
    another model hash."""
    identity = model_png_identity(model, args.prediction_type)
    wanted = getattr(args, "stored", {}).get("model_hash")
    if wanted and wanted.lower() != identity["model_hash"]:
        print(f"npdiff: warning: {args.reproduce} was made with model {shorten(args.stored.get('model', '?'))} "
              f"(hash {clip(wanted)}), but the model loaded is {identity['model']!r} (hash "
              f"{identity['model_hash']}): the picture will differ; pass that model with --model", file=sys.stderr)
    return identity


def load_pipeline(args):
    """Load the model (timed, reported on stderr) with the chosen sampler and backend."""

    name = chosen_backend(args)
    # a bad --lora (no number, or a scale such as nan or 1e309) fails before the model loads
    loras = [(path, check_scale(scale, path)) for path, scale in map(parse_lora_option, args.lora or [])]
    if name:
        backend.use(name, dtype="float16" if args.fp16 else "float32")
    model = Path(args.model) if args.model else default_model_path()
    control_paths = [parse_control_option(spec)[0] for spec in args.control or []]
    # a net for the other family (SD 1.x / SDXL) is refused now, before the model loads
    nets = load_controlnets(control_paths, model, precision=args.precision or "fp32",
                            net_precisions=getattr(args, "controlnet_precisions", None))
    start = time.perf_counter()
    pipe = load_any_pipeline(model, scheduler=args.sampler, prediction_type=args.prediction_type,
                             precision=args.precision or "fp32")  # SD or SDXL
    if args.vae:
        pipe.vae = load_vae(args.vae)
    use_vae_tiling(pipe, args.vae_tiling)  # --vae-tiling (or the PNG's vae_tiling with --reproduce)
    print(f"loaded model {model} in {time.perf_counter() - start:.2f} s (sampler {pipe.scheduler_name}, "
          f"backend {backend.name()} {backend.compute_dtype()}, precision {pipe.precision})", file=sys.stderr)
    for path, scale in loras:
        lora = pipe.load_lora_weights(path, scale=scale)
        print(f"loaded LoRA {path} (scale {scale}, {lora.layer_count} layers)", file=sys.stderr)
    if nets:
        pipe = attach_controlnets(pipe, nets)  # the SD or SDXL ControlNet pipeline over the loaded components
    return pipe, model


# --device -> the backend names that mean the same device


def chosen_backend(args):
    """The backend to use from --device cpu|cuda and --backend (which must agree), or None."""
    name = args.backend
    if args.device:
        if name and name.lower() not in DEVICE_BACKENDS[args.device]:
            raise npdiff.NpdiffError(f"--device {args.device} and --backend {name} disagree; give one of them")
        name = DEVICE_BACKENDS[args.device][0]
    if args.fp16 and (name is None or name.lower() not in DEVICE_BACKENDS["cuda"]):
        raise npdiff.NpdiffError("--fp16 runs the model in float16 on the GPU: it needs --device cuda")
    return name


def save_outputs(pipe, rendered, args, recorder):
    """Write the picture (its PNG as render() made it, parameters included); with --save-steps also the
    "watch it emerge" grid."""

    output = rendered.output
    path = Path(args.out or f"npdiff-{output.seed}.png")
    atomic_write(path, lambda handle: handle.write(rendered.png))
    print(f"wrote {path} (seed {output.seed})", file=sys.stderr)
    if recorder is not None:
        grid_path = steps_grid_path(path)
        grid = emergence_grid(pipe, recorder, final_latents=output.latents)
        atomic_write(grid_path, lambda handle: grid.save(handle, format="PNG"))
        print(f"wrote {grid_path} (every {args.save_steps} steps)", file=sys.stderr)
    return path


def steps_grid_path(path):
    """--save-steps writes OUT-steps.png beside OUT."""
    return path.with_name(path.stem + "-steps.png")


def check_outputs(args):
    """Before the model loads: --out (and the --save-steps grid) can be written; say what gets overwritten."""

    if args.save_steps is not None and args.save_steps < 1:
        raise npdiff.NpdiffError(f"--save-steps must be >= 1 (decode every K steps), got {args.save_steps}")
    out = args.out or "npdiff-SEED.png"  # the seed may not be known yet; the folder is what counts
    targets = [("--out", out)] + ([("--save-steps grid", steps_grid_path(Path(out)))] if args.save_steps else [])
    inputs = [(name, getattr(args, name[2:], None)) for name in ("--model", "--vae", "--refiner")]
    inputs += [("--lora", parse_lora_option(spec)[0]) for spec in getattr(args, "lora", None) or []]
    inputs += [("--control", parse_control_option(spec)[0]) for spec in getattr(args, "control", None) or []]
    for what, target in targets:
        for name, source in inputs:
            if source and same_place(target, source):  # a PNG written over a model file would destroy it
                raise npdiff.NpdiffError(f"{what} {target} is the {name} file; give another name for the picture")
        if check_destination(target, what) and args.out:
            print(f"npdiff: note: {target} exists and will be overwritten", file=sys.stderr)


def make_recorder(args):

    return StepRecorder() if args.save_steps else None


LARGEST_SIZE_MULTIPLE = 64  # picture_size.size_rule's largest: SD 1.x/2.x (SDXL's is 32, the shipped model's 16)


def load_inputs(args, command):
    """img2img's picture, inpaint's picture and mask, from --image / --mask (npdiff.images.load_image: the
    one loader every entry point uses) -> (picture, mask); (None, None) for generate."""
    if command == "generate":
        return None, None
    needed = "--image IN (a picture file)" if command == "img2img" else \
        "--image IN and --mask MASK (picture files; white = repaint)"
    if not args.image or (command == "inpaint" and not args.mask):
        hint = " (a PNG stores no picture path: give the input pictures again)" if args.reproduce else ""
        raise npdiff.NpdiffError(f"{command} needs {needed}{hint}")
    picture = load_image(args.image)  # corrupt, truncated, bomb, 16-bit -> NpdiffError naming the file
    # img2img and inpaint work at the picture's size: a side past MAX_SIDE is refused before the model loads.
    # Rounded down to 64 px (SD 1.x/2.x's size rule; every model's rule divides it), so only what every model
    # refuses is refused here; the model's own rule is checked again after it loads.
    check_picture_sides(picture, LARGEST_SIZE_MULTIPLE)
    mask = load_image(args.mask) if command == "inpaint" else None
    return picture, mask


def run_picture_command(args, command):
    """npdiff generate / img2img / inpaint: check everything, load the model, render (npdiff.recipe), write."""
    args = resolve_options(args, command)
    picture, mask = load_inputs(args, command)
    options = {option.name: getattr(args, option.name, None) for option in OPTIONS if command in option.commands}
    keywords = pipeline_arguments(command, options)  # a prompt a PNG cannot store fails before the model loads
    check_outputs(args)
    control = load_controls(args)  # control pictures and ControlNet paths checked before the model loads
    check_sdxl_request(command, keywords, args.model or default_model_path(), args.refiner, bool(control))
    pipe, model = load_pipeline(args)
    identity = identify_model(args, model)  # before the long work: warns early
    refiner = load_refiner(args.refiner, args.sampler, pipe.precision) if args.refiner else None
    if refiner is not None:  # the refiner's VAE decodes the picture: tiled as the base's would be
        use_vae_tiling(refiner.pipe, args.vae_tiling)
    for warning in refiner_mismatch(getattr(args, "stored", {}), refiner, args.reproduce):
        print(f"npdiff: warning: {warning}", file=sys.stderr)
    recorder = make_recorder(args)
    rendered = render(pipe, command, options, picture, mask, identity=identity, vae=args.vae, callback=recorder,
                      callback_steps=args.save_steps or 1, control=control, refiner=refiner)
    save_outputs(pipe, rendered, args, recorder)  # the picture and mask: not stored
    return 0


def run_generate(args):
    return run_picture_command(args, "generate")


def run_img2img(args):
    return run_picture_command(args, "img2img")


def run_inpaint(args):
    return run_picture_command(args, "inpaint")


# What to lower when a picture is too large (memory_estimate.PictureSizeError), named as this command line's flags
SIZE_HINTS = {"size": "lower --height/--width", "hires_scale": "lower --hires-scale",
              "image": "give a smaller --image (img2img works at its size)"}
# What --height/--width refuse before any work (picture_size.check_size, memory_estimate.check_attention_size)
SIZE_LIMITS = (f"at most {MAX_SIDE}; refused before any work past {MAX_ATTENTION_TOKENS} positions in the UNet's "
               f"self-attention ({ATTENTION_EXAMPLES}), whose time grows with their square")


def add_generate_command(subparsers):
    p = subparsers.add_parser("generate", help="text to image")
    add_sampling_options(p)
    p.add_argument("--height", type=int, default=None,
                   help="picture height, a multiple of 64 for SD (16 for the shipped model); " + SIZE_LIMITS)
    p.add_argument("--width", type=int, default=None,
                   help="picture width, a multiple of 64 for SD (16 for the shipped model); " + SIZE_LIMITS)
    add_hires_options(p)
    p.set_defaults(run=run_generate)


def add_img2img_command(subparsers):
    p = subparsers.add_parser("img2img", help="image + text to image")
    add_sampling_options(p)
    p.add_argument("--image", default=None, help="the starting picture")
    p.add_argument("--strength", type=float, default=None,
                   help=f"how much to change it, in (0, 1] (default {DEFAULTS['strength']})")
    add_denoising_start_option(p)  # SDXL
    p.set_defaults(run=run_img2img)


def add_inpaint_command(subparsers):
    p = subparsers.add_parser("inpaint", help="repaint a picture where a mask is white")
    add_sampling_options(p)
    p.add_argument("--image", default=None, help="the picture to repaint")
    p.add_argument("--mask", default=None, help="the mask: white = repaint, black = keep; the picture's size")
    p.add_argument("--strength", type=float, default=None,
                   help=f"how much to change the masked part, in (0, 1] (default {INPAINT_DEFAULTS['strength']})")
    p.add_argument("--height", type=int, default=None,
                   help="size to work at, a multiple of 64 for SD (default: the model's); " + SIZE_LIMITS)
    p.add_argument("--width", type=int, default=None,
                   help="size to work at, a multiple of 64 for SD (default: the model's); " + SIZE_LIMITS)
    add_denoising_start_option(p)  # SDXL
    p.set_defaults(run=run_inpaint)


# ---------------------------------------------------------------------------------------------
# npdiff verify
# ---------------------------------------------------------------------------------------------
def run_verify(args):

    return verify_model(args.model, steps=args.steps, height=args.height, width=args.width, seed=args.seed,
                        precision=args.precision)


def add_verify_command(subparsers):
    p = subparsers.add_parser("verify", help="compare npdiff with diffusers/transformers on a model's weights")
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    p.add_argument("--steps", type=int, default=4, help="steps of the sampling loop compared (default 4)")
    p.add_argument("--height", type=int, default=None, help="picture height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="picture width (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="npdiff's networks at this precision, against torch float32 (bf16: its own tolerances)")
    p.set_defaults(run=run_verify)


COMMANDS = [add_generate_command, add_img2img_command, add_inpaint_command, add_batch_command,
            add_serve_command, add_verify_command, add_bench_command, add_train_embedding_command,
            add_train_lora_command]


def build_parser():
    parser = argparse.ArgumentParser(prog="npdiff", description=npdiff.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"npdiff {npdiff.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


TRAINING_COMMANDS = ("train-embedding", "train-lora")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except npdiff.NpdiffError as exc:  # bad input: one line, no traceback, status 2
        message = exc.hinted(SIZE_HINTS) if isinstance(exc, PictureSizeError) else exc  # our flags, not keywords
        print(f"npdiff: error: {message}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # past the memory estimate's check (npdiff/memory_estimate.py): status 1
        # the training commands have no --height/--width: their batch is what grows
        advice = "lower --batch-size" if args.command in TRAINING_COMMANDS else "lower --height/--width"
        print(f"npdiff: error: out of memory ({exc or 'MemoryError'}); {advice}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
