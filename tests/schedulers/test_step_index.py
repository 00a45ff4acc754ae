"""The step-index bookkeeping (npdiff/schedulers/step_index.py) against diffusers, for every scheduler that
has one: where the first step starts (timestep lookup or begin index), repeated and absent timesteps,
and which sigma add_noise uses before and during sampling."""

import numpy as np
import pytest
import torch

import npdiff.schedulers as S
from npdiff.errors import NpdiffError
from scheduler_harness import SD_CONFIG, as_torch, make_pair

INDEXED = sorted(name for name, cls in S.SCHEDULER_CLASSES.items() if hasattr(cls, "set_begin_index"))
MULTISTEP = {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"}


def test_the_same_schedulers_have_a_step_index_as_in_diffusers():
    import diffusers

    for name in S.SCHEDULER_CLASSES:
        assert hasattr(getattr(diffusers, name), "set_begin_index") == (name in INDEXED), name


@pytest.mark.parametrize("class_name", INDEXED)
def test_index_for_timestep_like_diffusers(class_name, rng):
    ours, theirs = make_pair(class_name, SD_CONFIG)
    n = int(rng.integers(3, 30))
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    # 1. every scheduled timestep: its position, the second one where it repeats (Heun, DPM2)
    for position, (t_ours, t_theirs) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        if np.float32(t_ours) != np.float32(t_theirs.item()):
            # DPM2 ancestral's midpoint timesteps come from torch's float32 log/exp in diffusers and NumPy's
            # here: a few ulp apart at some (665.99994 against 666.0 at 10 steps), and where diffusers' value
            # equals the next scheduled timestep it finds two matches. The pipeline never looks a midpoint
            # up (sampling starts at a whole timestep); npdiff must find the midpoint at its own position.
            # (atol: near t = 0 the two are ~1e-6 of a training timestep apart, e.g. 2.7e-6 against 2.1e-6)
            assert np.isclose(t_ours, t_theirs.item(), rtol=1e-5, atol=1e-4), (class_name, t_ours, t_theirs)
            assert ours.index_for_timestep(t_ours) == position, (class_name, t_ours)
            continue
        assert ours.index_for_timestep(t_ours) == theirs.index_for_timestep(t_theirs), (class_name, t_theirs)
    # 2. a timestep not in the schedule: the last position for the multistep solvers, else an error
    #    naming it (diffusers raises IndexError there)
    absent = 1000.5
    if class_name in MULTISTEP:
        assert ours.index_for_timestep(absent) == theirs.index_for_timestep(torch.tensor(absent)) == n - 1
    else:
        with pytest.raises(IndexError):
            theirs.index_for_timestep(torch.tensor(absent))
        with pytest.raises(NpdiffError, match="timestep 1000.5 is not in the scheduler's timesteps"):
            ours.index_for_timestep(absent)


@pytest.mark.parametrize("class_name", INDEXED)
def test_begin_index_and_add_noise_indices_like_diffusers(class_name, rng):
    ours, theirs = make_pair(class_name, SD_CONFIG)
    n = int(rng.integers(4, 20))
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.step_index is None and ours.begin_index is None
    original = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(original.shape).astype(np.float32)
    picks = rng.integers(0, len(theirs.timesteps), size=2)

    def both_add_noise(what):
        mine = ours.add_noise(original, noise, ours.timesteps[picks])
        reference = theirs.add_noise(as_torch(original), as_torch(noise), theirs.timesteps[torch.from_numpy(picks)])
        np.testing.assert_allclose(mine, reference.numpy(), rtol=2e-6, atol=1e-6, err_msg=f"{class_name}: {what}")

    # 1. no begin index: each item's own timestep
    both_add_noise("per-item timesteps")
    # 2. a begin index: every item at it, before the first step
    begin = int(rng.integers(0, len(theirs.timesteps)))
    ours.set_begin_index(begin)
    theirs.set_begin_index(begin)
    assert ours.begin_index == theirs.begin_index == begin
    both_add_noise("begin index")
    # 3. the first scale_model_input / step takes the begin index as its step index
    sample = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    ours.scale_model_input(sample, ours.timesteps[begin])
    theirs.scale_model_input(as_torch(sample), theirs.timesteps[begin])
    if theirs.step_index is not None:  # (schedulers whose input scaling finds the index)
        assert ours.step_index == theirs.step_index == begin
    # 4. set_timesteps forgets both
    ours.set_timesteps(n)
    assert ours.step_index is None and ours.begin_index is None


@pytest.mark.parametrize("class_name", INDEXED)
@pytest.mark.parametrize("bad", [-1, 10_000, 1.5, True, "0"])
def test_bad_begin_index_is_refused_by_name(class_name, bad):
    ours, _ = make_pair(class_name, SD_CONFIG)
    ours.set_timesteps(5)
    with pytest.raises(NpdiffError, match="set_begin_index: begin_index must be an integer in"):
        ours.set_begin_index(bad)
