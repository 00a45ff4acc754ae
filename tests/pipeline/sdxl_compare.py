"""Running diffusers' SDXL pipelines and npdiff's on the same tiny SDXL (tests/pipeline/tiny_sdxl.py) and
comparing: final latents within relative 1e-4, 8-bit pictures within 2 levels per pixel."""

import functools

import numpy as np

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close

from tiny_sdxl import tiny_sdxl_folder, torch_sdxl_pipeline

from npdiff.pipeline_sdxl import StableDiffusionXLPipeline

PROMPTS = ["a red circle on a blue square", "a photo of an astronaut riding a horse on mars",
           "watercolor 東京 at night, ((detailed)), 🐱", "three green triangles"]


@functools.lru_cache(maxsize=None)
def theirs_pipeline(kind, mode):
    return torch_sdxl_pipeline(tiny_sdxl_folder(kind), mode)


def load_ours(kind, scheduler=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder(kind), scheduler=scheduler)
    pipe.show_progress = False
    return pipe


def run_theirs(kind, mode, seed, scheduler=None, output_type="np", **kwargs):
    """diffusers' pipeline -> (pictures as 8-bit levels [B,H,W,3] or None, final latents [B,4,h,w])."""
    import torch

    pipe = theirs_pipeline(kind, mode)
    original = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    try:
        out = pipe(generator=torch.Generator().manual_seed(seed), output_type=output_type,
                   callback_on_step_end=keep_latents, **kwargs)
    finally:
        pipe.scheduler = original
    if output_type == "latent":
        return None, out.images.detach().numpy()
    return to_levels(out.images), final["latents"]


def to_levels(float_pictures):
    return np.round(np.asarray(float_pictures) * 255).astype(np.int16)


def assert_same(ours, theirs_levels, theirs_latents, what):
    """ours: a PipelineOutput with output_type "np" (or "latent": theirs_levels None)."""
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what=f"{what}: final latents")
    if theirs_levels is None:
        return
    levels = to_levels(ours.images)
    assert levels.shape == theirs_levels.shape
    worst = int(np.max(np.abs(levels - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"{what}: 8-bit pictures differ by {worst} levels"


def random_picture(rng, size=64):
    """A smooth random picture [H,W,3] uint8 (a gradient plus a few blobs)."""
    from PIL import Image

    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def random_mask(rng, size=64):
    from PIL import Image

    mask = np.zeros((size, size), dtype=np.uint8)
    top, left = rng.integers(0, size // 2, size=2)
    mask[top:top + size // 2, left:left + size // 2] = 255
    return Image.fromarray(mask)
