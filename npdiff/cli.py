"""The `npdiff` command line.

    npdiff generate PROMPT [--negative N] [--steps S] [--guidance G] [--seed X] [--sampler NAME]
                    [--height H --width W] [--model PATH] [--out FILE] [--save-steps K]
                    [--reproduce PNG] [--device cpu|cuda [--fp16]] [--backend numpy|cupy]
                                     text -> picture; the PNG carries its parameters, and
                                     `--reproduce that.png` makes it again
    npdiff img2img PROMPT --image IN [--strength S] [same options]
                                     picture + text -> picture
    npdiff verify [--model PATH] [--steps N]
                                     npdiff against diffusers/transformers on the same weights:
                                     relative error per component and per block
    npdiff bench TOPIC [args...]     run benchmarks/TOPIC.py (kernels, rng, matmul, models, ...)

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

import npdiff  # noqa: F401  (chooses the BLAS kernels before numpy loads)


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


def run_bench(args):
    folder = find_benchmarks_dir()
    if folder is None:
        sys.exit("npdiff bench: no benchmarks/ folder found; run it from an npdiff source checkout")
    topics = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    script = folder / f"{args.topic}.py"
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
# npdiff generate / img2img
# ---------------------------------------------------------------------------------------------
# Options a PNG's parameters can fill in (--reproduce): option name -> key in the PNG's JSON.
REPRODUCIBLE = {"prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "guidance": "guidance_scale",
                "seed": "seed", "sampler": "sampler", "height": "height", "width": "width",
                "model": "model_path", "strength": "strength", "image": "image"}
DEFAULTS = {"negative": "", "steps": 30, "guidance": 7.5, "strength": 0.8}


def resolve_options(args):
    """Fill unset options: from the --reproduce PNG's parameters first, then from DEFAULTS."""
    from npdiff.images import read_png_params

    stored = read_png_params(args.reproduce) if args.reproduce else {}
    for option, key in REPRODUCIBLE.items():
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, stored.get(key, DEFAULTS.get(option)))
    if not args.prompt:
        raise npdiff.NpdiffError("no prompt given (pass PROMPT, or --reproduce a PNG made by npdiff)")
    return args


def load_pipeline(args):
    """Load the model (timed, reported on stderr) with the chosen sampler and backend."""
    from npdiff import backend
    from npdiff.pipeline import StableDiffusionPipeline
    from npdiff.pipeline_utils import default_model_path

    name = chosen_backend(args)
    if name:
        backend.use(name, dtype="float16" if args.fp16 else "float32")
    model = Path(args.model) if args.model else default_model_path()
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, scheduler=args.sampler)
    print(f"loaded model {model} in {time.perf_counter() - start:.2f} s (sampler {pipe.scheduler_name}, "
          f"backend {backend.name()} {backend.compute_dtype()})", file=sys.stderr)
    return pipe, model


# --device -> the backend names that mean the same device
DEVICE_BACKENDS = {"cpu": ("numpy", "cpu"), "cuda": ("cupy", "cuda", "gpu")}


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


def save_outputs(pipe, out, args, model, recorder, extra):
    """Write the picture with its parameters; with --save-steps also the "watch it emerge" grid."""
    from npdiff.atomic_files import atomic_write
    from npdiff.images import emergence_grid, save_png

    params = dict(out.parameters, model_path=str(Path(model).resolve()), **extra)
    path = Path(args.out or f"npdiff-{out.seed}.png")
    save_png(out.images[0], path, params)
    print(f"wrote {path} (seed {out.seed})", file=sys.stderr)
    if recorder is not None:
        grid_path = steps_grid_path(path)
        grid = emergence_grid(pipe, recorder, final_latents=out.latents)
        atomic_write(grid_path, lambda handle: grid.save(handle, format="PNG"))
        print(f"wrote {grid_path} (every {args.save_steps} steps)", file=sys.stderr)
    return path


def steps_grid_path(path):
    """--save-steps writes OUT-steps.png beside OUT."""
    return path.with_name(path.stem + "-steps.png")


def check_outputs(args):
    """Before the model loads: --out (and the --save-steps grid) can be written; say what gets overwritten."""
    from npdiff.atomic_files import check_destination

    if args.save_steps is not None and args.save_steps < 1:
        raise npdiff.NpdiffError(f"--save-steps must be >= 1 (decode every K steps), got {args.save_steps}")
    path = Path(args.out or "npdiff-SEED.png")  # the seed may not be known yet; the folder is what counts
    targets = [("--out", path)] + ([("--save-steps grid", steps_grid_path(path))] if args.save_steps else [])
    for what, target in targets:
        if check_destination(target, what) and args.out:
            print(f"npdiff: note: {target} exists and will be overwritten", file=sys.stderr)


def make_recorder(args):
    from npdiff.images import StepRecorder

    return StepRecorder() if args.save_steps else None


def run_generate(args):
    args = resolve_options(args)
    check_outputs(args)
    pipe, model = load_pipeline(args)
    recorder = make_recorder(args)
    out = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
               guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
               callback=recorder, callback_steps=args.save_steps or 1)
    save_outputs(pipe, out, args, model, recorder, {"command": "generate"})
    return 0


def run_img2img(args):
    from npdiff.images import load_image

    args = resolve_options(args)
    if not args.image:
        raise npdiff.NpdiffError("img2img needs --image IN (a picture file)")
    if not Path(args.image).is_file():
        raise npdiff.NpdiffError(f"--image {args.image}: no such file")
    picture = load_image(args.image)  # corrupt, truncated, bomb, 16-bit -> NpdiffError naming the file
    check_outputs(args)
    pipe, model = load_pipeline(args)
    recorder = make_recorder(args)
    out = pipe.img2img(args.prompt, picture, strength=args.strength, negative_prompt=args.negative,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                       callback=recorder, callback_steps=args.save_steps or 1)
    extra = {"command": "img2img", "image": str(Path(args.image).resolve())}
    save_outputs(pipe, out, args, model, recorder, extra)
    return 0


def add_sampling_options(p):
    p.add_argument("prompt", nargs="?", default=None, help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale; <= 1 turns it off (default {DEFAULTS['guidance']})")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed and stored)")
    p.add_argument("--sampler", default=None, help="pndm, ddim, ddpm, lms, euler, euler_a, dpmpp_2m, "
                   "dpmpp_2m_karras (default: the model's own scheduler)")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--out", default=None, help="output PNG (default npdiff-SEED.png)")
    p.add_argument("--save-steps", type=int, default=None, metavar="K",
                   help="also write OUT-steps.png: the picture decoded every K steps")
    p.add_argument("--reproduce", default=None, metavar="PNG",
                   help="take unset options from the parameters stored in a PNG made by npdiff")
    p.add_argument("--device", default=None, choices=sorted(DEVICE_BACKENDS),
                   help="cpu (NumPy/Numba, the default) or cuda (CuPy on an NVIDIA GPU; pip install -e '.[gpu]')")
    p.add_argument("--fp16", action="store_true", help="with --device cuda: weights and activations in float16")
    p.add_argument("--backend", default=None, help="numpy (default) or cupy: the same choice as --device")


def add_generate_command(subparsers):
    p = subparsers.add_parser("generate", help="text to image")
    add_sampling_options(p)
    p.add_argument("--height", type=int, default=None, help="picture height, a multiple of 8")
    p.add_argument("--width", type=int, default=None, help="picture width, a multiple of 8")
    p.set_defaults(run=run_generate)


def add_img2img_command(subparsers):
    p = subparsers.add_parser("img2img", help="image + text to image")
    add_sampling_options(p)
    p.add_argument("--image", default=None, help="the starting picture")
    p.add_argument("--strength", type=float, default=None,
                   help=f"how much to change it, in (0, 1] (default {DEFAULTS['strength']})")
    p.set_defaults(run=run_img2img)


# ---------------------------------------------------------------------------------------------
# npdiff verify
# ---------------------------------------------------------------------------------------------
def run_verify(args):
    from npdiff.verify import verify_model

    return verify_model(args.model, steps=args.steps, height=args.height, width=args.width, seed=args.seed)


def add_verify_command(subparsers):
    p = subparsers.add_parser("verify", help="compare npdiff with diffusers/transformers on a model's weights")
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    p.add_argument("--steps", type=int, default=4, help="steps of the sampling loop compared (default 4)")
    p.add_argument("--height", type=int, default=None, help="picture height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="picture width (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(run=run_verify)


COMMANDS = [add_generate_command, add_img2img_command, add_verify_command, add_bench_command]


def build_parser():
    parser = argparse.ArgumentParser(prog="npdiff", description=npdiff.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"npdiff {npdiff.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except npdiff.NpdiffError as exc:  # bad input: one line, no traceback, status 2
        print(f"npdiff: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # past the memory estimate's check (npdiff/memory_estimate.py): status 1
        print(f"npdiff: error: out of memory ({exc or 'MemoryError'}); lower --height/--width", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
