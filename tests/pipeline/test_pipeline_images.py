"""npdiff.images: picture conversions against diffusers' VaeImageProcessor, PNG metadata round trips, grids."""

import numpy as np
import pytest
from PIL import Image

from helpers import assert_rel_close
from npdiff import NpdiffError
from npdiff.images import (StepRecorder, decoded_to_uint8, emergence_grid, image_to_model_input, make_grid,
                           read_png_params, save_png, to_pil)

import torch
from diffusers import image_processor


@pytest.mark.parametrize("case", range(3))
def test_decoded_to_uint8_matches_diffusers_postprocess(rng, case):
    decoded = (1.3 * rng.standard_normal((2, 3, 16, 24))).astype(np.float32)  # beyond [-1,1] too: clamps
    processor = image_processor.VaeImageProcessor(vae_scale_factor=8)
    theirs = processor.postprocess(torch.from_numpy(decoded), output_type="pil")
    ours = to_pil(decoded)
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(decoded_to_uint8(decoded), np.stack([np.asarray(b) for b in theirs]))


@pytest.mark.parametrize("size", [(64, 48), (70, 53), (8, 8)])
def test_image_to_model_input_matches_diffusers_preprocess(rng, size):
    width, height = size
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    processor = image_processor.VaeImageProcessor(vae_scale_factor=8)
    theirs = processor.preprocess(picture).numpy()
    ours = image_to_model_input(picture, 8)
    assert ours.shape == theirs.shape == (1, 3, height - height % 8, width - width % 8)
    assert_rel_close(ours, theirs, tol=1e-6, what="preprocessed picture")
    # a uint8 array and a float array in [0,1] give the same result as the PIL image
    as_array = np.asarray(picture)
    assert np.array_equal(image_to_model_input(as_array, 8), ours)
    assert_rel_close(image_to_model_input(as_array / 255.0, 8), ours, tol=1e-6)


def test_image_to_model_input_rejects_bad_pictures():
    with pytest.raises(NpdiffError, match=r"image: expected an array \[H,W,3\]"):
        image_to_model_input(np.zeros((4, 4), np.uint8))
    with pytest.raises(NpdiffError, match=r"values in \[0, 1\]"):
        image_to_model_input(np.full((8, 8, 3), 2.0))
    with pytest.raises(NpdiffError, match="smaller than"):
        image_to_model_input(Image.new("RGB", (4, 16)), 8)
    with pytest.raises(NpdiffError, match="not a path"):
        image_to_model_input("picture.png")


def test_png_metadata_round_trip(tmp_path, rng):
    picture = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    params = {"prompt": "東京の猫, Москва, ελληνικά 🐱 \"quoted\"", "negative_prompt": "", "seed": 123456789,
              "steps": 7, "sampler": "euler_a", "guidance_scale": 7.5, "height": 16, "width": 16,
              "model": "tiny", "npdiff_version": "0.1.0"}
    path = save_png(picture, tmp_path / "out.png", params)
    assert read_png_params(path) == params
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(picture))  # PNG is lossless


def test_png_without_params(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(NpdiffError, match="carries no npdiff parameters"):
        read_png_params(tmp_path / "plain.png")
    with pytest.raises(NpdiffError, match="no such file"):
        read_png_params(tmp_path / "missing.png")
    with pytest.raises(NpdiffError, match="JSON"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", {"bad": object()})


def test_make_grid_places_cells(rng):
    cells = [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(5)]
    grid = make_grid(cells, columns=2)
    assert grid.size == (10, 18)
    pixels = np.asarray(grid)
    assert np.array_equal(pixels[6:12, 5:10], np.asarray(cells[3]))
    assert np.all(pixels[12:18, 5:10] == 255)  # the empty sixth cell stays white
    with pytest.raises(NpdiffError, match="no images"):
        make_grid([])


class _FakeDecoder:
    """decode_latents stand-in: a fixed linear map of the latents, so the grid content is predictable."""

    def decode_latents(self, latents):
        latents = np.asarray(latents)
        return np.repeat(latents[:, :3], 2, axis=2).repeat(2, axis=3)  # [N,4,h,w] -> [N,3,2h,2w]


def test_step_recorder_and_emergence_grid(rng):
    recorder = StepRecorder()
    steps = []
    for step, t in enumerate([999, 666, 333]):
        latents = np.tanh(rng.standard_normal((2, 4, 3, 3))).astype(np.float32)
        recorder(step, t, latents)
        latents[...] = 0  # the recorder keeps a copy, not a view
        steps.append(np.array(recorder.latents[-1]))
    final = np.tanh(rng.standard_normal((2, 4, 3, 3))).astype(np.float32)
    assert recorder.steps == [0, 1, 2] and recorder.timesteps == [999.0, 666.0, 333.0]
    grid = emergence_grid(_FakeDecoder(), recorder, final_latents=final, image_index=1, labels=False, min_size=0)
    assert grid.size == (4 * 6, 6)
    expected_last = decoded_to_uint8(_FakeDecoder().decode_latents(final[1:2]))[0]
    assert np.array_equal(np.asarray(grid)[:, 18:24], expected_last)
    enlarged = emergence_grid(_FakeDecoder(), recorder, image_index=1, min_size=20)  # 6 px -> 4 x 6 = 24 px
    assert enlarged.size == (3 * 24, 24)
    with pytest.raises(NpdiffError, match="holds no steps"):
        emergence_grid(_FakeDecoder(), StepRecorder())
