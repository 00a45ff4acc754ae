"""Textual inversion against diffusers' load_textual_inversion on the tiny model, in both file layouts:
the same token ids, the same prompt embeddings (relative 1e-4), the same picture."""

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close

import torch
import safetensors.torch as safetensors_torch

from tiny_sd import CLIP_CONFIG, tiny_sd_folder, torch_pipeline  # noqa: E402

from npdiff import NpdiffError  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402

WIDTH = CLIP_CONFIG["hidden_size"]


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def load_ours(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="ddim")
    pipe.show_progress = False
    return pipe


def random_vectors(rng, count, squeeze=False):
    vectors = rng.standard_normal((count, WIDTH)).astype(np.float32)
    return vectors[0] if squeeze else vectors


def compare_embeddings(ours_pipe, theirs_pipe, prompt, negative):
    ours_ids = ours_pipe.tokenizer(prompt)  # expands multi-vector tokens itself
    theirs_prompt = theirs_pipe.maybe_convert_prompt(prompt, theirs_pipe.tokenizer)
    theirs_ids = theirs_pipe.tokenizer(theirs_prompt, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="np").input_ids
    assert ours_ids.tolist() == theirs_ids.tolist()
    with torch.no_grad():
        cond, uncond = theirs_pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    ours_cond, ours_uncond = ours_pipe.encode_prompt(prompt, negative)
    assert_rel_close(ours_cond, cond.numpy(), tol=NETWORK_TOL, what="prompt embeddings")
    assert_rel_close(ours_uncond, uncond.numpy(), tol=NETWORK_TOL, what="negative prompt embeddings")


@pytest.mark.parametrize("count", [1, 3])
def test_diffusers_layout_matches_diffusers(folder, tmp_path, rng, count):
    token = "<cat-toy>"
    vectors = random_vectors(rng, count, squeeze=(count == 1 and rng.random() < 0.5))  # [D] or [n,D]
    path = tmp_path / "learned_embeds.safetensors"
    safetensors_torch.save_file({token: torch.from_numpy(vectors)}, str(path))
    theirs = torch_pipeline(folder, "ddim")
    theirs.load_textual_inversion(str(path))
    ours = load_ours(folder)
    added = ours.load_textual_inversion(path)
    assert added == [token] + [f"{token}_{i}" for i in range(1, count)]
    compare_embeddings(ours, theirs, f"a {token} on a table", "a photo of <cat-toy>, blurry")


def test_a1111_layout_fp16_multi_vector_matches_diffusers(folder, tmp_path, rng, seed):
    """{"emb_params": [n,D]} in fp16, token from the file name; diffusers gets the same vectors as A1111's dict."""
    vectors = random_vectors(rng, 2).astype(np.float16)
    path = tmp_path / "shapey.safetensors"
    safetensors_torch.save_file({"emb_params": torch.from_numpy(vectors)}, str(path))
    theirs = torch_pipeline(folder, "ddim")
    theirs.load_textual_inversion({"string_to_param": {"*": torch.from_numpy(vectors.astype(np.float32))},
                                   "name": "shapey"})
    ours = load_ours(folder)
    assert ours.load_textual_inversion(path) == ["shapey", "shapey_1"]
    prompt, negative = "shapey, three circles", "blurry shapey"
    compare_embeddings(ours, theirs, prompt, negative)

    # and the whole picture
    out = theirs(prompt, negative_prompt=negative, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(seed))
    mine = ours(prompt, negative_prompt=negative, num_inference_steps=2, output_type="np", seed=seed)
    theirs_levels = np.round(np.asarray(out.images) * 255).astype(np.int16)
    assert int(np.max(np.abs(np.round(mine.images * 255).astype(np.int16) - theirs_levels))) <= IMAGE_LEVELS_TOL


def test_token_argument_renames(folder, tmp_path, rng):
    path = tmp_path / "learned_embeds.safetensors"
    safetensors_torch.save_file({"<old>": torch.from_numpy(random_vectors(rng, 1))}, str(path))
    theirs = torch_pipeline(folder, "ddim")
    theirs.load_textual_inversion(str(path), token="<new>")
    ours = load_ours(folder)
    assert ours.load_textual_inversion(path, token="<new>") == ["<new>"]
    compare_embeddings(ours, theirs, "a <new> and an <old>", "")


def test_refusals(folder, tmp_path, rng):
    ours = load_ours(folder)
    for suffix in (".bin", ".pt"):
        pickle_file = tmp_path / f"learned_embeds{suffix}"
        pickle_file.write_bytes(b"not read")
        with pytest.raises(NpdiffError, match="pickle"):
            ours.load_textual_inversion(pickle_file)
    with pytest.raises(NpdiffError, match="does not exist"):
        ours.load_textual_inversion(tmp_path / "missing.safetensors")

    wrong_width = tmp_path / "wide.safetensors"
    safetensors_torch.save_file({"<w>": torch.zeros(WIDTH + 1)}, str(wrong_width))
    with pytest.raises(NpdiffError, match=f"width {WIDTH + 1} does not match .* {WIDTH}"):
        ours.load_textual_inversion(wrong_width)

    two_keys = tmp_path / "two.safetensors"
    safetensors_torch.save_file({"<a>": torch.zeros(WIDTH), "<b>": torch.zeros(WIDTH)}, str(two_keys))
    with pytest.raises(NpdiffError, match="not a textual inversion embedding"):
        ours.load_textual_inversion(two_keys)

    existing = tmp_path / "cat.safetensors"
    safetensors_torch.save_file({"cat</w>": torch.from_numpy(random_vectors(rng, 1))}, str(existing))
    with pytest.raises(NpdiffError, match="already in the tokenizer vocabulary"):
        ours.load_textual_inversion(existing)
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file({"<g>": torch.from_numpy(random_vectors(rng, 1))}, str(good))
    ours.load_textual_inversion(good)
    with pytest.raises(NpdiffError, match="already in the tokenizer vocabulary"):
        ours.load_textual_inversion(good)
