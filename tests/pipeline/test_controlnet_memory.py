"""A ControlNet pipeline's memory: the estimate (npdiff/memory_estimate.py) counts what the nets add to the
sampling stage (the residuals, sized as the nets' real outputs, and the control pictures) and stays within a
small factor of a traced peak; the nets' weight pages are released after the sampling with the UNet's (the
kernel's own count, /proc/self/smaps), and a net past the per-block limit drops each block's pages as it runs;
the pictures are the same bytes either way."""

import tracemalloc

import numpy as np
import pytest
from test_controlnet_sd import edge_picture, net_folders
from test_resident_pages import mapped_rss_bytes, unreleasable_bytes
from tiny_controlnet import tiny_controlnet
from tiny_sd import tiny_sd_folder

from npdiff import memory_estimate
from npdiff.kernels.block_pool import worker_count
from npdiff.loading.resident import release_resident_pages
from npdiff.models import ControlNetModel
from npdiff.models import unet as unet_module
from npdiff.pipeline_controlnet import StableDiffusionControlNetPipeline


@pytest.fixture(scope="module")
def pipe():
    nets = [ControlNetModel.from_pretrained(folder) for folder in net_folders(count=2)]
    loaded = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_folder(), controlnet=nets)
    loaded.show_progress = False
    return loaded


def test_estimate_counts_the_residuals_and_pictures(pipe, rng):
    size, batch = 128, 2
    added, weights = memory_estimate.controlnet_bytes(pipe, batch, size, size, True)
    h = size // 8
    sample = rng.standard_normal((2 * batch, 4, h, h), dtype=np.float32)
    text = rng.standard_normal((2 * batch, 77, pipe.unet.config["cross_attention_dim"]), dtype=np.float32)
    control = rng.random((2 * batch, 3, size, size), dtype=np.float32)
    down, mid = pipe.controlnets[0](sample, 500, text, control)
    outputs = sum(part.nbytes for part in down) + mid.nbytes
    pictures = 2 * (1 + 2 * batch) * 3 * size * size * 4  # two nets' [1,3,H,W] and their repeats to the batch
    assert added == 2 * outputs + pictures
    files = [folder / "diffusion_pytorch_model.safetensors" for folder in net_folders(count=2)]
    assert 0.9 * sum(path.stat().st_size for path in files) < weights <= sum(path.stat().st_size for path in files)
    # the check adds it to the sampling stage (here the VAE's decode is still the largest stage)
    plain = memory_estimate.estimate_call_bytes(pipe.unet.config, pipe.vae.config, 32, batch, size, size, True,
                                                workers=worker_count())
    with_nets = memory_estimate.check_call_memory(pipe, batch, size, size, True)
    assert with_nets["unet"] == plain["unet"] + added and with_nets["controlnet_weights"] == weights
    assert with_nets["total"] == plain["total"] - max(plain["unet"], plain["vae_decode"]) + max(
        with_nets["unet"], plain["vae_decode"])


def test_estimate_is_within_a_factor_of_the_traced_peak(pipe, rng):
    edges = [edge_picture(rng, 128, 128), edge_picture(rng, 128, 128)]
    pipe("x", image=edges, num_inference_steps=1)  # compile and warm everything first
    tracemalloc.start()
    try:
        pipe("x", image=edges, num_inference_steps=2, num_images_per_prompt=2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = memory_estimate.check_call_memory(pipe, 2, 128, 128, True)
    ratio = estimate["total"] / peak
    assert 0.5 <= ratio <= 4.0, f"estimate {estimate} vs traced peak {peak} bytes: ratio {ratio:.2f}"


def own_net_folder():
    """A net no other test here maps (each map of a file keeps its own few fault-around pages)."""
    return tiny_controlnet(tiny_sd_folder() / "unet", seed=30)[1]


def test_net_pages_released_after_the_sampling(rng):
    net_folder = own_net_folder()
    net_file = net_folder / "diffusion_pytorch_model.safetensors"
    single = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_folder(),
                                                               controlnet=ControlNetModel.from_pretrained(net_folder))
    single.show_progress = False
    call = dict(image=edge_picture(rng), num_inference_steps=2, seed=4, output_type="np")
    single.release_weights_between_stages = False
    kept = single("a red circle", **call).images
    assert mapped_rss_bytes(net_file) > unreleasable_bytes(net_file)  # the net ran: its pages are in
    single.release_weights_between_stages = True
    released = single("a red circle", **call).images
    assert mapped_rss_bytes(net_file) <= unreleasable_bytes(net_file)  # released with the UNet's
    assert kept.tobytes() == released.tobytes()


def test_a_large_net_releases_each_block(rng, monkeypatch):
    net_folder = own_net_folder()
    net_file = net_folder / "diffusion_pytorch_model.safetensors"
    whole = ControlNetModel.from_pretrained(net_folder)
    assert whole.release_weights_after_each_block is False  # a tiny net keeps its pages through a step
    monkeypatch.setattr(unet_module, "PER_BLOCK_RELEASE_BYTES", 0)
    per_block = ControlNetModel.from_pretrained(net_folder)
    assert per_block.release_weights_after_each_block is True
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    text = rng.standard_normal((2, 77, whole.config["cross_attention_dim"]), dtype=np.float32)
    control = rng.random((2, 3, 64, 64), dtype=np.float32)
    down_kept, mid_kept = whole(sample, 300, text, control)
    assert mapped_rss_bytes(net_file) > 0.9 * net_file.stat().st_size - 2 * 4096
    release_resident_pages(whole)  # both maps are of the same file: only the per-block net's pages count now
    down_released, mid_released = per_block(sample, 300, text, control)
    assert mapped_rss_bytes(net_file) < 0.5 * net_file.stat().st_size  # the blocks' pages went as each ran
    assert all(a.tobytes() == b.tobytes() for a, b in zip(down_kept + [mid_kept], down_released + [mid_released]))
