"""`npdiff batch` checks every line's picture size against the model before any picture is drawn: a side that
is not a multiple of the model's size rule (16 pixels for the shipped model), a picture past its self-attention
limit (past 1024x1024 for the shipped model), a hires_scale whose second pass is past it, or an img2img
picture past it fails its own line, named by line number and key, and never reaches a worker. The model's
configs are read, not its weights.

And one rule for integer options: a size of 64.0 (as JSON writers may emit 64) is 64 on a batch line, as in
the server's JSON; 64.5 is refused by both.
"""

import json

import numpy as np
import pytest
from PIL import Image

from npdiff.batch import run_batch
from npdiff.batch_jobs import read_jobs
from npdiff.errors import NpdiffError
from npdiff.recipe import options_from_png
from npdiff.serve_schemas import picture_request


class RecordingPool:
    """A worker pool that draws nothing: it records which lines reached it."""

    def __init__(self):
        self.lines = []

    def results(self, payloads):
        for payload in payloads:
            self.lines.append(payload["line"])
            yield {"line": payload["line"], "error": "reached a worker"}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """Model hashes are cached under $XDG_CACHE_HOME: this test's own, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_lines_the_model_refuses_fail_before_any_worker(tmp_path, rng):
    # a 100-line job file; a few lines the shipped model cannot draw, at random places
    bad_lines = sorted(rng.choice(np.arange(2, 101), size=5, replace=False).tolist())
    wide = Image.fromarray(rng.integers(0, 256, (1024, 1040, 3), dtype=np.uint8))  # img2img at 1040x1024
    wide.save(tmp_path / "wide.png")
    bad = {  # the line's options -> what its message must say
        "attention": ({"height": 1024, "width": 1040}, ["self-attention", "lower 'height'/'width'"]),
        "size rule": ({"width": 40}, ["'width' must be a multiple of 16", "try 32 or 48"]),
        "hires": ({"height": 768, "width": 768, "hires_scale": 2},
                  ["hires_scale 2 turns 768x768 into 1536x1536", "lower 'hires_scale' or lower 'height'/'width'"]),
        "img2img": ({"image": "wide.png", "strength": 0.5}, ["1040x1024 pixels is too large", "smaller 'image'"]),
        "default height": ({"width": 1056}, None),  # 1056x32 (the model's height): 264x8 positions, drawn
    }
    lines, expected = [], {}
    kinds = iter(bad)
    for number in range(1, 101):
        options = {"prompt": f"a red circle {number}"}
        if number in bad_lines:
            kind = next(kinds)
            options.update(bad[kind][0])
            if bad[kind][1] is not None:
                expected[number] = bad[kind][1]
        lines.append(json.dumps(options))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pool = RecordingPool()
    summary = run_batch(jobs, tmp_path / "out", defaults={"steps": 2}, pool=pool, progress=False)
    refused = set(expected)
    assert sorted(pool.lines) == [n for n in range(1, 101) if n not in refused]  # the others all went on
    for line, parts in expected.items():
        message = summary.failures[line]
        assert "reached a worker" not in message
        for part in parts:
            assert part in message, (line, message)
        assert "--height" not in message and "height=" not in message  # named as a line's keys


@pytest.mark.parametrize("defaults, message", [
    ({"height": 24}, "the batch's --height must be a multiple of 16 pixels"),  # the shipped model's size rule
    ({"width": 20}, "the batch's --width must be a positive multiple of 8"),
    ({"height": 1024, "width": 1040}, "self-attention"),  # past the shipped model's attention limit
    ({"height": "tall"}, "the batch's --height must be an integer >= 1, got 'tall'"),
])
def test_the_batchs_own_size_is_refused_once_by_its_flags(tmp_path, defaults, message):
    """A batch-wide --height/--width the model refuses is the command's error, before any line is read or drawn
    (it failed every line, each blaming the line's 'height')."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red circle\na blue square\n", encoding="utf-8")
    pool = RecordingPool()
    with pytest.raises(NpdiffError) as refusal:
        run_batch(jobs, tmp_path / "out", defaults={"steps": 2, **defaults}, pool=pool, progress=False)
    assert message in str(refusal.value)
    assert "'height'" not in str(refusal.value) and "'width'" not in str(refusal.value)  # not a line's keys
    assert pool.lines == [] and not (tmp_path / "out").exists()


def test_a_line_can_still_override_a_good_batch_size(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red circle", "height": 1024, "width": 1040}) + "\n"
                    + json.dumps({"prompt": "a blue square"}) + "\n", encoding="utf-8")
    pool = RecordingPool()
    summary = run_batch(jobs, tmp_path / "out", defaults={"steps": 2, "height": 64}, pool=pool, progress=False)
    assert pool.lines == [2] and "lower 'height'/'width'" in summary.failures[1]


def test_an_integral_float_size_is_one_rule_for_batch_and_serve(tmp_path, rng):
    side = int(rng.integers(2, 8)) * 16
    lines = [{"prompt": "a red circle", "height": float(side), "width": float(side), "steps": 2.0},
             {"prompt": "a red circle", "height": side + 0.5},
             {"prompt": "a red circle", "width": True}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    jobs, failures = read_jobs(jobs_file, {})
    assert [job.line for job in jobs] == [1]
    options = jobs[0].options
    assert (options["height"], options["width"], options["steps"]) == (side, side, 2)
    assert all(type(options[key]) is int for key in ("height", "width", "steps"))  # stored in the PNG as 64
    assert f"'height' must be an integer >= 1, got {side + 0.5}" in failures[2]
    assert "'width' must be an integer >= 1, got True" in failures[3]
    # the server's JSON: the same values, the same outcome
    request = picture_request({"prompt": "a red circle", "height": float(side), "width": float(side), "steps": 2.0},
                              "txt2img")
    assert (request.options["height"], request.options["width"]) == (side, side)
    assert type(request.options["height"]) is int
    for bad in ({"height": side + 0.5}, {"width": True}):
        with pytest.raises(NpdiffError, match="must be an integer"):
            picture_request({"prompt": "a red circle", **bad}, "txt2img")


def test_an_integral_float_inside_an_sdxl_pair_is_one_rule_for_lines_and_pngs(tmp_path, rng):
    """Before: [1024.0, 1024.0] for original_size was refused on a batch line and in a PNG, where every other
    integer option takes 1024.0 as 1024 (npdiff.option_numbers.integral)."""
    height, width = (int(side) for side in rng.integers(1, 4096, 2))
    corner = [int(rng.integers(0, 512)), 0]
    lines = [{"prompt": "a red circle", "original_size": [float(height), float(width)],
              "crops_coords_top_left": [float(corner[0]), corner[1]]},
             {"prompt": "a red circle", "original_size": [height + 0.5, width]},
             {"prompt": "a red circle", "target_size": [True, width]},
             {"prompt": "a red circle", "original_size": [0.0, width]}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    jobs, failures = read_jobs(jobs_file, {})
    assert [job.line for job in jobs] == [1]
    pair, crop = jobs[0].options["original_size"], jobs[0].options["crops_coords_top_left"]
    assert (pair, crop) == ([height, width], corner)
    assert all(type(value) is int for value in pair + crop)  # stored in the PNG as 1024, not 1024.0
    assert "'original_size' must be WIDTHxHEIGHT or [height, width]" in failures[2]
    assert "'target_size' must be WIDTHxHEIGHT or [height, width], got [True" in failures[3]
    assert "'original_size': each number must be in [1," in failures[4]
    # a PNG's stored parameters: the same values, the same outcome
    stored = options_from_png({"original_size": [float(height), float(width)]}, "x.png")
    assert stored["original_size"] == [height, width] and all(type(v) is int for v in stored["original_size"])
    with pytest.raises(NpdiffError, match="x.png: stored parameter: original_size"):
        options_from_png({"original_size": [height + 0.5, width]}, "x.png")
