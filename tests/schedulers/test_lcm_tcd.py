"""LCM and TCD (the consistency samplers) against diffusers' LCMScheduler / TCDScheduler.

Schedules must be equal (int64, exact) for any num_inference_steps / original_inference_steps /
strength / custom timesteps; chains step for step within STEP_TOL with the same seed (TorchGenerator on
our side, a CPU torch.Generator on theirs), both generators in the same state afterwards.
"""

import numpy as np
import pytest
import torch

import diffusers
from npdiff.errors import NpdiffError
from npdiff.rng import TorchGenerator
from npdiff.schedulers import LCMScheduler, TCDScheduler, make_scheduler
from scheduler_harness import BETA_VARIANTS, SD15_SCHEDULER_CONFIG, SD_CONFIG, compare_schedule, make_pair, run_chains
from test_stochastic import assert_generators_in_step, seeded_pair

CLASSES = ["LCMScheduler", "TCDScheduler"]


def random_config(rng, prediction_type):
    """SD's config with a random beta schedule and the consistency-specific keys drawn at random."""
    beta_name = str(rng.choice(sorted(BETA_VARIANTS)))
    return {**SD_CONFIG, **BETA_VARIANTS[beta_name], "prediction_type": prediction_type,
            "original_inference_steps": int(rng.choice([50, 25, 100, int(rng.integers(4, 200))])),
            "timestep_scaling": float(rng.choice([10.0, float(rng.uniform(0.5, 20.0))])),
            "set_alpha_to_one": bool(rng.integers(2)),
            "timestep_spacing": str(rng.choice(["leading", "trailing", "linspace"]))}


@pytest.mark.parametrize("class_name", CLASSES)
def test_timesteps_like_diffusers(class_name, rng):
    """Many (num_inference_steps, original_inference_steps, strength, spacing) combinations, exactly."""
    for _ in range(40):
        config = random_config(rng, "epsilon")
        ours, theirs = make_pair(class_name, config)
        original = config["original_inference_steps"]
        kwargs = {}
        if rng.integers(3) == 0:
            kwargs["strength"] = float(rng.uniform(0.1, 1.0))
        if rng.integers(3) == 0:
            kwargs["original_inference_steps"] = original = int(rng.integers(4, 200))
        available = int(original * kwargs.get("strength", 1.0))
        if available < 1:
            continue
        n = int(rng.integers(1, min(available, original) + 1))
        ours.set_timesteps(n, **kwargs)
        theirs.set_timesteps(n, **kwargs)
        compare_schedule(ours, theirs, f"{class_name} n={n} {kwargs} {config}")
        assert ours.num_inference_steps == theirs.num_inference_steps


@pytest.mark.parametrize("class_name", CLASSES)
def test_custom_timesteps_like_diffusers(class_name, rng):
    ours, theirs = make_pair(class_name, SD_CONFIG)
    timesteps = sorted(rng.choice(1000, size=int(rng.integers(1, 9)), replace=False).tolist(), reverse=True)
    strength = float(rng.choice([1.0, float(rng.uniform(0.3, 1.0))]))
    ours.set_timesteps(timesteps=timesteps, strength=strength)
    theirs.set_timesteps(timesteps=timesteps, strength=strength)
    compare_schedule(ours, theirs, f"{class_name} custom {timesteps} strength {strength}")
    assert ours.num_inference_steps == theirs.num_inference_steps


@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, "random"])
def test_same_seed_same_chain(class_name, prediction_type, steps, seed, rng):
    config = random_config(rng, prediction_type)
    if rng.integers(4) == 0:
        config.update(clip_sample=True, clip_sample_range=float(rng.uniform(0.5, 2.0)))
    original = config["original_inference_steps"]
    n = min(int(rng.integers(3, 9)) if steps == "random" else steps, original)
    step_kwargs = {}
    if class_name == "TCDScheduler":
        step_kwargs["eta"] = float(rng.choice([0.3, 1.0, float(rng.uniform(0.0, 1.0))]))
    ours, theirs = make_pair(class_name, config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    what = f"{class_name} {config} {step_kwargs} n={n}"
    compare_schedule(ours, theirs, what)
    ours_generator, theirs_generator = seeded_pair(seed)
    run_chains(ours, theirs, rng, step_kwargs=step_kwargs, ours_step_kwargs={"generator": ours_generator},
               theirs_step_kwargs={"generator": theirs_generator}, what=what)
    assert_generators_in_step(ours_generator, theirs_generator)


@pytest.mark.parametrize("class_name", CLASSES)
def test_one_generator_per_batch_item(class_name, seed, rng):
    ours, theirs = make_pair(class_name, SD_CONFIG)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    seeds = [seed, seed + 1]
    ours_generators = [TorchGenerator(s) for s in seeds]
    theirs_generators = [torch.Generator().manual_seed(s) for s in seeds]
    run_chains(ours, theirs, rng, shape=(2, 4, 4, 4), ours_step_kwargs={"generator": ours_generators},
               theirs_step_kwargs={"generator": theirs_generators}, what=f"{class_name} generator list")
    for ours_generator, theirs_generator in zip(ours_generators, theirs_generators):
        assert_generators_in_step(ours_generator, theirs_generator)


def test_tcd_gamma_zero_and_last_steps_draw_no_noise(seed, rng):
    """TCD with eta = 0 never draws; LCM and TCD draw nothing on their last step (like diffusers)."""
    for scheduler, kwargs, draws in ((TCDScheduler(), {"eta": 0.0}, 0), (TCDScheduler(), {"eta": 0.5}, 3),
                                     (LCMScheduler(), {}, 3)):
        scheduler.set_timesteps(4)
        generator = TorchGenerator(seed)
        sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        for t in scheduler.timesteps:
            model_output = rng.standard_normal(sample.shape).astype(np.float32)
            sample = scheduler.step(model_output, t, sample, generator=generator, **kwargs).prev_sample
        reference = TorchGenerator(seed)
        for _ in range(draws):
            reference.randn(sample.shape)
        np.testing.assert_array_equal(generator.randn((4,)), reference.randn((4,)))


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_from_the_model_config(name):
    """make_scheduler('lcm', SD 1.5's config) == diffusers' LCMScheduler.from_config(pipe.scheduler.config)."""
    class_name = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}[name]
    theirs = getattr(diffusers, class_name).from_config(
        diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config)
    ours = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == \
        {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert float(ours.final_alpha_cumprod) == float(theirs.final_alpha_cumprod)


@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("key,value", [("original_inference_steps", "50"), ("original_inference_steps", 0),
                                       ("original_inference_steps", 2000), ("original_inference_steps", 4.0),
                                       ("timestep_scaling", -1.0), ("timestep_scaling", "10"),
                                       ("timestep_scaling", float("nan")), ("clip_sample", "yes"),
                                       ("set_alpha_to_one", None), ("thresholding", True)])
def test_bad_config_names_the_key(class_name, key, value):
    cls = {"LCMScheduler": LCMScheduler, "TCDScheduler": TCDScheduler}[class_name]
    with pytest.raises(NpdiffError, match=key):
        cls(**{key: value})


@pytest.mark.parametrize("cls", [LCMScheduler, TCDScheduler])
def test_bad_set_timesteps_and_step(cls, rng):
    scheduler = cls(original_inference_steps=8)
    with pytest.raises(NpdiffError, match="original_inference_steps"):
        scheduler.set_timesteps(9)
    with pytest.raises(NpdiffError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(NpdiffError, match="exactly one"):
        scheduler.set_timesteps(4, timesteps=[999, 500])
    with pytest.raises(NpdiffError, match="descending"):
        scheduler.set_timesteps(timesteps=[500, 999])
    with pytest.raises(NpdiffError, match=r"\[0, 1000\)"):
        scheduler.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(NpdiffError, match="strength"):
        scheduler.set_timesteps(4, strength=0.0)
    sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    with pytest.raises(NpdiffError, match="set_timesteps"):
        scheduler.step(sample, 999, sample)
    scheduler.set_timesteps(4)
    with pytest.raises(NpdiffError, match="not in the scheduler's timesteps"):
        scheduler.step(sample, 998, sample)
    if cls is TCDScheduler:
        with pytest.raises(NpdiffError, match="eta"):
            scheduler.step(sample, scheduler.timesteps[0], sample, eta=1.5)
