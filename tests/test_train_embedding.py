"""`npdiff train-embedding` end to end on the tiny random SD (tests/pipeline/tiny_sd.py): a subprocess trains a
word and writes the embedding files; the learned vectors are what npdiff.training.textual_inversion gives with
the same options; checkpoint + --resume; bad options refused with one line and status 2 before the model loads."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
sys.path.insert(0, str(Path(__file__).parent / "training"))

from test_textual_inversion import draw_pictures
from tiny_sd import tiny_sd_folder

from npdiff import cli
from npdiff.errors import NpdiffError
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.training import textual_inversion

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture
def pictures(tmp_path, rng):
    return draw_pictures(tmp_path / "pictures", rng)


def test_train_embedding_command_end_to_end(folder, pictures, tmp_path, seed):
    out = tmp_path / "disc.safetensors"
    args = ["train-embedding", str(pictures), "--token", "<disc>", "--init-word", "ball", "--vectors", "2",
            "--steps", "3", "--lr", "0.02", "--seed", str(seed), "--model", str(folder), "--out", str(out),
            "--template", "a photo of a {}", "--template", "a {} on blue", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "npdiff.cli", *args], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "learned '<disc>' (2 vector(s)) in 3 steps" in done.stdout
    for name in ("disc.safetensors", "disc-a1111.safetensors", "disc.loss.csv", "disc.loss.png"):
        assert (tmp_path / name).is_file(), name
    vectors = load_file(str(out))["<disc>"]                             # [2,C]
    np.testing.assert_array_equal(load_file(str(tmp_path / "disc-a1111.safetensors"))["emb_params"], vectors)
    expected = textual_inversion(StableDiffusionPipeline.from_pretrained(folder), pictures, "<disc>", "ball",
                                 vectors=2, steps=3, lr=0.02, seed=seed,
                                 templates=["a photo of a {}", "a {} on blue"], progress=False)
    np.testing.assert_allclose(vectors, expected.vectors, rtol=0, atol=1e-6)


def test_train_embedding_checkpoint_and_resume(folder, pictures, tmp_path, seed):
    out = tmp_path / "w.safetensors"
    common = ["train-embedding", str(pictures), "--token", "<w>", "--init-word", "cat", "--seed", str(seed),
              "--model", str(folder), "--out", str(out), "--quiet", "--lr", "0.02"]
    assert cli.main([*common, "--steps", "2", "--checkpoint-every", "1"]) == 0
    checkpoint = tmp_path / "w.checkpoint.safetensors"
    assert checkpoint.is_file()
    assert cli.main([*common, "--steps", "3", "--resume", str(checkpoint)]) == 0
    resumed = load_file(str(out))["<w>"]
    assert cli.main([*common, "--steps", "3"]) == 0
    np.testing.assert_array_equal(load_file(str(out))["<w>"], resumed)


@pytest.mark.parametrize("changes,message", [
    ({"dir": "empty"}, "no pictures"),
    ({"--steps": "0"}, "--steps must be >= 1"),
    ({"--vectors": "0"}, "--vectors must be >= 1"),
    ({"--lr": "-1"}, "learning rate must be a finite number > 0"),
    ({"--out": "missing/x.safetensors"}, "does not exist"),
    ({"--resume": "nothing.safetensors"}, "no such file"),
    ({"--token": "cat"}, "already in the tokenizer"),
    ({"--init-word": "two words"}, "is 2 tokens"),
])
def test_train_embedding_bad_options(folder, pictures, tmp_path, capsys, changes, message):
    (tmp_path / "empty").mkdir()
    options = {"dir": str(pictures), "--token": "<x>", "--init-word": "cat", "--steps": "1",
               "--out": str(tmp_path / "x.safetensors"), "--model": str(folder)}
    for key, value in changes.items():
        options[key] = value if key in ("--steps", "--vectors", "--lr", "--token", "--init-word") else str(tmp_path / value)
    args = ["train-embedding", options.pop("dir")] + [part for item in options.items() for part in item]
    assert cli.main([*args, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("npdiff: error:") and message in error, error
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("command", ["train-embedding", "train-lora"])
def test_mixed_sizes_refused_before_the_model_loads_unless_asked_for(folder, tmp_path, capsys, command):
    pictures = tmp_path / "mixed"
    pictures.mkdir()
    Image.new("RGB", (80, 64), (30, 60, 200)).save(pictures / "a.png")
    Image.new("RGB", (64, 64), (200, 60, 30)).save(pictures / "b.png")
    out = tmp_path / "x.safetensors"
    words = ["--token", "<x>", "--init-word", "cat"] if command == "train-embedding" else ["--prompt", "a photo"]
    common = [command, str(pictures), *words, "--steps", "1", "--out", str(out), "--quiet"]
    assert cli.main([*common, "--model", str(tmp_path / "no-such-model")]) == 2  # refused before the model is read
    error = capsys.readouterr().err
    assert "b.png is 64x64 pixels but a.png is 80x64" in error and "--mixed-sizes" in error, error
    assert not out.exists()
    assert cli.main([*common, "--model", str(folder), "--mixed-sizes"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("token,init_word,message", [
    ("cat", "cat", "token 'cat' is already in the tokenizer vocabulary"),
    ("<x>", "two words", "init word 'two words' is 2 tokens"),
])
def test_words_refused_from_the_tokenizer_before_the_weights_load(folder, pictures, tmp_path, capsys, monkeypatch,
                                                                   token, init_word, message):
    """Before: the token already in the vocabulary was refused only after the whole model had loaded."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the word was checked")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
    out = tmp_path / "x.safetensors"
    args = ["train-embedding", str(pictures), "--token", token, "--init-word", init_word, "--steps", "1",
            "--out", str(out), "--model", str(folder), "--quiet"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("npdiff: error:") and message in error, error
    assert not out.exists()


@pytest.mark.parametrize("command", ["train-embedding", "train-lora"])
def test_a_batch_past_the_memory_is_refused_before_the_model_loads(folder, pictures, tmp_path, capsys, monkeypatch,
                                                                   rng, command):
    """Before: --batch-size 100000 on the shipped model loaded it, read the pictures and ran out of memory after
    79 s. The estimate is a lower bound: a batch of 10**8 needs tens of TiB on any model."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the batch was checked")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
    out = tmp_path / "x.safetensors"
    words = ["--token", "<x>", "--init-word", "cat"] if command == "train-embedding" else ["--prompt", "a photo"]
    batch = int(rng.integers(10**8, 10**9))
    args = [command, str(pictures), *words, "--steps", "1", "--batch-size", str(batch), "--out", str(out),
            "--model", str(folder), "--quiet"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert re.search(rf"training on 3 picture\(s\) of (\d+)x\1 pixels, {batch} a step \(--batch-size\)", error), error
    assert "but only" in error and error.rstrip().endswith("lower --batch-size"), error
    assert not out.exists()


def test_a_batch_past_the_memory_is_refused_by_the_python_api(folder, pictures, rng):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(NpdiffError, match=r"\(batch_size\), needs more than .* lower batch_size$"):
        textual_inversion(pipe, pictures, "<x>", "cat", steps=1, batch_size=int(rng.integers(10**8, 10**9)),
                          progress=False)
    assert "<x>" not in pipe.tokenizer.get_vocab()  # refused before the word went in


def test_a_batch_larger_than_the_folder_is_drawn_with_replacement_and_said(folder, pictures, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    args = ["train-embedding", str(pictures), "--token", "<x>", "--init-word", "cat", "--steps", "1",
            "--batch-size", "5", "--out", str(out), "--model", str(folder), "--quiet"]
    assert cli.main(args) == 0
    error = capsys.readouterr().err
    assert "note: --batch-size 5 is more than the 3 picture(s)" in error and "with replacement" in error, error
    assert out.is_file()
