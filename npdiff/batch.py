"""`npdiff batch JOBS --out DIR`: many pictures, on this machine's cores or on a Ray cluster.

    npdiff batch prompts.txt --out pictures/ --steps 20             # one worker on every core
    npdiff batch jobs.jsonl --out pictures/ --workers 2             # 2 processes, half the cores each
    npdiff batch jobs.jsonl --out pictures/ --ray auto              # the Ray cluster this machine is in

How a run goes:
  1. read and check every line of JOBS (npdiff/batch_jobs.py), its picture size against the model's configs
     too; a bad line is a failure, the rest go on;
  2. name the model by name and hash (as `npdiff generate` does: no local path goes into a PNG), and skip
     the pictures DIR already holds whole and with the job's parameters (a rerun resumes);
  3. start the workers (npdiff/batch_workers.py), each loading the model once: in this process
     (--workers 1), in N spawned processes sharing the cores (--workers N), or as Ray actors (--ray,
     npdiff/batch_ray.py);
  4. feed jobs (with the model's name and hash) to workers as they free up; each returns its PNG's bytes
     and parameters, or an error;
  5. this process writes every picture into DIR (npdiff/atomic_files.py: a picture is either
     whole or absent) and prints a summary; the exit code is 1 if any line failed.
A worker renders through npdiff.recipe.render, exactly what `npdiff generate` / `img2img` / `inpaint` would
with the same options (LoRAs, VAE and eta included): same seed, same bytes, same parameters in the PNG.
However the driver ends (an error, Ctrl-C, SIGTERM), its worker processes end with it. Ray is imported
only on the --ray path.
"""

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from npdiff.atomic_files import atomic_write, check_destination, non_regular_kind
from npdiff.batch_jobs import is_done, read_jobs
from npdiff.batch_sizes import check_batch_size, check_jobs_for_model
from npdiff.batch_workers import InProcessPool, ProcessPool
from npdiff.errors import NpdiffError
from npdiff.loading.weights import PRECISIONS, check_precision
from npdiff.pipeline_utils import default_model_path
from npdiff.recipe import DEFAULTS, model_png_identity


# ---------------------------------------------------------------------------------------------
# What a worker gets for one job
# ---------------------------------------------------------------------------------------------
def job_payload(job, identity):
    """What a worker needs for one job: its command and options, the PNG's model identity (model_png_identity,
    computed once by the driver, + the line's prediction type), the LoRA and VAE paths, and its pictures as
    bytes (workers may be elsewhere; the pictures' paths stay here)."""
    if job.options.get("prediction_type"):
        identity = dict(identity, prediction_type=job.options["prediction_type"])
    payload = {"line": job.line, "filename": job.filename, "command": job.command, "options": dict(job.options),
               "identity": identity, "vae": job.vae, "loras": [list(lora) for lora in job.loras],
               "refiner": job.refiner}
    for key in ("image", "mask"):
        path = getattr(job, key)
        payload.update({f"{key}_bytes": None, f"{key}_error": None, f"{key}_name": Path(path).name if path else None})
        if path is None:
            continue
        try:
            payload[f"{key}_bytes"] = Path(path).read_bytes()
        except OSError as exc:  # gone or unreadable since the job file was checked: this line fails
            payload[f"{key}_error"] = f"'{key}' {path}: {exc.strerror or exc}"
    payload.update(controls=[[net, scale] for net, _, scale in job.controls], control_settings=job.control_settings,
                   control_pictures=[])
    for _, path, _ in job.controls:  # the control pictures as bytes too, the ControlNets by path (as LoRAs)
        picture = {"bytes": None, "error": None, "name": Path(path).name}
        try:
            picture["bytes"] = Path(path).read_bytes()
        except OSError as exc:
            picture["error"] = f"'control' {path}: {exc.strerror or exc}"
        payload["control_pictures"].append(picture)
    return payload


def make_pool(model, workers=None, ray_address=None, precision="fp32"):
    """Start the workers (each loads the model at `precision`); workers=None: 1 locally, one per CPU on Ray."""
    if ray_address is not None:
        from npdiff.batch_ray import RayPool  # the only place ray is imported

        return RayPool(ray_address, model, workers=workers, precision=precision)
    if workers is None or workers == 1:
        return InProcessPool(model, precision)
    return ProcessPool(model, workers, precision=precision)


# ---------------------------------------------------------------------------------------------
# The driver: skip what is done, write what comes back, sum up
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    total: int = 0
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: dict = field(default_factory=dict)  # line number -> error message

    @property
    def per_minute(self):
        return 60.0 * self.written / self.seconds if self.seconds > 0 else 0.0

    def report(self):
        pictures = "picture" if self.written == 1 else "pictures"
        lines = [f"{self.written} {pictures} written, {self.skipped} skipped (already done), "
                 f"{len(self.failures)} failed, of {self.total} lines; {self.per_minute:.1f} pictures/minute "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  line {line}: {message}" for line, message in sorted(self.failures.items())]
        return "\n".join(lines)


def write_atomically(path, data):
    """Write bytes to `path` through a temporary file in the same folder and os.replace: whole or absent."""
    atomic_write(path, lambda handle: handle.write(data))


def prepare_out_dir(out_dir):
    """--out DIR: made if missing, and writable (tried for real); NpdiffError in one line otherwise."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NpdiffError(f"--out {out_dir} is a file; give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NpdiffError(f"--out {out_dir}: cannot make the folder ({exc.strerror or exc})") from exc
    check_destination(out_dir / "picture.png", "--out")  # a read-only folder fails here, before any work
    return out_dir


def blocked_output(path):
    """The message when something that is not a regular file sits at a picture's name, else None."""
    kind = non_regular_kind(path)
    return None if kind is None else f"{path.name} in --out is {kind}, not a picture: move it away"


def run_batch(jobs_file, out_dir, model=None, defaults=None, workers=None, ray_address=None, pool=None,
              progress=True, precision="fp32"):
    """Make every picture of `jobs_file` in `out_dir` that is not there yet. -> BatchSummary.

    defaults: the batch's options for what a line leaves out (npdiff.recipe option names, and "vae",
    "lora"). pool: a ready worker pool (make_pool) loading this same `model`, instead of starting one
    here (the PNGs name `model`, hashed here). precision: what every worker loads the model at ("fp32" or
    "bf16", recorded in each PNG when bf16, so a picture made at the other precision is made again). However the run ends (an error, Ctrl-C, SIGTERM turned
    into an exception by the command line), a pool started here is closed, its worker processes ended.
    """
    from tqdm.auto import tqdm


    start = time.perf_counter()
    defaults = {key: value for key, value in (defaults or {}).items() if value is not None}
    if check_precision(precision) != "fp32":  # in every job's expected parameters, as the PNGs store it
        defaults["precision"] = precision
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise NpdiffError(f"--workers must be an integer >= 1, got {workers!r}")
    # 1. find the model and check the batch's own size against it (its configs only); read and check the
    #    jobs, each line's size against the model too
    load_path = None if model is None else str(Path(model).expanduser())  # what the workers load
    model = default_model_path() if model is None else Path(model).expanduser()
    if not model.exists():  # on Ray too: this process hashes it to name it in the PNGs
        where = " on this machine (npdiff batch reads it here too, to name it by its hash)" if ray_address else ""
        raise NpdiffError(f"--model {model}: no such file or folder{where}")
    check_batch_size(defaults, model)
    jobs, failures = read_jobs(jobs_file, defaults)
    jobs = check_jobs_for_model(jobs, failures, model)  # a size the model refuses: its line fails now, not in a worker
    out_dir = prepare_out_dir(out_dir)
    # 2. name the model as npdiff generate does (name and hash, once for every job); skip what is already done
    identity = model_png_identity(model)
    total = len(jobs) + len(failures)
    todo, blocked = [], 0
    for job in jobs:
        message = blocked_output(out_dir / job.filename)
        if message:  # a folder (or a FIFO, ...) at the picture's name: this line fails, the others go on
            failures[job.line] = message
            blocked += 1
        elif not is_done(out_dir / job.filename, job, identity):
            todo.append(job)
    summary = BatchSummary(total=total, skipped=len(jobs) - len(todo) - blocked, failures=failures)
    # 3-5. render, write, sum up
    if todo:
        own_pool = pool is None
        pool = make_pool(load_path, workers, ray_address, precision) if own_pool else pool
        bar = tqdm(total=len(todo), desc="pictures", unit="pic", disable=not progress)
        written = set()
        finished = False
        try:
            for result in pool.results(job_payload(job, identity) for job in todo):
                line = result["line"]
                if "error" in result:
                    summary.failures[line] = result["error"]
                elif line not in written:  # exactly once, whatever a cluster resends
                    try:
                        write_atomically(out_dir / result["filename"], result["png"])
                        written.add(line)
                    except NpdiffError as exc:  # e.g. a folder made at its name meanwhile: this line fails
                        summary.failures[line] = str(exc)
                bar.update()
                bar.set_postfix(failed=len(summary.failures), refresh=False)
            finished = True
        finally:
            bar.close()
            if own_pool:
                pool.close(abort=not finished)
        summary.written = len(written)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
class Stopped(BaseException):
    """The batch was asked to stop by a signal (SIGTERM): raised in the driver so that it ends its workers.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` (a worker's per-line error
    handling, with --workers 1 in this very process) takes it for one line's failure."""


@contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises Stopped, so run_batch's clean-up runs (it would otherwise end the
    process at once and orphan the worker processes). Only in the main thread, where signals arrive."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_batch_command(args):
    defaults = {"negative": args.negative, "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                "height": args.height, "width": args.width, "strength": args.strength, "eta": args.eta,
                "prediction_type": args.prediction_type, "vae": args.vae, "lora": args.lora, "refiner": args.refiner}
    try:
        with stop_on_sigterm():
            summary = run_batch(args.jobs, args.out, model=args.model, defaults=defaults, workers=args.workers,
                                precision=args.precision,
                                ray_address=args.ray, progress=not args.quiet)
    except (Stopped, KeyboardInterrupt) as exc:
        why = f"by {exc}" if isinstance(exc, Stopped) else "by Ctrl-C"
        print(f"npdiff batch: stopped {why}; the workers are ended and the pictures written so far kept: run "
              "the same command again to finish", file=sys.stderr)
        return 143 if isinstance(exc, Stopped) else 130
    print(summary.report())
    return 1 if summary.failures else 0


def add_batch_command(subparsers):
    p = subparsers.add_parser(
        "batch", help="many pictures from a job file, on local processes or a Ray cluster",
        description="Make one picture per line of JOBS into DIR, named <line>-seed<seed>.png (line number "
        "zero-padded to 6). JOBS is a text file with one prompt a line, or JSON Lines (.jsonl) with generate's, "
        "img2img's or inpaint's options a line: prompt, negative (or negative_prompt), seed, steps, guidance, "
        "sampler, height, width, eta, prediction_type, image (+ strength) for img2img, image + mask for inpaint, "
        "vae (a folder), lora (\"FILE[:SCALE]\" or a list), control (\"CONTROLNET:IMAGE[:SCALE]\" or a list) with "
        "canny, control_start, control_end, guess_mode; SDXL's prompt_2, negative_2, original_size, target_size, "
        "crops_coords_top_left (and negative_*), aesthetic_score, refiner (a file or folder), refiner_switch, "
        "denoising_start, denoising_end; paths relative to the job file. Blank lines and "
        "# comments are skipped. A line without a seed gets its line number as seed, so reruns are "
        "reproducible. Pictures already in DIR, whole and with the job's parameters, are skipped: a rerun "
        "resumes. SIGTERM or Ctrl-C ends the workers too. Exit code 1 if any line failed.")
    p.add_argument("jobs", metavar="JOBS", help="job file: prompts, one a line, or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (made if missing)")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--negative", default=None, help="negative prompt for lines without one (default: empty)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULTS['guidance']})")
    p.add_argument("--sampler", default=None, help="sampler for lines without one (default: the model's own)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="load the model at fp32, bf16 (weights in bfloat16: half the memory), bf16x3 or mixed (the "
                        "UNet's transformer matmuls and attention in bf16); one for the batch")
    p.add_argument("--height", type=int, default=None,
                   help="picture height, a multiple of 64 for SD (16 for the shipped model)")
    p.add_argument("--width", type=int, default=None,
                   help="picture width, a multiple of 64 for SD (16 for the shipped model)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"strength for lines with an image (default {DEFAULTS['strength']}; inpaint 1.0)")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta / TCD's gamma for lines without one "
                   f"(default {DEFAULTS['eta']})")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts, for lines without one (default: the model's own)")
    p.add_argument("--vae", default=None, metavar="FOLDER", help="a VAE folder for lines without one")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="a LoRA fused for lines without one; repeatable")
    p.add_argument("--refiner", default=None, metavar="FILE_OR_FOLDER",
                   help="SDXL: a refiner finishing every line's picture (a line's refiner_switch, default 0.8)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, each loading the model once and using cores/N threads (default 1); "
                   "with --ray: Ray actors (default: one per CPU of the cluster)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray: a cluster address (host:port, ray://...), 'auto' (the cluster this "
                   "machine belongs to) or 'local' (start one here); needs pip install 'npdiff[cluster]'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_batch_command)
