"""Inputs that used to escape as foreign exceptions or make a black picture with exit code 0: each is now
an NpdiffError naming the file, key, step, character or pixels (README: "What npdiff refuses, and why")."""

import json
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from helpers import time_limit  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli, model_identity, pipeline_utils  # noqa: E402
from npdiff.images import load_image, read_png_params  # noqa: E402
from npdiff.loading import load_component_weights, load_pipeline_components, open_weights  # noqa: E402
from npdiff.model_identity import model_hash  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.schedulers import make_scheduler  # noqa: E402
from npdiff.tokenizer import CLIPTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture(scope="module")
def pipe(folder):
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    loaded.show_progress = False
    return loaded


def copy_model(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


# --------------------------------------------------------------------------------------------------
# Non-finite numbers: weights at load, latents per step, the decoded picture
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component,file,bad", [("unet", "diffusion_pytorch_model.safetensors", np.nan),
                                                ("text_encoder", "model.safetensors", np.inf),
                                                ("vae", "diffusion_pytorch_model.safetensors", -np.inf)])
def test_non_finite_weight_is_refused_at_load(folder, tmp_path, rng, component, file, bad):
    model = copy_model(folder, tmp_path)
    path = model / component / file
    tensors = load_file(str(path))
    key = sorted(k for k, v in tensors.items() if v.dtype == np.float32 and v.size > 1)[int(rng.integers(0, 5))]
    flat = tensors[key].reshape(-1).copy()
    index = int(rng.integers(0, flat.size))
    flat[index] = bad
    tensors[key] = flat.reshape(tensors[key].shape)
    save_file(tensors, str(path))
    position = tuple(int(i) for i in np.unravel_index(index, tensors[key].shape))
    with pytest.raises(NpdiffError) as info:
        StableDiffusionPipeline.from_pretrained(model)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and str(position) in message
    assert f"holds {bad}" in message and "damaged" in message


def test_non_finite_latents_name_the_step(pipe, monkeypatch):
    real_unet = pipe.unet
    calls = []

    def unet_with_nan_on_the_second_call(sample, timestep, context):
        out = real_unet(sample, timestep, context)
        calls.append(1)
        if len(calls) == 2:
            out = out.copy()
            out[0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(pipe, "unet", type("U", (), {"__call__": staticmethod(unet_with_nan_on_the_second_call),
                                                    "config": real_unet.config})())
    monkeypatch.setattr(pipe, "scheduler", make_scheduler("euler", pipe.scheduler_config))  # one call per step
    with pytest.raises(NpdiffError, match=r"sampling step 2 of 3 \(timestep \d+\) produced NaN or infinite latents"):
        pipe("a cat", num_inference_steps=3, guidance_scale=1.0, seed=0)


def test_non_finite_decoded_picture_is_an_error(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "decode_latents", lambda latents: np.full((1, 3, 64, 64), np.inf, np.float32))
    with pytest.raises(NpdiffError, match="the VAE decoded NaN or infinite values"):
        pipe("a cat", num_inference_steps=1, seed=0)


# --------------------------------------------------------------------------------------------------
# Config values (the full table of rules is exercised by tests/test_fuzz_inputs.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component,file,change,message", [
    ("vae", "config.json", {"scaling_factor": 0}, "scaling_factor must be a finite number > 0, got 0"),
    ("vae", "config.json", {"scaling_factor": float("nan")}, "scaling_factor must be a finite number > 0, got nan"),
    ("unet", "config.json", {"norm_eps": -1}, "norm_eps must be a finite number > 0 and <= 1, got -1"),
    ("unet", "config.json", {"norm_num_groups": 0}, "norm_num_groups must be an integer >= 1, got 0"),
    ("unet", "config.json", {"norm_num_groups": 3}, "norm_num_groups must divide every block_out_channels"),
    ("unet", "config.json", {"block_out_channels": []}, "block_out_channels must be a non-empty list"),
    ("unet", "config.json", {"attention_head_dim": 0}, "attention_head_dim must be an integer >= 1 or a per-block"),
    ("unet", "config.json", {"attention_head_dim": 3}, "attention_head_dim (the head count) must divide"),
    ("unet", "config.json", {"layers_per_block": [1, 2]}, "layers_per_block has 2 entries; block_out_channels has 3"),
    ("unet", "config.json", {"flip_sin_to_cos": "yes"}, "flip_sin_to_cos must be true or false, got 'yes'"),
    ("text_encoder", "config.json", {"hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
    ("text_encoder", "config.json", {"layer_norm_eps": 0.0}, "layer_norm_eps must be a finite number > 0"),
    ("text_encoder", "config.json", {"num_attention_heads": 3}, "num_attention_heads must divide hidden_size"),
    ("scheduler", "scheduler_config.json", {"beta_start": -1}, "beta_start must be a finite number > 0"),
    ("scheduler", "scheduler_config.json", {"beta_start": 0.5, "beta_end": 0.1}, "beta_start 0.5 is above beta_end"),
    ("scheduler", "scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps must be an integer >= 1"),
])
def test_bad_config_values_name_file_and_key(folder, tmp_path, component, file, change, message):
    model = copy_model(folder, tmp_path)
    path = model / component / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(NpdiffError) as info:
        StableDiffusionPipeline.from_pretrained(model)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


# --------------------------------------------------------------------------------------------------
# Prompts and pictures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,message", [
    ("a \ud800 cat", r"prompt has a lone surrogate '\\ud800' \(U\+D800\) at character 2"),
    (b"a cat", r"prompt must be text \(str\), got bytes b'a cat'; decode it first"),
    (["ok", b"\xffdog".decode("utf-8", "surrogateescape")], "prompt 1 has byte 0xff that is not UTF-8 at character 0"),
])
def test_bad_prompt_text(pipe, prompt, message):
    with pytest.raises(NpdiffError, match=message):
        pipe(prompt, num_inference_steps=1)
    with pytest.raises(NpdiffError, match="negative_prompt has a lone surrogate"):
        pipe("ok", negative_prompt="\udfff", num_inference_steps=1)


def test_cli_prompt_in_another_encoding(folder, tmp_path, capsys):
    prompt = "caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape")  # what Python makes of such argv
    assert cli.main(["generate", prompt, "--model", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    assert "npdiff: error: prompt has byte 0xe9 that is not UTF-8 at character 3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def png_bytes(size=(64, 64), mode="RGB"):
    import io

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_picture_files(tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a picture")
    with pytest.raises(NpdiffError, match=r"corrupt\.png: not a picture PIL can read"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes((256, 256))[:200])
    with pytest.raises(NpdiffError, match=r"truncated\.png: corrupt or truncated picture file"):
        load_image(truncated)
    deep = tmp_path / "deep.png"
    deep.write_bytes(png_bytes(mode="I;16"))
    with pytest.raises(NpdiffError, match=r"deep\.png: mode 'I;16' \(64x64 pixels\) is not an 8-bit picture"):
        load_image(deep)
    with pytest.raises(NpdiffError, match="no such file .it is a folder"):
        load_image(tmp_path)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes((64, 64)))  # 4096 pixels
    for limit in (3000, 1000):  # PIL warns above the limit and raises above twice the limit: both refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(NpdiffError, match=rf"bomb\.png: refusing a decompression bomb .*limit is {limit}"):
                load_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    picture = load_image(bomb)
    assert picture.mode == "RGB" and picture.size == (64, 64)


def test_cli_corrupt_picture_is_one_line(folder, tmp_path, capsys):
    corrupt = tmp_path / "in.png"
    corrupt.write_bytes(png_bytes()[:60])
    assert cli.main(["img2img", "x", "--image", str(corrupt), "--model", str(folder),
                     "--out", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npdiff: error: image ") and len(err.strip().splitlines()) == 1
    assert "loaded model" not in err


def test_img2img_sizes_in_pixels(pipe):
    with pytest.raises(NpdiffError, match=r"image: 16x16 pixels is smaller than 32x32, the least picture"):
        pipe.img2img("x", Image.new("RGB", (16, 16)), num_inference_steps=2)
    with pytest.raises(NpdiffError, match=r"image: mode 'F' \(40x40 pixels\) is not an 8-bit picture"):
        pipe.img2img("x", Image.new("F", (40, 40)), num_inference_steps=2)
    out = pipe.img2img("x", Image.new("RGB", (72, 40)), num_inference_steps=2, strength=0.5, output_type="np")
    assert out.images.shape == (1, 32, 64, 3)  # rounded down to multiples of 32 pixels, the UNet can take them


# --------------------------------------------------------------------------------------------------
# Tokenizer files, textual inversion, shards, folder listings
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", ["[1, 2", '{"a": "b"}', "[1, 2]", ""])
def test_garbage_vocab_json(folder, tmp_path, vocab):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(folder / "tokenizer", tokenizer)
    (tokenizer / "vocab.json").write_text(vocab)
    with pytest.raises(NpdiffError, match=r"the tokenizer files in .*tokenizer cannot be read|"
                                          r"'<\|startoftext\|>' is not in the vocabulary of .*tokenizer"):
        CLIPTokenizer.from_pretrained(tokenizer)


def test_pickle_renamed_as_textual_inversion(pipe, tmp_path):
    import torch

    path = tmp_path / "learned_embeds.safetensors"
    torch.save({"<cat>": torch.ones(32)}, str(path))
    with pytest.raises(NpdiffError, match=r"learned_embeds\.safetensors is not a readable safetensors file.*"
                                          r"PyTorch zip checkpoint"):
        pipe.load_textual_inversion(path)
    save_file({"<cat>": np.full(32, np.nan, np.float32)}, str(path))
    with pytest.raises(NpdiffError, match=r"'<cat>' in .*learned_embeds\.safetensors holds nan at index \(0,\)"):
        pipe.load_textual_inversion(path)


def test_shard_names_are_plain_file_names_of_the_folder(tmp_path):
    """A name read from an index is not a path; the entry it names may be a link, like any file of a model
    folder (the Hugging Face cache links every shard into ../../blobs)."""
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(outside))
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    save_file({"w": np.ones(2, np.float32)}, str(model / "sub" / "inside.safetensors"))
    for shard in ("../elsewhere.safetensors", str(outside), "sub/inside.safetensors", "sub\\inside.safetensors",
                  ".", "", 7, None, ["a"]):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(NpdiffError, match=r"model\.safetensors\.index\.json: key 'w' names shard"):
            load_component_weights(model)
    os.symlink(outside, model / "link.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "link.safetensors"}}))
    assert load_component_weights(model).keys() == ["w"]
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "absent.safetensors"}}))
    with pytest.raises(NpdiffError, match=r"missing file: .*absent\.safetensors \(shard named by model\."):
        load_component_weights(model)


def make_special(path, kind):
    """Replace `path` (file or folder) with a FIFO, a link to /dev/null, a symlink loop or a dangling link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.symlink("/dev/null", path)
    elif kind == "loop":
        os.symlink(path.name, path)  # a link to itself
    elif kind == "dangling":
        os.symlink(path.name + ".gone", path)


SPECIAL_MESSAGES = {"fifo": r"is a FIFO \(named pipe\); npdiff reads only regular files",
                    "device": "is a character device", "loop": "is a symlink loop",
                    "dangling": r"is a symlink to '.*\.gone', which does not exist"}


@pytest.mark.parametrize("where,kind", [
    ("unet/config.json", "fifo"), ("unet/diffusion_pytorch_model.safetensors", "device"),
    ("text_encoder/model.safetensors", "fifo"), ("vae/diffusion_pytorch_model.safetensors", "dangling"),
    ("tokenizer/vocab.json", "loop"), ("tokenizer/tokenizer_config.json", "fifo"), ("vae", "loop"),
    ("scheduler/scheduler_config.json", "fifo"), ("model_index.json", "device"), ("unet", "dangling"),
])
def test_special_files_in_a_model_folder_are_refused_by_name(folder, tmp_path, where, kind):
    """Loops, FIFOs, devices and dangling links are named, never followed into a hang or a wrong message."""
    model = copy_model(folder, tmp_path)
    make_special(model / where, kind)
    pattern = re.escape(str(model / where)) + r" \(.*\) " + SPECIAL_MESSAGES[kind]
    with time_limit("a special file in a model folder", 20):
        with pytest.raises(NpdiffError, match=pattern):
            StableDiffusionPipeline.from_pretrained(model)
        if where.endswith("safetensors") or "/" not in where and where != "model_index.json":
            with pytest.raises(NpdiffError, match=pattern):
                model_hash(model)


@pytest.mark.parametrize("kind", ["fifo", "device", "loop"])
def test_a_special_file_given_as_the_model_is_refused(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    make_special(path, kind)
    with time_limit("a special file in a model folder", 20):
        for call in (load_pipeline_components, model_hash, open_weights):
            with pytest.raises(NpdiffError, match=SPECIAL_MESSAGES[kind]):
                call(path)


def test_messages_never_list_a_folder(tmp_path):
    (tmp_path / "private-diary.txt").write_text("x")
    (tmp_path / "component").mkdir()
    (tmp_path / "component" / "tax-return.pdf").write_text("x")
    for call in (lambda: load_pipeline_components(tmp_path), lambda: load_component_weights(tmp_path / "component")):
        with pytest.raises(NpdiffError) as info:
            call()
        assert "diary" not in str(info.value) and "tax" not in str(info.value)


def test_damaged_tokenizer_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = pipeline_utils.tokenizer_cache_folder()
    first = pipeline_utils._tokenizer_from_openai_clip()
    assert (cache / "vocab.json").is_file() and first("a cat").shape == (1, 77)
    (cache / "vocab.json").write_text('{"damaged": ')
    with pytest.warns(UserWarning, match="tokenizer cache .* is damaged"):
        second = pipeline_utils._tokenizer_from_openai_clip()
    assert np.array_equal(second("a cat"), first("a cat"))
    (cache / "merges.txt").unlink()  # a half-written cache from an older npdiff
    with pytest.warns(UserWarning, match="rebuilding it"):
        pipeline_utils._tokenizer_from_openai_clip()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["clip-tokenizer"]  # no temporary folders left


# --------------------------------------------------------------------------------------------------
# The cache folder: never /.cache at the root, never the user's during tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("home", ["", "/", "relative/home"])
def test_cache_folder_without_a_usable_home(tmp_path, monkeypatch, home):
    """HOME= (empty) made Path.home() "/": the caches went to /.cache/npdiff. Now a private folder in the
    temporary directory, with a warning."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", home)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr("npdiff.cache_folder._fallback", None)
    with pytest.warns(UserWarning, match="neither XDG_CACHE_HOME nor HOME names a usable folder"):
        tokenizer_cache = pipeline_utils.tokenizer_cache_folder()
    private = tmp_path / f"npdiff-cache-{os.getuid()}"
    assert tokenizer_cache == private / "clip-tokenizer" and model_identity.cache_path() == private / "hashes.json"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700


def test_cache_folder_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rule: a relative path is ignored
    assert model_identity.cache_path() == tmp_path / "home" / ".cache" / "npdiff" / "hashes.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline_utils.tokenizer_cache_folder("!") == tmp_path / "xdg" / "npdiff" / "clip-tokenizer-sd2"
    # a shared temporary folder someone else could write into is not used: a fresh one instead
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr("npdiff.cache_folder._fallback", None)
    shared = tmp_path / f"npdiff-cache-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.warns(UserWarning):
        chosen = model_identity.cache_path().parent
    assert chosen != shared and chosen.parent == tmp_path and stat.S_IMODE(os.stat(chosen).st_mode) == 0o700


def test_the_test_session_never_uses_the_users_cache(tmp_path_factory):
    """tests/conftest.py points XDG_CACHE_HOME and HOME into the session's temporary folder."""
    base = tmp_path_factory.getbasetemp()
    for path in (model_identity.cache_path(), pipeline_utils.tokenizer_cache_folder(), Path.home()):
        assert base in path.parents, path


def test_cli_generate_with_linked_component_folders(folder, tmp_path):
    """A folder sharing its UNet and VAE with another model by links: `npdiff generate` failed at the end of
    loading ("model hash: ... holds no .safetensors files"); now it works and its PNG names the same hash."""
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked, ignore=shutil.ignore_patterns("unet", "vae"))
    for name in ("unet", "vae"):
        os.symlink(folder / name, linked / name)
    out = tmp_path / "linked.png"
    assert cli.main(["generate", "a cat", "--model", str(linked), "--steps", "1", "--seed", "3",
                     "--out", str(out)]) == 0
    assert read_png_params(out)["model_hash"] == model_hash(folder)
