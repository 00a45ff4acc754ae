"""Numba's disk cache for npdiff's kernels, invalidated by a change to ANY of npdiff's jitted modules.

Numba keys a cached function on the hash of its own source file only. But the machine code it caches
holds a copy of every jitted function it calls, from whatever files those live in. Edit a callee (say
lane_sums.sum_f64) and every caller in another file (softmax.softmax_rows_block) still loads its old
cached copy, with the old callee inside, until its own file changes: a reader who edits a kernel to
learn from it measures, or tests, code that no longer exists. (Seen twice while developing: timings of
stale code, and a test failure that appeared only once __pycache__ was deleted.)

So npdiff's functions get locators of their own (numba.core.caching's, subclassed): the same cache
folders as Numba's (NUMBA_CACHE_DIR when set, else __pycache__ beside the source, else the user-wide
folder), but a source stamp that is the file's own hash AND a fingerprint of every npdiff module that
holds jitted code (its path and bytes: the modules that mention numba or njit). Any edit there
invalidates every cached npdiff kernel once; the next run compiles them again (about a minute for the
UNet's) and caches the new code in the same files. An installed release never changes, so it compiles once.
Other packages' functions keep Numba's own locators. NUMBA_CACHE_LOCATOR_CLASSES, when a user sets it,
replaces every locator, these included (Numba's rule).
"""

import functools
import hashlib
from pathlib import Path

from numba.core import caching

PACKAGE_FOLDER = Path(__file__).resolve().parent


def numba_class(name):
    """caching.NAME, or caching._NAME in the Numba releases before the locators lost their underscore."""
    return getattr(caching, name, None) or getattr(caching, "_" + name)


def jitted_modules(folder):
    """The .py files under folder that hold jitted code or its constants: those that mention numba/njit."""
    modules = []
    for path in sorted(folder.rglob("*.py")):
        source = path.read_bytes()
        if b"njit" in source or b"numba" in source:
            modules.append(path)
    return modules


def fingerprint(folder):
    """sha256 of the jitted modules under folder: each one's path (relative) and bytes."""
    digest = hashlib.sha256()
    for path in jitted_modules(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def package_fingerprint():
    """fingerprint(npdiff's folder), once per process (~190 files, a few ms)."""
    return fingerprint(PACKAGE_FOLDER)


def inside_package(py_file):
    try:
        return Path(py_file).resolve().is_relative_to(PACKAGE_FOLDER)
    except (OSError, ValueError):
        return False


class _WholePackageStamp:
    """Mixed in before a Numba locator: only npdiff's files, stamped with the package's fingerprint too."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not inside_package(py_file):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return super().get_source_stamp(), package_fingerprint()


class PackageUserProvidedLocator(_WholePackageStamp, numba_class("UserProvidedCacheLocator")):
    """NUMBA_CACHE_DIR, when set."""


class PackageInTreeLocator(_WholePackageStamp, numba_class("InTreeCacheLocator")):
    """__pycache__ beside the source, when writable."""


class PackageUserWideLocator(_WholePackageStamp, numba_class("UserWideCacheLocator")):
    """Numba's user-wide cache folder otherwise (a read-only install)."""


PACKAGE_LOCATORS = [PackageUserProvidedLocator, PackageInTreeLocator, PackageUserWideLocator]


def install_package_locators():
    """Put the three locators first in Numba's list (once). Returns whether they are installed now."""
    classes = numba_class("CacheImpl")._locator_classes
    if classes[:len(PACKAGE_LOCATORS)] != PACKAGE_LOCATORS:
        classes[:0] = PACKAGE_LOCATORS
    return classes[:len(PACKAGE_LOCATORS)] == PACKAGE_LOCATORS
