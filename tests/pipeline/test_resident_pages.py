"""Memory-mapped weights and releasing their pages between stages (npdiff/loading/resident.py), on the
tiny model (tiny_sd.py): every float32 weight is a view of its file's map (no copy), release drops the
map's resident pages (the kernel's own count, /proc/self/smaps), and pictures are byte-identical
before and after a release, with and without the release between stages."""

import numpy as np
import pytest

from helpers import mapped_rss_bytes, unreleasable_bytes
from tiny_sd import tiny_sd_folder

from npdiff.loading import resident
from npdiff.loading.resident import mapped_arrays, mapping_of, reachable, release_resident_pages
from npdiff.models import unet as unet_module
from npdiff.models.packed_linear import PackedLinear
from npdiff.pipeline import StableDiffusionPipeline


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def all_arrays(obj):
    """Every NumPy array reachable from an npdiff model (the walk of mapped_arrays, unfiltered)."""
    return [item for item in reachable(obj) if isinstance(item, np.ndarray)]


def packed_copies(model):
    """The weights PackedLinear keeps as private packed copies beside the mapped ones (CLIP's projections:
    the one documented weight preparation, see npdiff/models/packed_linear.py)."""
    layers = [item for item in reachable(model) if isinstance(item, PackedLinear)]
    return {id(layer.panels) for layer in layers}, len(layers)


def test_float32_weights_are_views_of_the_files(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        model = getattr(pipe, name)
        prepared, layers = packed_copies(model)
        assert bool(layers) == (name == "text_encoder")
        weights = [a for a in all_arrays(model) if a.size > 1 and a.dtype == np.float32]
        private = [a for a in weights if mapping_of(a) is None]
        # every float32 weight is a view, no copy; PackedLinear adds one packed copy per layer
        assert sorted(map(id, private)) == sorted(prepared) and len(prepared) == layers, name
        mapped = mapped_arrays(model)
        assert weights and len(mapped) + layers == len(weights), name
        assert all(not a.flags.writeable for a in mapped)
        assert len({id(mapping_of(a)) for a in mapped}) == 1  # one map: the component's one file


def test_release_drops_the_resident_pages_and_keeps_the_output(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    size = unet_file.stat().st_size
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    text = rng.standard_normal((2, 77, 32), dtype=np.float32)
    # loading checked every value for NaN/Inf and released each tensor's pages after: little is resident
    after_load = mapped_rss_bytes(unet_file)
    first = pipe.unet(latents, 500, text)
    paged_in = mapped_rss_bytes(unet_file)
    assert paged_in > 0.9 * size - 2 * 4096 and paged_in > after_load  # the forward read every weight
    released = release_resident_pages(pipe.unet)
    assert released > 0.9 * size - 2 * 4096
    assert mapped_rss_bytes(unet_file) <= unreleasable_bytes(unet_file)
    second = pipe.unet(latents, 500, text)  # faulted back in from the page cache
    assert mapped_rss_bytes(unet_file) >= paged_in - unreleasable_bytes(unet_file)
    assert np.array_equal(first, second)  # bit-identical
    assert after_load <= unreleasable_bytes(unet_file)


def test_per_block_release_drops_each_block_after_it_runs(folder, monkeypatch):
    """SDXL-size UNets drop each block's pages right after the block (models/unet.py): the same output,
    and after the forward only the layers outside the blocks (conv_in, time embedding, conv_out) and
    fault-around pages stay resident, not the whole UNet as without it."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.release_weights_after_each_block is False  # a tiny UNet keeps its pages through a step
    monkeypatch.setattr(unet_module, "PER_BLOCK_RELEASE_BYTES", 0)
    per_block = StableDiffusionPipeline.from_pretrained(folder).unet
    assert per_block.release_weights_after_each_block is True  # the rule: mapped bytes past the limit
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    size = unet_file.stat().st_size
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    text = rng.standard_normal((2, 77, 32), dtype=np.float32)
    kept = pipe.unet(latents, 300, text)
    assert mapped_rss_bytes(unet_file) > 0.9 * size - 2 * 4096  # every weight resident after a forward
    release_resident_pages(pipe.unet)
    released = per_block(latents, 300, text)
    assert mapped_rss_bytes(unet_file) < 0.5 * size  # the blocks' pages went as each block finished
    again = per_block(latents, 300, text)  # faulted back in from the page cache
    assert kept.tobytes() == released.tobytes() == again.tobytes()


def test_pictures_are_the_same_bytes_with_and_without_release(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.show_progress = False
    arguments = dict(num_inference_steps=3, guidance_scale=7.5, seed=3, output_type="np")
    pipe.release_weights_between_stages = False
    kept = pipe("a red circle", **arguments).images
    files = [folder / "unet" / "diffusion_pytorch_model.safetensors",
             folder / "text_encoder" / "model.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors"]
    # all resident: kept (not checked for the text encoder: its projections run on PackedLinear's private
    # copies, and of what stays mapped a forward touches only a few pages, e.g. the prompt's embedding rows)
    assert all(mapped_rss_bytes(path) > unreleasable_bytes(path) for path in files[:1] + files[2:])
    pipe.release_weights_between_stages = True
    released = pipe("a red circle", **arguments).images
    assert all(mapped_rss_bytes(path) <= unreleasable_bytes(path) for path in files)  # each released after its stage
    again = pipe("a red circle", **arguments).images  # every weight faulted back in
    assert kept.tobytes() == released.tobytes() == again.tobytes()


def test_release_between_stages_in_img2img(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.show_progress = False
    picture = np.random.default_rng(1).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    arguments = dict(image=picture, strength=0.7, num_inference_steps=4, seed=5, output_type="np")
    released = pipe.img2img("a blue square", **arguments).images
    pipe.release_weights_between_stages = False
    kept = pipe.img2img("a blue square", **arguments).images
    assert kept.tobytes() == released.tobytes()


def test_release_is_a_no_op_without_madvise(folder, monkeypatch):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.unet(np.zeros((1, 4, 8, 8), np.float32), 10, np.zeros((1, 77, 32), np.float32))
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    before = mapped_rss_bytes(unet_file)
    monkeypatch.setattr(resident, "_MADVISE", False)
    assert pipe.release_resident_pages("unet") == 0
    assert mapped_rss_bytes(unet_file) == before


def test_page_runs_round_inward_and_merge():
    page = resident.mmap.PAGESIZE
    runs = resident._page_runs([(10, page + 5), (page + 5, 3 * page + 1), (5 * page, 5 * page + 10)])
    assert runs == [(page, 2 * page)]  # merged 10..3p+1 -> p..3p; the last range holds no whole page
    assert resident._page_runs([(0, page)]) == [(0, page)]
