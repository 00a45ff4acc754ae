"""bf16x3 linear layers (npdiff/kernels/matmul_bf16x3.py) against the float32 GEMM, on SD's shapes.

    python benchmarks/kernels_bf16x3.py [--repeat N]

Sides, each in a process of its own (best of --repeat after a warm-up), 2 threads; in one process torch's
OpenMP threads spun on after its call and slowed the side timed next by up to 25%:
  float32     npdiff's float32 linear (kernels.linear: OpenBLAS sgemm on npdiff's pool)
  torch f32   torch's F.linear in float32 (oneDNN), the anchor
  bf16x3      three bf16 products on AMX tiles, float32 sums (linear_bf16x3)
  bf16        one bf16 product on AMX (linear_bf16): what bf16x3 costs three of
GFLOP/s are the float32 GEMM's 2*M*K*N over the time ("equivalent" for bf16x3, which multiplies three
times as much); "x3/f32" is bf16x3's time over npdiff float32's. "rel err": bf16x3 and float32 against
torch float32 on the same inputs (each process makes them from one seed; the outputs come back through .npy
files). Output: the table and benchmarks/out/kernels_bf16x3.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np  # first, as in a user's script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, sgemm_peak_gflops, time_call, write_json  # noqa: E402

# (name, rows, in, out): SD 1.5's UNet at batch 2, 64x64 latent (tokens 8192 / 2048 / 512 per level),
# the attention projections, GEGLU's projection and feed-forward out; CLIP's MLP
CASES = [
    ("64px q/k/v/out [8192,320]x[320,320]", 8192, 320, 320),
    ("64px GEGLU [8192,320]x[320,2560]", 8192, 320, 2560),
    ("64px ff out [8192,1280]x[1280,320]", 8192, 1280, 320),
    ("32px q/k/v/out [2048,640]x[640,640]", 2048, 640, 640),
    ("32px GEGLU [2048,640]x[640,5120]", 2048, 640, 5120),
    ("16px GEGLU [512,1280]x[1280,10240]", 512, 1280, 10240),
    ("CLIP fc1 [154,768]x[768,3072]", 154, 768, 3072),
]
SIDES = ("float32", "torch f32", "bf16x3", "bf16")
KEPT = ("float32", "torch f32", "bf16x3")  # the sides whose outputs the error columns compare


def rel_err(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def case_inputs():
    """(x [M,K], weight [N,K]) of each case in turn, the same in every process (one seed)."""
    rng = np.random.default_rng(0)
    for _, rows, depth, cols in CASES:
        x = rng.standard_normal((rows, depth), dtype=np.float32)  # [M, K]
        weight = (rng.standard_normal((cols, depth)) / np.sqrt(depth)).astype(np.float32)  # [N, K]
        yield x, weight


def side_callable(side, x, weight):
    """The call one side times; torch is imported only by its own process, npdiff only by the others."""
    if side == "torch f32":
        import torch
        import torch.nn.functional as F

        x_t, w_t = torch.from_numpy(x), torch.from_numpy(weight)
        return lambda: F.linear(x_t, w_t).numpy()
    from npdiff import kernels
    from npdiff.kernels.matmul_bf16 import linear_bf16, pack_linear_bf16
    from npdiff.kernels.matmul_bf16x3 import linear_bf16x3, pack_linear_bf16x3

    if side == "float32":
        return lambda: kernels.linear(x, weight)
    if side == "bf16x3":
        split = pack_linear_bf16x3(weight)
        return lambda: linear_bf16x3(x, split)
    rounded = pack_linear_bf16(weight)
    return lambda: linear_bf16(x, rounded)


def worker(side, repeat, out_dir):
    """One side, every case: prints RESULT {"seconds": [...], "kernel": ...}; KEPT sides save each output."""
    if side == "torch f32":
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        context = torch.inference_mode()
        kernel = "oneDNN"
    else:
        from contextlib import nullcontext

        from npdiff.kernels.bf16_rounding import bf16_kernel

        context, kernel = nullcontext(), bf16_kernel()
    seconds = []
    with context:
        for index, (x, weight) in enumerate(case_inputs()):
            fn = side_callable(side, x, weight)
            seconds.append(time_call(fn, repeat=repeat))
            if side in KEPT:
                np.save(Path(out_dir) / f"{SIDES.index(side)}-{index}.npy", np.asarray(fn()))
            print(f"  {side} {CASES[index][0]}: done", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"seconds": seconds, "kernel": kernel}))


def run_side(side, repeat, out_dir):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--repeat", str(repeat),
               "--out", str(out_dir)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.exit(f"benchmark worker failed ({completed.returncode}): {side}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeat, args.out)
    load_before = os.getloadavg()
    peak = sgemm_peak_gflops()
    with tempfile.TemporaryDirectory(prefix="npdiff-bench-bf16x3-") as out_dir:
        results = {side: run_side(side, args.repeat, out_dir) for side in SIDES}  # one process per side, in turn
        print(f"bf16 GEMM here: {results['bf16']['kernel']}; load average before: {load_before}")
        rows_out = []
        for index, (name, rows, depth, cols) in enumerate(CASES):
            seconds = {side: results[side]["seconds"][index] for side in SIDES}
            outputs = {side: np.load(Path(out_dir) / f"{SIDES.index(side)}-{index}.npy") for side in KEPT}
            flops = 2.0 * rows * depth * cols
            row = {"what": name, **{f"{side} GF/s": flops / seconds[side] / 1e9 for side in SIDES},
                   "x3/f32": seconds["bf16x3"] / seconds["float32"],
                   "x3/torch": seconds["bf16x3"] / seconds["torch f32"],
                   "x3 err": rel_err(outputs["bf16x3"], outputs["torch f32"]),
                   "f32 err": rel_err(outputs["float32"], outputs["torch f32"]), "seconds": seconds}
            rows_out.append(row)
    columns = [("what", "shape", "{}")] + [(f"{side} GF/s", f"{side} GF/s", "{:.0f}") for side in SIDES]
    columns += [("x3/f32", "x3/f32", "{:.2f}"), ("x3/torch", "x3/torch", "{:.2f}"), ("x3 err", "bf16x3 err", "{:.1e}"),
                ("f32 err", "f32 err", "{:.1e}")]
    print_table(rows_out, columns)
    print(f"sgemm peak (NumPy 2048^2): {peak:.0f} GFLOP/s; load average after: {os.getloadavg()}")
    print("wrote", write_json("kernels_bf16x3", {"peak_gflops": peak, "rows": rows_out, "separate_processes": True}))


if __name__ == "__main__":
    main()
