"""The command line: `npdiff generate` in a subprocess writes a PNG whose stored parameters make the same
picture again; img2img, error messages and `npdiff verify` (its table can also fail) in-process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from helpers import pixels  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli, verify  # noqa: E402
from npdiff.images import read_png_params  # noqa: E402
from npdiff.model_identity import model_hash  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402


def npdiff_command():
    """The installed `npdiff` script beside this Python, else `python -m npdiff.cli`."""
    script = Path(sys.executable).parent / "npdiff"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "npdiff.cli"]


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def test_generate_subprocess_png_reproduces_itself(folder, tmp_path, seed):
    out = tmp_path / "circle.png"
    args = ["generate", "a red circle, 東京", "--model", str(folder), "--steps", "3", "--seed", str(seed),
            "--sampler", "euler_a", "--negative", "blurry", "--guidance", "6.5", "--height", "64", "--width", "32",
            "--out", str(out), "--save-steps", "1"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    first = subprocess.run(npdiff_command() + args, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "loaded model" in first.stderr and "denoising" in first.stderr

    params = read_png_params(out)
    assert params["prompt"] == "a red circle, 東京" and params["negative_prompt"] == "blurry"
    assert (params["seed"], params["steps"], params["sampler"], params["guidance_scale"]) == (seed, 3, "euler_a", 6.5)
    assert (params["height"], params["width"]) == (64, 32) and params["npdiff_version"]
    # the model by name and hash only: no local path (npdiff.model_identity; tests/test_png_metadata.py)
    assert params["model"] == Path(folder).name and params["model_hash"] == model_hash(folder)
    assert "model_path" not in params
    assert pixels(out).shape == (64, 32, 3)

    # the "watch it emerge" grid: steps 0, 1, 2 (the last is the final picture), enlarged 2x to >= 128 px
    grid = tmp_path / "circle-steps.png"
    assert pixels(grid).shape == (128, 3 * 64, 3)

    # regenerate from the PNG alone
    again = tmp_path / "again.png"
    second = subprocess.run(npdiff_command() + ["generate", "--reproduce", str(out), "--model", str(folder),
                                                "--out", str(again)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert np.array_equal(pixels(again), pixels(out))
    assert read_png_params(again) == params

    # and the library gives the same picture
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler_a")
    pipe.show_progress = False
    library = pipe("a red circle, 東京", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.5,
                   height=64, width=32, seed=seed)
    assert np.array_equal(np.asarray(library.images[0]), pixels(out))


def test_img2img_command_and_reproduce(folder, tmp_path, rng, capsys):
    source = tmp_path / "source.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "changed.png"
    code = cli.main(["img2img", "two squares", "--image", str(source), "--strength", "0.5", "--steps", "4",
                     "--seed", "3", "--model", str(folder), "--out", str(out)])
    assert code == 0
    params = read_png_params(out)
    assert params["command"] == "img2img" and params["strength"] == 0.5
    assert "image" not in params  # no local path: reproducing img2img takes --image again
    assert cli.main(["img2img", "--reproduce", str(out), "--model", str(folder)]) == 2
    assert "a PNG stores no picture path" in capsys.readouterr().err
    again = tmp_path / "again.png"
    assert cli.main(["img2img", "--reproduce", str(out), "--image", str(source), "--model", str(folder),
                     "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


@pytest.mark.parametrize("args,message", [
    (["generate"], "no prompt given"),
    (["generate", "x", "--sampler", "dpmpp_sde"], "unknown scheduler 'dpmpp_sde'; known:"),
    (["generate", "x", "--height", "60"], "height must be a multiple of 32 pixels"),
    (["generate", "x", "--height", "99999999999999999999"],  # no 'try 99999999999999999984' for an impossible size
     "height must be at most 8192 pixels (the largest side npdiff accepts), got 99999999999999999999\n"),
    (["generate", "x", "--steps", "0"], "num_inference_steps must be an integer >= 1, got 0"),
    (["img2img", "x"], "img2img needs --image"),
    (["img2img", "x", "--image", "/no/such/picture.png"], "no such file"),
    (["generate", "--reproduce", "/no/such.png"], "no such file"),
])
def test_command_errors(folder, capsys, args, message):
    assert cli.main(args + ["--model", str(folder)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["img2img", "inpaint"])
def test_a_picture_past_the_side_limit_is_refused_before_the_model_loads(tmp_path, capsys, command):
    from PIL import Image

    picture = tmp_path / "wide.png"
    Image.new("RGB", (9000, 16), (200, 20, 20)).save(picture)
    mask = ["--mask", str(picture)] if command == "inpaint" else []
    missing_model = tmp_path / "no-model"  # the refusal must come first: no model is loaded, none exists here
    assert cli.main([command, "x", "--image", str(picture), *mask, "--model", str(missing_model)]) == 2
    err = capsys.readouterr().err
    assert "the picture is 9000x16 pixels" in err and "width must be at most 8192 pixels" in err
    Image.new("RGB", (8192 + 63, 16)).save(picture)  # rounds down to 8192 under every model's size rule: not refused
    assert cli.main([command, "x", "--image", str(picture), *mask, "--model", str(missing_model)]) == 2
    assert "the picture is" not in capsys.readouterr().err  # it went on to the (missing) model


def test_an_impossible_side_is_refused_before_the_model_loads(folder, capsys):
    assert cli.main(["generate", "x", "--width", "1048576", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "width must be at most 8192 pixels (the largest side npdiff accepts), got 1048576" in err
    assert "loaded model" not in err


def test_generate_empty_model_folder(tmp_path, capsys):
    assert cli.main(["generate", "x", "--model", str(tmp_path)]) == 2
    assert "expected a diffusers folder" in capsys.readouterr().err


def test_verify_prints_every_block_within_tolerance(folder, capsys):
    assert cli.main(["verify", "--model", str(folder), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    table = capsys.readouterr().out
    for row in ["identical ids", "layer 1", "last_hidden_state", "time_embedding", "down_blocks.2", "mid_block",
                "up_blocks.2", "noise prediction", "encoder.down_blocks.3", "decoder.up_blocks.3",
                "posterior mean", "final latents", "8-bit picture", "all within tolerance"]:
        assert row in table, f"verify table lacks {row!r}:\n{table}"
    assert "ABOVE" not in table


class NoisyBlock:
    """A block that adds 1% noise to its output: verify must flag it and everything after it."""

    def __init__(self, block):
        self.block = block

    def __call__(self, *args):
        out = self.block(*args)
        return out + 0.01 * np.std(out) * np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)

    def __getattr__(self, name):
        return getattr(self.block, name)


def test_verify_flags_a_wrong_block(folder, monkeypatch, capsys):
    original = StableDiffusionPipeline.from_pretrained.__func__

    def with_noisy_mid_block(cls, *args, **kwargs):
        pipe = original(cls, *args, **kwargs)
        pipe.unet.mid_block = NoisyBlock(pipe.unet.mid_block)
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(with_noisy_mid_block))
    assert verify.verify_model(folder, steps=1, height=32, width=32) == 1
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("unet")}
    assert "ok" in rows["down_blocks.2"]
    assert "ABOVE" in rows["mid_block"] and "ABOVE" in rows["up_blocks.0"]


def test_verify_without_torch_says_what_to_install(folder, monkeypatch, capsys):
    real_find_spec = verify.importlib.util.find_spec
    monkeypatch.setattr(verify.importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real_find_spec(name, *a))
    assert cli.main(["verify", "--model", str(folder)]) == 2
    assert "needs diffusers, which is not installed: pip install" in capsys.readouterr().err


def test_a_lazily_opened_truncated_picture_is_an_npdiff_error(folder, tmp_path, rng):
    """PIL opens lazily: a truncated file fails only when decoded, inside the pipeline; that is an NpdiffError
    naming the file, not an OSError (for the picture and for the mask)."""
    whole = tmp_path / "whole.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.show_progress = False
    with Image.open(truncated) as picture, pytest.raises(NpdiffError, match="truncated.png is a corrupt or truncated"):
        pipe.img2img("x", picture, num_inference_steps=2, seed=1)
    with Image.open(whole) as picture, Image.open(truncated) as mask:
        with pytest.raises(NpdiffError, match="mask_image: .*truncated.png is a corrupt or truncated"):
            pipe.inpaint("x", picture, mask, num_inference_steps=2, seed=1)
