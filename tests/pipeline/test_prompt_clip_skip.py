"""clip_skip with plain prompt syntax against diffusers' own clip_skip= (StableDiffusionPipeline: the hidden state
k layers before the last through the final layer norm; StableDiffusionXLPipeline: both encoders'
hidden_states[-(k + 2)], no norm; in both the negative prompt keeps the default layer): embeddings within
relative 1e-4, pictures within 2 levels; a prompt cut at 77 tokens warns; the parameters record clip_skip."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import NETWORK_TOL, assert_rel_close

import torch

from test_pipeline_txt2img import assert_same_pictures, to_levels  # noqa: E402
from tiny_sd import tiny_sd_folder, torch_pipeline  # noqa: E402
from tiny_sdxl import tiny_sdxl_folder, torch_sdxl_pipeline  # noqa: E402

from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline  # noqa: E402
from npdiff.tokenizer import PromptTruncatedWarning  # noqa: E402

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


def diffusers_sd(folder, sampler="euler"):
    """diffusers' pipeline; its clip_skip reads text_encoder.text_model.final_layer_norm, which transformers 5's
    CLIPTextModel no longer has (the layers sit on the model itself): the same norm is put where it looks."""
    pipe = torch_pipeline(folder, sampler)
    if not hasattr(pipe.text_encoder, "text_model"):
        object.__setattr__(pipe.text_encoder, "text_model",
                           SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm))
    return pipe


@pytest.mark.parametrize("kind", ["test", "sd2"])
def test_sd_clip_skip_equals_diffusers(seed, kind):
    folder = tiny_sd_folder(kind=kind)
    theirs_pipe = diffusers_sd(folder)
    ours_pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    ours_pipe.show_progress = False
    for clip_skip in (1, 2):  # 2 = the embeddings' output through the final norm (the tiny encoder has 2 layers)
        with torch.no_grad():
            cond, uncond = theirs_pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE,
                                                     clip_skip=clip_skip)
        ours_cond, ours_uncond = ours_pipe.encode_prompt(PROMPT, NEGATIVE, clip_skip=clip_skip)
        assert_rel_close(ours_cond, cond.numpy(), tol=NETWORK_TOL, what=f"cond, clip_skip {clip_skip}")
        assert_rel_close(ours_uncond, uncond.numpy(), tol=NETWORK_TOL, what=f"uncond, clip_skip {clip_skip}")
    plain, _ = ours_pipe.encode_prompt(PROMPT, NEGATIVE)
    assert np.abs(plain - ours_cond).max() > 1e-3  # the option changes what the UNet sees
    theirs = theirs_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, clip_skip=1, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images
    ours = ours_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, clip_skip=1, seed=seed,
                     output_type="np")
    assert_same_pictures(ours.images, to_levels(theirs))
    assert ours.parameters["clip_skip"] == 1 and "prompt_syntax" not in ours.parameters


def test_sdxl_clip_skip_equals_diffusers(seed):
    folder = tiny_sdxl_folder("base")
    theirs_pipe = torch_sdxl_pipeline(folder)
    ours_pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    ours_pipe.show_progress = False
    for clip_skip in (1, 2):  # the tiny CLIP-L has 3 layers: hidden_states[-3], [-4]
        with torch.no_grad():
            theirs = theirs_pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=NEGATIVE,
                                               clip_skip=clip_skip)
        ours = ours_pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE, clip_skip=clip_skip)
        for ours_part, theirs_part, what in zip(ours, theirs, ("cond", "uncond", "pooled", "negative pooled")):
            assert_rel_close(ours_part, theirs_part.numpy(), tol=NETWORK_TOL, what=f"{what}, clip_skip {clip_skip}")
    theirs = theirs_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, clip_skip=1, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images
    ours = ours_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, clip_skip=1, seed=seed,
                     output_type="np")
    assert_same_pictures(ours.images, to_levels(theirs))
    assert ours.parameters["clip_skip"] == 1


def test_plain_prompt_cut_at_77_tokens_warns_and_a1111_does_not():
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder())
    long_prompt = ", ".join(["a red circle on a blue square"] * 15)  # about 120 tokens
    with pytest.warns(PromptTruncatedWarning, match="dropped"):
        cond, _ = pipe.encode_prompt(long_prompt)
    assert cond.shape[1] == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond, uncond = pipe.encode_prompt(long_prompt, prompt_syntax="a1111")
    assert cond.shape[1] == uncond.shape[1] == 154
