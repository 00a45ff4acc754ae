"""`npdiff batch JOBS --out DIR`: many pictures, on this machine's cores or on a Ray cluster.

    npdiff batch prompts.txt --out pictures/ --steps 20             # one worker on every core
    npdiff batch jobs.jsonl --out pictures/ --workers 2             # 2 processes, half the cores each
    npdiff batch jobs.jsonl --out pictures/ --ray auto              # the Ray cluster this machine is in

How a run goes:
  1. read and check every line of JOBS (npdiff/batch_jobs.py); a bad line is a failure, the rest go on;
  2. name the model by name and hash (as `npdiff generate` does: no local path goes into a PNG), and skip
     the pictures DIR already holds whole and with the job's parameters (a rerun resumes);
  3. start the workers, each loading the model once: in this process (--workers 1), in N spawned
     processes sharing the cores (--workers N), or as Ray actors (--ray, npdiff/batch_ray.py);
  4. feed jobs (with the model's name and hash) to workers as they free up; each returns its PNG's bytes
     and parameters, or an error;
  5. this process writes every picture into DIR (npdiff/atomic_files.py: a picture is either
     whole or absent) and prints a summary; the exit code is 1 if any line failed.
A worker renders exactly what `npdiff generate` / `npdiff img2img` would with the same options: same
seed, same bytes, same parameters in the PNG. Ray is imported only on the --ray path.
"""

import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from itertools import islice
from pathlib import Path

from npdiff.atomic_files import atomic_write
from npdiff.batch_jobs import is_done, read_jobs
from npdiff.errors import NpdiffError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_variables(threads):
    """The environment that gives a fresh process `threads` BLAS and Numba threads (read at import)."""
    return {name: str(threads) for name in THREAD_VARIABLES}


# ---------------------------------------------------------------------------------------------
# A worker: the model, loaded once, turning jobs into PNG bytes
# ---------------------------------------------------------------------------------------------
def job_payload(job, identity):
    """What a worker needs for one job: its options, the PNG's model identity (cli.model_png_identity, computed
    once by the driver) and img2img's picture as bytes (workers may be elsewhere; its path stays here)."""
    options = {key: value for key, value in vars(job).items() if key != "image"}
    payload = dict(options, filename=job.filename, command=job.command, identity=identity, image_bytes=None,
                   image_error=None)
    if job.image is not None:
        try:
            payload["image_bytes"] = Path(job.image).read_bytes()
        except OSError as exc:  # gone or unreadable since the job file was checked: this line fails
            payload["image_error"] = f"'image' {job.image}: {exc.strerror or exc}"
    return payload


class Renderer:
    """One worker's pipeline: job payloads -> {"line", "filename", "png", "params"} or {"line", "error"}.

    model: the path to load, as this worker sees it (None: the model shipped with npdiff, wherever this
    worker's npdiff is installed). The PNGs name the model as each payload's "identity" says (name and hash).
    """

    def __init__(self, model, threads=None):
        if threads:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        from npdiff.pipeline import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(model)
        self.pipe.show_progress = False
        self.samplers = {None: (self.pipe.scheduler, self.pipe.scheduler_name)}  # None: the model's own

    def ready(self):
        """-> what this worker runs on: the model's name and its thread counts."""
        import numba

        return {"model": self.pipe.model_name, "numba_threads": numba.get_num_threads(),
                "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}

    def use_sampler(self, name):
        """Switch the pipeline to `name` as `npdiff generate --sampler name` would load it."""
        if name not in self.samplers:
            self.pipe.set_scheduler(name)
            self.samplers[name] = (self.pipe.scheduler, self.pipe.scheduler_name)
        self.pipe.scheduler, self.pipe.scheduler_name = self.samplers[name]

    def render(self, payload):
        start = time.perf_counter()
        try:
            png, params = self.render_png(payload)
        except Exception as exc:  # noqa: BLE001  (one line failing must not stop the others)
            message = str(exc) if isinstance(exc, NpdiffError) else f"{type(exc).__name__}: {exc}"
            return {"line": payload["line"], "error": message}
        return {"line": payload["line"], "filename": payload["filename"], "png": png, "params": params,
                "seconds": time.perf_counter() - start}

    def render_png(self, job):
        """The same calls as run_generate / run_img2img in npdiff/cli.py, the PNG kept in memory."""
        from PIL import Image

        from npdiff.cli import png_parameters
        from npdiff.images import save_png

        if job["image_error"]:
            raise NpdiffError(job["image_error"])
        self.use_sampler(job["sampler"])
        if job["command"] == "img2img":
            with Image.open(BytesIO(job["image_bytes"])) as picture:
                picture.load()
                out = self.pipe.img2img(job["prompt"], picture, strength=job["strength"],
                                        negative_prompt=job["negative"], num_inference_steps=job["steps"],
                                        guidance_scale=job["guidance"], seed=job["seed"])
            params = png_parameters(out.parameters, "img2img", job["identity"])
        else:
            out = self.pipe(job["prompt"], negative_prompt=job["negative"], num_inference_steps=job["steps"],
                            guidance_scale=job["guidance"], height=job["height"], width=job["width"],
                            seed=job["seed"])
            params = png_parameters(out.parameters, "generate", job["identity"])
        buffer = BytesIO()
        save_png(out.images[0], buffer, params)
        return buffer.getvalue(), params


# ---------------------------------------------------------------------------------------------
# Local workers: this process, or N spawned processes
# ---------------------------------------------------------------------------------------------
class InProcessPool:
    """--workers 1: the model in this process, on all its threads."""

    def __init__(self, model):
        self.renderer = Renderer(model)

    def results(self, payloads):
        for payload in payloads:
            yield self.renderer.render(payload)

    def close(self):
        self.renderer = None


_PROCESS_RENDERER = None  # the Renderer of a spawned worker process


def _start_worker_process(model, threads):
    global _PROCESS_RENDERER
    _PROCESS_RENDERER = Renderer(model, threads)


def _render_in_worker_process(payload):
    return _PROCESS_RENDERER.render(payload)


def _worker_process_ready():
    return _PROCESS_RENDERER.ready()


@contextmanager
def environment(variables):
    """Set environment variables for what starts inside the block; restore them after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ProcessPool:
    """--workers N: N spawned processes, cores // N threads each (or `threads`), each loading the model once.

    The thread counts go in through the environment the children start with: OpenBLAS and Numba read
    them when NumPy and Numba are imported, which in a spawned child happens before any initializer.
    """

    def __init__(self, model, workers, threads=None):
        import multiprocessing

        self.workers = workers
        self.threads = max(1, cpu_cores() // workers) if threads is None else threads
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker_process,
                                            initargs=(model, self.threads))

    def results(self, payloads):
        payloads = iter(payloads)
        in_flight = {}
        # 1. the first N jobs: each submit spawns one process, with the thread variables set
        with environment(thread_variables(self.threads)):
            for payload in islice(payloads, self.workers):
                in_flight[self.executor.submit(_render_in_worker_process, payload)] = payload
        # 2. then one new job each time a worker frees up
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                payload = in_flight.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:
                    raise NpdiffError(f"a worker process died ({exc}); the pictures written so far are "
                                      "kept: run the same command again to finish") from exc
                following = next(payloads, None)
                if following is not None:
                    in_flight[self.executor.submit(_render_in_worker_process, following)] = following
                yield result

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


def make_pool(model, workers=None, ray_address=None):
    """Start the workers (each loads the model); workers=None: 1 locally, one per CPU on Ray."""
    if ray_address is not None:
        from npdiff.batch_ray import RayPool  # the only place ray is imported

        return RayPool(ray_address, model, workers=workers)
    if workers is None or workers == 1:
        return InProcessPool(model)
    return ProcessPool(model, workers)


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


def run_batch(jobs_file, out_dir, model=None, defaults=None, workers=None, ray_address=None, pool=None,
              progress=True):
    """Make every picture of `jobs_file` in `out_dir` that is not there yet. -> BatchSummary.

    defaults: the batch's options for what a line leaves out (negative, steps, guidance, sampler, height,
    width, strength). pool: a ready worker pool (make_pool) loading this same `model`, instead of starting one
    here (the PNGs name `model`, hashed here).
    """
    from tqdm.auto import tqdm

    from npdiff.cli import DEFAULTS, model_png_identity
    from npdiff.pipeline_utils import default_model_path

    start = time.perf_counter()
    defaults = {**DEFAULTS, **{k: v for k, v in (defaults or {}).items() if v is not None}}
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise NpdiffError(f"--workers must be an integer >= 1, got {workers!r}")
    # 1. read and check the jobs; find the model
    jobs, failures = read_jobs(jobs_file, defaults)
    load_path = None if model is None else str(Path(model).expanduser())  # what the workers load
    model = default_model_path() if model is None else Path(model).expanduser()
    if not model.exists():  # on Ray too: this process hashes it to name it in the PNGs
        where = " on this machine (npdiff batch reads it here too, to name it by its hash)" if ray_address else ""
        raise NpdiffError(f"--model {model}: no such file or folder{where}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NpdiffError(f"--out {out_dir} is a file; give a folder")
    # 2. name the model as npdiff generate does (name and hash, once for every job); skip what is already done
    identity = model_png_identity(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not is_done(out_dir / job.filename, job, identity)]
    summary = BatchSummary(total=len(jobs) + len(failures), skipped=len(jobs) - len(todo), failures=failures)
    # 3-5. render, write, sum up
    if todo:
        own_pool = pool is None
        pool = make_pool(load_path, workers, ray_address) if own_pool else pool
        bar = tqdm(total=len(todo), desc="pictures", unit="pic", disable=not progress)
        written = set()
        try:
            for result in pool.results(job_payload(job, identity) for job in todo):
                line = result["line"]
                if "error" in result:
                    summary.failures[line] = result["error"]
                elif line not in written:  # exactly once, whatever a cluster resends
                    write_atomically(out_dir / result["filename"], result["png"])
                    written.add(line)
                bar.update()
                bar.set_postfix(failed=len(summary.failures), refresh=False)
        finally:
            bar.close()
            if own_pool:
                pool.close()
        summary.written = len(written)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def run_batch_command(args):
    defaults = {"negative": args.negative, "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                "height": args.height, "width": args.width, "strength": args.strength}
    summary = run_batch(args.jobs, args.out, model=args.model, defaults=defaults, workers=args.workers,
                        ray_address=args.ray, progress=not args.quiet)
    print(summary.report())
    return 1 if summary.failures else 0


def add_batch_command(subparsers):
    from npdiff.cli import DEFAULTS

    p = subparsers.add_parser(
        "batch", help="many pictures from a job file, on local processes or a Ray cluster",
        description="Make one picture per line of JOBS into DIR, named <line>-seed<seed>.png (line number "
        "zero-padded to 6). JOBS is a text file with one prompt a line, or JSON Lines (.jsonl) with generate's "
        "or img2img's options a line: prompt, negative (or negative_prompt), seed, steps, guidance, sampler, "
        "height, width, image + strength (image relative to the job file). Blank lines and # comments are "
        "skipped. A line without a seed gets its line number as seed, so reruns are reproducible. Pictures "
        "already in DIR, whole and with the job's parameters, are skipped: a rerun resumes. Exit code 1 if "
        "any line failed.")
    p.add_argument("jobs", metavar="JOBS", help="job file: prompts, one a line, or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (made if missing)")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--negative", default=None, help="negative prompt for lines without one (default: empty)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULTS['guidance']})")
    p.add_argument("--sampler", default=None, help="sampler for lines without one (default: the model's own)")
    p.add_argument("--height", type=int, default=None,
                   help="picture height, a multiple of 64 for SD (16 for the shipped model)")
    p.add_argument("--width", type=int, default=None,
                   help="picture width, a multiple of 64 for SD (16 for the shipped model)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"img2img strength for lines with an image (default {DEFAULTS['strength']})")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, each loading the model once and using cores/N threads (default 1); "
                   "with --ray: Ray actors (default: one per CPU of the cluster)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray: a cluster address (host:port, ray://...), 'auto' (the cluster this "
                   "machine belongs to) or 'local' (start one here); needs pip install 'npdiff[cluster]'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_batch_command)
