"""`npdiff batch`'s workers: the model loaded once, turning jobs into PNG bytes, here or in N processes.

  Renderer        one worker's pipeline; render(payload) -> {"line", "filename", "png", "params"} or
                  {"line", "error"}; the picture is made by npdiff.recipe.render, as `npdiff generate`,
                  `img2img` and `inpaint` make it, so a batch line gives their bytes
  InProcessPool   --workers 1: the Renderer in this process
  ProcessPool     --workers N: N spawned processes, cores // N threads each; close(abort=True) ends them
                  at once (the driver was stopped: SIGTERM, Ctrl-C, an error), resource tracker included
Ray actors (npdiff/batch_ray.py) hold a Renderer too.
"""

import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import islice

from npdiff.batch_sizes import SIZE_HINTS
from npdiff.errors import NpdiffError
from npdiff.images import load_image
from npdiff.memory_estimate import PictureSizeError
from npdiff.models.controlnet import ControlNetModel
from npdiff.pipeline_controlnet_attach import attach_controlnets
from npdiff.pipeline_sdxl import load_any_pipeline
from npdiff.pipeline_utils import resolve_scheduler
from npdiff.recipe import control_for_render, load_vae, render, use_vae_tiling
from npdiff.sdxl_refiner import load_refiner

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_variables(threads):
    """The environment that gives a fresh process `threads` BLAS and Numba threads (read at import)."""
    return {name: str(threads) for name in THREAD_VARIABLES}


# ---------------------------------------------------------------------------------------------
# A worker: the model, loaded once, turning jobs into PNG bytes
# ---------------------------------------------------------------------------------------------
class Renderer:
    """One worker's pipeline: job payloads (npdiff.batch.job_payload) -> results.

    model: the path to load, as this worker sees it (None: the model shipped with npdiff, wherever this
    worker's npdiff is installed). The PNGs name the model as each payload's "identity" says (name and hash).
    Between lines the pipeline is set to each line's sampler, prediction type, VAE and LoRAs (VAEs and
    samplers are kept once loaded; LoRAs stay fused while consecutive lines use the same ones). A line with
    a control gets the ControlNet pipeline over the same components (ControlNets kept once loaded).
    """

    def __init__(self, model, threads=None, precision="fp32"):
        if threads:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

        self.pipe = load_any_pipeline(model, precision=precision)  # SD or SDXL, as the model's layout says
        self.pipe.show_progress = False
        self.model_vae = self.pipe.vae
        self.vaes = {}  # folder -> loaded VAE
        self.samplers = {}  # (sampler name or None, prediction type or None) -> (scheduler, its name)
        self.loras = ()  # ((path, scale), ...) fused now
        self.refiners = {}  # path -> sdxl_recipe.Refiner (loaded once)
        self.controlnets = {}  # path -> loaded ControlNetModel

    def ready(self):
        """-> what this worker runs on: the model's name and its thread counts."""
        import numba

        return {"model": self.pipe.model_name, "numba_threads": numba.get_num_threads(),
                "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}

    def use_sampler(self, name, prediction_type=None):
        """Switch to `name` as `npdiff generate --sampler name --prediction-type P` would load it."""

        key = (name, prediction_type)
        if key not in self.samplers:
            config = dict(self.pipe.scheduler_config)
            if prediction_type is not None:
                config["prediction_type"] = prediction_type
            self.samplers[key] = resolve_scheduler(name, config)
        self.pipe.scheduler, self.pipe.scheduler_name = self.samplers[key]

    def use_vae(self, folder):

        if folder is not None and folder not in self.vaes:
            self.vaes[folder] = load_vae(folder)
        self.pipe.vae = self.model_vae if folder is None else self.vaes[folder]

    def use_refiner(self, path, sampler):
        """-> the SDXL refiner at `path` (None: none) sampling with the line's sampler, as npdiff generate's."""
        if path is None:
            return None
        if path not in self.refiners:
            self.refiners[path] = load_refiner(path, precision=self.pipe.precision)
        refiner = self.refiners[path]
        refiner.pipe.scheduler, refiner.pipe.scheduler_name = resolve_scheduler(sampler, refiner.pipe.scheduler_config)
        return refiner

    def use_loras(self, loras):
        loras = tuple(tuple(lora) for lora in loras)
        if loras == self.loras:
            return
        self.pipe.unload_lora_weights()  # the original weights back, exactly
        self.loras = None  # not known until every LoRA is fused: a failed load is undone by the next line
        for path, scale in loras:
            self.pipe.load_lora_weights(path, scale=scale)
        self.loras = loras

    def render(self, payload):
        start = time.perf_counter()
        try:
            png, params = self.render_png(payload)
        except Exception as exc:  # noqa: BLE001  (one line failing must not stop the others)
            message = str(exc) if isinstance(exc, NpdiffError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, PictureSizeError):  # e.g. past the free memory: what to lower named as a line's keys
                message = exc.hinted(SIZE_HINTS)
            return {"line": payload["line"], "error": message}
        return {"line": payload["line"], "filename": payload["filename"], "png": png, "params": params,
                "seconds": time.perf_counter() - start}

    def render_png(self, job):
        """The picture of one line through npdiff.recipe.render, its PNG kept in memory -> (bytes, params)."""

        # 1. the pictures: one loader for every entry point (bomb check before decoding)
        pictures = {}
        for key in ("image", "mask"):
            if job[f"{key}_error"]:
                raise NpdiffError(job[f"{key}_error"])
            if job[f"{key}_bytes"] is not None:
                pictures[key] = load_image(job[f"{key}_bytes"], name=job[f"{key}_name"], what=key)
        # 2. the pipeline as the line wants it
        options = job["options"]
        self.use_sampler(options.get("sampler"), options.get("prediction_type"))
        self.use_vae(job["vae"])
        use_vae_tiling(self.pipe, options.get("vae_tiling"))
        self.use_loras(job["loras"])
        pipe, control = self.with_controls(job)
        # 3. the picture
        refiner = self.use_refiner(job.get("refiner"), options.get("sampler"))
        if refiner is not None:  # the refiner's VAE decodes the picture: tiled as the base's would be
            use_vae_tiling(refiner.pipe, options.get("vae_tiling"))
        rendered = render(pipe, job["command"], options, pictures.get("image"), pictures.get("mask"),
                          identity=job["identity"], vae=job["vae"], refiner=refiner, control=control)
        return rendered.png, rendered.params

    def with_controls(self, job):
        """-> (the pipeline, render()'s control) for a line: the plain pipeline and None without a control."""
        if not job.get("controls"):
            return self.pipe, None
        pictures = []
        for picture in job["control_pictures"]:
            if picture["error"]:
                raise NpdiffError(picture["error"])
            pictures.append(load_image(picture["bytes"], name=picture["name"], what="control picture"))
        for path, _ in job["controls"]:
            if path not in self.controlnets:
                self.controlnets[path] = ControlNetModel.from_pretrained(path, precision=self.pipe.precision)
        pipe = attach_controlnets(self.pipe, [self.controlnets[path] for path, _ in job["controls"]])
        return pipe, control_for_render(pictures, [scale for _, scale in job["controls"]], job["control_settings"])


# ---------------------------------------------------------------------------------------------
# Local workers: this process, or N spawned processes
# ---------------------------------------------------------------------------------------------
class InProcessPool:
    """--workers 1: the model in this process, on all its threads."""

    def __init__(self, model, precision="fp32"):
        self.renderer = Renderer(model, precision=precision)

    def results(self, payloads):
        for payload in payloads:
            yield self.renderer.render(payload)

    def close(self, abort=False):
        self.renderer = None


_PROCESS_RENDERER = None  # the Renderer of a spawned worker process


def _start_worker_process(model, threads, precision):
    global _PROCESS_RENDERER
    _PROCESS_RENDERER = Renderer(model, threads, precision)


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

    def __init__(self, model, workers, threads=None, precision="fp32"):
        import multiprocessing

        self.workers = workers
        self.threads = max(1, cpu_cores() // workers) if threads is None else threads
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker_process,
                                            initargs=(model, self.threads, precision))

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

    def close(self, abort=False):
        """Wait for the workers to finish (abort=False), or end them now: the run was stopped (SIGTERM,
        Ctrl-C, an error), and a worker would otherwise render on, orphaned, for minutes."""
        if not abort:
            self.executor.shutdown(wait=True, cancel_futures=True)
            return
        # the executor keeps its processes in _processes (pid -> Process); it offers no public way to end them
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)
        stop_resource_tracker()


def stop_resource_tracker():
    """End multiprocessing's resource tracker process (started for the pool's queues), if it runs."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)  # Python >= 3.8 has it; no public way either
    if stop is not None:
        stop()
