"""What a PNG says about its picture: AUTOMATIC1111's "parameters" text beside npdiff's JSON, read by a real
third-party reader (sd-parsers); the model by name and hash, never a local path; --reproduce from npdiff's
and from hand-written AUTOMATIC1111 pictures, never opening a path it read; the model hash and its cache."""

import hashlib
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from helpers import pixels, write_png  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli, model_identity, pipeline  # noqa: E402
from npdiff.images import read_png_params, save_png  # noqa: E402
from npdiff.infotext import format_infotext, parse_infotext, quote  # noqa: E402
from npdiff.model_identity import model_hash  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def text_chunks(path):
    with Image.open(path) as picture:
        picture.load()
        return dict(picture.text)


def generate(folder, out, *extra):
    args = ["generate", "a red circle, big", "--model", str(folder), "--steps", "3", "--seed", "5",
            "--negative", "blurry: dark", "--guidance", "6.5", "--height", "32", "--width", "64",
            "--out", str(out), *extra]
    assert cli.main(args) == 0
    return out


# ---------------------------------------------------------------------------------------------
# The text format
# ---------------------------------------------------------------------------------------------
def test_infotext_format_and_parse_round_trip():
    params = {"prompt": "a cat, sitting: on a mat", "negative_prompt": "blurry, \"dark\"", "steps": 20,
              "sampler": "dpmpp_2m_karras", "guidance_scale": 7.25, "seed": 4294967297, "width": 512,
              "height": 768, "model": "v1-5, pruned", "model_hash": "6ce0161689", "strength": 0.75,
              "npdiff_version": "0.1.0"}
    text = format_infotext(params)
    assert text.splitlines() == [
        "a cat, sitting: on a mat",
        'Negative prompt: blurry, "dark"',
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.25, Seed: 4294967297, Size: 512x768, '
        'Model hash: 6ce0161689, Model: "v1-5, pruned", Denoising strength: 0.75, Version: npdiff 0.1.0']
    back = parse_infotext(text)
    assert back.pop("unmapped") == []
    assert back.pop("mode") == "img2img"  # a Denoising strength without hires fix: an img2img picture
    assert back == {key: value for key, value in params.items() if key != "npdiff_version"}
    # AUTOMATIC1111's quote(): only values with a comma, colon or newline become JSON strings
    assert quote("Euler a") == "Euler a" and quote("a: b") == '"a: b"' and quote('x, "y"') == '"x, \\"y\\""'
    # no negative prompt: no line, as AUTOMATIC1111 writes it
    assert format_infotext(dict(params, negative_prompt="")).count("\n") == 1


def test_infotext_loras_vae_and_every_sampler_name():
    loras = [{"name": "shapes", "scale": 0.8, "sha256": "0123456789ab"},
             {"name": "ink", "scale": 1.0, "sha256": "ba9876543210"}]
    text = format_infotext({"prompt": "a square", "steps": 4, "sampler": "euler_a", "guidance_scale": 7.0,
                            "seed": 1, "width": 64, "height": 64, "loras": loras, "vae": "ft-mse"})
    first, settings = text.splitlines()
    assert first == "a square <lora:shapes:0.8> <lora:ink:1>"
    assert 'Lora hashes: "shapes: 0123456789ab, ink: ba9876543210"' in settings and "VAE: ft-mse" in settings
    assert "CFG scale: 7," in settings and "Sampler: Euler a," in settings
    back = parse_infotext(text)
    assert back["prompt"] == "a square" and back["sampler"] == "euler_a"
    assert back["unmapped"] == [] and back["vae"] == "ft-mse" and back["loras"] == loras
    for name in ["pndm", "ddim", "ddpm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]:
        line = format_infotext({"prompt": "x", "steps": 2, "sampler": name, "seed": 0})
        assert parse_infotext(line)["sampler"] == name


def test_infotext_from_other_tools():
    webui_19 = ("masterpiece, (red:1.2) circle\nwith a second line\nNegative prompt: blurry\n"
                "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
                "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Hires upscale: 2, "
                "ENSD: 31337, Version: v1.9.4")
    params = parse_infotext(webui_19)
    assert params["prompt"] == "masterpiece, (red:1.2) circle\nwith a second line"
    assert (params["sampler"], params["steps"], params["guidance_scale"], params["seed"]) == \
        ("dpmpp_2m_karras", 25, 7.0, 123)
    assert params["unmapped"] == ["ENSD: 31337"]
    assert (params["clip_skip"], params["hires_scale"], params["prompt_syntax"]) == (1, 2.0, "a1111")
    # a sampler npdiff lacks is kept for the caller (a problem only when no --sampler is given)
    assert parse_infotext("x\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1")["unsupported_sampler"] == \
        "DPM++ SDE"
    assert parse_infotext("x\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1")[
        "unsupported_sampler"] == "Euler a, Schedule type: Karras"
    with pytest.raises(NpdiffError, match="'Seed: abc' is not a int"):
        parse_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: abc")
    # fewer than three settings: all of it is prompt, as AUTOMATIC1111 reads it
    assert parse_infotext("just: a prompt") == {"prompt": "just: a prompt", "negative_prompt": "", "unmapped": [],
                                                "prompt_syntax": "a1111"}


# ---------------------------------------------------------------------------------------------
# The PNG a generate run writes
# ---------------------------------------------------------------------------------------------
def test_png_is_read_by_sd_parsers_and_holds_no_path(folder, tmp_path, rng):
    from sd_parsers import ParserManager

    out = generate(folder, tmp_path / "out.png", "--sampler", "euler_a")
    info = ParserManager().parse(str(out))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert info.full_prompt == "a red circle, big" and info.full_negative_prompt == "blurry: dark"
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"cfg_scale": "6.5", "seed": "5", "steps": "3"}
    assert (sampler.model.name, sampler.model.hash) == (Path(folder).name, model_hash(folder))
    assert info.metadata["Size"] == "64x32"

    # img2img too: neither the model's nor the input picture's path, nor the home folder, in any text chunk
    source = tmp_path / "private-input.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    changed = tmp_path / "changed.png"
    assert cli.main(["img2img", "two squares", "--image", str(source), "--strength", "0.5", "--steps", "2",
                     "--seed", "3", "--model", str(folder), "--out", str(changed)]) == 0
    assert "Denoising strength: 0.5" in text_chunks(changed)["parameters"]
    for picture in (out, changed):
        chunks = text_chunks(picture)
        assert set(chunks) == {"npdiff", "parameters"}
        everything = "\n".join(chunks.values())
        for private in (str(Path(folder).resolve()), str(tmp_path), str(Path.home()), "private-input", "/tmp/"):
            assert private not in everything, f"{private!r} leaked into {picture.name}'s metadata"
        stored = read_png_params(picture)
        assert "model_path" not in stored and "image" not in stored and stored["model_hash"] == model_hash(folder)


def test_reproduce_from_the_a1111_text_alone_gives_the_same_pixels(folder, tmp_path):
    out = generate(folder, tmp_path / "out.png", "--sampler", "dpmpp_2m_karras")
    only_a1111 = write_png(tmp_path / "a1111.png", {"parameters": text_chunks(out)["parameters"]})
    assert "unmapped" in read_png_params(only_a1111)  # read from the text, not from npdiff's JSON
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(only_a1111), "--model", str(folder), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    assert read_png_params(again)["sampler"] == "dpmpp_2m_karras"


def test_reproduce_a_hand_written_webui_png(folder, tmp_path, capsys):
    text = ("a blue square\nNegative prompt: blurry, dark\n"
            "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 77, Size: 32x64, "
            "Model hash: 0123456789, Model: v1-5-pruned-emaonly, ENSD: 31337, Version: v1.9.4")
    webui = write_png(tmp_path / "00001-77.png", {"parameters": text}, size=(32, 64))
    out = tmp_path / "ours.png"
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not reproduced (npdiff has no such setting): ENSD: 31337" in err
    assert "made with model 'v1-5-pruned-emaonly' (hash 0123456789)" in err and "warning" in err
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler_a")
    pipe.show_progress = False
    library = pipe("a blue square", negative_prompt="blurry, dark", num_inference_steps=3, guidance_scale=5.5,
                   height=64, width=32, seed=77)
    assert np.array_equal(np.asarray(library.images[0]), pixels(out))
    # a sampler npdiff lacks stops before any model is loaded, naming it, unless --sampler is given
    sde = write_png(tmp_path / "sde.png", {"parameters": text.replace("Euler a", "DPM++ SDE")})
    assert cli.main(["generate", "--reproduce", str(sde), "--model", str(folder)]) == 2
    assert "made with sampler 'DPM++ SDE', which npdiff does not have: pass --sampler" in capsys.readouterr().err


def test_reproduce_never_opens_a_path_from_the_png(folder, tmp_path, monkeypatch, capsys):
    out = generate(folder, tmp_path / "out.png")
    capsys.readouterr()
    decoy = tmp_path / "decoy-model"
    decoy.mkdir()
    decoy_picture = tmp_path / "decoy.png"
    tampered_params = dict(read_png_params(out), model_path=str(decoy), image=str(decoy_picture),
                           model_hash="ffffffffff")
    tampered = write_png(tmp_path / "tampered.png", {"npdiff": json.dumps(tampered_params)})
    opened = []
    real_load, real_open = pipeline.load_components, Image.open
    monkeypatch.setattr(pipeline, "load_components", lambda path, **kw: opened.append(Path(path)) or
                        real_load(path, **kw))
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: opened.append(Path(fp)) or real_open(fp, *a, **kw))
    monkeypatch.setenv("NPDIFF_MODEL", str(folder))  # no --model: the default model, not the PNG's path
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(tampered), "--out", str(again)]) == 0
    assert decoy not in opened and decoy_picture not in opened and Path(folder) in opened
    assert np.array_equal(pixels(again), pixels(out))
    assert f"hash ffffffffff), but the model loaded is '{Path(folder).name}'" in capsys.readouterr().err
    # img2img: the picture must be given again
    assert cli.main(["img2img", "--reproduce", str(tampered)]) == 2
    assert "a PNG stores no picture path" in capsys.readouterr().err
    assert decoy_picture not in opened


# ---------------------------------------------------------------------------------------------
# Bad PNGs given to --reproduce
# ---------------------------------------------------------------------------------------------
def png_with_header(path, width, height):
    """A PNG file whose header declares width x height, with a token pixel stream (never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"a string"', "holds a JSON str, not an object"),
    ("{not json", "not valid JSON"),
])
def test_bad_npdiff_chunk_is_an_npdiff_error(tmp_path, content, message):
    path = write_png(tmp_path / "bad.png", {"npdiff": content})
    with pytest.raises(NpdiffError, match=message):
        read_png_params(path)
    assert cli.main(["generate", "--reproduce", str(path)]) == 2


def test_bomb_corrupt_and_foreign_files_are_npdiff_errors(tmp_path):
    bomb = png_with_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(NpdiffError, match="too large to be safe"):
        read_png_params(bomb)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(write_png(tmp_path / "ok.png", {"npdiff": "{}"}).read_bytes()[:30])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(256))
    for path in (truncated, garbage):
        with pytest.raises(NpdiffError, match="not a readable PNG"):
            read_png_params(path)
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    with pytest.raises(NpdiffError, match="is a JPEG picture, not a PNG"):
        read_png_params(jpeg)


# ---------------------------------------------------------------------------------------------
# Model identity and its cache
# ---------------------------------------------------------------------------------------------
def test_model_hash_of_a_folder_ignores_files_beside_model_index(folder, tmp_path):
    """A LoRA kept at the top of a diffusers folder (as weights/tiny-shapes/lcm-lora.safetensors) does
    not change the folder's model hash; a component's weights do."""
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    before = model_hash(model)
    (model / "lcm-lora.safetensors").write_bytes(os.urandom(1 << 10))
    assert model_hash(model) == before
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(1 << 10))
    assert model_hash(model) != before


def test_model_hash_file_folder_and_cache(folder, tmp_path, monkeypatch, hash_cache):
    weights = tmp_path / "my-model.safetensors"
    weights.write_bytes(os.urandom(3 << 20))
    assert model_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]  # A1111's shorthash
    assert model_identity.model_name(weights) == "my-model"
    files = sorted(Path(folder).rglob("*.safetensors"), key=lambda p: p.relative_to(folder).as_posix())
    joined = "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert model_hash(folder) == hashlib.sha256(joined.encode()).hexdigest()[:10]

    # the cache: a second call reads nothing; a changed file is hashed again; a damaged cache is rebuilt
    hashed = []
    real = model_identity.sha256_of_file
    monkeypatch.setattr(model_identity, "sha256_of_file", lambda p: hashed.append(p) or real(p))
    first = model_hash(weights)
    assert hashed == []
    cached = json.loads(hash_cache.read_text())["files"][str(weights.resolve())]
    assert cached["size"] == 3 << 20 and cached["sha256"].startswith(first)
    weights.write_bytes(os.urandom(3 << 20))
    os.utime(weights, ns=(1, 1))
    assert model_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10] != first
    assert len(hashed) == 1
    hash_cache.write_text("{damaged")
    assert model_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert json.loads(hash_cache.read_text())["version"] == 1
    assert not [p for p in hash_cache.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    with pytest.raises(NpdiffError, match="no such file or folder"):
        model_hash(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NpdiffError, match="has no unet/ folder"):  # the hash covers what a load reads
        model_hash(empty)


def test_save_png_keeps_non_latin_prompts_in_both_chunks(tmp_path):
    params = {"prompt": "東京の猫, Москва", "negative_prompt": "", "seed": 1, "steps": 2, "sampler": "euler",
              "guidance_scale": 7.5, "height": 8, "width": 8, "model": "tiny", "model_hash": "0123456789"}
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", params)
    assert read_png_params(path) == params
    assert parse_infotext(text_chunks(path)["parameters"])["prompt"] == "東京の猫, Москва"


def test_prediction_type_option_is_stored_and_reproduced(folder, tmp_path):
    """--prediction-type (SD 2.x base models: epsilon) replaces the model's; --reproduce takes it from the PNG."""
    out = generate(folder, tmp_path / "v.png", "--prediction-type", "v_prediction", "--sampler", "ddim")
    assert read_png_params(out)["prediction_type"] == "v_prediction"
    plain = generate(folder, tmp_path / "eps.png", "--sampler", "ddim")
    assert "prediction_type" not in read_png_params(plain)
    assert not np.array_equal(pixels(out), pixels(plain))
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


def test_reproduce_warns_about_loras_not_given_again(folder, tmp_path, capsys):
    """The PNG names its LoRAs (name, scale, hash), never a path: --reproduce says which are missing."""
    made = generate(folder, tmp_path / "made.png")
    params = dict(read_png_params(made), loras=[{"name": "style", "scale": 0.8, "sha256": "0123456789ab"}])
    with Image.open(made) as picture:
        save_png(picture, tmp_path / "with-lora.png", params)
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(tmp_path / "with-lora.png"), "--model", str(folder),
                     "--out", str(again)]) == 0
    assert "was made with LoRA style (scale 0.8, hash 0123456789ab), which is not given" in capsys.readouterr().err
    assert cli.main(["generate", "--reproduce", str(made), "--model", str(folder), "--out", str(again)]) == 0
    assert "LoRA" not in capsys.readouterr().err


def test_eta_is_stored_and_a_tcd_picture_redraws_byte_for_byte(folder, tmp_path):
    """eta changes TCD's (and DDIM's) pixels: it is stored in both chunks and --reproduce reads it back."""
    out = generate(folder, tmp_path / "tcd.png", "--sampler", "tcd", "--eta", "0.3")
    params = read_png_params(out)
    assert params["eta"] == 0.3 and params["sampler"] == "tcd"
    assert "Eta: 0.3" in text_chunks(out)["parameters"]
    assert parse_infotext(text_chunks(out)["parameters"])["eta"] == 0.3
    plain = generate(folder, tmp_path / "tcd0.png", "--sampler", "tcd")
    assert not np.array_equal(pixels(out), pixels(plain))  # eta made a difference worth recording
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    # DDIM's eta is "Eta DDIM" in webui's text; read back too
    assert "Eta DDIM: 0.5" in format_infotext({"prompt": "x", "sampler": "ddim", "eta": 0.5})
    assert parse_infotext("x\nSteps: 2, Sampler: DDIM, Seed: 1, Eta DDIM: 0.5")["eta"] == 0.5


def test_eta_for_img2img_and_inpaint(folder, tmp_path, rng):
    source = tmp_path / "source.png"
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    Image.fromarray((rng.random((32, 64)) > 0.5).astype(np.uint8) * 255).save(mask)
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="tcd")
    pipe.show_progress = False
    with Image.open(source) as picture:
        eta0 = pipe.img2img("a red circle", picture, strength=0.9, num_inference_steps=3, seed=2)
        eta3 = pipe.img2img("a red circle", picture, strength=0.9, num_inference_steps=3, seed=2, eta=0.3)
        with Image.open(mask) as mask_picture:
            inpainted = pipe.inpaint("a red circle", picture, mask_picture, num_inference_steps=3, seed=2,
                                     height=32, width=64, eta=0.3)
    assert eta3.parameters["eta"] == 0.3 and inpainted.parameters["eta"] == 0.3 and eta0.parameters["eta"] == 0.0
    assert not np.array_equal(np.asarray(eta0.images[0]), np.asarray(eta3.images[0]))
    out = tmp_path / "img2img.png"
    assert cli.main(["img2img", "a red circle", "--image", str(source), "--strength", "0.9", "--steps", "3",
                     "--seed", "2", "--sampler", "tcd", "--eta", "0.3", "--model", str(folder),
                     "--out", str(out)]) == 0
    assert np.array_equal(pixels(out), np.asarray(eta3.images[0]))
    again = tmp_path / "again.png"
    assert cli.main(["img2img", "--reproduce", str(out), "--image", str(source), "--model", str(folder),
                     "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("stored,message", [
    ({"prompt": "x", "loras": "abc"}, "'loras' must be a list"),
    ({"prompt": "x", "model_hash": 12345}, "stored 'model_hash' must be a string"),
    ({"prompt": "x", "steps": "many"}, "'steps' must be an integer >= 1, got 'many'"),
    ({"prompt": "x", "sampler": ["ddim"]}, "'sampler' must be a sampler name"),
    ({"prompt": "x", "eta": -1}, "'eta' must be a finite number >= 0"),
    ({"prompt": "x", "seed": 2**70}, "'seed' must be an integer in [0, 2**64)"),
    ({"prompt": "x", "unmapped": "abc"}, "stored 'unmapped' must be a list"),
])
def test_reproduce_malformed_npdiff_parameters(folder, tmp_path, capsys, stored, message):
    path = write_png(tmp_path / "bad.png", {"npdiff": json.dumps(stored)})
    assert cli.main(["generate", "--reproduce", str(path), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_reproduce_deep_nesting_long_size_and_huge_values(folder, tmp_path, capsys):
    deep = write_png(tmp_path / "deep.png", {"npdiff": "[" * 100_000})
    assert cli.main(["generate", "--reproduce", str(deep), "--model", str(folder)]) == 2
    assert "nests too deeply" in capsys.readouterr().err
    size = write_png(tmp_path / "size.png", {"parameters": "x\nSteps: 2, Seed: 1, Size: " + "9" * 5000 + "x8"})
    assert cli.main(["generate", "--reproduce", str(size), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not WIDTHxHEIGHT" in err and len(err) < 400
    # 10 MB values in what --reproduce warns about: the warnings are cut, the picture is made
    huge = "z" * 10_000_000
    stored = {"prompt": "a red circle", "steps": 1, "seed": 1, "model": huge, "model_hash": "0000000000",
              "loras": [{"name": huge, "scale": 1.0, "sha256": huge}], "unmapped": [f"Hires prompt: {huge}"]}
    made = write_png(tmp_path / "huge.png", {"npdiff": json.dumps(stored)})
    assert cli.main(["generate", "--reproduce", str(made), "--model", str(folder), "--height", "32", "--width",
                     "32", "--out", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert len(err) < 3000 and "was made with LoRA" in err and "not reproduced" in err and "warning" in err
    # a 10 MB prompt in AUTOMATIC1111's text is read in linear time (no settings line is looked for in it)
    params = parse_infotext(huge)
    assert params["prompt"] == huge


def test_nul_in_a_prompt_is_refused_before_any_work(folder, tmp_path, capsys):
    """PNG text chunks cannot hold NUL (the PNG specification forbids it): refused, not written broken."""
    out = tmp_path / "nul.png"
    assert cli.main(["generate", "a red\x00circle", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a NUL character" in err and "loaded model" not in err and not out.exists()
    assert cli.main(["generate", "x", "--negative", "\x00", "--model", str(folder), "--out", str(out)]) == 2
    assert "the negative prompt holds a NUL character" in capsys.readouterr().err
    with pytest.raises(NpdiffError, match="NUL"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "lib.png", {"prompt": "a\x00b"})
    assert list(tmp_path.iterdir()) == []
