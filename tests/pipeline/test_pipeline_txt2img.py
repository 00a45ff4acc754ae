"""Text-to-image against diffusers' StableDiffusionPipeline on a tiny random model (tests/pipeline/tiny_sd.py):
same prompt, negative prompt and seed (a CPU torch.Generator on their side, npdiff.rng.TorchGenerator on ours)
-> final latents within relative 1e-4, 8-bit pictures within 2 levels per pixel."""

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close

import torch

from tiny_sd import tiny_sd_folder, torch_pipeline  # noqa: E402

from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.rng import TorchGenerator  # noqa: E402

PROMPTS = ["a red circle on a blue square", "a photo of an astronaut riding a horse on mars",
           "watercolor 東京 at night, ((detailed)), 🐱", "three green triangles"]
NEGATIVES = ["blurry, low quality", "", "text, watermark"]


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def load_ours(folder, sampler):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler=sampler)
    pipe.show_progress = False
    return pipe


def run_theirs(folder, sampler, prompt, seed, **kwargs):
    """diffusers' pipeline; -> (pictures as uint8 [B,H,W,3], final latents [B,4,h,w])."""
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    pipe = torch_pipeline(folder, sampler)
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
               callback_on_step_end=keep_latents, **kwargs)
    return to_levels(out.images), final["latents"]


def to_levels(float_pictures):
    return np.round(np.asarray(float_pictures) * 255).astype(np.int16)


def assert_same_pictures(ours, theirs_levels):
    levels = to_levels(ours)
    assert levels.shape == theirs_levels.shape
    worst = int(np.max(np.abs(levels - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "heun", "dpm2", "dpm2_a_karras", "dpmpp_2m_sde",
                                     "dpmpp_2m_sde_karras", "unipc", "deis"])
def test_same_picture_as_diffusers(folder, rng, seed, sampler):
    prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
    negative = NEGATIVES[int(rng.integers(len(NEGATIVES)))]
    steps = int(rng.integers(3, 7))
    guidance = float(rng.uniform(2.0, 9.0))
    kwargs = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance)
    theirs_pictures, theirs_latents = run_theirs(folder, sampler, prompt, seed, **kwargs)
    ours = load_ours(folder, sampler)(prompt, seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what=f"{sampler} final latents")
    assert_same_pictures(ours.images, theirs_pictures)
    assert ours.seed == seed
    assert ours.parameters["sampler"] == sampler and ours.parameters["steps"] == steps
    assert ours.parameters["prompt"] == prompt and ours.parameters["negative_prompt"] == negative


def test_batch_of_prompts_and_images_per_prompt(folder, seed):
    """Two prompts, two negatives, two pictures each: the noise is drawn for the whole batch at once."""
    prompts, negatives = PROMPTS[:2], NEGATIVES[:2]
    kwargs = dict(negative_prompt=negatives, num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=2,
                  height=32, width=64)
    theirs_pictures, theirs_latents = run_theirs(folder, "euler_a", prompts, seed, **kwargs)
    ours = load_ours(folder, "euler_a")(prompts, seed=seed, output_type="pil", **kwargs)
    assert len(ours.images) == 4 and ours.images[0].size == (64, 32)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what="batch final latents")
    assert_same_pictures(np.stack([np.asarray(p) for p in ours.images]) / 255.0, theirs_pictures)


class CountingUNet:
    """Wraps the UNet and records the batch size of every call."""

    def __init__(self, unet):
        self.unet, self.batches, self.config = unet, [], unet.config

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.batches.append(sample.shape[0])
        return self.unet(sample, timestep, encoder_hidden_states)


@pytest.mark.parametrize("guidance", [1.0, 0.3])
def test_guidance_at_most_one_skips_the_unconditional_pass(folder, seed, guidance):
    kwargs = dict(num_inference_steps=3, guidance_scale=guidance)
    theirs_pictures, theirs_latents = run_theirs(folder, "pndm", PROMPTS[0], seed, **kwargs)
    pipe = load_ours(folder, "pndm")
    pipe.unet = CountingUNet(pipe.unet)
    ours = pipe(PROMPTS[0], seed=seed, output_type="np", **kwargs)
    assert set(pipe.unet.batches) == {1}
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what="unguided final latents")
    assert_same_pictures(ours.images, theirs_pictures)


def test_guidance_uses_one_unet_call_at_twice_the_batch(folder, seed):
    pipe = load_ours(folder, "ddim")
    pipe.unet = CountingUNet(pipe.unet)
    pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=7.5, seed=seed, output_type="latent")
    assert pipe.unet.batches == [4, 4]


def test_callbacks_like_diffusers(folder, seed):
    """callback(step, timestep, latents) on the same steps, with the same values, as diffusers' callback
    (PNDM runs one timestep more than the steps asked for: the callbacks follow diffusers' progress steps)."""
    sampler, callback_steps = "pndm", 2
    theirs_calls, ours_calls = [], []
    pipe = torch_pipeline(folder, sampler)
    pipe(PROMPTS[1], num_inference_steps=5, generator=torch.Generator().manual_seed(seed), output_type="latent",
         callback=lambda i, t, latents: theirs_calls.append((i, float(t), latents.numpy().copy())),
         callback_steps=callback_steps)
    load_ours(folder, sampler)(PROMPTS[1], num_inference_steps=5, seed=seed, output_type="latent",
                               callback=lambda i, t, latents: ours_calls.append((i, float(t), np.copy(latents))),
                               callback_steps=callback_steps)
    assert [(i, t) for i, t, _ in ours_calls] == [(i, t) for i, t, _ in theirs_calls]
    assert len(ours_calls) >= 2
    for (i, _, ours), (_, _, theirs) in zip(ours_calls, theirs_calls):
        assert_rel_close(ours, theirs, tol=NETWORK_TOL, what=f"latents at callback step {i}")


def test_given_latents_and_generator(folder, rng):
    """latents= replaces the first draw; a generator= continues its own stream (for euler_a's noise)."""
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    stream_seed = int(rng.integers(2**31))
    pipe = torch_pipeline(folder, "euler_a")
    theirs = pipe(PROMPTS[3], num_inference_steps=3, latents=torch.from_numpy(latents),
                  generator=torch.Generator().manual_seed(stream_seed), output_type="latent").images.numpy()
    ours = load_ours(folder, "euler_a")(PROMPTS[3], num_inference_steps=3, latents=latents,
                                        generator=TorchGenerator(stream_seed), output_type="latent")
    assert ours.images is None and ours.seed is None
    assert_rel_close(ours.latents, theirs, tol=NETWORK_TOL, what="final latents from given latents")


def test_repeatable_and_default_size(folder):
    """Same seed twice -> identical pictures (each call starts a fresh scheduler); size = 8 * sample_size."""
    pipe = load_ours(folder, "dpmpp_2m")
    first = pipe(PROMPTS[0], num_inference_steps=3, seed=11)
    second = pipe(PROMPTS[0], num_inference_steps=3, seed=11)
    other = pipe(PROMPTS[0], num_inference_steps=3, seed=12)
    assert first.images[0].size == (64, 64) and first.parameters["height"] == 64
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert not np.array_equal(first.latents, other.latents)
    unseeded = pipe(PROMPTS[0], num_inference_steps=1, output_type="latent")
    assert isinstance(unseeded.seed, int) and unseeded.parameters["seed"] == unseeded.seed
