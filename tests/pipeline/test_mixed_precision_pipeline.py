"""precision="mixed" pipelines: SD and SDXL end to end against diffusers float32, the CLI and --reproduce, its
own packed-weight cache file, a LoRA on its layers of both kinds, and `npdiff verify --precision mixed`.

At "mixed" the UNet runs the families of precision.BF16_FAMILIES["mixed"] in bf16 and the rest in float32, and
the text encoders and the VAE are float32 (tests/models/test_mixed_precision_models.py checks the networks).
The tiny random pipelines' pictures are compared with diffusers' float32 pictures from the same seed: within
bf16's bound for the tiny pipelines (8 levels, tests/pipeline/test_bf16_pipeline.py), and printed. (The 2-level
goal of "mixed" is for the real SDXL job: benchmarks/sdxl_precision_mix.py and RESULTS.md measure it.)
"""

import numpy as np
from precision_cli import check_precision_round_trip
from sdxl_compare import PROMPTS, run_theirs, to_levels
from test_bf16_cache import COMPONENTS, cache_dir, cache_files, draw, load, models, packed_weights  # noqa: F401
from test_bf16_pipeline import kohya_lora
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

import npdiff
from npdiff.kernels.bf16_rounding import bf16_to_float32, float32_to_bf16
from npdiff.loading.resident import mapping_of
from npdiff.lora import named_layers
from npdiff.models.precision import BF16_FAMILIES, float32_values, is_packed

PICTURE_LEVELS = 8  # as bf16's tiny-pipeline bound (test_bf16_pipeline.py)


def packed_count(model):
    return sum(1 for layer in named_layers(model, "unet").values() if is_packed(layer.weight))


def check_float32_encoders_and_vae(pipe):
    """The UNet holds some packed layers; the text encoders and the VAE none."""
    assert pipe.precision == "mixed"
    assert packed_count(pipe.unet) > 0 or not BF16_FAMILIES["mixed"]
    for model in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae):
        assert model is None or packed_count(model) == 0


def test_sdxl_mixed_picture_against_diffusers_float32(rng, seed):
    kwargs = dict(prompt=PROMPTS[int(rng.integers(4))], num_inference_steps=3, guidance_scale=5.0)
    theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed, **kwargs)
    pipe = npdiff.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"), precision="mixed")
    pipe.show_progress = False
    check_float32_encoders_and_vae(pipe)
    ours = pipe(seed=seed, output_type="np", **kwargs)
    worst = int(np.abs(to_levels(ours.images) - theirs_levels).max())
    latent_err = np.linalg.norm(ours.latents - theirs_latents) / np.linalg.norm(theirs_latents)
    print(f"tiny SDXL at mixed vs diffusers float32, seed {seed}: max {worst} levels, latents rel err {latent_err:.2e}")
    assert ours.parameters["precision"] == "mixed"
    assert 0 < latent_err and worst <= PICTURE_LEVELS  # bf16 ran (not float32), and within the bound


def test_sd_mixed_picture_against_diffusers_float32(seed):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder = tiny_sd_folder()
    kwargs = dict(num_inference_steps=3, guidance_scale=7.0, height=32, width=32)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs_levels = to_levels(theirs("a red circle", generator=torch.Generator().manual_seed(seed),
                                     output_type="np", **kwargs).images)
    pipe = npdiff.StableDiffusionPipeline.from_pretrained(folder, scheduler="euler", precision="mixed")
    pipe.show_progress = False
    check_float32_encoders_and_vae(pipe)
    ours = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    worst = int(np.abs(to_levels(ours.images) - theirs_levels).max())
    print(f"tiny SD at mixed vs diffusers float32, seed {seed}: max {worst} levels")
    assert worst <= PICTURE_LEVELS


def test_cli_precision_mixed_is_stored_and_reproduced(tmp_path, capsys):
    """--precision mixed on an SDXL model: in the PNG's JSON and AUTOMATIC1111 text; --reproduce loads mixed
    again and draws the same picture."""
    check_precision_round_trip("mixed", tiny_sdxl_folder("base"), tmp_path, capsys, size=64)


def test_mixed_keeps_its_own_packed_cache_file(models, cache_dir, seed):
    """"mixed" writes the UNet's packed layers into a file of its own (the text encoders and the VAE pack
    nothing): a later bf16 load finds its own complete file, every layer mapped from it, none private."""
    mixed = load(models["sdxl"], precision="mixed")
    files = cache_files(cache_dir)
    assert [path.name.split("-mixed-")[0] for path in files] == ["unet-diffusion_pytorch_model"]
    assert all(mapping_of(weight.data) is not None for weight in packed_weights(mixed.unet))
    full = load(models["sdxl"], precision="bf16")
    assert len(cache_files(cache_dir)) == 1 + len(COMPONENTS["sdxl"])  # mixed's file untouched beside bf16's
    for name in COMPONENTS["sdxl"]:
        read = packed_weights(getattr(full, name))
        assert read and all(mapping_of(weight.data) is not None for weight in read), name
    again = load(models["sdxl"], precision="mixed")  # read back: the same picture
    assert draw(again, seed).tobytes() == draw(mixed, seed).tobytes()


def test_lora_on_a_mixed_pipeline_keeps_each_layer_its_kind(rng, tmp_path):
    """A LoRA fused into a "mixed" pipeline: a packed layer (attn1.to_q) holds the fused weight rounded to bf16
    again, a float32 one (a resnet conv, proj_in, CLIP's fc1) the fused float32 weight; unloading puts back the
    very originals."""
    pipe = npdiff.StableDiffusionPipeline.from_pretrained(tiny_sd_folder(), scheduler="euler", precision="mixed")
    parts = kohya_lora(pipe, tmp_path / "style.safetensors", rng)
    originals = {name: layer.weight for name, (layer, *_) in parts.items()}
    values = {name: np.array(float32_values(weight)) for name, weight in originals.items()}
    assert {name: is_packed(weight) for name, weight in originals.items()} == {
        name: name.endswith("to_q") for name in parts}
    scale = 0.8
    pipe.load_lora_weights(tmp_path / "style.safetensors", scale=scale)
    for name, (layer, down, up, multiplier) in parts.items():
        assert is_packed(layer.weight) == is_packed(originals[name]) and layer.weight is not originals[name]
        update = (up @ down.reshape(down.shape[0], -1)).reshape(values[name].shape)  # [out,in(,k,k)]
        fused = values[name] + np.float32(scale * multiplier) * update                # float32, like torch
        if is_packed(layer.weight):
            fused = bf16_to_float32(float32_to_bf16(fused)).reshape(fused.shape)       # rounded to bf16 again
        np.testing.assert_array_equal(float32_values(layer.weight), fused, err_msg=name)
    pipe.unload_lora_weights()
    assert all(layer.weight is originals[name] for name, (layer, *_) in parts.items())


def test_verify_mixed_prints_each_block_against_torch_float32(capsys):
    """npdiff verify --precision mixed on the shipped model: every network row within bf16's tolerance."""
    from npdiff import cli

    assert cli.main(["verify", "--precision", "mixed", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "precision mixed against torch float32" in printed
    assert "all within tolerance (networks: relative error <= 3e-02" in printed
