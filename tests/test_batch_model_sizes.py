"""`npdiff batch` checks every line's picture size against the model before any picture is drawn: a side that
is not a multiple of the model's size rule (16 pixels for the shipped model), a picture past its self-attention
limit (past 1024x1024 for the shipped model), a hires_scale whose second pass is past it, or an img2img
picture past it fails its own line, named by line number and key, and never reaches a worker. The model's
configs are read, not its weights.
"""

import json

import numpy as np
import pytest
from PIL import Image

from npdiff.batch import run_batch


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


def test_batch_height_and_width_at_the_batch_level_are_checked_too(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red circle\na blue square\n", encoding="utf-8")
    pool = RecordingPool()
    summary = run_batch(jobs, tmp_path / "out", defaults={"steps": 2, "height": 24}, pool=pool, progress=False)
    assert pool.lines == []
    assert all("'height' must be a multiple of 16" in summary.failures[line] for line in (1, 2))
