"""The CLI round trip of a precision: `generate --precision P` records P in the PNG (npdiff's JSON and
AUTOMATIC1111's text), and `--reproduce` loads the model at P again and draws the same picture."""

import numpy as np
from helpers import pixels
from PIL import Image

from npdiff import cli
from npdiff.images import read_png_params
from npdiff.infotext import parse_infotext


def check_precision_round_trip(precision, folder, tmp_path, capsys, size=32):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--model", str(folder), "--steps", "2", "--height", str(size), "--width", str(size), "--sampler", "euler"]
    assert cli.main(["generate", "a red circle", "--seed", "3", "--precision", precision, "--out", str(first)]
                    + common) == 0
    assert f"precision {precision}" in capsys.readouterr().err
    assert read_png_params(first)["precision"] == precision
    with Image.open(first) as picture:
        text = picture.text["parameters"]
    assert f"Precision: {precision}" in text and parse_infotext(text)["precision"] == precision
    assert cli.main(["generate", "--reproduce", str(first), "--model", str(folder), "--out", str(again)]) == 0
    assert f"precision {precision}" in capsys.readouterr().err
    np.testing.assert_array_equal(pixels(again), pixels(first))
