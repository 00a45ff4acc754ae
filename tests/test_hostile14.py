"""Hostile input on the size limits, the per-call VAE tiling argument and a PNG's ControlNet entries: each is
refused as an NpdiffError naming the problem, before any work (no traceback, no picture drawn past a limit)."""

import base64
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from shipped import MODEL_DIR  # noqa: E402

from npdiff import cli  # noqa: E402
from npdiff.batch_jobs import read_jobs  # noqa: E402
from npdiff.errors import NpdiffError  # noqa: E402
from npdiff.images import PNG_PARAMS_KEY  # noqa: E402
from npdiff.models import AutoencoderKL  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.picture_size import MAX_SIDE, check_side, check_size  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


@pytest.fixture(scope="module")
def folder():
    return MODEL_DIR  # the shipped model: 16-pixel sides, no torch needed


# ---------------------------------------------------------------------------------------------
# check_side: a message for any value, never a ValueError of its own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,words", [
    (-10**5000, "height must be a positive integer, got a negative number of about 5001 digits"),  # repr() raised
    (10**5000, "height must be at most 8192 pixels"),
    ("6" * 100_000, "height must be a positive integer, got '666"),
    (-64, "height must be a positive integer, got -64"),
    (np.int64(-64), "height must be a positive integer, got -64"),
], ids=["minus-10**5000", "10**5000", "100k-digit-string", "-64", "np.int64(-64)"])
def test_check_side_names_any_bad_value_briefly(value, words):
    with pytest.raises(NpdiffError) as caught:
        check_size(value, 64, 16)
    assert words in str(caught.value) and len(str(caught.value)) < 400


def test_check_side_takes_numpy_ints_at_the_limit():
    assert check_side("width", np.uint16(MAX_SIDE)) == MAX_SIDE
    with pytest.raises(NpdiffError, match="at most 8192"):
        check_side("width", np.uint64(MAX_SIDE + 1))


# ---------------------------------------------------------------------------------------------
# vae.decode / vae.encode(tiling=...): True, False (numpy's too) or None; "no" is not true
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae(folder):
    return AutoencoderKL.from_pretrained(folder, subfolder="vae")


@pytest.mark.parametrize("tiling", ["no", "False", "yes", 1, 0, 2.5, [], ""])
def test_a_tiling_that_is_not_a_bool_is_refused(vae, rng, tiling):
    z = rng.standard_normal((1, vae.config["latent_channels"], 12, 12)).astype(np.float32)
    side = 2 * vae.tile_sample_min_size  # past one tile, a multiple of the VAE's factor
    x = rng.uniform(-1, 1, (1, 3, side, side))
    for call, data in ((vae.decode, z), (vae.encode, x.astype(np.float32))):
        with pytest.raises(NpdiffError, match="tiling must be True, False or None"):
            call(data, tiling=tiling)


def test_numpy_bools_choose_tiling_as_bools_do(vae, rng):
    z = rng.standard_normal((1, vae.config["latent_channels"], 3 * vae.tile_latent_min_size // 2,
                             3 * vae.tile_latent_min_size // 2)).astype(np.float32)  # past one tile
    whole, tiled = vae.decode(z, tiling=False), vae.decode(z, tiling=True)
    assert not np.array_equal(whole, tiled)  # the two differ at this size, so the checks below can fail
    assert np.array_equal(vae.decode(z, tiling=np.bool_(True)), tiled)
    assert np.array_equal(vae.decode(z, tiling=np.bool_(False)), whole)
    assert vae.use_tiling is False


@pytest.mark.parametrize("use_tiling", ["no", 1, None])
def test_a_use_tiling_that_is_not_a_bool_is_refused(vae, rng, use_tiling):
    z = rng.standard_normal((1, vae.config["latent_channels"], 12, 12)).astype(np.float32)
    try:
        vae.use_tiling = use_tiling  # "no" was truthy: the call tiled
        with pytest.raises(NpdiffError, match="vae.use_tiling must be True or False"):
            vae.decode(z)
        assert np.array_equal(vae.decode(z, tiling=False), vae.decode(z, tiling=False))  # the call's own choice
    finally:
        vae.use_tiling = False


def test_a_pipeline_with_a_use_tiling_that_is_not_a_bool_is_refused_before_sampling(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # its own: the module's pipe stays untouched
    unet_calls = []

    class CountedUNet:  # the pipeline's UNet, its calls counted
        def __init__(self, unet):
            self.unet = unet

        def __getattr__(self, name):
            return getattr(self.unet, name)

        def __call__(self, *args, **kwargs):
            unet_calls.append(1)
            return self.unet(*args, **kwargs)

    pipe.unet = CountedUNet(pipe.unet)
    pipe("a circle", num_inference_steps=1, height=64, width=64, output_type="np")
    assert unet_calls  # the count sees the UNet's calls, so the check below can fail
    unet_calls.clear()
    pipe.vae.use_tiling = "no"
    with pytest.raises(NpdiffError, match="vae.use_tiling must be True or False"):
        pipe("a circle", num_inference_steps=2, height=64, width=64, output_type="np")
    assert unet_calls == []


# ---------------------------------------------------------------------------------------------
# img2img works at its picture's size: a side past MAX_SIDE is refused as --width past it is
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(folder):
    return StableDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("size", [(MAX_SIDE + 16, 16), (16, MAX_SIDE + 64)])
def test_img2img_picture_past_the_side_limit_is_refused_before_work(pipe, size):
    picture = Image.new("RGB", size, (200, 20, 20))
    start = time.perf_counter()
    with pytest.raises(NpdiffError) as caught:  # on main: drawn, 70 s for 9000x16 on the tiny model
        pipe.img2img("a circle", image=picture, strength=0.5, num_inference_steps=2, output_type="np")
    name = "width" if size[0] > MAX_SIDE else "height"
    assert f"{name} must be at most {MAX_SIDE} pixels" in str(caught.value)
    assert f"the picture is {size[0]}x{size[1]} pixels" in str(caught.value)
    assert time.perf_counter() - start < 2
    with pytest.raises(NpdiffError, match="at most 8192"):  # an array [H,W,3] the same
        pipe.img2img("a circle", image=np.zeros((16, MAX_SIDE + 16, 3), np.uint8), strength=0.5,
                     num_inference_steps=2)


def test_img2img_picture_that_rounds_down_to_the_limit_is_taken(pipe):
    from npdiff.sampling_starts import check_picture_sides
    check_picture_sides(Image.new("RGB", (MAX_SIDE + 15, 16)), 16)  # worked at 8192 wide: no error


# ---------------------------------------------------------------------------------------------
# npdiff batch: a line past the side limit fails when the file is read, before a worker loads the model
# ---------------------------------------------------------------------------------------------
def test_batch_line_past_the_side_limit_fails_on_reading(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a circle", "height": 9000, "width": 64},
        {"prompt": "a circle", "width": MAX_SIDE + 8},
        {"prompt": "a circle", "height": MAX_SIDE, "width": 64},
    ]) + "\n")
    good, failures = read_jobs(jobs, {})
    assert [job.line for job in good] == [3]
    assert "'height' must be at most 8192 pixels" in failures[1]
    assert "'width' must be at most 8192 pixels" in failures[2]


# ---------------------------------------------------------------------------------------------
# --reproduce of an edited PNG: a bad 'controlnets' or a side past the limit, named with the PNG
# ---------------------------------------------------------------------------------------------
def png_with(path, params):
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMS_KEY, json.dumps(params))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("controlnets", [5, "edges", {"name": "edges"}])
def test_reproduce_png_whose_controlnets_is_not_a_list(folder, tmp_path, capsys, controlnets):
    png = png_with(tmp_path / "edited.png", {"prompt": "a circle", "controlnets": controlnets})
    assert cli.main(["generate", "--reproduce", str(png), "--model", str(folder),
                     "--out", str(tmp_path / "out.png")]) == 2  # on main: a TypeError (5) or nothing said
    err = capsys.readouterr().err
    assert f"{png}: stored parameter 'controlnets' must be a list" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_reproduce_png_side_past_the_limit_names_the_png(folder, tmp_path, capsys):
    png = png_with(tmp_path / "edited.png", {"prompt": "a circle", "height": 9000, "width": 32})
    assert cli.main(["generate", "--reproduce", str(png), "--model", str(folder),
                     "--out", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert f"{png}: stored parameter: height must be at most 8192 pixels" in err and "loaded model" not in err
    assert cli.main(["generate", "--reproduce", str(png), "--height", "9008", "--model", str(folder)]) == 2
    assert "npdiff: error: height must be at most 8192 pixels (the largest side npdiff accepts), got 9008" in \
        capsys.readouterr().err  # the user's own --height is not blamed on the PNG


@pytest.mark.parametrize("controlnets,listed", [(5, 0), ("edges", 0), ([5, None], 0), ([{"name": "edges"}, "x"], 1)],
                         ids=["5", "a string", "numbers", "a net and a string"])
def test_infotext_of_an_edited_png_skips_what_is_not_a_controlnet(controlnets, listed):
    from npdiff.infotext import format_infotext  # npdiff serve's png-info writes it from a PNG's "npdiff" chunk
    text = format_infotext({"prompt": "a circle", "controlnets": controlnets})  # on main: TypeError/AttributeError
    assert text.startswith("a circle") and text.count("ControlNet ") == listed
    assert listed == 0 or 'ControlNet 0: "Module: none, Model: edges' in text


@pytest.mark.parametrize("scale", [np.complex128(2 + 5j), np.complex64(2), "2", np.float64("nan")], ids=str)
def test_hires_scale_must_be_a_real_number(scale):
    from npdiff.hires import check_hires
    with pytest.raises(NpdiffError, match="hires_scale must be a number in"):  # on main: complex taken as 2.0
        check_hires(scale)
    assert check_hires(np.float32(2)).scale == 2.0 and check_hires(np.int8(3)).scale == 3.0


# ---------------------------------------------------------------------------------------------
# A PNG whose "npdiff" chunk holds an integer past Python's 4300 digits, or values of the wrong types
# ---------------------------------------------------------------------------------------------
HUGE_HEIGHT = '{"prompt": "a circle", "height": ' + "9" * 5000 + "}"


def test_reproduce_png_with_an_integer_of_thousands_of_digits(folder, tmp_path, capsys):
    png = tmp_path / "huge.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMS_KEY, HUGE_HEIGHT)
    Image.new("RGB", (16, 16)).save(png, pnginfo=info)
    assert cli.main(["generate", "--reproduce", str(png), "--model", str(folder)]) == 2  # on main: ValueError
    err = capsys.readouterr().err
    assert "text chunk holds an integer of over 4300 digits" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def server():
    from serve_server import running_server

    with running_server() as (url, app):  # the shipped model
        yield url


def base64_png(size, chunk=None):
    info = None
    if chunk is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_PARAMS_KEY, chunk)
    data = io.BytesIO()
    Image.new("RGB", size, (200, 20, 20)).save(data, "PNG", pnginfo=info)
    return base64.b64encode(data.getvalue()).decode()


@pytest.mark.parametrize("chunk", [HUGE_HEIGHT, '{"prompt": "x", "loras": 5}', "[1, 2]"],
                         ids=["5000 digits", "loras 5", "a list"])
def test_serve_png_info_of_an_edited_png_is_the_images_422(server, chunk):
    answer = requests.post(f"{server}/sdapi/v1/png-info", json={"image": base64_png((8, 8), chunk)},
                           timeout=30)  # on main: 500 ('loras' 5), or a 400 blaming the request's body
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("image: its 'npdiff' text chunk is not parameters npdiff wrote")
    assert requests.get(f"{server}/sdapi/v1/samplers", timeout=30).status_code == 200  # still serving


@pytest.mark.parametrize("size,words", [
    ((2048, 2048), "init_images[0]: 2048x2048 pixels is too large"),  # on main: blamed on width/height
    ((MAX_SIDE + 808, 16), "image: the picture is 9000x16 pixels"),  # on main: drawn (72 s)
])
def test_serve_img2img_picture_past_a_limit_names_the_picture(server, size, words):
    body = {"prompt": "a circle", "steps": 2, "init_images": [base64_png(size)], "width": 32, "height": 32}
    start = time.perf_counter()
    answer = requests.post(f"{server}/sdapi/v1/img2img", json=body, timeout=60)
    assert answer.status_code == 422 and answer.json()["detail"].startswith(words)
    assert time.perf_counter() - start < 10
