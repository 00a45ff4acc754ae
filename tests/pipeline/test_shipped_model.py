"""The shipped model weights/tiny-shapes really draws what it is asked for, through npdiff.

The pictures are read back by the rules of weights/shape_classifier.py (border colour, centre colour,
fill measures of the shape's bounding box). Prompts and noise come from a seed drawn per run (printed
on failure; NPDIFF_TEST_SEED=<seed> repeats it); the pass criteria are the issue's rates over a batch,
so a run fails only when the model is really worse than the thresholds, not on one unlucky picture.
One check (the last test) compares npdiff's pictures with diffusers' on the same seed.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import npdiff
from helpers import IMAGE_LEVELS_TOL
from shipped import MODEL_DIR, shape_classifier, shapes_data, to_uint8

STEPS = 15
GUIDANCE = 7.0
# The rates: background and shape colour right in 90% of pictures, shape right in 80%.
# weights/README.md measures 100% and 100% at guidance 3-8 (1,000 pictures, DDIM, 15-50 steps), so a
# fresh batch of BATCH falls under the bars only if the model really got worse.
COLOR_MIN = 0.9
SHAPE_MIN = 0.8
# Guidance 1 against 7: at guidance 1 this model is already right about the colours in ~97% of pictures
# (weights/README.md: 96.5-98.5% on 200-picture sets), at guidance 7 in 100%. To see that change every
# run the batch is large: at a true 97% a batch of 256 has no colour mistake at guidance 1 with
# probability ~0.1%.
BATCH = 256
NEGATIVE_BATCH = 64  # the negative prompt moves the colour rate from ~100% to ~13%: a small batch shows it


@pytest.fixture(scope="module")
def run_seed():
    return int(os.environ.get("NPDIFF_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture(scope="module")
def pipe():
    return npdiff.StableDiffusionPipeline.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def text_to_image(pipe, run_seed):
    """The same random prompts and noise four ways: -> dict name -> (pictures, specs).

    "guided": guidance 7; "unguided": guidance 1; "negative": guidance 7 with the shape's colour
    word as the negative prompt; "unrelated": guidance 7 with a colour word that is neither the
    shape's nor the background's as the negative prompt (the last two on the first NEGATIVE_BATCH).
    """
    prompts, specs = shapes_data.random_prompts(BATCH, run_seed)
    negatives = [spec["color"] for spec in specs[:NEGATIVE_BATCH]]
    unrelated = shapes_data.unrelated_colors(specs[:NEGATIVE_BATCH], run_seed + 1)
    runs = {"guided": (GUIDANCE, BATCH, None), "unguided": (1.0, BATCH, None),
            "negative": (GUIDANCE, NEGATIVE_BATCH, negatives),
            "unrelated": (GUIDANCE, NEGATIVE_BATCH, unrelated)}
    results = {}
    for name, (guidance, count, negative_prompts) in runs.items():
        output = pipe(prompts[:count], negative_prompt=negative_prompts, num_inference_steps=STEPS,
                      guidance_scale=guidance, seed=run_seed, output_type="np", progress=False)
        results[name] = (to_uint8(output.images), specs[:count])
    return results


def shape_color_rate(pictures, specs):
    """Fraction of pictures whose shape centre is the prompt's shape colour."""
    found = [shape_classifier.classify_picture(picture)["color"] for picture in pictures]
    return float(np.mean([color == spec["color"] for color, spec in zip(found, specs)]))


def test_folder_is_a_small_safetensors_diffusers_model():
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    total_bytes = sum(p.stat().st_size for p in files)
    assert total_bytes <= 25 * 2**20, f"weights/tiny-shapes is {total_bytes / 2**20:.1f} MiB, over 25 MiB"
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    for part in ("text_encoder", "unet", "vae"):
        assert list((MODEL_DIR / part).glob("*.safetensors")), f"{part}/ has no safetensors file"
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    vocab = json.loads((MODEL_DIR / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    scheduler = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"],
            scheduler["num_train_timesteps"]) == ("scaled_linear", 0.00085, 0.012, 1000)


def test_default_model_is_the_shipped_one():
    from npdiff.pipeline_utils import default_model_path

    if os.environ.get("NPDIFF_MODEL"):
        pytest.skip("NPDIFF_MODEL chooses another default model")
    assert Path(default_model_path()).resolve() == MODEL_DIR.resolve()


def test_guided_pictures_show_the_named_colours_and_shapes(text_to_image, run_seed):
    scores = shape_classifier.score(*text_to_image["guided"])
    assert scores["color_accuracy"] >= COLOR_MIN, f"seed {run_seed}: {scores}"
    assert scores["shape_accuracy"] >= SHAPE_MIN, f"seed {run_seed}: {scores}"


def test_guidance_7_gets_colours_right_more_often_than_guidance_1(text_to_image, run_seed):
    """Measured on 200 pictures (weights/README.md): colours 96.5% -> 100% from guidance 1 to 7, and the
    mean colour error (RGB distance from the named colours) 28 -> 11."""
    unguided = shape_classifier.score(*text_to_image["unguided"])
    guided = shape_classifier.score(*text_to_image["guided"])
    assert guided["color_accuracy"] > unguided["color_accuracy"], \
        f"seed {run_seed}: colours right at guidance 1: {unguided}, at guidance {GUIDANCE}: {guided}"


def test_negative_prompt_pushes_its_colour_out(text_to_image, run_seed):
    pictures, specs = text_to_image["guided"]
    without = shape_color_rate(pictures[:NEGATIVE_BATCH], specs[:NEGATIVE_BATCH])
    with_negative = shape_color_rate(*text_to_image["negative"])
    assert with_negative <= without - 0.25, \
        f"seed {run_seed}: shapes in the named colour: {without:.0%} without, {with_negative:.0%} with it as negative"
    # ... and it is that colour which goes, more than with an unrelated colour word as negative prompt
    # (weights/README.md: 13% against 48% of 100 pictures; any one-word negative prompt disturbs this
    # model's pictures, an unrelated one too, because it never saw one-word captions)
    with_unrelated = shape_color_rate(*text_to_image["unrelated"])
    assert with_negative <= with_unrelated - 0.1, \
        f"seed {run_seed}: shapes in the named colour: {with_negative:.0%} with it as negative prompt, " \
        f"{with_unrelated:.0%} with an unrelated colour as negative prompt"


def test_img2img_keeps_layout_at_low_strength_and_follows_prompt_at_high(pipe, run_seed):
    rng = np.random.default_rng(run_seed)
    shape, color, background, _, _, _ = shapes_data.sample_spec(rng)
    drawn = np.asarray(shapes_data.draw_shape(shape, color, background, 18, 16.0, 16.0))  # [32,32,3]
    drawn_mask = shape_classifier.shape_mask(drawn)  # [32,32]
    # prompts naming other colours and another shape than the drawing
    prompts, specs = [], []
    while len(prompts) < 8:
        spec_shape, spec_color, spec_background, _, _, _ = shapes_data.sample_spec(rng)
        if spec_shape == shape or {spec_color, spec_background} & {color, background}:
            continue
        prompts.append(f"a {spec_color} {spec_shape} on a {spec_background} background")
        specs.append(dict(shape=spec_shape, color=spec_color, background=spec_background))

    # strength 0.1 (one step of 15 here): the drawing, colours and all, survives the other prompt
    low = to_uint8(pipe.img2img(prompts, image=drawn, strength=0.1, num_inference_steps=STEPS,
                                guidance_scale=GUIDANCE, seed=run_seed, output_type="np", progress=False).images)
    kept = 0
    for picture in low:
        found = shape_classifier.classify_picture(picture)
        overlap = shape_classifier.iou(shape_classifier.shape_mask(picture), drawn_mask)
        kept += (found["background"], found["color"]) == (background, color) and overlap >= 0.7
    assert kept >= 7, f"seed {run_seed}: {kept}/8 pictures kept the drawn {color} {shape} on {background}"

    # strength 1 starts from noise: the prompt's colours win
    high = to_uint8(pipe.img2img(prompts, image=drawn, strength=1.0, num_inference_steps=STEPS,
                                 guidance_scale=GUIDANCE, seed=run_seed, output_type="np", progress=False).images)
    followed = shape_classifier.score(high, specs)["color_accuracy"]
    assert followed >= 0.75, f"seed {run_seed}: strength 1 followed the prompt's colours in {followed:.0%}"


def test_npdiff_draws_what_diffusers_draws(pipe, run_seed):
    import torch
    from diffusers import StableDiffusionPipeline

    prompts, _ = shapes_data.random_prompts(3, run_seed + 1)
    ours = to_uint8(pipe(prompts, num_inference_steps=10, guidance_scale=GUIDANCE, seed=run_seed,
                         output_type="np", progress=False).images)
    reference_pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32,
                                                             safety_checker=None, requires_safety_checker=False)
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe(prompts, num_inference_steps=10, guidance_scale=GUIDANCE,
                               generator=torch.Generator().manual_seed(run_seed), output_type="np").images
    reference = to_uint8(reference)
    worst = int(np.abs(ours.astype(np.int32) - reference.astype(np.int32)).max())
    assert worst <= IMAGE_LEVELS_TOL, f"seed {run_seed}: npdiff and diffusers differ by {worst} levels"
