"""Random-number throughput: npdiff's generators against torch.randn and NumPy, same process.

    npdiff bench rng                      # or: python benchmarks/rng.py [--big 10000000] [--repeat 7]

For each generator: the best time of one call producing a latent (1,4,64,64) = 16,384 normals and
one producing --big (10M) normals, as elements per second, and the time relative to torch.randn
measured in the same run (ratio = ours / torch: below 1 is faster than torch). Pure-Python
Wichmann-Hill is measured on --python-n (100k) uniforms only: at ~1 M/s a 10M run would take
seconds and say nothing new.

Rows:
  torch.randn                 the anchor (torch's CPU generator, float32)
  TorchGenerator              npdiff, bit-identical to torch.randn (AVX2 math path)
  TorchGenerator math=default npdiff, torch's portable libm path
  PhiloxGenerator             npdiff's CPU emulation of torch's CUDA generator
  numpy default_rng           PCG64 + ziggurat, float32 (a different stream; a speed reference)
  WichmannHill vectorised     randn: power-doubling LCGs + Box-Muller in NumPy (float64)
  WichmannHill pure Python    uniforms, one g.random() call each
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_call, write_json  # noqa: E402  (imports npdiff first)

import numpy as np  # noqa: E402

from npdiff.rng import PhiloxGenerator, TorchGenerator, WichmannHill  # noqa: E402

LATENT_SHAPE = (1, 4, 64, 64)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=10_000_000, help="elements in the big draw")
    parser.add_argument("--python-n", type=int, default=100_000, help="uniforms for pure-Python WH")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (best is kept)")
    return parser.parse_args(argv)


def candidates(torch):
    """(name, what it draws, make(shape) -> zero-argument callable)."""
    torch_cpu = TorchGenerator(0)
    torch_default = TorchGenerator(0, math="default")
    philox = PhiloxGenerator(0)
    numpy_rng = np.random.default_rng(0)
    wh = WichmannHill(0)
    return [
        ("torch.randn", "normal f32", lambda shape: lambda: torch.randn(shape)),
        ("TorchGenerator", "normal f32", lambda shape: lambda: torch_cpu.randn(shape)),
        ("TorchGenerator math=default", "normal f32", lambda shape: lambda: torch_default.randn(shape)),
        ("PhiloxGenerator", "normal f32", lambda shape: lambda: philox.randn(shape)),
        ("numpy default_rng", "normal f32",
         lambda shape: lambda: numpy_rng.standard_normal(shape, dtype=np.float32)),
        ("WichmannHill vectorised", "normal f64", lambda shape: lambda: wh.randn(shape)),
    ]


def measure(fn, n, repeat):
    seconds = time_call(fn, repeat=repeat, warmup=2, min_time=0.3 if n < 100_000 else 0.0)
    return seconds, n / seconds


def main(argv=None):
    args = parse_args(argv)
    import torch

    sizes = [("latent (1,4,64,64)", LATENT_SHAPE, int(np.prod(LATENT_SHAPE))), (f"{args.big:,}", (args.big,), args.big)]
    rows = []
    for size_name, shape, n in sizes:
        torch_seconds = None
        for name, draws, make in candidates(torch):
            seconds, rate = measure(make(shape), n, args.repeat)
            if name == "torch.randn":
                torch_seconds = seconds
            rows.append({"size": size_name, "generator": name, "draws": draws, "n": n, "ms": seconds * 1e3,
                         "melem_s": rate / 1e6, "ratio": seconds / torch_seconds})
    # pure-Python Wichmann-Hill: uniforms, at a smaller size
    wh = WichmannHill(0)
    n_python = args.python_n
    seconds = time_call(lambda: [wh.random() for _ in range(n_python)], repeat=3, warmup=1)
    rows.append({"size": f"{n_python:,}", "generator": "WichmannHill pure Python", "draws": "uniform f64",
                 "n": n_python, "ms": seconds * 1e3, "melem_s": n_python / seconds / 1e6, "ratio": None})

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print_table(rows, [("size", "size", None), ("generator", "generator", None), ("draws", "draws", None),
                       ("ms", "ms", "{:.3f}"), ("melem_s", "M elem/s", "{:.1f}"),
                       ("ratio", "time / torch.randn", "{:.2f}")])
    path = write_json("rng", {"command": " ".join(["npdiff bench rng", *(argv or sys.argv[1:])]),
                              "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
