"""GFLOP/s of every step of the matmul progression (npdiff/kernels/matmul.py) against torch.mm and NumPy.

    flock /tmp/npdiff-heavy.lock npdiff bench matmul            # full run, a few minutes
    flock /tmp/npdiff-heavy.lock npdiff bench matmul --quick    # N = 64, 256, 1024; ~half a minute

Square float32 products C[N,N] = A[N,N] @ B[N,N], 2*N^3 FLOP, at N = 64 ... 4096. Each version is
timed with 1 thread and with all cores (best of a few runs after a warm-up that also compiles the
Numba versions). The slow steps run only up to the N in MAX_N (beyond it they take minutes; the
table shows '-'). Every result is checked against NumPy's before it is timed.

How the thread count is set for each library, in the same process:
  Numba    numba.set_num_threads(t)  (prange in the Numba versions)
  torch    torch.set_num_threads(t)
  OpenBLAS (NumPy's BLAS) npdiff.blas.set_num_threads(t): openblas_set_num_threads called through
           ctypes on the OpenBLAS library NumPy loaded (NumPy's wheels name the symbol
           scipy_openblas_set_num_threads64_). OPENBLAS_NUM_THREADS would only act before
           NumPy's import, and threadpoolctl is not a dependency.

Output: a table per thread count (GFLOP/s; last column: blocked Numba as a fraction of NumPy's
BLAS), benchmarks/out/matmul.json, and a log-log plot benchmarks/out/matmul.png.
"""

import argparse
import os
import re

from _common import OUT_DIR, print_table, time_call, write_json

import numpy as np  # noqa: E402  (after _common, which imports npdiff first: AVX-512 OpenBLAS)

from npdiff import blas  # noqa: E402

SIZES = [64, 128, 256, 512, 1024, 2048, 4096]
QUICK_SIZES = [64, 256, 1024]
# Largest N each step runs at (time per product at that N, 1 thread, this machine: about 1 s).
MAX_N = {"python": 64, "row_dot": 128, "broadcast": 512, "einsum": 1024, "numba_naive": 2048}


def set_threads(threads):
    import numba
    import torch

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    symbol = blas.set_num_threads(threads)
    if symbol is None:
        print("warning: OpenBLAS not found in this process; NumPy's BLAS thread count unchanged")


def build_versions():
    """name -> fn(a, b), in the order of the progression, then torch."""
    import torch

    from npdiff.kernels import matmul

    versions = {f"npdiff {name}": fn for name, fn in matmul.VERSIONS.items()}
    versions["torch.mm"] = lambda a, b: torch.mm(torch.from_numpy(a), torch.from_numpy(b))
    return versions


def max_size(name):
    short = name.removeprefix("npdiff ")
    return MAX_N.get(short, max(SIZES))


def repeats_for(n, quick):
    """(runs, min seconds): the best of at least `runs` runs, and of as many as fit in min seconds,
    so that a quiet moment of the shared machine is caught for the short products."""
    if quick:
        return 2, 0.05
    return (5, 0.3) if n <= 1024 else (3, 0.0)


def measure(versions, sizes, threads, quick):
    """rows of {"version", "n", "threads", "seconds", "gflops"} for every version up to its MAX_N."""
    set_threads(threads)
    rng = np.random.default_rng(0)
    warm_a = rng.standard_normal((8, 8), dtype=np.float32)
    for fn in versions.values():  # compile the Numba versions before any timing
        fn(warm_a, warm_a)
    results = []
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)  # [N,N]
        b = rng.standard_normal((n, n), dtype=np.float32)  # [N,N]
        expected = a @ b  # [N,N]
        for name, fn in versions.items():
            if n > max_size(name):
                continue
            got = np.asarray(fn(a, b))
            error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
            if not error < 1e-4:
                raise SystemExit(f"{name} at N={n}: relative error {error:.2e} against NumPy")
            at_its_limit = name.removeprefix("npdiff ") in MAX_N and n == max_size(name)
            repeat, min_time = (1, 0.0) if at_its_limit else repeats_for(n, quick)
            # warmup=0: the check above ran (and compiled) it
            seconds = time_call(lambda: fn(a, b), repeat=repeat, warmup=0, min_time=min_time)
            gflops = 2.0 * n**3 / seconds / 1e9
            results.append(dict(version=name, n=n, threads=threads, seconds=seconds, gflops=gflops,
                                rel_err=error))
            print(f"  threads={threads} N={n:5d} {name:22s} {seconds * 1e3:10.2f} ms {gflops:8.2f} GFLOP/s",
                  flush=True)
    return results


def print_summary(results, versions, sizes, threads):
    """One table: a row per version, a column per N, GFLOP/s; then blocked Numba / BLAS."""
    print(f"\nGFLOP/s, {threads} thread{'s' if threads > 1 else ''} (float32, C = A @ B, A and B N x N):")
    by_key = {(r["version"], r["n"]): r["gflops"] for r in results if r["threads"] == threads}
    rows = []
    for name in versions:
        rows.append({"version": name, **{str(n): by_key.get((name, n)) for n in sizes}})
    ratio = {"version": "blocked / BLAS"}
    for n in sizes:
        ours, blas = by_key.get(("npdiff numba_blocked", n)), by_key.get(("npdiff blas", n))
        ratio[str(n)] = ours / blas if ours and blas else None
    columns = [("version", "version", None)] + [(str(n), f"N={n}", "{:.3g}") for n in sizes]
    print_table(rows + [ratio], columns)


def micro_kernel_summary():
    """How the blocked version's micro-kernel compiled here: counts of zmm FMAs and broadcasts."""
    from npdiff.kernels.matmul_numba import MR, NR, micro_kernel_asm

    asm = micro_kernel_asm()
    zmm_fmas = len(re.findall(r"vfmadd\d+ps\s[^\n]*%zmm", asm))
    broadcasts = len(re.findall(r"vbroadcastss\s[^\n]*%zmm", asm))
    return f"micro-kernel {MR}x{NR}: {zmm_fmas} zmm FMAs, {broadcasts} zmm broadcasts in its code"


def plot(results, versions, thread_counts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, len(thread_counts), figsize=(6 * len(thread_counts), 4.5), sharey=True)
    axes = np.atleast_1d(axes)
    for axis, threads in zip(axes, thread_counts):
        for name in versions:
            points = [(r["n"], r["gflops"]) for r in results
                      if r["version"] == name and r["threads"] == threads]
            if points:
                sizes, gflops = zip(*points)
                axis.loglog(sizes, gflops, marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({r["n"] for r in results}))
        axis.set_xticklabels([str(n) for n in sorted({r["n"] for r in results})])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
        axis.set_xlabel("N (C[N,N] = A[N,N] @ B[N,N], float32)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[-1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES}, fewer repeats")
    parser.add_argument("--sizes", type=int, nargs="+", help="N values to run (default: all)")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all cores)")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    cores = os.cpu_count() or 1
    thread_counts = args.threads or sorted({1, cores})

    versions = build_versions()
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min) on {cores} cores")
    results = []
    for threads in thread_counts:
        results += measure(versions, sizes, threads, args.quick)
    for threads in thread_counts:
        print_summary(results, versions, sizes, threads)
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min) on {cores} cores")
    limits = ", ".join(f"{name} N<={n}" for name, n in MAX_N.items())
    print(f"slow steps only up to: {limits}")
    kernel_note = micro_kernel_summary()
    print(kernel_note)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    png = OUT_DIR / "matmul.png"
    plot(results, versions, thread_counts, png)
    json_path = write_json("matmul", dict(sizes=sizes, thread_counts=thread_counts, max_n=MAX_N,
                                          micro_kernel=kernel_note, load_average_before=load_before,
                                          load_average_after=load_after, results=results))
    print(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    main()
