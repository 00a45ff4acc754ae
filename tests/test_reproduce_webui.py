"""--reproduce as a webui user expects it: pictures whose PNGs other tools wrote, built here in each tool's
format (the chunk names and shapes the sd-parsers package reads), and npdiff's own pictures of other modes."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from helpers import pixels, write_png  # noqa: E402
from lora_helpers import all_weights  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli  # noqa: E402
from npdiff.images import read_png_params  # noqa: E402
from npdiff.infotext import format_infotext, parse_infotext  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.recipe_reproduce import find_loras, lora_hashes  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


WEBUI = ("a (blue:1.2) square\nNegative prompt: blurry\n"
         "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 77, Size: 32x32, "
         "Model hash: 0123456789, Model: v1-5, Clip skip: 2, Hires upscale: 2, Hires steps: 2, "
         "Hires upscaler: Latent (bicubic), Denoising strength: 0.6, Version: v1.9.4")

OTHER_TOOLS = {
    "Fooocus": {"parameters": json.dumps({"prompt": "a cat", "negative_prompt": "", "steps": 30, "seed": 1,
                                          "sampler": "dpmpp_2m_sde_gpu", "version": "Fooocus v2.5.5"}),
                "fooocus_scheme": "fooocus"},
    "ComfyUI": {"prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}}}),
                "workflow": json.dumps({"nodes": [], "links": []})},
    "InvokeAI": {"invokeai_metadata": json.dumps({"positive_prompt": "a cat", "seed": 1, "steps": 30})},
    "NovelAI": {"Title": "AI generated image", "Description": "a cat", "Software": "NovelAI",
                "Source": "Stable Diffusion XL C1E1DE52", "Comment": json.dumps({"prompt": "a cat", "steps": 28})},
}


@pytest.mark.parametrize("tool", list(OTHER_TOOLS))
def test_other_tools_named_and_refused_in_one_line(folder, tmp_path, capsys, tool):
    made = write_png(tmp_path / f"{tool}.png", OTHER_TOOLS[tool])
    with pytest.raises(NpdiffError, match=f"was made by {tool}, whose settings npdiff cannot read"):
        read_png_params(made)
    assert cli.main(["generate", "a cat", "--reproduce", str(made), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"was made by {tool}" in err and "not reproduced" not in err and len(err.strip().splitlines()) == 1


def test_webui_hires_clip_skip_and_syntax_reproduced(folder, tmp_path, capsys):
    """Hires fix, Clip skip 2 and webui's prompt syntax all taken from the text; the picture is the pipeline's."""
    params = parse_infotext(WEBUI)
    assert (params["hires_scale"], params["hires_steps"], params["hires_upscaler"], params["hires_strength"]) == \
        (2.0, 2, "latent-bicubic", 0.6)
    assert "strength" not in params and "mode" not in params  # the hires strength, not img2img's
    assert (params["clip_skip"], params["prompt_syntax"]) == (1, "a1111")  # diffusers' k = webui's N - 1
    webui = write_png(tmp_path / "00001-77.png", {"parameters": WEBUI})
    out = tmp_path / "ours.png"
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--out", str(out)]) == 0
    assert "not reproduced" not in capsys.readouterr().err
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler_a")
    pipe.show_progress = False
    library = pipe("a (blue:1.2) square", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.5,
                   height=32, width=32, seed=77, clip_skip=1, prompt_syntax="a1111", hires_scale=2,
                   hires_strength=0.6, hires_steps=2, hires_upscaler="latent-bicubic")
    assert np.array_equal(np.asarray(library.images[0]), pixels(out))
    # what ours stores reads back the same, in npdiff's JSON and in webui's text
    stored = read_png_params(out)
    assert (stored["hires_scale"], stored["hires_strength"], stored["clip_skip"]) == (2.0, 0.6, 1)
    with Image.open(out) as picture:
        text = picture.text["parameters"]
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (bicubic)" in text
    assert "Denoising strength: 0.6" in text and "Clip skip: 2" in text and "Size: 32x32" in text
    again = parse_infotext(text)
    assert {key: again[key] for key in ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler",
                                        "clip_skip")} == {key: params[key] for key in ("hires_scale",
                                                          "hires_strength", "hires_steps", "hires_upscaler",
                                                          "clip_skip")}


def test_options_given_win_over_the_png(folder, tmp_path, capsys):
    """A sampler npdiff lacks, an upscaler it lacks: errors only when no option replaces them."""
    text = WEBUI.replace("Euler a", "DPM++ SDE").replace("Latent (bicubic)", "R-ESRGAN 4x+")
    webui = write_png(tmp_path / "sde.png", {"parameters": text})
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "sampler 'DPM++ SDE', which npdiff does not have: pass --sampler" in err
    assert "hires upscaler 'R-ESRGAN 4x+', which npdiff does not have: pass --hires-upscaler" in err
    out = tmp_path / "ours.png"
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--sampler", "euler",
                     "--hires-upscaler", "latent", "--steps", "2", "--hires-scale", "1", "--clip-skip", "1",
                     "--out", str(out)]) == 0
    stored = read_png_params(out)
    assert (stored["sampler"], stored["steps"], stored["hires_upscaler"], stored["hires_scale"]) == \
        ("euler", 2, "latent", 1.0)
    assert stored["seed"] == 77 and stored.get("clip_skip") is None  # unset options still come from the PNG


def test_other_modes_said_so(folder, tmp_path, capsys, rng):
    """A webui img2img text (Denoising strength, no hires) and an npdiff img2img PNG, reproduced with generate:
    said on stderr, strength named as not used."""
    img2img_text = WEBUI.split("Clip skip")[0] + "Denoising strength: 0.75"
    webui = write_png(tmp_path / "img2img.png", {"parameters": img2img_text})
    assert parse_infotext(img2img_text)["mode"] == "img2img"
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--steps", "1",
                     "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "made in webui's img2img or inpaint tab at strength 0.75, not txt2img" in err and "not used" in err
    source = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    made = tmp_path / "made.png"
    assert cli.main(["img2img", "a cat", "--image", str(source), "--model", str(folder), "--steps", "2",
                     "--strength", "0.5", "--out", str(made)]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--reproduce", str(made), "--model", str(folder), "--height", "32", "--width",
                     "32", "--out", str(tmp_path / "b.png")]) == 0
    assert "made by npdiff img2img at strength 0.5, not txt2img" in capsys.readouterr().err
    assert "img2img" not in format_infotext({"prompt": "x", "steps": 1, "seed": 1, "hires_scale": 2.0,
                                             "hires_strength": 0.5, "hires_upscaler": "latent", "hires_steps": 0})


def tiny_lora(folder, path):
    """A kohya LoRA over one attention layer of the tiny UNet."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    name, weight = next((name, weight) for name, weight in all_weights(pipe).items() if name.endswith("to_q"))
    rng = np.random.default_rng(0)
    key = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
    save_file({f"{key}.lora_down.weight": rng.standard_normal((2, weight.shape[1]), dtype=np.float32),
               f"{key}.lora_up.weight": rng.standard_normal((weight.shape[0], 2), dtype=np.float32),
               f"{key}.alpha": np.array(2.0, dtype=np.float32)}, str(path))
    return path


def test_loras_found_in_lora_dir_by_name_and_hash(folder, tmp_path, capsys):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    path = tiny_lora(folder, lora_dir / "shapes.safetensors")
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # webui's "Lora hashes" for a .safetensors
    assert lora_hashes(path) == {hashlib.sha256(data).hexdigest()[:12], addnet}
    stored = [{"name": "shapes", "scale": 0.6, "sha256": addnet}, {"name": "ink", "scale": 1.0, "sha256": None}]
    found, warnings = find_loras(stored, lora_dir, set())
    assert found == [(str(path), 0.6)]
    assert len(warnings) == 1 and "was made with LoRA ink (scale 1.0), which is not found in --lora-dir" in warnings[0]
    found, warnings = find_loras([dict(stored[0], sha256="ffffffffffff")], lora_dir, set())
    assert found == [] and "does not match the hash ffffffffffff" in warnings[0]
    assert find_loras(stored, None, {"shapes", "ink"}) == ([], [])  # given with --lora: nothing to say
    # through the CLI: the tag's LoRA is loaded from --lora-dir, the picture names it again
    text = WEBUI.replace("a (blue:1.2) square", "a square <lora:shapes:0.6>").replace(
        "Version", f'Lora hashes: "shapes: {addnet}", Version')
    webui = write_png(tmp_path / "lora.png", {"parameters": text})
    out = tmp_path / "out.png"
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--lora-dir", str(lora_dir),
                     "--hires-scale", "1", "--hires-steps", "2", "--steps", "1", "--out", str(out)]) == 0
    assert "loaded LoRA" in capsys.readouterr().err
    assert [(lora["name"], lora["scale"]) for lora in read_png_params(out)["loras"]] == [("shapes", 0.6)]
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--steps", "1",
                     "--hires-scale", "1", "--hires-steps", "2", "--out", str(out)]) == 0
    assert "pass it with --lora FILE:0.6" in capsys.readouterr().err


def test_vae_named_hires_options_checked(folder, tmp_path, capsys):
    webui = write_png(tmp_path / "vae.png", {"parameters": WEBUI.replace("Version", "VAE: ft-mse.safetensors, Version")})
    assert cli.main(["generate", "--reproduce", str(webui), "--model", str(folder), "--steps", "1",
                     "--hires-scale", "1", "--hires-steps", "2", "--out", str(tmp_path / "out.png")]) == 0
    assert "made with VAE 'ft-mse.safetensors'" in capsys.readouterr().err
    assert cli.main(["generate", "a cat", "--model", str(folder), "--hires-strength", "0.5"]) == 2
    assert "hires_strength without hires_scale" in capsys.readouterr().err
    assert cli.main(["generate", "a cat", "--model", str(folder), "--hires-scale", "0.5"]) == 2
    assert "'hires_scale' must be a number in [1, 16]" in capsys.readouterr().err


def test_webui_hires_fields_read_as_webui_writes_them():
    settings = "x\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, "
    scaled = parse_infotext(settings + "Hires resize-1: 0, Hires resize-2: 0, Hires upscale: 1.5, "
                                       "Denoising strength: 0.4")
    assert (scaled["hires_scale"], scaled["hires_strength"], scaled["unmapped"]) == (1.5, 0.4, [])
    assert parse_infotext(settings + "Hires upscale: 1.5")["hires_strength"] == 0.7  # webui's default
    fixed = parse_infotext(settings + "Hires resize-1: 1024, Hires resize-2: 768, Hires upscaler: Latent, "
                                      "Denoising strength: 0.4")  # a fixed hires size: said, not reproduced
    assert fixed["unmapped"] == ["Hires resize-1: 1024", "Hires resize-2: 768"]
    assert not any(key.startswith("hires") or key in ("strength", "mode") for key in fixed)
