"""Run an npdiff scheduler and the diffusers scheduler of the same name side by side.

Both start from the same random latents and receive the same random "model outputs" at every step
(fresh from the test's rng); each runs its own chain, as a pipeline would, and every quantity is
compared as it comes out: timesteps, sigmas, init_noise_sigma, scale_model_input, prev_sample and
pred_original_sample.
"""

import inspect
import logging
import warnings

import numpy as np
import torch

import diffusers
from helpers import KERNEL_TOL, assert_rel_close, rel_err

import npdiff.schedulers as ours_module

# diffusers warns when step() runs without scale_model_input() (DDIM-style tests) and on ignored
# config keys; neither matters here.
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*scale_model_input.*")

STEP_TOL = KERNEL_TOL / 5      # per-step bound, tighter than the 1e-5 policy: measured <= ~7e-7 over 50 steps
# LMS: diffusers' coefficients come from scipy quad (epsrel 1e-4) on a float32 integrand, ~2e-6
# from the exact integral we use, so LMS chains get the policy bound itself
STEP_TOL_FOR = {"LMSDiscreteScheduler": KERNEL_TOL}
# UniPC (every variant) and DEIS on x0 ("sample") prediction: their higher-order updates difference the
# predictions of neighbouring steps, which magnifies 1-ulp differences of torch's float32 exp/log. Measured
# worst per step over 40-60 seeds of random step counts: UniPC 5.1e-6 (noise-space solver, x0 prediction),
# 2.6e-6 (noise-space, v), 3.0e-6 (data-space, x0), 1.5e-6 (3rd order, exponential sigmas); DEIS 2.5e-6 (x0,
# cosine), <= 9e-7 on epsilon and v. Those chains get the policy bound itself (clean-clone runs failed UniPC at
# 2.06-2.35e-6 against 2e-6: seeds 670228181, 3184249414 ...).
STEP_TOL_FOR["UniPCMultistepScheduler"] = KERNEL_TOL
STEP_TOL_FOR["DEISMultistepScheduler"] = KERNEL_TOL  # 3rd order on epsilon, cosine: 2.7e-6 (seed 1725685002)
# KDPM2 ancestral at 2 steps: the last step (to sigma 0) adds the midpoint's derivative times the whole
# remaining sigma, so a 1-ulp difference of the midpoint's sigma shows in the result: 2.00e-6 and 2.12e-6
# in 2 of 31 seeds (1251503789, ...), epsilon, scaled_linear; every other KDPM2 ancestral step <= 1e-6
STEP_TOL_FOR["KDPM2AncestralDiscreteScheduler"] = KERNEL_TOL
SAMPLE_PREDICTION_TOL_FOR = {}
SCHEDULE_TOL = 1e-6            # sigmas / init_noise_sigma: float32 schedule values, 1 ulp apart at most

# Stable Diffusion 1.x's scheduler config (scheduler/scheduler_config.json of SD 1.5, PNDM)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_CONFIG = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if not k.startswith("_")}
BETA_VARIANTS = {
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}


def diffusers_init_keys(diffusers_class):
    return [p for p in inspect.signature(diffusers_class.__init__).parameters if p != "self"]


def make_pair(name, config):
    """(ours, theirs) built from the same config, each keeping only the keys its class takes."""
    ours_class = ours_module.SCHEDULER_CLASSES[name]
    theirs_class = getattr(diffusers, name)
    ours = ours_class(**{k: v for k, v in config.items() if k in ours_class._DEFAULTS})
    theirs = theirs_class(**{k: v for k, v in config.items() if k in diffusers_init_keys(theirs_class)})
    return ours, theirs


def as_torch(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def compare_schedule(ours, theirs, what):
    """timesteps (exact, same dtype), sigmas and init_noise_sigma (float32-close)."""
    theirs_t = theirs.timesteps.numpy()
    assert ours.timesteps.dtype == theirs_t.dtype, f"{what}: timesteps dtype {ours.timesteps.dtype} != {theirs_t.dtype}"
    from_sigmas = any(getattr(theirs.config, key, False) for key in ("use_karras_sigmas", "use_exponential_sigmas"))
    if theirs_t.dtype.kind == "f" and (from_sigmas or hasattr(theirs, "sigmas_interpol")):
        # Karras / exponential timesteps and DPM2's midpoint timesteps are fractional (interpolated in
        # log-sigma); the float32 sigmas they come from may differ by an ulp (torch's float32 log/exp
        # are not correctly rounded), so compare closely instead of exactly
        assert_rel_close(ours.timesteps, theirs_t, SCHEDULE_TOL, f"{what}: timesteps from sigmas")
    else:
        np.testing.assert_array_equal(ours.timesteps, theirs_t, err_msg=f"{what}: timesteps")
    if hasattr(theirs, "sigmas") and isinstance(theirs.sigmas, torch.Tensor):
        assert ours.sigmas.dtype == np.float32, f"{what}: sigmas dtype {ours.sigmas.dtype}"
        assert_rel_close(ours.sigmas, theirs.sigmas, SCHEDULE_TOL, f"{what}: sigmas")
    for name in ("sigmas_interpol", "sigmas_up", "sigmas_down"):  # DPM2 (a): midpoints, ancestral split
        if hasattr(theirs, name):
            usable = np.isfinite(theirs_values := getattr(theirs, name).numpy())  # diffusers' unused ends are NaN
            assert_rel_close(getattr(ours, name)[usable], theirs_values[usable], SCHEDULE_TOL, f"{what}: {name}")
    assert_rel_close(np.float32(ours.init_noise_sigma), np.float32(float(theirs.init_noise_sigma)),
                     SCHEDULE_TOL, f"{what}: init_noise_sigma")


def run_chains(ours, theirs, rng, shape=(2, 4, 8, 8), step_kwargs=None, ours_step_kwargs=None,
               theirs_step_kwargs=None, begin_index=None, what="", start_sample=None, amplification=None):
    """Step both schedulers over their timesteps (from begin_index if given) with the same inputs: the same
    model output, and at every step the same sample (both go on from ours).

    Returns the worst relative error seen (for reporting); asserts <= STEP_TOL at every step, times
    the largest cancellation factor met so far in the chain (errors carry down the chain):
      - always ||sample in|| / ||prev_sample||: a step whose output is much smaller than its input
        (Euler from sigma_max ~ 2e4 of the cosine schedule straight to sigma ~ 0.03) turns one-ulp
        differences at the input's scale into large relative differences of the output;
      - amplification: optional callable () -> float for cancellation inside a step's formula
        (PNDM, see test_deterministic.pndm_cancellation), called after each of our steps.
    Typical SD chains keep the factor near 1, so the bound stays ~STEP_TOL.
    """
    step_kwargs = step_kwargs or {}
    ours_kwargs = {**step_kwargs, **(ours_step_kwargs or {})}
    theirs_kwargs = {**step_kwargs, **(theirs_step_kwargs or {})}
    if start_sample is None:
        start_sample = rng.standard_normal(shape).astype(np.float32) * np.float32(float(theirs.init_noise_sigma))
    sample_ours = start_sample.copy()
    sample_theirs = as_torch(start_sample.copy())
    first = 0 if begin_index is None else begin_index
    worst = 0.0
    base_tol = STEP_TOL_FOR.get(type(theirs).__name__, STEP_TOL)
    if ours.config.get("prediction_type") == "sample":
        base_tol = SAMPLE_PREDICTION_TOL_FOR.get(type(theirs).__name__, base_tol)
    tol = base_tol
    for i in range(first, len(theirs.timesteps)):
        t_ours, t_theirs = ours.timesteps[i], theirs.timesteps[i]
        label = f"{what} step {i} (t={t_theirs.item()})"
        # 1. the model input
        input_ours = ours.scale_model_input(sample_ours, t_ours)
        input_theirs = theirs.scale_model_input(sample_theirs, t_theirs)
        worst = max(worst, assert_rel_close(input_ours, input_theirs, tol, f"{label}: scale_model_input"))
        # 2. a random "model output", the same for both
        model_output = rng.standard_normal(shape).astype(np.float32)
        out_ours = ours.step(model_output, t_ours, sample_ours, **ours_kwargs)
        out_theirs = theirs.step(as_torch(model_output), t_theirs, sample_theirs, **theirs_kwargs)
        shrink = float(np.linalg.norm(sample_ours) / max(np.linalg.norm(out_ours.prev_sample), 1e-30))
        tol = max(tol, base_tol * shrink)
        if amplification is not None:
            tol = max(tol, base_tol * amplification())
        assert out_ours.prev_sample.dtype == np.float32, f"{label}: prev_sample dtype {out_ours.prev_sample.dtype}"
        assert out_ours.prev_sample.shape == shape
        worst = max(worst, assert_rel_close(out_ours.prev_sample, out_theirs.prev_sample, tol,
                                            f"{label}: prev_sample"))
        # the second output under diffusers' name: x_0 (most), LCM's denoised, TCD's pred_noised_sample
        for field in ("pred_original_sample", "denoised", "pred_noised_sample"):
            theirs_x0 = getattr(out_theirs, field, None)
            if theirs_x0 is None:
                assert getattr(out_ours, field, None) is None, f"{label}: diffusers gives no {field}"
            else:
                worst = max(worst, assert_rel_close(getattr(out_ours, field), theirs_x0, tol, f"{label}: {field}"))
        # 3. both go on from the same sample (ours): each step is compared on the same input, so float32
        #    rounding does not pile up over a long chain (a 50-step DEIS chain drifted to 2.03e-6 by step 37)
        sample_ours, sample_theirs = out_ours.prev_sample, as_torch(out_ours.prev_sample.copy())
    return worst


__all__ = ["STEP_TOL", "SCHEDULE_TOL", "SD15_SCHEDULER_CONFIG", "SD_CONFIG", "BETA_VARIANTS", "make_pair",
           "as_torch", "compare_schedule", "run_chains", "rel_err", "diffusers_init_keys"]
