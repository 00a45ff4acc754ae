"""The memory estimate (npdiff/memory_estimate.py): huge calls are refused at once with both numbers and
what to lower, normal calls pass, and the estimate is within a small factor of a traced real peak."""

import sys
import time
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, memory_estimate  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_folder())
    loaded.show_progress = False
    return loaded


@pytest.mark.parametrize("kwargs", [dict(height=2048, width=2048, num_images_per_prompt=10**3),
                                    dict(num_images_per_prompt=10**6)])
def test_impossible_calls_are_refused_fast_with_both_numbers(pipe, kwargs):
    start = time.perf_counter()
    with pytest.raises(NpdiffError) as info:
        pipe("a cat", num_inference_steps=1, **kwargs)
    assert time.perf_counter() - start < 2.0, "the refusal must come before any work"
    message = str(info.value)
    assert "needs about" in message and "but only" in message and "is available" in message
    assert message.count("iB") >= 2  # the estimate and the free memory, each with a unit
    assert message.endswith("lower height=/width= or pass fewer prompts or a lower num_images_per_prompt=")


@pytest.mark.parametrize("height, width, words", [
    (1048576, 64, "height must be at most 8192 pixels (the largest side npdiff accepts), got 1048576"),
    (64, 99999999999999999999, "width must be at most 8192 pixels (the largest side npdiff accepts), "
                               "got 99999999999999999999"),
    (10**5000, 64, "height must be at most 8192 pixels (the largest side npdiff accepts), got a number of about "
                   "5001 digits"),
    # the tiny model: 8-pixel latent cells, attention on the latent itself: (2112/8) * (2048/8) = 67584 positions
    (2048, 2112, "2112x2048 pixels is too large: the UNet's self-attention would run over 67,584 positions"),
], ids=["1048576x64", "20 digits", "5001 digits", "past 65536 tokens"])
def test_sizes_that_would_take_hours_are_refused_at_once(pipe, height, width, words):
    start = time.perf_counter()
    with pytest.raises(NpdiffError) as info:
        pipe("a cat", num_inference_steps=1, height=height, width=width)
    assert time.perf_counter() - start < 2.0, "the refusal must come before any work"
    assert words in str(info.value)
    assert "try" not in str(info.value)  # no suggested size next to an impossible one


@pytest.mark.parametrize("side, scale, words", [
    (1024, 16, "16384x16384, which the model cannot take: height must be at most 8192 pixels"),
    (2048, 1.05, "2144x2144, which the model cannot take: 2144x2144 pixels is too large"),  # 268 * 268 positions
])
def test_a_hires_size_that_would_take_hours_is_refused_before_the_first_pass(pipe, side, scale, words):
    start = time.perf_counter()
    with pytest.raises(NpdiffError) as info:
        pipe("a cat", num_inference_steps=1, height=side, width=side, hires_scale=scale)
    assert time.perf_counter() - start < 2.0, "the refusal must come before any work"
    assert words in str(info.value)


# (unet config, VAE factor): SD 1.x/2.x and SDXL's down blocks, as their configs name them
SD15 = ({"block_out_channels": [320, 640, 1280, 1280],
         "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}, 8)
SDXL = ({"block_out_channels": [320, 640, 1280], "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2},
        8)
SDXL_BUCKETS = [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (1728, 576), (2048, 512)]


def test_sizes_people_use_pass_the_attention_check():
    used = [(SD15, side, side) for side in (512, 768, 1024, 1536, 2048)]  # 2048: with tiled decode, or hires 2x
    used += [(SD15, 1024, 2048), (SD15, 512, 8192)]
    for height, width in SDXL_BUCKETS:
        used += [(SDXL, height, width), (SDXL, width, height), (SDXL, 2 * height, 2 * width)]  # hires 2x too
    used += [(SDXL, 4096, 4096)]
    for (config, factor), height, width in used:
        memory_estimate.check_attention_size(config, factor, height, width)
    with pytest.raises(NpdiffError, match="65,536"):
        memory_estimate.check_attention_size(SD15[0], 8, 2048, 2112)  # one row of cells past SD 1.5's 2048x2048
    with pytest.raises(NpdiffError, match="65,536"):
        memory_estimate.check_attention_size(SDXL[0], 8, 4096, 4224)


def test_img2img_checks_memory_too(pipe, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: 1 << 20)  # a machine with 1 MiB free
    with pytest.raises(NpdiffError, match=r"needs about .* but only 1\.0 MiB is available"):
        pipe.img2img("a cat", Image.new("RGB", (64, 64)), num_inference_steps=2)


def test_normal_sizes_pass(pipe):
    for size, count in ((64, 1), (128, 2), (512, 1)):
        free = memory_estimate.available_bytes()
        estimate = memory_estimate.estimate_call_bytes(pipe.unet.config, pipe.vae.config, 32, count, size, size,
                                                       True, workers=2)
        assert estimate["total"] < free, f"{size}x{size} x{count} estimated at {estimate['total']} > {free} free"
    out = pipe("a cat", num_inference_steps=1, height=64, width=64, num_images_per_prompt=2, output_type="np")
    assert out.images.shape == (2, 64, 64, 3)


def test_available_bytes_falls_back_to_sysconf(monkeypatch):
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    free = memory_estimate.available_bytes()
    assert free is not None and free > 0


def test_estimate_is_within_a_factor_of_the_traced_peak(pipe):
    """tracemalloc sees every NumPy allocation (not Numba's own, which are small here); the estimate is an
    upper-side guess: between 0.5x and 4x the real peak of a call made of several steps and a decode."""
    pipe("x", num_inference_steps=1, height=64, width=64)  # compile and warm everything first
    size, count = 192, 2
    tracemalloc.start()
    try:
        pipe("x", num_inference_steps=2, height=size, width=size, num_images_per_prompt=count, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    from npdiff.kernels.block_pool import worker_count

    estimate = memory_estimate.estimate_call_bytes(pipe.unet.config, pipe.vae.config, 32, count, size, size, True,
                                                   workers=worker_count())
    ratio = estimate["total"] / peak
    assert 0.5 <= ratio <= 4.0, f"estimate {estimate} vs traced peak {peak} bytes: ratio {ratio:.2f}"


def test_sd15_sizes_are_plausible():
    """SD 1.5's configs at 512x512, one picture with guidance: a few hundred MiB to a few GiB of activations;
    at 4096x4096 tens of GiB (the VAE decode at full size dominates)."""
    unet = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    vae = dict(block_out_channels=[128, 256, 512, 512])
    small = memory_estimate.estimate_call_bytes(unet, vae, 768, 1, 512, 512, True, workers=2)
    large = memory_estimate.estimate_call_bytes(unet, vae, 768, 1, 4096, 4096, True, workers=2)
    assert 2**28 < small["total"] < 2**32
    assert large["total"] > 2**34 and large["vae_decode"] > large["unet"]
