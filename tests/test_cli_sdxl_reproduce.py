"""--reproduce of a PNG whose npdiff JSON names its mode, model or SDXL refiner with something other than text
(a hand-edited or hostile file): an NpdiffError naming the PNG and the key, before any model loads, never a
traceback (a fuzz case found `"command": {"name": "x"}` raising TypeError in the mode check)."""

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from npdiff import cli
from npdiff.errors import NpdiffError
from npdiff.images import PNG_PARAMS_KEY


def png_with(tmp_path, stored):
    info = PngInfo()
    info.add_text(PNG_PARAMS_KEY, json.dumps(stored))
    path = tmp_path / "stored.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("key, value", [("command", {"name": "x"}), ("mode", ["img2img"]), ("refiner", 5),
                                        ("refiner_hash", {"a": 1})])
@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_a_stored_name_that_is_not_text_is_refused(tmp_path, key, value, command):
    path = png_with(tmp_path, {"prompt": "a red circle", "steps": 2, "seed": 1, key: value})
    args = cli.build_parser().parse_args([command, "--reproduce", str(path)])
    with pytest.raises(NpdiffError, match=f"stored '{key}' must be a string"):
        cli.resolve_options(args, command)


def test_stored_text_names_still_reproduce(tmp_path):
    path = png_with(tmp_path, {"prompt": "a red circle", "steps": 2, "seed": 1, "command": "generate",
                               "denoising_end": 0.7})
    args = cli.resolve_options(cli.build_parser().parse_args(["generate", "--reproduce", str(path)]), "generate")
    assert (args.prompt, args.steps, args.denoising_end) == ("a red circle", 2, 0.7)
