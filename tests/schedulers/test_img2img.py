"""img2img: add_noise, and starting mid-schedule with set_begin_index, as diffusers' pipelines do.

The img2img pipeline keeps the last int(n * strength) timesteps, calls
scheduler.set_begin_index(t_start * order) where the scheduler has it, noises the image latents to
the first kept timestep with add_noise, and steps from there.
"""

import numpy as np
import pytest
import torch

import npdiff.schedulers as S
from helpers import assert_rel_close
from npdiff.rng import TorchGenerator
from scheduler_harness import SD_CONFIG, as_torch, make_pair, run_chains

STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler",
              "KDPM2AncestralDiscreteScheduler"}


@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_img2img_start_mid_schedule(name, prediction_type, seed, rng):
    class_name = S.SCHEDULERS[name].__name__
    extra = dict(getattr(S.SCHEDULERS[name], "fixed", {}))  # a preset's values (Karras, SDE, ...)
    ours, theirs = make_pair(class_name, {**SD_CONFIG, **extra, "prediction_type": prediction_type})
    n = int(rng.integers(5, 31))
    strength = float(rng.uniform(0.2, 0.95))  # int(n * strength) >= 1: at least one step to run
    ours.set_timesteps(n)
    theirs.set_timesteps(n)

    # 1. timesteps from strength (diffusers' get_timesteps); two-stage samplers (Heun, DPM2: order 2)
    #    hold two schedule entries per step
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    assert ours.order == theirs.order, class_name
    begin = t_start * theirs.order
    assert hasattr(ours, "set_begin_index") == hasattr(theirs, "set_begin_index"), class_name
    if hasattr(theirs, "set_begin_index"):
        ours.set_begin_index(begin)
        theirs.set_begin_index(begin)

    # 2. noise the image latents to the first kept timestep
    image_latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(image_latents.shape).astype(np.float32)
    first_ours = np.repeat(ours.timesteps[begin:begin + 1], 2)
    first_theirs = theirs.timesteps[begin:begin + 1].repeat(2)
    noised = ours.add_noise(image_latents, noise, first_ours)
    reference = theirs.add_noise(as_torch(image_latents), as_torch(noise), first_theirs)
    assert noised.dtype == np.float32
    assert_rel_close(noised, reference, 1e-6, f"{name}: add_noise")

    # 3. denoise from there, both chains from the same noised latents
    step_kwargs = {}
    if class_name in STOCHASTIC or extra.get("algorithm_type") == "sde-dpmsolver++":
        step_kwargs = {"ours_step_kwargs": {"generator": TorchGenerator(seed)},
                       "theirs_step_kwargs": {"generator": torch.Generator().manual_seed(seed)}}
    run_chains(ours, theirs, rng, shape=image_latents.shape, begin_index=begin, start_sample=noised,
               what=f"{name} img2img n={n} t_start={t_start}", **step_kwargs)


@pytest.mark.parametrize("class_name", sorted(S.SCHEDULER_CLASSES))
def test_add_noise_per_item_timesteps(class_name, rng):
    """A batch whose items sit at different timesteps (training-style add_noise)."""
    ours, theirs = make_pair(class_name, SD_CONFIG)
    n = int(rng.integers(5, 51))
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    picks = rng.integers(0, len(theirs.timesteps), size=3)
    original = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(original.shape).astype(np.float32)
    mine = ours.add_noise(original, noise, ours.timesteps[picks])
    reference = theirs.add_noise(as_torch(original), as_torch(noise), theirs.timesteps[torch.from_numpy(picks)])
    assert_rel_close(mine, reference, 1e-6, f"{class_name}: add_noise per item")
