"""SDXL with the rest of npdiff, against diffusers on tiny random SDXLs: an LCM-distilled SDXL UNet, textual
inversion in SDXL's file layout (clip_l / clip_g), loading (SD vs SDXL folders, refiners), and refusals."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdxl_compare import PROMPTS, assert_same, load_ours, run_theirs, theirs_pipeline
from tiny_sd import diffusers_scheduler, tiny_sd_folder
from tiny_sdxl import CLIP_G, CLIP_L, tiny_sdxl_folder, torch_sdxl_pipeline

from npdiff import NpdiffError
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline


def test_lcm_unet(rng, seed):
    """time_cond_proj_dim: the guidance goes in as timestep_cond, no unconditional pass; LCMScheduler."""
    pipe = load_ours("lcm", scheduler="lcm")
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=float(rng.uniform(2, 8)))
    theirs_levels, theirs_latents = run_theirs("lcm", "txt2img", seed,
                                               scheduler=diffusers_scheduler("lcm", pipe.scheduler_config), **kwargs)
    calls = []
    unet = pipe.unet
    pipe.unet = lambda sample, *args, **kw: calls.append((sample.shape[0], "timestep_cond" in kw)) or unet(
        sample, *args, **kw)
    pipe.unet.config = unet.config
    ours = pipe(seed=seed, output_type="np", **kwargs)
    assert calls == [(1, True)] * 3
    assert_same(ours, theirs_levels, theirs_latents, "LCM SDXL")


def test_textual_inversion_sdxl_file(tmp_path, rng, seed):
    """{"clip_l": [2,16], "clip_g": [2,32]} -> both encoders, as diffusers loads the two halves by hand."""
    vectors = {"clip_l": rng.standard_normal((2, CLIP_L["hidden_size"])).astype(np.float32),
               "clip_g": rng.standard_normal((2, CLIP_G["hidden_size"])).astype(np.float32)}
    path = tmp_path / "shiny.safetensors"
    save_file({key: torch.from_numpy(value) for key, value in vectors.items()}, str(path))
    theirs = torch_sdxl_pipeline(tiny_sdxl_folder("base"))
    theirs.load_textual_inversion(torch.from_numpy(vectors["clip_l"]), token="shiny", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(torch.from_numpy(vectors["clip_g"]), token="shiny",
                                  text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    kwargs = dict(prompt="a shiny red circle", num_inference_steps=2, guidance_scale=5.0, negative_prompt="shiny")
    out = theirs(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    ours_pipe = load_ours("base")
    assert ours_pipe.load_textual_inversion(path) == ["shiny", "shiny_1"]
    ours = ours_pipe(seed=seed, output_type="np", **kwargs)
    levels = np.round(ours.images * 255).astype(np.int16)
    assert int(np.abs(levels - np.round(out.images * 255).astype(np.int16)).max()) <= 2
    with pytest.raises(NpdiffError, match="already in the tokenizer vocabulary"):
        ours_pipe.load_textual_inversion(path)
    with pytest.raises(NpdiffError, match="an SDXL embedding"):
        StableDiffusionPipeline.from_pretrained(tiny_sd_folder()).load_textual_inversion(path)


def test_textual_inversion_one_encoder_like_diffusers(rng):
    """diffusers' call: vectors, a token, text_encoder_2 and tokenizer_2 -> only that encoder learns the word."""
    pipe = load_ours("base")
    rows = pipe.text_encoder_2.token_embedding.shape[0]
    vectors = rng.standard_normal(CLIP_G["hidden_size"]).astype(np.float32)
    added = pipe.load_textual_inversion(vectors, token="<g>", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    assert added == ["<g>"] and pipe.text_encoder_2.token_embedding.shape[0] == rows + 1
    assert "<g>" not in pipe.tokenizer.get_vocab()
    with pytest.raises(NpdiffError, match="width 32 does not match"):
        pipe.load_textual_inversion(vectors, token="<l>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


def test_sd_pipeline_refuses_sdxl_and_back():
    with pytest.raises(NpdiffError, match="SDXL model.*StableDiffusionXLPipeline.from_pretrained"):
        StableDiffusionPipeline.from_pretrained(tiny_sdxl_folder("base"))
    with pytest.raises(NpdiffError, match="SD 1.x/2.x model.*StableDiffusionPipeline.from_pretrained"):
        StableDiffusionXLPipeline.from_pretrained(tiny_sd_folder())


def test_refiner_folder_loads_without_text_encoder():
    pipe = load_ours("refiner")
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.scheduler_name == "euler" and pipe.vae.scaling_factor == pytest.approx(0.13025)


def must_not_run(*args, **kwargs):
    raise AssertionError("a network ran before the arguments were checked")


def test_bad_arguments_before_any_work():
    base, refiner = load_ours("base"), load_ours("refiner")
    base.text_encoder = base.text_encoder_2 = refiner.text_encoder_2 = must_not_run
    with pytest.raises(NpdiffError, match="prompt_2 has batch size 3 but prompt has batch size 2"):
        base(PROMPTS[:2], prompt_2=PROMPTS[:3], num_inference_steps=1)
    with pytest.raises(NpdiffError, match="original_size must be a pair"):
        base("a cat", original_size=(1024,), num_inference_steps=1)
    with pytest.raises(NpdiffError, match="denoising_end must be a number strictly between 0 and 1"):
        base("a cat", denoising_end=1.5, num_inference_steps=1)
    with pytest.raises(NpdiffError, match="aesthetic_score must be a finite number"):
        refiner.img2img("a cat", image=np.zeros((64, 64, 3), np.uint8), aesthetic_score=float("nan"))


def test_aesthetic_flag_that_does_not_fit_the_unet():
    """A base UNet (6 ids) told it takes an aesthetic score (5 ids) -> the message says which flag to change."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"), requires_aesthetics_score=True)
    with pytest.raises(NpdiffError, match="requires_aesthetics_score=False"):
        pipe.img2img("a cat", image=np.zeros((64, 64, 3), np.uint8), num_inference_steps=4)


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_tiny_autoencoder_taesdxl(rng, seed, mode):
    """pipe.vae = AutoencoderTiny (TAESDXL's kind) decodes, and encodes for img2img, as diffusers' with the same."""
    from sdxl_compare import random_picture
    from tiny_models import tiny_taesd

    from npdiff.models import AutoencoderTiny

    torch_taesd, taesd_folder = tiny_taesd("sd", seed=0)
    kwargs = dict(prompt=PROMPTS[1], num_inference_steps=3, guidance_scale=5.0)
    if mode == "img2img":
        kwargs.update(image=random_picture(rng), strength=0.7)
    theirs = theirs_pipeline("base", mode)  # shared by the tests: its VAE is put back after
    model_vae, theirs.vae = theirs.vae, torch_taesd
    theirs.vae.config.force_upcast = False  # diffusers' SDXL img2img reads it; AutoencoderTiny's config lacks it
    final = {}
    try:
        out = theirs(generator=torch.Generator().manual_seed(seed), output_type="np",
                     callback_on_step_end=lambda _p, _i, _t, kw: final.update(latents=kw["latents"].numpy().copy())
                     or {}, **kwargs)
    finally:
        theirs.vae = model_vae
    pipe = load_ours("base")
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_folder)
    ours = (pipe.img2img if mode == "img2img" else pipe)(seed=seed, output_type="np", **kwargs)
    assert_same(ours, np.round(out.images * 255).astype(np.int16), final["latents"], f"TAESDXL {mode}")


def test_encode_prompt_like_diffusers(rng):
    """The four arrays of diffusers' SDXL encode_prompt, on a base (both encoders) and a refiner (text_encoder_2)."""
    from helpers import NETWORK_TOL, assert_rel_close

    for kind, mode in (("base", "txt2img"), ("refiner", "img2img")):
        prompt, prompt_2 = PROMPTS[int(rng.integers(4))], PROMPTS[int(rng.integers(4))]
        with torch.no_grad():
            theirs = theirs_pipeline(kind, mode).encode_prompt(
                prompt, prompt_2, "cpu", 2, True, negative_prompt="blurry", negative_prompt_2="dark")
        ours = load_ours(kind).encode_prompt(prompt, prompt_2, 2, True, negative_prompt="blurry",
                                             negative_prompt_2="dark")
        for name, mine, reference in zip(("prompt", "negative", "pooled", "negative pooled"), ours, theirs):
            assert_rel_close(mine, reference.numpy(), tol=NETWORK_TOL, what=f"{kind} {name} embeddings")


def test_single_file_like_diffusers_folder(tmp_path, seed):
    """The same weights as one SDXL single file (sgm layout; tokenizer/ and tokenizer_2/ beside it) draw diffusers'
    picture from the folder: configs inferred from the tensors, SDXL's scheduler."""
    from tiny_sdxl import write_sdxl_single_file

    folder = tiny_sdxl_folder("single_file")
    path = write_sdxl_single_file(folder, folder / "sdxl-tiny.safetensors")
    kwargs = dict(prompt=PROMPTS[0], prompt_2=PROMPTS[1], num_inference_steps=3, guidance_scale=5.0, height=64,
                  width=64, negative_prompt="blurry")
    theirs_levels, theirs_latents = run_theirs("single_file", "txt2img", seed, **kwargs)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.show_progress = False
    assert pipe.force_zeros_for_empty_prompt and not pipe.requires_aesthetics_score
    assert pipe.scheduler_name == "euler" and pipe.unet.config["sample_size"] == 128
    ours = pipe(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "single file")
    with pytest.raises(NpdiffError, match="SDXL model.*StableDiffusionXLPipeline"):
        StableDiffusionPipeline.from_pretrained(path)


def test_model_family_from_the_layout(tmp_path):
    from tiny_sdxl import write_sdxl_single_file

    from npdiff.pipeline_utils import model_family

    folder = tiny_sdxl_folder("single_file")
    assert model_family(folder) == "sdxl" and model_family(tiny_sdxl_folder("refiner")) == "sdxl"
    assert model_family(write_sdxl_single_file(folder, tmp_path / "xl.safetensors")) == "sdxl"
    assert model_family(tiny_sd_folder()) == "sd" and model_family(tmp_path / "missing") == "sd"
