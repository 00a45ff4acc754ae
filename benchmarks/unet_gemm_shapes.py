"""The SD 1.5 UNet's linear and GEGLU shapes, one by one: npdiff against a whole np.matmul and torch.

    flock /work/bench.lock python benchmarks/unet_gemm_shapes.py [--repeat 5] [--quick]

Every GEMM of the UNet's transformer blocks at batch 2 (classifier-free guidance) and a 64x64 latent:
R = 2 x 4096 / 1024 / 256 / 64 tokens at 320 / 640 / 1280 / 1280 channels C, each [R, in] x [in, out]:
    C x C      proj_in, to_q, to_k, to_v, to_out.0 (attn1, attn2), proj_out: 8 per block (4 with a bias)
    ff.net.2   [R, 4C] x [4C, C]
    GEGLU      [R, C] x [C, 8C], then value * gelu(gate) (ff.net.0)
    to_k/to_v  of attn2 on the text context: [154, 768] x [768, C]

Sides, each in its own process that imports numpy first (as a user's script does):
    npdiff   npdiff.kernels.linear / geglu with a bias: OpenBLAS sgemm in one block per worker of npdiff's pool
    numpy    one np.matmul(x, w.T) on OpenBLAS's own threads, no bias, and for GEGLU the GEMM alone: the
             speed OpenBLAS itself reaches at the shape
    torch    torch.nn.functional.linear (GEGLU: linear, chunk, gelu, product), torch.set_num_threads(cores)
Best wall time of --repeat calls after a warm-up, GFLOP/s against the sgemm peak measured in the npdiff process.
Output: a table, and benchmarks/out/unet_gemm_shapes.json with the load average before and after.
"""

import argparse
import json
import os
import subprocess
import sys

SIDES = ("npdiff", "numpy", "torch")


def unet_shapes(quick=False):
    """[(name, rows, in, out, kind)] with kind "linear" or "geglu"; shape_key() names each one."""
    levels = ((8192, 320), (2048, 640), (512, 1280)) if quick else ((8192, 320), (2048, 640), (512, 1280), (128, 1280))
    shapes = []
    for rows, channels in levels:
        shapes.append(("C x C", rows, channels, channels, "linear"))
        shapes.append(("ff.net.2", rows, 4 * channels, channels, "linear"))
        shapes.append(("GEGLU", rows, channels, 8 * channels, "geglu"))
    shapes.append(("attn2 to_k/v", 154, 768, 320, "linear"))
    shapes.append(("attn2 to_k/v", 154, 768, 1280, "linear"))
    return shapes


def shape_key(name, rows, depth, outputs):
    return f"{name}: [{rows},{depth}] x [{depth},{outputs}]"


def make_call(side, modules, x, weight, bias, kind):
    """The call that one side times for one shape."""
    np = modules["numpy"]
    if side == "numpy":
        return lambda: np.matmul(x, weight.T)  # [R,in] @ [in,out] -> [R,out]
    if side == "npdiff":
        function = modules["kernels"].geglu if kind == "geglu" else modules["kernels"].linear
        return lambda: function(x, weight, bias)  # [R,in] -> [R,out] (GEGLU: [R,out/2])
    torch, F = modules["torch"], modules["F"]
    x_t, weight_t, bias_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)

    def call():
        with torch.inference_mode():
            hidden = F.linear(x_t, weight_t, bias_t)  # [R,out]
            if kind == "linear":
                return hidden
            value, gate = hidden.chunk(2, dim=-1)  # [R,out/2] each
            return value * F.gelu(gate)

    return call


def worker(side, repeat, quick):
    """Time every shape on one side; print one JSON line {name: seconds}."""
    import time

    import numpy as np  # first, as a user's script (and npdiff only on its own side)

    def time_call(call, repeat):
        call()  # warm-up: compiles, packs, faults the pages in
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        return best

    modules = {"numpy": np}
    if side == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        modules.update(torch=torch, F=F)
    elif side == "npdiff":
        from npdiff import kernels

        modules["kernels"] = kernels
    rng = np.random.default_rng(0)
    seconds = {}
    for name, rows, depth, outputs, kind in unet_shapes(quick):
        x = rng.standard_normal((rows, depth), dtype=np.float32)  # [R,in]
        weight = rng.standard_normal((outputs, depth), dtype=np.float32) * np.float32(0.05)  # [out,in]
        bias = rng.standard_normal(outputs, dtype=np.float32)  # [out]
        seconds[shape_key(name, rows, depth, outputs)] = time_call(make_call(side, modules, x, weight, bias, kind), repeat)
    if side == "npdiff":
        from _common import sgemm_peak_gflops

        seconds["sgemm peak GFLOP/s"] = sgemm_peak_gflops()
    print(json.dumps(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="leave out the mid block's 128-row shapes")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeat, args.quick)
        return
    from _common import print_table, write_json

    load_before = os.getloadavg()
    results = {}
    for side in SIDES:
        command = [sys.executable, __file__, "--worker", side, "--repeat", str(args.repeat)] + (["--quick"] * args.quick)
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    peak = results["npdiff"].pop("sgemm peak GFLOP/s")
    rows = []
    for name, n_rows, depth, outputs, _ in unet_shapes(args.quick):
        flop = 2.0 * n_rows * depth * outputs
        key = shape_key(name, n_rows, depth, outputs)
        row = {"shape": key}
        for side in SIDES:
            row[side] = flop / results[side][key] / 1e9
        row["npdiff/numpy"] = results["npdiff"][key] / results["numpy"][key]
        row["npdiff/torch"] = results["npdiff"][key] / results["torch"][key]
        rows.append(row)
    print(f"sgemm peak (NumPy, 2048^2): {peak:.0f} GFLOP/s; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; GFLOP/s on the wall clock, best of {args.repeat}")
    print_table(rows, [("shape", "shape", None), ("npdiff", "npdiff", "{:.0f}"), ("numpy", "whole np.matmul", "{:.0f}"),
                       ("torch", "torch", "{:.0f}"), ("npdiff/numpy", "time / numpy", "{:.2f}"),
                       ("npdiff/torch", "time / torch", "{:.2f}")])
    path = write_json("unet_gemm_shapes", {"seconds": results, "sgemm_peak_gflops": peak,
                                           "load_before": load_before, "load_after": load_after})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
