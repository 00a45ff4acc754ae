"""The `npdiff` command line.

    npdiff bench TOPIC [args...]     run benchmarks/TOPIC.py (kernels, rng, matmul, models, ...)

Each subcommand is one `add_<name>_command(subparsers)` function below that registers its parser and
the function that runs it.
"""

import argparse
import runpy
import sys
from pathlib import Path

import npdiff  # noqa: F401  (chooses the BLAS kernels before numpy loads)


# ---------------------------------------------------------------------------------------------
# npdiff bench TOPIC
# ---------------------------------------------------------------------------------------------
def find_benchmarks_dir():
    """benchmarks/ lives beside the package in a source checkout (it is not installed)."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    return None


def run_bench(args):
    folder = find_benchmarks_dir()
    if folder is None:
        sys.exit("npdiff bench: no benchmarks/ folder found; run it from an npdiff source checkout")
    topics = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    script = folder / f"{args.topic}.py"
    if not script.is_file():
        sys.exit(f"npdiff bench: unknown topic {args.topic!r}; known: {', '.join(topics)}")
    sys.argv = [str(script), *args.bench_args]
    sys.path.insert(0, str(folder))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_bench_command(subparsers):
    p = subparsers.add_parser("bench", help="run a benchmark from benchmarks/ against PyTorch")
    p.add_argument("topic", help="benchmark name: a file benchmarks/<topic>.py")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(run=run_bench)


COMMANDS = [add_bench_command]


def build_parser():
    parser = argparse.ArgumentParser(prog="npdiff", description=npdiff.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"npdiff {npdiff.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except npdiff.NpdiffError as exc:
        print(f"npdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
