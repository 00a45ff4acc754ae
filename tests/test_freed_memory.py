"""keep_freed_memory: inside it, the memory one "step" frees is reused by the next step instead of being
given back to the kernel and faulted in again (a training step's tape forward writes into the last step's
pages); outside, glibc trims it and every step faults its pages in anew."""

import resource

import numpy as np
import pytest

from npdiff.freed_memory import _glibc, keep_freed_memory

ARRAYS, ELEMENTS = 12, 6 * 2**20  # 12 arrays of 24 MiB kept at once, as a tape keeps its activations


def minor_faults_of_a_step(elements=ELEMENTS):
    """Minor page faults taken while 12 arrays of 24 MiB (or `elements` floats) are made, filled, kept, then
    all freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = []
    for _ in range(ARRAYS):
        array = np.empty(elements, np.float32)  # [24 MiB]
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



@pytest.mark.skipif(_glibc() is None, reason="keep_freed_memory only acts on glibc's malloc")
def test_heap_only_reuses_blocks_above_the_mmap_threshold():
    """Arrays of 40 MiB (SD 1.5's 64x64 GEGLU hidden layer) are above glibc's largest mmap threshold: with
    keep_freed_memory() alone each is mmapped and faulted in every step; with heap_only they come from the
    heap and the next step reuses their pages; on leaving, mmap is allowed again (faults again)."""
    large = 10 * 2**20  # [40 MiB]
    with keep_freed_memory():
        minor_faults_of_a_step(large)
        mapped = min(minor_faults_of_a_step(large) for _ in range(2))
    with keep_freed_memory(heap_only=True):
        minor_faults_of_a_step(large)  # the first step grows the heap
        from_heap = min(minor_faults_of_a_step(large) for _ in range(2))
    after = minor_faults_of_a_step(large)
    assert mapped > 100, f"{mapped} minor faults per step with mmapped blocks: nothing to compare"
    assert from_heap < mapped // 10, f"{from_heap} minor faults per step from the heap against {mapped} mmapped"
    assert after > mapped // 2, f"{after} minor faults after leaving against {mapped} inside keep_freed_memory()"
