"""The tiled VAE in the pipelines and on the command line (npdiff/models/vae_tiling.py).

A tiny random SD (tests/pipeline/tiny_sd.py; its VAE's sample_size 64 makes 8-latent tiles) at 128x128 pixels,
so the final decode (and img2img's encode) runs in 3 x 3 tiles:
- pipe.enable_vae_tiling() draws the picture diffusers draws with pipe.vae.enable_tiling() (2 levels), for SD
  (txt2img, img2img) and SDXL (tests/pipeline/tiny_sdxl.py, the same 8-latent tiles);
- the memory check switches tiling on by itself, for that call only, with a one-line note, when the whole
  picture's decode would not fit and the tiled one does (free memory stubbed between the two estimates);
  when neither fits, the call is refused before any work;
- `--vae-tiling` is stored in the PNG and `--reproduce` turns it on again (the same pixels); a batch line keeps
  vae_tiling, and a batch line or a PNG with a vae_tiling that is not true/false is refused by name; TAESD has
  no tiling: refused.
"""

import threading

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, pixels
from tiny_models import tiny_taesd
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import cli, memory_estimate
from npdiff.errors import NpdiffError
from npdiff.images import read_png_params
from npdiff.models import AutoencoderTiny
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.recipe import check_value, options_from_png

SIZE = 128  # pixels: 16 latents, 3 x 3 tiles of 8 at a stride of 6


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def load_ours(folder, sampler="euler"):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler=sampler)
    pipe.show_progress = False
    return pipe


def to_levels(float_pictures):
    return np.round(np.asarray(float_pictures) * 255).astype(np.int16)


def assert_within_levels(ours, theirs):
    worst = int(np.max(np.abs(to_levels(ours) - to_levels(theirs))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"


def test_tiled_txt2img_like_diffusers(folder, seed):
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE)
    theirs_pipe = torch_pipeline(folder, "euler")
    theirs_pipe.vae.enable_tiling()
    try:
        theirs = theirs_pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np",
                             **kwargs).images
    finally:
        theirs_pipe.vae.disable_tiling()
    pipe = load_ours(folder)
    pipe.enable_vae_tiling()
    ours = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    assert_within_levels(ours.images, theirs)
    assert ours.parameters["vae_tiling"] is True
    pipe.disable_vae_tiling()
    untiled = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    assert "vae_tiling" not in untiled.parameters
    assert np.abs(to_levels(untiled.images) - to_levels(ours.images)).max() > IMAGE_LEVELS_TOL  # tiles matter


def test_tiled_img2img_like_diffusers(folder, seed, rng):
    """img2img encodes the picture in tiles too (diffusers' _tiled_encode), then decodes in tiles."""
    picture = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    kwargs = dict(num_inference_steps=4, strength=0.6, guidance_scale=4.0)
    theirs_pipe = torch_pipeline(folder, "euler", img2img=True)
    theirs_pipe.vae.enable_tiling()
    try:
        from PIL import Image

        theirs = theirs_pipe("a blue square", image=Image.fromarray(picture), output_type="np",
                             generator=torch.Generator().manual_seed(seed), **kwargs).images
    finally:
        theirs_pipe.vae.disable_tiling()
    pipe = load_ours(folder)
    pipe.vae.enable_tiling()  # diffusers' other spelling
    ours = pipe.img2img("a blue square", image=picture, seed=seed, output_type="np", **kwargs)
    assert_within_levels(ours.images, theirs)
    assert ours.parameters["vae_tiling"] is True


def test_tiled_sdxl_like_diffusers(seed):
    """SDXL's pipeline runs the same flow: its VAE (4 blocks, scaling_factor 0.13025) in tiles too."""
    from sdxl_compare import assert_same, theirs_pipeline
    from sdxl_compare import load_ours as load_sdxl
    from sdxl_compare import run_theirs as run_sdxl

    kwargs = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE)
    theirs_vae = theirs_pipeline("base", "txt2img").vae
    theirs_vae.enable_tiling()
    try:
        theirs_levels, theirs_latents = run_sdxl("base", "txt2img", seed, **kwargs)
    finally:
        theirs_vae.disable_tiling()
    pipe = load_sdxl("base")
    pipe.enable_vae_tiling()
    ours = pipe(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "SDXL with the VAE in tiles")
    assert ours.parameters["vae_tiling"] is True


def whole_and_tiled_estimates(pipe, size):
    """-> the estimated bytes of a size x size call (batch 1, guided) with the whole-picture VAE and in tiles."""
    call = dict(unet_config=pipe.unet.config, vae_config=pipe.vae.config, text_dim=32, batch=1, height=size,
                width=size, guidance=True, workers=memory_estimate.worker_count())
    whole = memory_estimate.estimate_call_bytes(**call)["total"]
    return whole, memory_estimate.estimate_call_bytes(**call, vae_tile=pipe.vae.tile_latent_min_size)["total"]


def test_tiling_switched_on_when_the_whole_decode_would_not_fit(folder, seed, monkeypatch, capsys):
    pipe = load_ours(folder)
    size = 2 * SIZE
    whole, tiled = whole_and_tiled_estimates(pipe, size)
    assert tiled < whole  # the VAE decode is what needs the memory at this size
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=size, width=size)
    # 1. between the two estimates: tiles, for this call only, with a note
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: (tiled + whole) // 2)
    auto = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    note = capsys.readouterr().err
    assert "npdiff: note: the VAE decodes" in note and len(note.strip().splitlines()) == 1
    assert auto.parameters["vae_tiling"] is True and pipe.vae.use_tiling is False
    pipe.enable_vae_tiling()
    asked = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    assert np.array_equal(auto.images, asked.images)  # the same tiles as asked for
    pipe.disable_vae_tiling()
    # 2. below both: refused before any work
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: tiled // 2)
    with pytest.raises(NpdiffError, match="memory"):
        pipe("a red circle", seed=seed, **kwargs)
    # 3. enough for the whole picture: no tiles, no note
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: 2 * whole)
    plain = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    assert "vae_tiling" not in plain.parameters and "note" not in capsys.readouterr().err


def test_cli_vae_tiling_is_stored_and_reproduced(folder, tmp_path, seed):
    out = tmp_path / "tiled.png"
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--seed", str(seed), "--sampler",
            "euler", "--height", str(SIZE), "--width", str(SIZE)]
    assert cli.main(args + ["--vae-tiling", "--out", str(out)]) == 0
    assert read_png_params(out)["vae_tiling"] is True
    assert cli.main(args + ["--out", str(tmp_path / "whole.png")]) == 0
    assert "vae_tiling" not in read_png_params(tmp_path / "whole.png")
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out", str(again)]) == 0
    assert read_png_params(again)["vae_tiling"] is True
    assert np.array_equal(pixels(again), pixels(out))
    assert not np.array_equal(pixels(tmp_path / "whole.png"), pixels(out))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_vae_tiling_must_be_true_or_false(value, tmp_path):
    if value is None:
        assert check_value("vae_tiling", False) is False
        return
    with pytest.raises(NpdiffError, match="'vae_tiling' must be true or false"):
        check_value("vae_tiling", value)
    with pytest.raises(NpdiffError, match="picture.png.*vae_tiling"):
        options_from_png({"prompt": "x", "vae_tiling": value}, "picture.png")


def test_batch_lines_take_vae_tiling(tmp_path):
    """A batch line's vae_tiling: true is kept (and expected in its PNG, so a rerun knows the picture is done);
    "yes" fails that line, named."""
    from npdiff.batch_jobs import read_jobs

    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a", "vae_tiling": true}\n{"prompt": "b", "vae_tiling": "yes"}\n')
    jobs, failures = read_jobs(jobs_file, {})
    assert [job.options["vae_tiling"] for job in jobs] == [True]
    assert jobs[0].expected_params({"model": "m", "model_hash": "h"})["vae_tiling"] is True
    assert "'vae_tiling' must be true or false" in failures[2]


def test_taesd_has_no_tiling(folder):
    pipe = load_ours(folder)
    _, taesd_folder = tiny_taesd("sd", seed=0)
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_folder)
    with pytest.raises(NpdiffError, match="AutoencoderTiny"):
        pipe.enable_vae_tiling()
    pipe.disable_vae_tiling()  # nothing to turn off: no error


def test_tiling_switched_on_for_a_call_leaves_the_vae_untiled_for_other_threads(folder, seed, monkeypatch):
    """While a call whose memory check chose tiles decodes, a direct pipe.vae.decode from another thread is
    untiled (the model's own use_tiling, False): the choice is the call's argument, not the model's state.
    The other thread runs inside the call's decode (no kernels at the same time: see test_pipeline_threads)."""
    pipe = load_ours(folder)
    size = 2 * SIZE
    whole, tiled = whole_and_tiled_estimates(pipe, size)
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: (tiled + whole) // 2)  # the call tiles
    latents = np.random.default_rng(seed).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    untiled = pipe.vae.decode(latents)  # [1,3,256,256], alone, before
    decoder, seen = pipe.vae.decoder, {}

    def decoder_that_lets_another_thread_decode(z):
        if not seen:  # the call's first tile: decode directly from another thread, now
            seen["use_tiling"] = pipe.vae.use_tiling
            other = threading.Thread(target=lambda: seen.setdefault("image", pipe.vae.decode(latents)))
            other.start()
            other.join()
        return decoder(z)

    monkeypatch.setattr(pipe.vae, "decoder", decoder_that_lets_another_thread_decode)
    out = pipe("a red circle", seed=seed, output_type="np", num_inference_steps=1, height=size, width=size)
    assert out.parameters["vae_tiling"] is True  # the call did tile
    assert seen["use_tiling"] is False, "the call set the model's use_tiling"
    assert np.array_equal(seen["image"], untiled), "another thread's decode ran in tiles during the call"
