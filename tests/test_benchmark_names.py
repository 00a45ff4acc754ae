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


def test_renamed_bench_topics_still_run_their_script(monkeypatch):
    """`npdiff bench kernels` (the README's command before the rename) runs benchmarks/sd15_kernels.py."""
    import argparse
    import runpy

    from npdiff import cli

    ran = []
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: ran.append(Path(path).name))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for old, new in cli.BENCH_TOPIC_ALIASES.items():
        assert not (BENCHMARKS / f"{old}.py").exists()  # an alias never hides a script of that name
        assert cli.run_bench(argparse.Namespace(topic=old, bench_args=["--help"])) == 0
        assert ran[-1] == f"{new}.py" and sys.argv[1:] == ["--help"]
