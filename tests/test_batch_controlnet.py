"""`npdiff batch` lines with a control: "control" ("CONTROLNET:IMAGE[:SCALE]" or a list, paths relative to the job
file), "canny", "control_start", "control_end", "guess_mode" (npdiff.recipe.CONTROL_SETTINGS, the names of
--control-start ...). Each picture has the bytes `npdiff generate/img2img --control ...` writes; a rerun skips
them, and a picture made with other controls (or none) is not taken for done; bad control keys fail their line
naming the key. On the shipped model (32x32) and its shipped ControlNet, 2 steps."""

import json

import numpy as np
from PIL import Image
from test_batch import STEPS, assert_no_local_path, folder_bytes, run_cli, write_lines

from npdiff.batch import run_batch
from npdiff.images import read_png_params
from npdiff.pipeline_utils import default_model_path

NET = default_model_path() / "controlnet-edges"


def edge_picture(rng, path):
    """White outlines of a random square on black, 32x32 (the shipped model's size)."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    top, left = rng.integers(2, 16, size=2)
    pixels[top, left:left + 12] = pixels[top + 12, left:left + 12] = 255
    pixels[top:top + 13, left] = pixels[top:top + 13, left + 12] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_control_lines_equal_the_single_commands(tmp_path, capsys, rng):
    (tmp_path / "pictures").mkdir()
    edges = edge_picture(rng, tmp_path / "pictures" / "edges.png")
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
    scale = float(np.round(rng.uniform(0.5, 1.2), 2))
    lines = [
        {"prompt": "a red circle on a blue background", "control": f"{NET}:pictures/edges.png:{scale}",
         "control_end": 0.75, "seed": 3},
        {"prompt": "a green square", "image": "photo.png", "strength": 0.7, "control": [f"{NET}:photo.png"],
         "canny": True, "guess_mode": True, "control_start": 0.25, "seed": 4},
        {"prompt": "a red circle on a blue background", "seed": 3, "height": 32, "width": 32},  # no control
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", [json.dumps(line) for line in lines])
    out = tmp_path / "out"
    code, captured = run_cli(["batch", str(jobs), "--out", str(out), *STEPS, "--quiet"], capsys)
    assert code == 0, captured.out
    written = folder_bytes(out)
    same = {
        "000001-seed3.png": ["generate", lines[0]["prompt"], "--control", f"{NET}:{edges}:{scale}",
                             "--control-end", "0.75", "--seed", "3"],
        "000002-seed4.png": ["img2img", "a green square", "--image", str(photo), "--strength", "0.7", "--control",
                             f"{NET}:{photo}", "--canny", "--guess-mode", "--control-start", "0.25", "--seed", "4"],
        "000003-seed3.png": ["generate", lines[0]["prompt"], "--seed", "3", "--height", "32", "--width", "32"],
    }
    assert sorted(written) == sorted(same)
    for name, args in same.items():
        single = tmp_path / f"single-{name}"
        assert run_cli(args + [*STEPS, "--out", str(single)], capsys)[0] == 0
        assert single.read_bytes() == written[name], f"{name} differs from npdiff {args[0]}"
    assert written["000001-seed3.png"] != written["000003-seed3.png"]  # the control changed the picture
    (net,) = read_png_params(out / "000001-seed3.png")["controlnets"]
    assert (net["name"], net["scale"], net["end"]) == ("controlnet-edges", scale, 0.75)
    second = read_png_params(out / "000002-seed4.png")
    assert second["guess_mode"] is True and second["controlnets"][0]["module"] == "canny"
    assert_no_local_path(out, tmp_path, edges, "pictures/edges.png")
    # a rerun: every picture done; the same lines with another scale, or without their control, are not
    summary = run_batch(jobs, out, defaults={"steps": 2}, progress=False)
    assert (summary.written, summary.skipped, summary.failures) == (0, 3, {})
    changed = [dict(lines[0], control=f"{NET}:pictures/edges.png:{scale + 0.1}"), dict(lines[1], guess_mode=False),
               dict(lines[2], control=f"{NET}:pictures/edges.png")]
    write_lines(jobs, [json.dumps(line) for line in changed])
    summary = run_batch(jobs, out, defaults={"steps": 2}, progress=False)
    assert (summary.written, summary.skipped) == (3, 0)
    without = {key: value for key, value in lines[0].items() if not key.startswith("control")}
    write_lines(jobs, [json.dumps(without)])
    summary = run_batch(jobs, out, defaults={"steps": 2}, progress=False)
    assert (summary.written, summary.skipped) == (1, 0)


def test_bad_control_keys_fail_their_line(tmp_path, capsys, rng):
    edge_picture(rng, tmp_path / "edges.png")
    lines = [
        {"prompt": "a", "control_start": 0.2},                                   # a setting without a control
        {"prompt": "b", "control": f"{NET}:missing.png"},                        # no such picture
        {"prompt": "c", "control": "no-such-net:edges.png"},                     # no such ControlNet
        {"prompt": "d", "control": f"{NET}:edges.png", "control_end": 1.5},      # not a fraction
        {"prompt": "e", "control": f"{NET}:edges.png", "canny": "yes"},          # not a boolean
        {"prompt": "f", "control": f"{NET}:edges.png", "control_start": 0.6, "control_end": 0.4},
        {"prompt": "g", "control": 7},
        {"prompt": "h", "control": f"{NET}:edges.png:0.5"},                      # a good one
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", [json.dumps(line) for line in lines])
    summary = run_batch(jobs, tmp_path / "out", defaults={"steps": 1}, progress=False)
    assert summary.written == 1 and sorted(summary.failures) == [1, 2, 3, 4, 5, 6, 7]
    expected = {1: "'control_start' without 'control'", 2: "'control' 'missing.png': no such file",
                3: "'control' 'no-such-net': no such ControlNet", 4: "'control_end' must be a fraction",
                5: "'canny' must be true or false", 6: "control_start (0.6) must be below control_end (0.4)",
                7: "'control' must be"}
    for line, message in expected.items():
        assert message in summary.failures[line], summary.failures[line]
