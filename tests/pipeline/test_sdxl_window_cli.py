"""SDXL's `--denoising-end` / `--denoising-start` on the command line (diffusers' denoising_end / denoising_start
without a refiner): the picture is diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline /
StableDiffusionXLInpaintPipeline's from the same seed and settings (8-bit levels within 2), the PNG records the
window and --reproduce draws it again; a batch line takes them; bad values and combinations are refused by
name before any model loads."""

import json

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, pixels
from PIL import Image
from sdxl_compare import random_mask, random_picture, theirs_pipeline
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

from npdiff import cli
from npdiff.batch_jobs import make_job
from npdiff.errors import NpdiffError
from npdiff.images import read_png_params

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def levels(float_picture):
    return np.round(np.asarray(float_picture) * 255).astype(np.int16)


def assert_like(path, theirs, what):
    worst = int(np.abs(pixels(path).astype(np.int16) - theirs).max())
    assert worst <= IMAGE_LEVELS_TOL, f"{what} differs from diffusers' by {worst} levels"


def test_denoising_end_then_start_by_hand_like_diffusers(tmp_path, seed):
    """generate --denoising-end: the partly noisy picture, decoded as diffusers decodes it; then img2img of that
    picture with a refiner and --denoising-start, as diffusers' refiner takes a picture (VAE encoder, no noise)."""
    base, refiner = tiny_sdxl_folder("base"), tiny_sdxl_folder("refiner")
    half = tmp_path / "half.png"
    assert cli.main(["generate", "a fox", "--steps", "4", "--seed", str(seed), "--denoising-end", "0.6",
                     "--model", str(base), "--out", str(half)]) == 0
    theirs = theirs_pipeline("base", "txt2img")("a fox", num_inference_steps=4, guidance_scale=7.5, denoising_end=0.6,
                                                generator=torch.Generator().manual_seed(seed), output_type="np")
    assert_like(half, levels(theirs.images[0]), "generate --denoising-end")
    params = read_png_params(half)
    assert params["denoising_end"] == 0.6 and "denoising_start" not in params
    # --reproduce takes the window back from the PNG: the same bytes
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(half), "--model", str(base), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(half)) and read_png_params(again)["denoising_end"] == 0.6
    # the second half: the refiner from the picture (the VAE's round trip of a noisy picture, as diffusers does it)
    out = tmp_path / "out.png"
    assert cli.main(["img2img", "a fox", "--image", str(half), "--steps", "4", "--seed", str(seed + 1),
                     "--denoising-start", "0.6", "--aesthetic-score", "7", "--model", str(refiner),
                     "--out", str(out)]) == 0
    with Image.open(half) as picture:
        theirs = theirs_pipeline("refiner", "img2img")("a fox", image=picture.convert("RGB"), num_inference_steps=4,
                                                       guidance_scale=7.5, denoising_start=0.6, aesthetic_score=7.0,
                                                       generator=torch.Generator().manual_seed(seed + 1),
                                                       output_type="np")
    assert_like(out, levels(theirs.images[0]), "img2img --denoising-start")
    params = read_png_params(out)
    assert params["denoising_start"] == 0.6 and params["aesthetic_score"] == 7.0


def test_inpaint_window_like_diffusers(tmp_path, rng, seed):
    """inpaint --denoising-start --denoising-end on a 4-channel SDXL UNet (the kept part put back each step)."""
    random_picture(rng).save(tmp_path / "in.png")
    random_mask(rng).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    start, end = round(float(rng.uniform(0.2, 0.4)), 2), round(float(rng.uniform(0.7, 0.9)), 2)
    assert cli.main(["inpaint", "a fox", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--steps", "5", "--seed", str(seed), "--denoising-start", str(start), "--denoising-end",
                     str(end), "--model", str(tiny_sdxl_folder("base")), "--out", str(out)]) == 0
    with Image.open(tmp_path / "in.png") as picture, Image.open(tmp_path / "mask.png") as mask:
        theirs = theirs_pipeline("base", "inpaint")("a fox", image=picture.convert("RGB"), mask_image=mask.convert("L"),
                                                    strength=1.0, num_inference_steps=5, guidance_scale=7.5,
                                                    denoising_start=start, denoising_end=end,
                                                    generator=torch.Generator().manual_seed(seed), output_type="np")
    assert_like(out, levels(theirs.images[0]), f"inpaint window ({start}, {end})")
    params = read_png_params(out)
    assert (params["denoising_start"], params["denoising_end"]) == (start, end)


@pytest.mark.parametrize("case", ["sd_model", "end_1", "start_0", "start_after_end", "with_refiner", "with_hires",
                                  "start_on_generate"])
def test_bad_windows_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, case):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(cli, "load_any_pipeline", no_loading)
    base, refiner, sd = (str(tiny_sdxl_folder("base")), str(tiny_sdxl_folder("refiner")), str(tiny_sd_folder()))
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(source)
    out = tmp_path / "x.png"
    command, argv, expected = {
        "sd_model": ("generate", ["--model", sd, "--denoising-end", "0.5"],
                     "--denoising-end / denoising_end is for SDXL models"),
        "end_1": ("generate", ["--model", base, "--denoising-end", "1"],
                  "--denoising-end / denoising_end must be a number strictly between 0 and 1"),
        "start_0": ("img2img", ["--model", base, "--image", str(source), "--denoising-start", "0"],
                    "--denoising-start / denoising_start must be a number strictly between 0 and 1"),
        "start_after_end": ("img2img", ["--model", base, "--image", str(source), "--denoising-start", "0.7",
                                         "--denoising-end", "0.7"], "0.7 must be smaller than --denoising-end"),
        "with_refiner": ("generate", ["--model", base, "--refiner", refiner, "--denoising-end", "0.5"],
                         "cannot be combined with --refiner"),
        "with_hires": ("generate", ["--model", base, "--hires-scale", "2", "--denoising-end", "0.5"],
                       "cannot be combined with --hires-scale"),
        "start_on_generate": ("generate", ["--model", base, "--denoising-start", "0.5"],
                              "unrecognized arguments: --denoising-start"),
    }[case]
    try:
        code = cli.main([command, "a cat", "--steps", "2", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse: generate has no --denoising-start
        code = exc.code
    assert code == 2 and expected in capsys.readouterr().err
    assert not out.exists()


def test_batch_lines_take_the_window(tmp_path):
    job = make_job(1, {"prompt": "a cat", "denoising_end": 0.75}, {}, tmp_path)
    assert job.options["denoising_end"] == 0.75
    with pytest.raises(NpdiffError, match="denoising_end.*strictly between 0 and 1"):
        make_job(2, {"prompt": "a cat", "denoising_end": 1.5}, {}, tmp_path)
    with pytest.raises(NpdiffError, match="denoising_end.*strictly between 0 and 1"):
        make_job(3, {"prompt": "a cat", "denoising_end": json.loads("true")}, {}, tmp_path)
