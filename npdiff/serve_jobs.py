"""One job at a time, a bounded queue: how `npdiff serve` runs what its clients ask for.

  JobQueue(shelf, limit)
    .check(request)     before queuing, on the request's thread: the prompt's LoRA names found, pictures
                        decoded, size and memory checked against the loaded model (NpdiffError -> a 4xx in
                        under a second, nothing queued)
    .submit(job)        QueueFull when `limit` jobs wait already (the route answers 503 + Retry-After)
    .cancel(job)        a client that went away: a waiting job is dropped, the running one stopped
    .interrupt()        webui's /interrupt: the running job stops after its current step and returns what
                        it has (the pipeline's StopSampling)
    .progress(...)      webui's /progress: fraction, eta, step, and the latest decoded step as PNG
    .gallery            the last GALLERY_SIZE pictures made since the server started (PNG bytes, infotext)

One worker thread runs every job, so the pipeline is never used by two threads at once; a model switch
is a job too, so it never happens in the middle of a picture.
"""

import itertools
import threading
import time
from collections import deque

from npdiff.errors import NpdiffError
from npdiff.images import load_image
from npdiff.infotext import format_infotext
from npdiff.memory_estimate import PictureSizeError, check_call_memory
from npdiff.picture_size import check_size, size_rule
from npdiff.pipeline_utils import StopSampling
from npdiff.recipe import render
from npdiff.serve_refiner import RefinerSlot
from npdiff.serve_schemas import SIZE_HINTS, RequestError, check_lora_names

GALLERY_SIZE = 48
PREVIEW_WANTED_SECONDS = 5.0  # decode live pictures only while a client polled /progress this recently
PREVIEW_EVERY_WITH_VAE = 2  # steps between live pictures decoded with the model's own VAE (TAESD: every step)


class QueueFull(Exception):
    pass


class Job:
    """A picture request (or a model switch: `work` given) waiting, running or done."""

    ids = itertools.count(1)

    def __init__(self, request=None, work=None):
        self.id = f"npdiff-{next(Job.ids)}"
        self.request = request
        self.work = work
        self.done = threading.Event()
        self.results = []  # recipe.Rendered, one per picture
        self.error = None  # the NpdiffError (or other exception) that ended it
        self.cancelled = False  # the client went away
        self.interrupted = False  # /interrupt
        self.picture_index = 0
        self.step = 0
        self.started = None
        self.current_png = None
        self.total_steps = expected_steps(request) if request else 1


def expected_steps(request):
    """The callbacks a picture makes: steps, or int(steps * strength) when starting from a picture."""
    steps = request.options["steps"]
    strength = request.options.get("strength", 1.0)
    return max(1, min(steps, int(steps * strength))) if request.command != "generate" else steps


class JobQueue:
    def __init__(self, shelf, limit):
        self.shelf = shelf
        self.limit = limit
        self.waiting = deque()
        self.current = None
        self.condition = threading.Condition()
        self.gallery = deque(maxlen=GALLERY_SIZE)
        self.refiners = RefinerSlot(shelf)  # the SDXL refiner a request names, held beside the model
        self.preview_wanted_until = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="npdiff-serve-worker", daemon=True)
        self.thread.start()

    # -----------------------------------------------------------------------------------------
    # What the routes call
    # -----------------------------------------------------------------------------------------
    def check(self, request):
        """Check the prompt's LoRA names against --lora-dir, decode the pictures, and check size and memory
        against the loaded model: NpdiffError naming the field, before anything is queued."""
        pipe = self.shelf.pipe
        if pipe is None:
            raise RequestError(503, "sd_model_checkpoint", "sd_model_checkpoint: a model is being loaded; try again")
        check_lora_names(request.loras, self.shelf.lora_paths())
        if request.init_image is not None:
            request.picture = load_image(request.init_image, name="init_images[0]")
        if request.mask is not None:
            request.mask_picture = load_image(request.mask, name="mask", what="mask")
        if request.command == "img2img":
            height, width = request.picture.height, request.picture.width
        else:
            height, width = request.options["height"], request.options["width"]
            multiple, why = size_rule(pipe.unet.config, pipe.vae_scale_factor)
            try:
                check_size(height, width, multiple, why)
            except NpdiffError as exc:
                raise RequestError(422, "width/height", f"width/height: {exc}") from None
        field_name = "init_images[0]" if request.command == "img2img" else "width/height"  # img2img: the picture's size
        try:
            check_call_memory(pipe, 1, height, width, pipe.do_classifier_free_guidance(request.options["guidance"]),
                              encode=request.command != "generate",
                              lower=("image",) if request.command == "img2img" else ("size",))  # what set the size
        except PictureSizeError as exc:  # what to lower, named as the request's keys
            raise RequestError(422, field_name, f"{field_name}: {exc.hinted(SIZE_HINTS)}") from None
        except NpdiffError as exc:
            raise RequestError(422, field_name, f"{field_name}: {exc}") from None

    def submit(self, job):
        with self.condition:
            if len(self.waiting) >= self.limit:
                raise QueueFull(f"{len(self.waiting)} jobs wait already (--queue {self.limit})")
            self.waiting.append(job)
            self.condition.notify()
        return job

    def cancel(self, job):
        with self.condition:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                job.done.set()

    def interrupt(self):
        job = self.current
        if job is not None:
            job.interrupted = True

    def stop(self):
        with self.condition:
            self.stopping = True
            self.condition.notify()

    def progress(self, want_image=True):
        """webui's /sdapi/v1/progress body (current_image: the latest decoded step as PNG bytes, or None)."""
        if want_image:
            self.preview_wanted_until = time.monotonic() + PREVIEW_WANTED_SECONDS
        job = self.current
        waiting = len(self.waiting)
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": waiting, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None or job.request is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        pictures = job.request.pictures
        fraction = min(0.999, (job.picture_index + job.step / job.total_steps) / pictures)
        elapsed = time.monotonic() - job.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state.update(interrupted=job.interrupted, job=job.id, job_count=waiting + 1, job_no=job.picture_index,
                     sampling_step=job.step, sampling_steps=job.total_steps,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - elapsed)))
        return {"progress": fraction, "eta_relative": eta, "state": state,
                "current_image": job.current_png if want_image else None, "textinfo": None}

    # -----------------------------------------------------------------------------------------
    # The worker
    # -----------------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.condition:
                while not self.waiting and not self.stopping:
                    self.condition.wait()
                if self.stopping:
                    return
                job = self.waiting.popleft()
                job.started = time.monotonic()  # before it is current: progress() reads it
                self.current = job
            try:
                if job.work is not None:
                    job.work()
                else:
                    self._render_pictures(job)
            except PictureSizeError as exc:  # e.g. hr_scale's second pass too large: named as the request's keys
                job.error = NpdiffError(exc.hinted(SIZE_HINTS))
            except Exception as exc:  # reported to the job's client; the worker keeps serving
                job.error = exc
            finally:
                self.current = None
                job.done.set()

    def _render_pictures(self, job):
        """batch_size * n_iter pictures, the i-th with seed + i (webui's rule), each through recipe.render."""
        request, shelf = job.request, self.shelf
        own_model = shelf.name
        if request.model:
            shelf.load(request.model)
        try:
            self._render_with_loaded_model(job, request, shelf)
        finally:
            if request.model and request.restore_model:  # webui's override_settings_restore_afterwards
                shelf.load(own_model)

    def _render_with_loaded_model(self, job, request, shelf):
        shelf.use_sampler(request.sampler)
        callback = self._progress_callback(job)
        with shelf.loras_fused(request.loras):
            for index in range(request.pictures):
                if job.cancelled or job.interrupted:
                    break
                job.picture_index, job.step = index, 0
                options = dict(request.options, seed=request.options["seed"] + index)
                rendered = render(shelf.pipe, request.command, options, request.picture, request.mask_picture,
                                  identity=shelf.identity, callback=callback, callback_steps=1,
                                  refiner=self.refiners.get(request.refiner, request.sampler) if request.refiner
                                  else None)  # webui's refiner_checkpoint (npdiff/serve_refiner.py)
                job.results.append(rendered)
                if not job.cancelled:
                    self.gallery.append((rendered.png, format_infotext(rendered.params)))

    def _progress_callback(self, job):
        """The pipeline callback: count the step, decode a live picture when someone watches, stop on request."""
        every = 1 if self.shelf.preview_vae is not None else PREVIEW_EVERY_WITH_VAE

        def callback(step, timestep, latents):
            job.step = step + 1
            watched = time.monotonic() < self.preview_wanted_until
            if watched and (step % every == 0 or job.step == job.total_steps):
                job.current_png = self.shelf.preview_png(latents)
            if job.cancelled or job.interrupted:
                raise StopSampling

        return callback
