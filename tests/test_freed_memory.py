"""keep_freed_memory: inside it, the memory one "step" frees is reused by the next step instead of being
given back to the kernel and faulted in again (a training step's tape forward writes into the last step's
pages); outside, glibc trims it and every step faults its pages in anew."""

import resource

import numpy as np
import pytest

from npdiff.freed_memory import _glibc, keep_freed_memory

ARRAYS, ELEMENTS = 12, 6 * 2**20  # 12 arrays of 24 MiB kept at once, as a tape keeps its activations


def minor_faults_of_a_step():
    """Minor page faults taken while 12 arrays of 24 MiB are made, filled, kept, then all freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = []
    for _ in range(ARRAYS):
        array = np.empty(ELEMENTS, np.float32)  # [24 MiB]
        array.fill(1.0)
        kept.append(array)
    del kept, array
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="keep_freed_memory only acts on glibc's malloc")
def test_a_steps_freed_pages_are_reused_by_the_next_step_inside_only():
    minor_faults_of_a_step()
    outside = minor_faults_of_a_step()  # the second step outside: glibc has trimmed the first's memory
    with keep_freed_memory():
        minor_faults_of_a_step()  # the first step inside may fault its pages in
        inside = min(minor_faults_of_a_step() for _ in range(2))
    after = minor_faults_of_a_step()  # given back on leaving: faulted in again
    assert outside > 100, f"{outside} minor faults outside: this glibc does not trim, nothing to compare"
    assert inside < outside // 10, f"{inside} minor faults per step inside against {outside} outside"
    assert after > outside // 2, f"{after} minor faults after leaving against {outside} outside"


def test_keep_freed_memory_passes_exceptions_through():
    with pytest.raises(KeyError), keep_freed_memory():
        raise KeyError("x")

