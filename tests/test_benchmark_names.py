"""No benchmark module may be named like an installed top-level module.

A script run from benchmarks/ (`python benchmarks/X.py`, `npdiff bench X`) has that folder first on sys.path, so a
file there named like a package that diffusers or transformers import (Hugging Face's `kernels`, a standard
library module) is imported in its place. The check asks importlib where each name would come from with
benchmarks/ off the path; any answer is a clash.
"""

import importlib.machinery
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Names that diffusers/transformers import when installed, checked even where they are not installed here.
OPTIONAL_HUB_PACKAGES = {"kernels"}


def test_no_benchmark_module_shadows_an_installed_module():
    search_path = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCHMARKS]
    names = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert len(names) > 10  # the folder was found and listed
    clashes = {}
    for name in names:
        # PathFinder looks on the given path only, not in sys.modules (other tests import benchmark helpers)
        spec = importlib.machinery.PathFinder.find_spec(name, search_path)
        if spec is not None and spec.origin is not None:  # not a bare folder (a namespace portion loses to a file)
            clashes[name] = spec.origin
        elif name in sys.stdlib_module_names or name in OPTIONAL_HUB_PACKAGES:
            clashes[name] = "the standard library, or a package diffusers/transformers import when installed"
    assert not clashes, f"benchmarks/ modules named like installed modules (rename them): {clashes}"
