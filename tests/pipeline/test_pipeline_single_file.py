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
