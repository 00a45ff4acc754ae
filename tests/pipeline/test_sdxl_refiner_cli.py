"""SDXL's own settings on the command line: `--refiner` / `--refiner-switch` (diffusers' ensemble of experts,
webui's "Refiner switch at"), the aesthetic scores and the size/crop conditioning. The picture is diffusers'
StableDiffusionXLPipeline (denoising_end, latents out) + StableDiffusionXLImg2ImgPipeline refiner (denoising_start)
from the same seed; the PNG names the refiner by name and hash (webui's fields too) and --reproduce draws it
again; bad requests are refused before any model loads."""

import json

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, pixels
from PIL import Image
from sdxl_compare import random_mask, random_picture, theirs_pipeline
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

from npdiff import cli
from npdiff.batch import run_batch
from npdiff.batch_jobs import make_job
from npdiff.errors import NpdiffError
from npdiff.images import read_png_params
from npdiff.infotext import format_infotext, parse_infotext
from npdiff.model_identity import model_hash

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def theirs_ensemble(prompt, seed, steps, switch, **conditioning):
    """diffusers' base (denoising_end=switch, latents out) then its refiner (denoising_start=switch) -> levels."""
    aesthetic = {name: conditioning.pop(name) for name in ("aesthetic_score",) if name in conditioning}
    latents = theirs_pipeline("base", "txt2img")(prompt, num_inference_steps=steps, guidance_scale=7.5,
                                                 denoising_end=switch, output_type="latent",
                                                 generator=torch.Generator().manual_seed(seed), **conditioning).images
    picture = theirs_pipeline("refiner", "img2img")(prompt, image=latents, num_inference_steps=steps,
                                                    guidance_scale=7.5, denoising_start=switch, output_type="np",
                                                    generator=torch.Generator().manual_seed(seed), **conditioning,
                                                    **aesthetic).images[0]
    return np.round(picture * 255).astype(np.int16)


def test_refiner_like_diffusers_ensemble_png_and_reproduce(tmp_path, seed, capsys):
    base, refiner = tiny_sdxl_folder("base"), tiny_sdxl_folder("refiner")
    out = tmp_path / "refined.png"
    assert cli.main(["generate", "a lion in the snow", "--steps", "3", "--seed", str(seed), "--model", str(base),
                     "--refiner", str(refiner), "--refiner-switch", "0.5", "--aesthetic-score", "7",
                     "--original-size", "96x80", "--crops-coords-top-left", "8,4", "--out", str(out)]) == 0
    # 1. the picture: diffusers' ensemble from the same seed (base: timestep 667; refiner: 334, 1)
    theirs = theirs_ensemble("a lion in the snow", seed, 3, 0.5, original_size=(80, 96),
                             crops_coords_top_left=(4, 8), aesthetic_score=7.0)
    worst = np.abs(pixels(out).astype(np.int16) - theirs).max()
    assert worst <= IMAGE_LEVELS_TOL, f"base + refiner differ from diffusers' ensemble by {worst} levels"
    # 2. the PNG: every setting, the refiner by name and hash (no path); webui's fields in its text
    params = read_png_params(out)
    assert params["refiner"] == "tiny-sdxl-refiner" and params["refiner_hash"] == model_hash(refiner)
    assert params["refiner_switch"] == 0.5 and params["aesthetic_score"] == 7.0
    assert params["original_size"] == [80, 96] and params["crops_coords_top_left"] == [4, 8]
    assert "denoising_end" not in params and str(tmp_path) not in json.dumps(params)
    text = Image.open(out).text["parameters"]
    assert f"Refiner: tiny-sdxl-refiner [{model_hash(refiner)}], Refiner switch at: 0.5" in text
    # 3. --reproduce with the refiner: the same bytes; without it: a warning naming it, the base alone
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(base), "--refiner", str(refiner),
                     "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    assert read_png_params(again)["refiner_switch"] == 0.5
    capsys.readouterr()
    alone = tmp_path / "alone.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(base), "--out", str(alone)]) == 0
    warned = capsys.readouterr().err
    assert f"SDXL refiner tiny-sdxl-refiner [{model_hash(refiner)}]" in warned and "--refiner" in warned
    assert "refiner" not in read_png_params(alone) and "refiner_switch" not in read_png_params(alone)
    assert np.abs(pixels(alone).astype(np.int16) - pixels(out)).max() > IMAGE_LEVELS_TOL  # not the same picture
    # 4. npdiff batch --refiner: a line with the same settings is the same picture; a rerun skips it
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a lion in the snow", "seed": seed, "steps": 3, "refiner_switch": 0.5,
                                "aesthetic_score": 7, "original_size": "96x80", "crops_coords_top_left": "8,4"}))
    for written in (1, 0):
        summary = run_batch(jobs, tmp_path / "batch", model=base, defaults={"refiner": str(refiner)}, progress=False)
        assert (summary.written, summary.failures) == (written, {})
    assert np.array_equal(pixels(tmp_path / "batch" / f"000001-seed{seed}.png"), pixels(out))


def test_img2img_with_refiner_like_diffusers(tmp_path, rng, seed):
    """npdiff img2img --refiner: diffusers' base img2img (strength, denoising_end, latents out), then its refiner."""
    base, refiner = tiny_sdxl_folder("base"), tiny_sdxl_folder("refiner")
    picture = random_picture(rng)
    picture.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert cli.main(["img2img", "a lion", "--image", str(tmp_path / "in.png"), "--strength", "0.9", "--steps", "4",
                     "--refiner", str(refiner), "--refiner-switch", "0.5", "--negative-aesthetic-score", "2",
                     "--seed", str(seed), "--model", str(base), "--out", str(out)]) == 0
    # strength 0.9 of 4 steps: 501, 251, 1; the base runs 501, the refiner 251 and 1
    latents = theirs_pipeline("base", "img2img")("a lion", image=picture, strength=0.9, num_inference_steps=4,
                                                 guidance_scale=7.5, denoising_end=0.5, output_type="latent",
                                                 generator=torch.Generator().manual_seed(seed)).images
    theirs = theirs_pipeline("refiner", "img2img")("a lion", image=latents, num_inference_steps=4, guidance_scale=7.5,
                                                   denoising_start=0.5, negative_aesthetic_score=2.0, output_type="np",
                                                   generator=torch.Generator().manual_seed(seed)).images[0]
    worst = np.abs(pixels(out).astype(np.int16) - np.round(theirs * 255).astype(np.int16)).max()
    assert worst <= IMAGE_LEVELS_TOL, f"img2img + refiner differ from diffusers' by {worst} levels"
    params = read_png_params(out)
    assert (params["command"], params["strength"], params["refiner_switch"]) == ("img2img", 0.9, 0.5)
    assert params["negative_aesthetic_score"] == 2.0 and params["aesthetic_score"] == 6.0


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_inpaint_with_refiner_like_diffusers(tmp_path, rng, seed, kind):
    """npdiff inpaint --refiner: diffusers' StableDiffusionXLInpaintPipeline ensemble, the base (a 4-channel UNet or
    a 9-channel inpainting one) to denoising_end with latents out, then the refiner's inpaint of those latents with
    the same mask from denoising_start."""
    base, refiner = tiny_sdxl_folder(kind), tiny_sdxl_folder("refiner")
    picture, mask = random_picture(rng), random_mask(rng)
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli.main(["inpaint", "a lion", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--steps", "4", "--refiner", str(refiner), "--refiner-switch", "0.6", "--aesthetic-score", "7",
                     "--seed", str(seed), "--model", str(base), "--out", str(out)]) == 0
    shared = dict(mask_image=mask, num_inference_steps=4, guidance_scale=7.5, strength=1.0)
    latents = theirs_pipeline(kind, "inpaint")("a lion", image=picture, denoising_end=0.6, output_type="latent",
                                               generator=torch.Generator().manual_seed(seed), **shared).images
    theirs = theirs_pipeline("refiner", "inpaint")("a lion", image=latents, denoising_start=0.6, aesthetic_score=7.0,
                                                   output_type="np", generator=torch.Generator().manual_seed(seed),
                                                   **shared).images[0]
    worst = np.abs(pixels(out).astype(np.int16) - np.round(theirs * 255).astype(np.int16)).max()
    assert worst <= IMAGE_LEVELS_TOL, f"inpaint + refiner ({kind}) differ from diffusers' by {worst} levels"
    params = read_png_params(out)
    assert (params["command"], params["mode"], params["refiner_switch"]) == ("inpaint", "inpaint", 0.6)
    assert params["refiner"] == "tiny-sdxl-refiner" and params["aesthetic_score"] == 7.0
    assert "denoising_end" not in params and "denoising_start" not in params
    again = tmp_path / "again.png"  # --reproduce with the refiner (and the pictures) again: the same pixels
    assert cli.main(["inpaint", "--reproduce", str(out), "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--model", str(base), "--refiner", str(refiner),
                     "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    jobs = tmp_path / "jobs.jsonl"  # a batch line with the same settings: the same picture
    jobs.write_text(json.dumps({"prompt": "a lion", "image": "in.png", "mask": "mask.png", "steps": 4, "seed": seed,
                                "refiner_switch": 0.6, "aesthetic_score": 7, "refiner": str(refiner)}))
    summary = run_batch(jobs, tmp_path / "batch", model=base, progress=False)
    assert (summary.written, summary.failures) == (1, {})
    assert np.array_equal(pixels(tmp_path / "batch" / f"000001-seed{seed}.png"), pixels(out))


@pytest.mark.parametrize("case", ["sd_model", "base_as_refiner", "switch_1.5", "switch_alone", "score_on_base",
                                  "size_on_sd", "bad_size", "refiner_inpaint", "refiner_is_sd"])
def test_bad_sdxl_requests_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, case):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(cli, "load_any_pipeline", no_loading)
    base, refiner, sd = (str(tiny_sdxl_folder("base")), str(tiny_sdxl_folder("refiner")), str(tiny_sd_folder()))
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64)).save(source)
    Image.new("L", (64, 64), 255).save(mask)
    out = tmp_path / "x.png"
    argv, expected = {
        "sd_model": (["--model", sd, "--refiner", refiner], "--refiner is for SDXL base models"),
        "refiner_is_sd": (["--model", base, "--refiner", sd], "is an SD 1.x/2.x model, not an SDXL refiner"),
        "base_as_refiner": (["--model", base, "--refiner", base], "is an SDXL base model, not an SDXL refiner"),
        "switch_1.5": (["--model", base, "--refiner", refiner, "--refiner-switch", "1.5"], "strictly between 0 and 1"),
        "switch_alone": (["--model", base, "--refiner-switch", "0.8"], "refiner_switch needs --refiner"),
        "score_on_base": (["--model", base, "--aesthetic-score", "7"], "conditions an SDXL refiner"),
        "size_on_sd": (["--model", sd, "--target-size", "64x64"], "--target-size / target_size is for SDXL models"),
        "bad_size": (["--model", base, "--original-size", "64 by 64"], "must be WIDTHxHEIGHT"),
        "refiner_inpaint": (["--model", base, "--refiner", refiner, "--image", str(source), "--mask", str(mask),
                             "--refiner-switch", "0"], "--refiner-switch / refiner_switch must be a number strictly"),
    }[case]
    command = "inpaint" if case == "refiner_inpaint" else "generate"
    code = cli.main([command, "a cat", "--steps", "2", "--out", str(out), *argv])
    assert code == 2 and expected in capsys.readouterr().err
    assert not out.exists()


def test_batch_lines_take_sdxl_settings(tmp_path):
    args = cli.build_parser().parse_args(["generate", "x", "--negative-prompt-2", "dark", "--target-size", "96x80"])
    assert (args.negative_2, args.target_size) == ("dark", "96x80")  # --negative-prompt-2: --negative-2's alias
    line = {"prompt": "a cat", "original_size": "96x80", "negative_target_size": [48, 64],
            "crops_coords_top_left": "8,4", "aesthetic_score": 7, "refiner_switch": 0.7}
    job = make_job(1, line, {}, tmp_path)
    assert job.options["original_size"] == [80, 96] and job.options["negative_target_size"] == [48, 64]
    assert job.options["crops_coords_top_left"] == [4, 8] and job.options["refiner_switch"] == 0.7
    with pytest.raises(NpdiffError, match="refiner_switch.*strictly between 0 and 1"):
        make_job(2, {"prompt": "a cat", "refiner_switch": 1.5}, {}, tmp_path)
    with pytest.raises(NpdiffError, match="crops_coords_top_left"):
        make_job(3, {"prompt": "a cat", "crops_coords_top_left": [-1, 0]}, {}, tmp_path)


def test_webui_refiner_fields_read_and_written():
    text = ("a lion\nSteps: 30, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 1024x1024, Model hash: 31e35c80fc, "
            "Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0 [7440042BBD], Refiner switch at: 0.8, Version: v1.6.0")
    params = parse_infotext(text)
    assert (params["refiner"], params["refiner_hash"], params["refiner_switch"]) == \
        ("sd_xl_refiner_1.0", "7440042bbd", 0.8)
    assert params["unmapped"] == []
    written = format_infotext({"prompt": "a lion", "steps": 30, "refiner": "sd_xl_refiner_1.0",
                               "refiner_hash": "7440042bbd", "refiner_switch": 0.8})
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8" in written
    assert parse_infotext(written)["refiner_switch"] == 0.8
