"""npdiff.numba_cache: a cached kernel is recompiled when any of npdiff's jitted modules changed, not only
its own file (Numba's rule). Numba caches a caller's machine code with a copy of every jitted callee in
it; with its own locators, editing a callee in another file left the caller running the old callee."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from numba import njit as numba_njit

import npdiff
from npdiff import numba_cache
from npdiff.jit import PACKAGE_LOCATORS_INSTALLED
from npdiff.kernels.lane_sums import sum_f64

CHILD = textwrap.dedent("""
    import hashlib
    import numpy as np
    import npdiff
    from npdiff.kernels.softmax import softmax
    assert npdiff.__file__.startswith({package!r}), npdiff.__file__
    x = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    print(hashlib.sha256(softmax(x).tobytes()).hexdigest())  # softmax_rows_block calls lane_sums.sum_f64
""")


def test_fingerprint_follows_jitted_modules_only(tmp_path):
    (tmp_path / "kernel.py").write_text("from numba import njit\n")
    (tmp_path / "cli.py").write_text("print('no jitted code here')\n")
    before = numba_cache.fingerprint(tmp_path)
    (tmp_path / "cli.py").write_text("print('edited')\n")
    assert numba_cache.fingerprint(tmp_path) == before
    (tmp_path / "kernel.py").write_text("from numba import njit  # edited\n")
    assert numba_cache.fingerprint(tmp_path) != before
    assert [p.name for p in numba_cache.jitted_modules(tmp_path)] == ["kernel.py"]


def test_npdiff_functions_get_the_package_locators_and_others_do_not():
    assert PACKAGE_LOCATORS_INSTALLED
    assert numba_cache.numba_class("CacheImpl")._locator_classes[:3] == numba_cache.PACKAGE_LOCATORS
    ours = numba_cache.numba_class("CompileResultCacheImpl")(sum_f64.py_func).locator
    assert isinstance(ours, tuple(numba_cache.PACKAGE_LOCATORS))
    assert ours.get_source_stamp()[1] == numba_cache.package_fingerprint()

    @numba_njit(cache=True)
    def elsewhere(x):
        return x + 1

    theirs = numba_cache.numba_class("CompileResultCacheImpl")(elsewhere.py_func).locator
    assert not isinstance(theirs, tuple(numba_cache.PACKAGE_LOCATORS))


def run_child(package_root, cache_dir):
    env = dict(os.environ, PYTHONPATH=str(package_root), NUMBA_CACHE_DIR=str(cache_dir))
    script = CHILD.format(package=str(package_root))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=package_root, capture_output=True, text=True,
                          timeout=600)  # (cwd: not the checkout, whose npdiff would come first)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_editing_a_callee_in_another_file_recompiles_its_cached_callers(tmp_path):
    # 1. a private copy of the package, its kernels compiled and cached by a first process
    package_root = tmp_path / "copy"
    shutil.copytree(Path(npdiff.__file__).parent, package_root / "npdiff",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "numba-cache"
    first = run_child(package_root, cache)
    assert run_child(package_root, cache) == first  # loaded from the cache: the same bytes
    # 2. the callee edited in its own file (a different, valid sum: every row total doubled)
    lane_sums = package_root / "npdiff" / "kernels" / "lane_sums.py"
    source = lane_sums.read_text()
    edited = source.replace("    total = sum_lanes_in_tree(lanes)\n    for k in range(full, run.size):",
                            "    total = 2.0 * sum_lanes_in_tree(lanes)\n    for k in range(full, run.size):")
    assert edited != source
    lane_sums.write_text(edited)
    # 3. the caller (softmax.py, unchanged) must now run the edited callee: as a process compiling from nothing
    after_edit = run_child(package_root, cache)
    fresh = run_child(package_root, tmp_path / "fresh-cache")
    assert fresh != first
    assert after_edit == fresh, "softmax ran its cached copy of the old lane_sums.sum_f64"
