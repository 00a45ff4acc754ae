"""SDXL on the command line: `npdiff generate/img2img --model` find an SDXL folder or single file by themselves,
`--prompt-2` / `--negative-2`, the PNG's parameters and --reproduce, batch lines with prompt_2; the picture is
diffusers' StableDiffusionXLPipeline's from the same seed (an empty negative prompt: zeros, its default)."""

import json

import numpy as np
import pytest
import torch

from helpers import IMAGE_LEVELS_TOL, pixels
from sdxl_compare import theirs_pipeline
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder, write_sdxl_single_file

from npdiff import cli
from npdiff.batch_jobs import make_job
from npdiff.images import read_png_params

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def test_generate_prompt_2_like_diffusers_and_reproduce(tmp_path, seed):
    folder = tiny_sdxl_folder("base")
    out = tmp_path / "xl.png"
    assert cli.main(["generate", "a red circle", "--prompt-2", "an oil painting", "--steps", "2", "--seed",
                     str(seed), "--model", str(folder), "--out", str(out)]) == 0
    theirs = theirs_pipeline("base", "txt2img")("a red circle", prompt_2="an oil painting", num_inference_steps=2,
                                                guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                                                output_type="np").images[0]
    worst = np.abs(pixels(out).astype(np.int16) - np.round(theirs * 255).astype(np.int16)).max()
    assert worst <= IMAGE_LEVELS_TOL, f"npdiff generate differs from diffusers by {worst} levels"
    params = read_png_params(out)
    assert params["prompt_2"] == "an oil painting" and params["command"] == "generate"
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


def test_single_file_model_and_img2img(tmp_path, rng):
    folder = tiny_sdxl_folder("single_file")
    model = write_sdxl_single_file(folder, folder / "xl-cli.safetensors")
    source = tmp_path / "source.png"
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "changed.png"
    assert cli.main(["img2img", "two squares", "--negative-2", "blurry", "--negative", "dark", "--image",
                     str(source), "--strength", "0.5", "--steps", "2", "--seed", "3", "--model", str(model), "--out",
                     str(out)]) == 0
    params = read_png_params(out)
    assert params["negative_prompt_2"] == "blurry" and params["model"] == "xl-cli"


def test_prompt_2_needs_an_sdxl_model(tmp_path, capsys):
    code = cli.main(["generate", "x", "--prompt-2", "y", "--steps", "1", "--model", str(tiny_sd_folder()),
                     "--out", str(tmp_path / "x.png")])
    assert code == 2 and "--prompt-2 / prompt_2 is for SDXL models" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_batch_line_takes_prompt_2(tmp_path):
    line = json.loads('{"prompt": "a cat", "prompt_2": "watercolor", "negative_prompt_2": "dark", "seed": 4}')
    job = make_job(1, line, {}, tmp_path)
    assert job.options["prompt_2"] == "watercolor" and job.options["negative_2"] == "dark"
