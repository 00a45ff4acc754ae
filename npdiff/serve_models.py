"""The one model `npdiff serve` holds in memory, the models and LoRAs it may switch to (by name only), and
the cheap decode of a step's latents for the page's live picture.

  ModelShelf(model, models_dir, lora_dir, preview_vae)
    .model_paths() / .lora_paths()   {name: path} of what --models-dir / --lora-dir hold (and --model)
    .load(name)                      frees the loaded model first, then loads `name`: one model at a time
    .use_sampler(name)               the sampler of the next pictures (None: the model's own)
    .loras_fused(loras)              a context: [(name, scale)] fused in, unfused after (even on error)
    .preview_png(latents)            the first picture of a step's latents as PNG bytes: TAESD (--preview-vae)
                                     when given, else the model's own VAE

Only the job queue's worker thread (npdiff/serve_jobs.py) calls load, use_sampler, loras_fused and
preview_png: the pipeline is never used by two threads at once.
"""

import gc
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from npdiff.errors import NpdiffError
from npdiff.images import to_pil
from npdiff.loading.weights import check_precision
from npdiff.pipeline_sdxl import load_any_pipeline
from npdiff.pipeline_utils import check_vae_fits, default_model_path
from npdiff.recipe import load_vae, model_png_identity
from npdiff.serve_schemas import RequestError, check_lora_names, check_name

MODEL_SUFFIXES = (".safetensors",)


def folder_entries(folder, is_model):
    """{name: path} of the models (diffusers folders, .safetensors files) or LoRA files in `folder`."""
    if folder is None:
        return {}
    entries = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix in MODEL_SUFFIXES:
            entries[path.stem if not is_model else path.name] = path
        elif is_model and path.is_dir() and (path / "model_index.json").is_file():
            entries[path.name] = path
    return entries


class ModelShelf:
    def __init__(self, model=None, models_dir=None, lora_dir=None, preview_vae=None, precision="fp32"):
        self.precision = check_precision(precision)  # every model this server loads: "fp32", "bf16", "bf16x3" or "mixed"
        for option, folder in (("--models-dir", models_dir), ("--lora-dir", lora_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise NpdiffError(f"{option} {folder}: no such folder")
        self.first_model = Path(model) if model else default_model_path()
        self.first_identity = model_png_identity(self.first_model)  # hashed once; NpdiffError if it is missing
        self.models_dir = models_dir
        self.lora_dir = lora_dir
        self.preview_vae_folder = preview_vae
        self.pipe = None
        self.name = None
        self.identity = {}
        self.preview_vae = None
        self.load_seconds = None

    def model_paths(self):
        """{name: path}: the model given with --model (or the shipped one), then --models-dir's entries."""
        return {self.first_identity["model"]: self.first_model, **folder_entries(self.models_dir, is_model=True)}

    def lora_paths(self):
        return folder_entries(self.lora_dir, is_model=False)

    def model_path(self, name, field_name="sd_model_checkpoint"):
        """A name from model_paths (or webui's title "name [hash]") -> (name, path); RequestError naming
        `field_name` (the request field that named it) otherwise."""
        check_name(name, field_name)
        paths = self.model_paths()
        bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        if bare not in paths:
            raise RequestError(404, field_name, f"{field_name}: no model named {name!r}; known: {', '.join(paths)}")
        return bare, paths[bare]

    def load(self, name=None):
        """Load the model `name` (None: the first one), freeing the one loaded before."""
        name, path = self.model_path(name) if name else (self.first_identity["model"], self.first_model)
        if name == self.name and self.pipe is not None:
            return
        previous = self.name
        self.pipe, self.preview_vae, self.name = None, None, None  # free the old model before loading the new
        gc.collect()
        start = time.perf_counter()
        try:
            pipe = load_any_pipeline(path, precision=self.precision)  # SD or SDXL, as the command line loads --model
        except Exception:
            if previous is not None:  # the server keeps serving the model it had
                self.load(previous)
            raise
        pipe.show_progress = False
        if self.preview_vae_folder:
            self.preview_vae = check_vae_fits(load_vae(self.preview_vae_folder), pipe.unet.config,
                                              pipe.model_vae_scale_factor)
        self.default_scheduler = (pipe.scheduler, pipe.scheduler_name)
        self.identity = self.first_identity if path == self.first_model else model_png_identity(path)
        self.pipe, self.name = pipe, name
        self.load_seconds = time.perf_counter() - start

    def use_sampler(self, sampler):
        """The sampler of the next pictures, built from the model's scheduler config as `--sampler` does."""
        if sampler is None:
            self.pipe.scheduler, self.pipe.scheduler_name = self.default_scheduler
        else:
            self.pipe.set_scheduler(sampler)

    @contextmanager
    def loras_fused(self, loras):
        """Fuse [(name, scale)] from --lora-dir for the pictures made inside; unfused afterwards."""
        paths = self.lora_paths()
        check_lora_names(loras, paths)
        try:
            for name, scale in loras:
                self.pipe.load_lora_weights(paths[name], scale=scale)
            yield
        finally:
            if loras:
                self.pipe.unload_lora_weights()

    def preview_png(self, latents):
        """The first picture of a step's latents [B,4,h,w], decoded, as PNG bytes (no metadata)."""
        first = latents[:1]  # [B,4,h,w] -> [1,4,h,w]
        if self.preview_vae is not None:
            decoded = self.preview_vae.decode(first / self.preview_vae.scaling_factor)  # [1,3,H,W]
        else:
            decoded = self.pipe.decode_latents(first)  # [1,4,h,w] -> [1,3,H,W]
        buffer = BytesIO()
        to_pil(decoded)[0].save(buffer, format="PNG")
        return buffer.getvalue()
