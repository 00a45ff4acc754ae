"""Configs like diffusers' ConfigMixin: defaults, scheduler_config.json, switching class; bad input."""

import inspect

import diffusers
import numpy as np
import pytest

import npdiff.schedulers as S
from npdiff.errors import NpdiffError
from scheduler_harness import SD15_SCHEDULER_CONFIG, SD_CONFIG, compare_schedule, make_pair, run_chains


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("class_name", sorted(S.SCHEDULER_CLASSES))
def test_defaults_are_diffusers_defaults(class_name):
    """Every __init__ keyword of the diffusers class, with the same default, and nothing else."""
    signature = inspect.signature(getattr(diffusers, class_name).__init__)
    theirs = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    ours = S.SCHEDULER_CLASSES[class_name]._DEFAULTS
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key] == value or (value != value and ours[key] != ours[key]), key  # -inf == -inf; nan


def test_sd15_scheduler_config_json():
    """SD 1.5's scheduler_config.json -> PNDM with the same config as diffusers builds from it."""
    ours = S.scheduler_from_config(SD15_SCHEDULER_CONFIG)
    theirs = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert isinstance(ours, S.PNDMScheduler)
    assert public(ours.config) == public(theirs.config)
    assert ours.config["_class_name"] == "PNDMScheduler"
    assert ours.config.clip_sample is False  # unknown to PNDM: kept for a later switch, like diffusers
    assert ours.config.steps_offset == 1
    np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
def test_make_scheduler_keeps_the_model_config(name, rng):
    """make_scheduler(name, json) == diffusers' Target.from_config(pipe.scheduler.config)."""
    class_name = S.SCHEDULERS[name].__name__
    pipe_scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    overrides = dict(getattr(S.SCHEDULERS[name], "fixed", {}))  # a preset's values (Karras, SDE, ...)
    theirs = getattr(diffusers, class_name).from_config(pipe_scheduler.config, **overrides)
    ours = S.make_scheduler(name, SD15_SCHEDULER_CONFIG)
    assert type(ours).__name__ == class_name
    assert public(ours.config) == public(theirs.config)
    n = int(rng.integers(2, 25))
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    compare_schedule(ours, theirs, f"{name} n={n}")
    stochastic = ("DDPM", "EulerAncestral", "LCM", "TCD", "KDPM2Ancestral")
    if class_name == "PNDMScheduler" or class_name.startswith(stochastic) \
            or overrides.get("algorithm_type") == "sde-dpmsolver++":
        return  # stochastic ones are covered in test_stochastic; PNDM in test_deterministic
    run_chains(ours, theirs, rng, shape=(1, 4, 4, 4), what=f"{name} n={n}")


def test_switching_twice_uses_each_class_defaults():
    """Keys a scheduler took as defaults are not forced on the next class (diffusers' _use_default_values)."""
    theirs = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    theirs = diffusers.DDIMScheduler.from_config(theirs.config)
    theirs = diffusers.EulerDiscreteScheduler.from_config(theirs.config)
    ddim = S.make_scheduler("ddim", S.scheduler_from_config(SD15_SCHEDULER_CONFIG).config)
    ours = S.make_scheduler("euler", ddim.config)
    assert public(ours.config) == public(theirs.config)
    assert ours.config.timestep_spacing == "linspace"  # Euler's default, not DDIM's "leading"


def test_from_config_ignores_unknown_and_private_keys():
    config = {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "some_future_option": 3}
    scheduler = S.DDIMScheduler.from_config(config)
    assert scheduler.config["some_future_option"] == 3
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False


def test_unknown_names_list_the_known_ones():
    with pytest.raises(NpdiffError, match="known: pndm, ddim"):
        S.make_scheduler("dpmpp_sde", SD15_SCHEDULER_CONFIG)   # DPM++ SDE: left out (README, "Samplers")
    with pytest.raises(NpdiffError, match="DPMSolverSDEScheduler.*known: PNDMScheduler"):
        S.scheduler_from_config({**SD15_SCHEDULER_CONFIG, "_class_name": "DPMSolverSDEScheduler"})
    with pytest.raises(NpdiffError, match="_class_name None"):
        S.scheduler_from_config(SD_CONFIG)


@pytest.mark.parametrize("class_name", sorted(S.SCHEDULER_CLASSES))
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_num_inference_steps(class_name, steps):
    scheduler = S.SCHEDULER_CLASSES[class_name](**{k: v for k, v in SD_CONFIG.items()
                                                    if k in S.SCHEDULER_CLASSES[class_name]._DEFAULTS})
    with pytest.raises(NpdiffError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("class_name", sorted(S.SCHEDULER_CLASSES))
@pytest.mark.parametrize("key, value, listed", [
    ("prediction_type", "noise", "epsilon, v_prediction"),
    ("beta_schedule", "cosine", "linear, scaled_linear, squaredcos_cap_v2"),
    ("timestep_spacing", "uniform", "leading, trailing, linspace"),
])
def test_bad_config_values_list_the_valid_ones(class_name, key, value, listed):
    with pytest.raises(NpdiffError, match=f"{key}.*{listed}.*{value!r}"):
        S.SCHEDULER_CLASSES[class_name](**{key: value})


def test_other_bad_input():
    with pytest.raises(NpdiffError, match="unknown config key.*beta_strat"):
        S.DDIMScheduler(beta_strat=0.1)
    with pytest.raises(NpdiffError, match="thresholding=True is not implemented"):
        S.DDIMScheduler(thresholding=True)
    # (sde-dpmsolver++ is implemented now; diffusers' deprecated noise-prediction forms are not)
    with pytest.raises(NpdiffError, match="algorithm_type='sde-dpmsolver' is not implemented"):
        S.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")
    with pytest.raises(NpdiffError, match="only one of use_karras_sigmas, use_exponential_sigmas"):
        S.EulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(NpdiffError, match="trained_betas: expected 1000 values"):
        S.DDIMScheduler(trained_betas=[0.1, 0.2])
    prk = S.PNDMScheduler(skip_prk_steps=False)
    with pytest.raises(NpdiffError, match="num_inference_steps >= 4"):
        prk.set_timesteps(3)
    sample = np.zeros((1, 4, 4, 4), np.float32)
    ddim = S.DDIMScheduler(**{k: v for k, v in SD_CONFIG.items() if k in S.DDIMScheduler._DEFAULTS})
    with pytest.raises(NpdiffError, match="set_timesteps"):
        ddim.step(sample, 981, sample)
    ddim.set_timesteps(10)
    with pytest.raises(NpdiffError, match="eta must be >= 0"):
        ddim.step(sample, ddim.timesteps[0], sample, eta=-0.1)
    with pytest.raises(NpdiffError, match=r"model_output shape \(1, 4, 4, 3\) must equal sample shape"):
        ddim.step(sample[..., :3], ddim.timesteps[0], sample)
    euler = S.EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(NpdiffError, match="timestep 500.5 is not in the scheduler's timesteps"):
        euler.scale_model_input(sample, 500.5)
    with pytest.raises(NpdiffError, match="generator: expected"):
        S.EulerAncestralDiscreteScheduler().step(sample, 999.0, sample, generator="seed")


def test_trained_betas_and_repr():
    ours, theirs = make_pair("DDIMScheduler", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()})
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert "DDIMScheduler(" in repr(ours) and "trained_betas" in repr(ours)


def test_scheduler_output_reads_like_diffusers_output(rng):
    ours, theirs = make_pair("EulerDiscreteScheduler", SD_CONFIG)
    ours.set_timesteps(3)
    sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    out = ours.step(sample, ours.timesteps[0], sample)
    assert out[0] is out.prev_sample and out[1] is out.pred_original_sample and len(out.to_tuple()) == 2
    dpm = S.DPMSolverMultistepScheduler()
    dpm.set_timesteps(3)
    assert len(dpm.step(sample, dpm.timesteps[0], sample).to_tuple()) == 1  # no pred_original_sample


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_refuses_timesteps_past_the_schedule(skip_prk_steps):
    """A huge steps_offset ("leading" spacing): an NpdiffError at set_timesteps, before any UNet call
    (it was an IndexError at the first step, as in diffusers' PNDM; found by tests/test_fuzz_inputs.py)."""
    scheduler = S.PNDMScheduler(steps_offset=10**9, skip_prk_steps=skip_prk_steps)
    with pytest.raises(NpdiffError, match="past the last training step 999"):
        scheduler.set_timesteps(10)


@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
def test_every_sampler_has_its_webui_name(name):
    """Each sampler is written to the PNG under AUTOMATIC1111's name and read back to the same sampler,
    in webui's older "Sampler: X Karras" form and its 1.9+ "Sampler: X, Schedule type: Karras" form."""
    from npdiff.infotext import SAMPLER_NAMES, format_infotext, parse_infotext

    text = format_infotext({"prompt": "a red circle", "sampler": name, "steps": 20, "guidance_scale": 7.0,
                            "seed": 1, "height": 64, "width": 64})
    assert f"Sampler: {SAMPLER_NAMES[name]}," in text
    assert parse_infotext(text)["sampler"] == name
    webui_name = SAMPLER_NAMES[name]
    if webui_name.endswith(" Karras"):
        split = f"x\nSteps: 20, Sampler: {webui_name[:-len(' Karras')]}, Schedule type: Karras, CFG scale: 7, Seed: 1"
        assert parse_infotext(split)["sampler"] == name


@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
@pytest.mark.parametrize("betas, key", [((1e-30, 1e-30), "beta_start"), ((1e-9, 0.012), "beta_start"),
                                        ((0.00085, 1.0), "beta_end")])
def test_schedule_without_noise_or_signal_is_refused_by_name(name, betas, key):
    """A beta that rounds 1 - beta to 1 (no noise, sigma 0) or a beta of 1 (no signal) used to divide by zero
    inside step() (a ZeroDivisionError from LMS, IndexErrors from the sigma samplers); now the config is refused."""
    config = dict(beta_start=betas[0], beta_end=betas[1], beta_schedule="linear", num_train_timesteps=1000)
    with pytest.raises(NpdiffError, match=key):
        S.make_scheduler(name, config)
