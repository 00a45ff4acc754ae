"""`npdiff serve` with SDXL: webui's refiner_checkpoint / refiner_switch_at on /sdapi/v1/txt2img and img2img
(inpainting too), and webui's SDXL settings in override_settings (sdxl_crop_top/left, the refiner's aesthetic
scores): the served picture is `npdiff generate/inpaint --refiner ...`'s bytes (whose pictures are diffusers'
ensemble of experts: tests/pipeline/test_sdxl_refiner_cli.py); bad values get webui's error shape naming the
field, in under a second, before any work."""

import base64
import io
import json
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from serve_server import running_server

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from tiny_sd import tiny_sd_folder  # noqa: E402
from tiny_sdxl import tiny_sdxl_folder  # noqa: E402

from npdiff import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """--models-dir with the tiny SDXL base, refiner and an SD model (links to the folders tests build)."""
    folder = tmp_path_factory.mktemp("models")
    links = {"tiny-sdxl-base": tiny_sdxl_folder("base"), "tiny-sdxl-refiner": tiny_sdxl_folder("refiner"),
             "tiny-sd": tiny_sd_folder()}
    for name, target in links.items():
        (folder / name).symlink_to(target, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def server(models):
    with running_server(model=models / "tiny-sdxl-base", models_dir=models) as (url, app):
        yield url


def post(server, kind, body):
    return requests.post(f"{server}/sdapi/v1/{kind}", json=body, timeout=120)


def served_png(response):
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["images"][0])


def cli_png(tmp_path, name, command, *arguments):
    """The command's PNG; the server reads prompts with webui's syntax, so the command does too."""
    out = tmp_path / name
    assert cli.main([command, *arguments, "--prompt-syntax", "a1111", "--out", str(out)]) == 0
    return out.read_bytes()


def test_txt2img_with_refiner_is_generate_refiners_bytes(server, models, tmp_path, seed):
    body = {"prompt": "a lion", "seed": seed, "steps": 3, "cfg_scale": 7.5, "width": 64, "height": 64,
            "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5,
            "override_settings": {"sdxl_refiner_high_aesthetic_score": 7, "sdxl_crop_top": 4, "sdxl_crop_left": 8}}
    response = post(server, "txt2img", body)
    expected = cli_png(tmp_path, "a.png", "generate", "a lion", "--seed", str(seed), "--steps", "3", "--guidance",
                       "7.5", "--width", "64", "--height", "64", "--model", str(models / "tiny-sdxl-base"),
                       "--refiner", str(models / "tiny-sdxl-refiner"), "--refiner-switch", "0.5",
                       "--aesthetic-score", "7", "--crops-coords-top-left", "8,4",
                       "--negative-crops-coords-top-left", "8,4")
    assert served_png(response) == expected
    info = json.loads(response.json()["info"])
    assert "Refiner: tiny-sdxl-refiner [" in info["infotexts"][0] and "Refiner switch at: 0.5" in info["infotexts"][0]
    assert not any(item.startswith(("refiner", "override_settings.sdxl")) for item in info["npdiff_ignored"])
    # no refiner ("None", as webui's page sends it): the base alone, the switch listed as ignored
    plain = post(server, "txt2img", dict(body, refiner_checkpoint="None", override_settings={}))
    assert served_png(plain) == cli_png(tmp_path, "b.png", "generate", "a lion", "--seed", str(seed), "--steps", "3",
                                        "--guidance", "7.5", "--width", "64", "--height", "64", "--model",
                                        str(models / "tiny-sdxl-base"))
    assert "refiner_switch_at=0.5 (no refiner_checkpoint)" in json.loads(plain.json()["info"])["npdiff_ignored"]


def test_inpainting_with_refiner_is_inpaint_refiners_bytes(server, models, tmp_path, seed):
    picture = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")

    def b64(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    response = post(server, "img2img", {"prompt": "a lion", "seed": seed, "steps": 4, "cfg_scale": 7.5, "width": 64,
                                        "height": 64, "init_images": [b64(picture)], "mask": b64(mask),
                                        "denoising_strength": 1.0, "refiner_checkpoint": "tiny-sdxl-refiner [0]"})
    expected = cli_png(tmp_path, "i.png", "inpaint", "a lion", "--seed", str(seed), "--steps", "4", "--guidance",
                       "7.5", "--width", "64", "--height", "64", "--image", str(tmp_path / "in.png"), "--mask",
                       str(tmp_path / "mask.png"), "--strength", "1", "--model", str(models / "tiny-sdxl-base"),
                       "--refiner", str(models / "tiny-sdxl-refiner"))  # webui's switch default 0.8 = npdiff's
    assert served_png(response) == expected


BAD = [
    # (what, body fields, status, words the message holds)
    ("a refiner path", {"refiner_checkpoint": "../tiny-sdxl-refiner"}, 400, "refiner_checkpoint"),
    ("a refiner not served", {"refiner_checkpoint": "sd_xl_refiner_1.0"}, 404, "refiner_checkpoint"),
    ("a base as the refiner", {"refiner_checkpoint": "tiny-sdxl-base"}, 422, "not an SDXL refiner"),
    ("an SD model as the refiner", {"refiner_checkpoint": "tiny-sd"}, 422, "not an SDXL refiner"),
    ("a refiner after an SD model", {"refiner_checkpoint": "tiny-sdxl-refiner",
                                     "override_settings": {"sd_model_checkpoint": "tiny-sd"}}, 422, "follows an SDXL"),
    ("switch 1", {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 1}, 422, "refiner_switch_at"),
    ("switch 0", {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0}, 422, "refiner_switch_at"),
    ("switch a string", {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": "0.8"}, 422,
     "refiner_switch_at"),
    ("refiner with hires", {"refiner_checkpoint": "tiny-sdxl-refiner", "enable_hr": True}, 422, "enable_hr"),
    ("negative crop", {"override_settings": {"sdxl_crop_top": -1}}, 422, "override_settings.sdxl_crop_top"),
    ("score a string", {"override_settings": {"sdxl_refiner_high_aesthetic_score": "high"}}, 422,
     "override_settings.sdxl_refiner_high_aesthetic_score"),
]


@pytest.mark.parametrize("what, fields, status, words", BAD, ids=[case[0] for case in BAD])
def test_bad_refiner_fields_get_webuis_error_shape_fast(server, what, fields, status, words):
    start = time.monotonic()
    response = post(server, "txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **fields})
    elapsed = time.monotonic() - start
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "detail", "body", "errors"} and words in error["detail"]
    assert elapsed < 1.0, f"{what}: answered in {elapsed:.2f} s"


def test_sdxl_settings_on_an_sd_model_are_listed_as_ignored(server):
    response = post(server, "txt2img", {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "override_settings": {
        "sd_model_checkpoint": "tiny-sd", "sdxl_crop_top": 8, "sdxl_refiner_low_aesthetic_score": 2}})
    ignored = json.loads(response.json()["info"])["npdiff_ignored"]
    assert any("sdxl_crop_top" in item and "no crop conditioning" in item for item in ignored), ignored
    assert any("aesthetic_score" in item and "condition an SDXL refiner" in item for item in ignored), ignored
