"""A pipeline from a single-file SD 1.x checkpoint (CompVis layout): the same weights as a diffusers folder give
diffusers' picture; the tokenizer comes from tokenizer=, from a folder beside the file, or the default."""

import shutil

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close

import torch

from tiny_sd import tiny_sd_folder, torch_pipeline, write_as_single_file  # noqa: E402

from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder(kind="sd_constants")


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    return write_as_single_file(folder, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def test_single_file_gives_diffusers_picture(folder, checkpoint, seed):
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, height=64, width=64)
    theirs = torch_pipeline(folder)("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np",
                                    callback_on_step_end=keep_latents, **kwargs)
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, tokenizer=folder / "tokenizer")
    pipe.show_progress = False
    assert pipe.scheduler_name == "pndm" and pipe.model_name == "tiny-sd.safetensors"
    ours = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="single-file final latents")
    levels = np.round(ours.images * 255).astype(np.int16)
    worst = int(np.max(np.abs(levels - np.round(theirs.images * 255).astype(np.int16))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"


def test_single_file_tokenizer_sources(folder, checkpoint, tmp_path):
    """Beside the file, else the default (the shipped model's, or the CLIP vocabulary from openai-clip):
    every source is the same SD 1.x tokenizer, so the ids agree."""
    reference = StableDiffusionPipeline.from_pretrained(folder).tokenizer
    prompt = ["a photo of a cat, 東京 🐱", "two blue squares!"]
    default = StableDiffusionPipeline.from_pretrained(checkpoint)
    assert default.tokenizer(prompt).tolist() == reference(prompt).tolist()

    beside = tmp_path / "model.safetensors"
    shutil.copy(checkpoint, beside)
    shutil.copytree(folder / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "special_tokens_map.json").write_text('{"pad_token": "!"}')  # marks this copy
    pipe = StableDiffusionPipeline.from_pretrained(beside)
    assert pipe.tokenizer.pad_token_id == 0


# --------------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP text encoder, linear projections, per-block heads, v-prediction
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_folder():
    return tiny_sd_folder(kind="sd2")


@pytest.fixture(scope="module")
def sd2_checkpoint(sd2_folder, tmp_path_factory):
    return write_as_single_file(sd2_folder, tmp_path_factory.mktemp("single-sd2") / "tiny-sd2.safetensors")


def test_sd2_single_file_networks_match_the_diffusers_folder(sd2_folder, sd2_checkpoint, rng):
    """Every network read from the SD 2.x file gives the diffusers folder model's output (<= 1e-4)."""
    theirs = torch_pipeline(sd2_folder)
    pipe = StableDiffusionPipeline.from_pretrained(sd2_checkpoint)
    # what the file determines, inferred as diffusers' SD 2.x config has it
    unet_config = pipe.unet.config
    assert unet_config["use_linear_projection"] is True and list(unet_config["attention_head_dim"]) == [1, 2, 2]
    assert pipe.text_encoder.config["hidden_act"] == "gelu"
    assert pipe.text_encoder.config["num_hidden_layers"] == theirs.text_encoder.config.num_hidden_layers
    assert pipe.scheduler_name == "ddim" and pipe.scheduler.config["prediction_type"] == "v_prediction"
    assert unet_config["sample_size"] == 96  # SD 2.x-v: 768-pixel pictures by default
    # the SD 2.x tokenizer (pads with "!", id 0) rebuilt without a tokenizer folder
    prompts = ["a photo of a cat, 東京 🐱!", "two blue squares"]
    assert pipe.tokenizer(prompts).tolist() == theirs.tokenizer(prompts, padding="max_length", max_length=77,
                                                              truncation=True).input_ids
    assert pipe.tokenizer.pad_token_id == 0

    ids = pipe.tokenizer(prompts)
    with torch.no_grad():
        ref_text = theirs.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_rel_close(pipe.text_encoder(ids), ref_text, NETWORK_TOL, what="SD 2.x text encoder")

    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    timestep = int(rng.integers(0, 1000))
    with torch.no_grad():
        ref_noise = theirs.unet(torch.from_numpy(sample), timestep, torch.from_numpy(ref_text)).sample.numpy()
    assert_rel_close(pipe.unet(sample, timestep, ref_text), ref_noise, NETWORK_TOL, what="SD 2.x unet")

    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref_image = theirs.vae.decode(torch.from_numpy(latents)).sample.numpy()
    assert_rel_close(pipe.vae.decode(latents), ref_image, NETWORK_TOL, what="SD 2.x vae decode")


@pytest.mark.parametrize("prediction_type", [None, "epsilon"])
def test_sd2_single_file_gives_diffusers_picture(sd2_folder, sd2_checkpoint, seed, prediction_type):
    """v-prediction by default (diffusers' choice for SD 2.x files); prediction_type="epsilon" for base models."""
    theirs_pipe = torch_pipeline(sd2_folder)
    if prediction_type is not None:
        theirs_pipe.scheduler = type(theirs_pipe.scheduler).from_config(theirs_pipe.scheduler.config,
                                                                        prediction_type=prediction_type)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, height=64, width=64)
    theirs = theirs_pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    pipe = StableDiffusionPipeline.from_pretrained(sd2_checkpoint, prediction_type=prediction_type)
    pipe.show_progress = False
    assert pipe.scheduler.config["prediction_type"] == (prediction_type or "v_prediction")
    ours = pipe("a red circle", seed=seed, output_type="np", **kwargs)
    levels = np.round(ours.images * 255).astype(np.int16)
    worst = int(np.max(np.abs(levels - np.round(theirs.images * 255).astype(np.int16))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
