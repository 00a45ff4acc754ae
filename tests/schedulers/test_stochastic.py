"""Stochastic samplers vs diffusers with the same seed: npdiff.rng.TorchGenerator on our side,
torch.Generator().manual_seed(seed) on diffusers' side.

The noise must be drawn where diffusers draws it, with the same shape, so the same seed gives the
same chain; afterwards both generators must be in the same state (checked by one more draw).
"""

import numpy as np
import pytest
import torch
from helpers import assert_rel_close

from npdiff.errors import NpdiffError
from npdiff.rng import TorchGenerator
from scheduler_harness import BETA_VARIANTS, SD_CONFIG, compare_schedule, make_pair, run_chains


def assert_generators_in_step(ours, theirs):
    np.testing.assert_array_equal(ours.randn((5,), dtype=np.float32), torch.randn(5, generator=theirs).numpy(),
                                  err_msg="generators drew a different amount of noise")


def seeded_pair(seed):
    return TorchGenerator(seed), torch.Generator().manual_seed(seed)


CASES = [
    # (diffusers class, extra config, step kwargs)
    ("DDIMScheduler", {}, {"eta": "random"}),
    ("DDIMScheduler", {"timestep_spacing": "trailing"}, {"eta": 1.0}),
    ("DDIMScheduler", {}, {"eta": 0.5, "use_clipped_model_output": True}),
    ("DDPMScheduler", {"variance_type": "fixed_small"}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "linspace"}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 0.5}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 8.0}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, {}),
    ("KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "leading"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "leading",
                                     "solver_type": "heun", "final_sigmas_type": "sigma_min"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                     "timestep_spacing": "trailing", "lower_order_final": False}, {}),
]
# Karras / exponential sigmas on the cosine schedule repeat timesteps, which diffusers cannot step through
NO_COSINE = ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, "random"])
def test_same_seed_same_chain(case, prediction_type, steps, seed, rng):
    class_name, extra, step_kwargs = CASES[case]
    step_kwargs = dict(step_kwargs)
    if step_kwargs.get("eta") == "random":
        step_kwargs["eta"] = float(rng.uniform(0.05, 1.0))
    n = int(rng.integers(3, 31)) if steps == "random" else steps
    betas = sorted(BETA_VARIANTS)
    if step_kwargs.get("eta") == 1.0 or class_name in NO_COSINE \
            or extra.get("use_karras_sigmas") or extra.get("use_exponential_sigmas"):
        # From t = 999 of the cosine schedule (alpha_bar ~ 2e-9, sigma ~ 2e4) diffusers takes the sqrt
        # of a quantity that is >= 0 exactly but rounds below 0 (DDIM eta=1: 1 - alpha_prev - sigma_t^2
        # ~ 1e-13; Euler ancestral: sigma_to^2 - sigma_up^2 = sigma_to^4/sigma_from^2) and returns NaN;
        # npdiff clamps at 0. Degenerate, so not compared.
        betas.remove("squaredcos_cap_v2")
    beta_name = str(rng.choice(betas))
    config = {**SD_CONFIG, **BETA_VARIANTS[beta_name], **extra, "prediction_type": prediction_type}
    what = f"{class_name} {extra} {step_kwargs} {prediction_type} {beta_name} n={n}"
    ours, theirs = make_pair(class_name, config)
    theirs.set_timesteps(n)
    if class_name == "KDPM2AncestralDiscreteScheduler" and torch.isnan(theirs.timesteps).any():
        # a step so large that sigma_down rounds to 0 (e.g. 2 steps): diffusers' midpoint timestep is NaN
        with pytest.raises(NpdiffError, match="sigma_down rounds to 0"):
            ours.set_timesteps(n)
        return
    ours.set_timesteps(n)
    compare_schedule(ours, theirs, what)
    ours_generator, theirs_generator = seeded_pair(seed)
    run_chains(ours, theirs, rng, step_kwargs=step_kwargs, ours_step_kwargs={"generator": ours_generator},
               theirs_step_kwargs={"generator": theirs_generator}, what=what)
    assert_generators_in_step(ours_generator, theirs_generator)


@pytest.mark.parametrize("class_name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler", "DDIMScheduler",
                                        "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_one_generator_per_batch_item(class_name, seed, rng):
    """A list of generators draws each item's noise from its own generator, as diffusers does."""
    extra = {"algorithm_type": "sde-dpmsolver++"} if class_name == "DPMSolverMultistepScheduler" else {}
    ours, theirs = make_pair(class_name, {**SD_CONFIG, **extra})
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    seeds = [seed, seed + 1, seed + 2]
    ours_generators = [TorchGenerator(s) for s in seeds]
    theirs_generators = [torch.Generator().manual_seed(s) for s in seeds]
    step_kwargs = {"eta": 1.0} if class_name == "DDIMScheduler" else {}
    run_chains(ours, theirs, rng, shape=(3, 4, 4, 4), step_kwargs=step_kwargs,
               ours_step_kwargs={"generator": ours_generators},
               theirs_step_kwargs={"generator": theirs_generators}, what=f"{class_name} generator list")
    for ours_generator, theirs_generator in zip(ours_generators, theirs_generators):
        assert_generators_in_step(ours_generator, theirs_generator)


def test_deterministic_steps_draw_no_noise(seed, rng):
    """DDIM with eta=0, Euler without churn and the deterministic new samplers must leave the generator
    untouched (like diffusers, whose Heun/DPM2/UniPC/DEIS steps take no generator at all)."""
    for class_name, step_kwargs in (("DDIMScheduler", {"eta": 0.0}), ("EulerDiscreteScheduler", {}),
                                    ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                                    ("UniPCMultistepScheduler", {}), ("DEISMultistepScheduler", {}),
                                    ("DPMSolverMultistepScheduler", {})):
        ours, _ = make_pair(class_name, SD_CONFIG)
        ours.set_timesteps(4)
        generator = TorchGenerator(seed)
        sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        for t in ours.timesteps:
            model_output = rng.standard_normal(sample.shape).astype(np.float32)
            sample = ours.step(model_output, t, ours.scale_model_input(sample, t), generator=generator,
                               **step_kwargs).prev_sample
        np.testing.assert_array_equal(generator.randn((4,)), TorchGenerator(seed).randn((4,)))


def test_ddim_variance_noise_instead_of_generator(rng):
    """DDIM's variance_noise argument (given noise) matches diffusers with the same noise."""
    ours, theirs = make_pair("DDIMScheduler", SD_CONFIG)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    sample = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    model_output = rng.standard_normal(sample.shape).astype(np.float32)
    noise = rng.standard_normal(sample.shape).astype(np.float32)
    t = ours.timesteps[1]
    mine = ours.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
    reference = theirs.step(torch.from_numpy(model_output), theirs.timesteps[1], torch.from_numpy(sample),
                            eta=0.7, variance_noise=torch.from_numpy(noise)).prev_sample
    assert_rel_close(mine, reference, 1e-5, "DDIM variance_noise")


def test_dpm2_a_refuses_where_diffusers_gives_nan():
    """DPM2 a with 2 steps on the linear schedule: sigma_down of the first step rounds to 0, diffusers'
    midpoint timestep and pictures are NaN; npdiff refuses at set_timesteps, naming the step."""
    config = {**SD_CONFIG, **BETA_VARIANTS["linear"], "timestep_spacing": "linspace"}
    ours, theirs = make_pair("KDPM2AncestralDiscreteScheduler", config)
    theirs.set_timesteps(2)
    assert torch.isnan(theirs.timesteps).any(), "diffusers no longer NaN here; compare instead"
    with pytest.raises(NpdiffError, match="with 2 steps the step from sigma .* is too large"):
        ours.set_timesteps(2)
    ours.set_timesteps(3)  # fine with one more step


def test_dpmpp_sde_variance_noise_instead_of_generator(rng):
    """DPM++ SDE's variance_noise argument (given noise) matches diffusers with the same noise."""
    config = {**SD_CONFIG, "algorithm_type": "sde-dpmsolver++"}
    ours, theirs = make_pair("DPMSolverMultistepScheduler", config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    sample = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    for i in range(2):
        model_output = rng.standard_normal(sample.shape).astype(np.float32)
        noise = rng.standard_normal(sample.shape).astype(np.float32)
        mine = ours.step(model_output, ours.timesteps[i], sample, variance_noise=noise).prev_sample
        reference = theirs.step(torch.from_numpy(model_output), theirs.timesteps[i], torch.from_numpy(sample),
                                variance_noise=torch.from_numpy(noise)).prev_sample
        assert_rel_close(mine, reference, 1e-5, f"DPM++ SDE variance_noise, step {i}")
        sample = mine


def test_no_nan_where_rounding_goes_below_zero(seed, rng):
    """Cosine schedule from t = 999: diffusers' Euler ancestral and DDIM (eta = 1) return NaN there
    (sqrt of a value rounded below 0); npdiff clamps at 0 and stays finite. diffusers is checked to
    be NaN, so this test notices if that ever changes and the comparison can be made instead."""
    config = {**SD_CONFIG, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}
    for class_name, n, step_kwargs in (("EulerAncestralDiscreteScheduler", 4, {}),
                                       ("DDIMScheduler", 1, {"eta": 1.0})):
        ours, theirs = make_pair(class_name, {**config, "timestep_spacing": "trailing"}
                                 if class_name == "DDIMScheduler" else config)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32) * np.float32(float(ours.init_noise_sigma))
        model_output = rng.standard_normal(sample.shape).astype(np.float32)
        t = ours.timesteps[0]
        mine = ours.step(model_output, t, ours.scale_model_input(sample, t), generator=TorchGenerator(seed),
                         **step_kwargs).prev_sample
        reference = theirs.step(torch.from_numpy(model_output), theirs.timesteps[0],
                                theirs.scale_model_input(torch.from_numpy(sample), theirs.timesteps[0]),
                                generator=torch.Generator().manual_seed(seed), **step_kwargs).prev_sample
        assert np.isfinite(mine).all(), class_name
        assert torch.isnan(reference).any(), f"{class_name}: diffusers no longer NaN here; compare instead"
