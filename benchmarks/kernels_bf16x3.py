"""bf16x3 linear layers (npdiff/kernels/matmul_bf16x3.py) against the float32 GEMM, on SD's shapes.

    python benchmarks/kernels_bf16x3.py [--repeat N]

Sides, each timed in turn in the same process (best of --repeat after a warm-up), 2 threads:
  float32     npdiff's float32 linear (kernels.linear: OpenBLAS sgemm on npdiff's pool)
  torch f32   torch's F.linear in float32 (oneDNN), the anchor
  bf16x3      three bf16 products on AMX tiles, float32 sums (linear_bf16x3)
  bf16        one bf16 product on AMX (linear_bf16): what bf16x3 costs three of
GFLOP/s are the float32 GEMM's 2*M*K*N over the time ("equivalent" for bf16x3, which multiplies three
times as much); "x3/f32" is bf16x3's time over npdiff float32's. "rel err": bf16x3 and float32 against
torch float32 on the same inputs. Output: the table and benchmarks/out/kernels_bf16x3.json.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np  # first, as in a user's script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, sgemm_peak_gflops, time_call, write_json  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.kernels.bf16_rounding import bf16_kernel  # noqa: E402
from npdiff.kernels.matmul_bf16 import linear_bf16, pack_linear_bf16  # noqa: E402
from npdiff.kernels.matmul_bf16x3 import linear_bf16x3, pack_linear_bf16x3  # noqa: E402

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


def rel_err(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"bf16 GEMM here: {bf16_kernel()}; load average before: {os.getloadavg()}")
    peak = sgemm_peak_gflops()
    rng = np.random.default_rng(0)
    rows_out = []
    for name, rows, depth, cols in CASES:
        x = rng.standard_normal((rows, depth), dtype=np.float32)  # [M, K]
        weight = (rng.standard_normal((cols, depth)) / np.sqrt(depth)).astype(np.float32)  # [N, K]
        x_t, w_t = torch.from_numpy(x), torch.from_numpy(weight)
        split, rounded = pack_linear_bf16x3(weight), pack_linear_bf16(weight)
        sides = {"float32": lambda: kernels.linear(x, weight), "torch f32": lambda: F.linear(x_t, w_t),
                 "bf16x3": lambda: linear_bf16x3(x, split), "bf16": lambda: linear_bf16(x, rounded)}
        with torch.inference_mode():
            expected = F.linear(x_t, w_t).numpy()
            seconds = {side: time_call(fn, repeat=args.repeat) for side, fn in sides.items()}
        flops = 2.0 * rows * depth * cols
        row = {"what": name, **{f"{side} GF/s": flops / seconds[side] / 1e9 for side in sides},
               "x3/f32": seconds["bf16x3"] / seconds["float32"], "x3/torch": seconds["bf16x3"] / seconds["torch f32"],
               "x3 err": rel_err(linear_bf16x3(x, split), expected), "f32 err": rel_err(kernels.linear(x, weight), expected),
               "seconds": seconds}
        rows_out.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)
    columns = [("what", "shape", "{}")] + [(f"{side} GF/s", f"{side} GF/s", "{:.0f}") for side in sides]
    columns += [("x3/f32", "x3/f32", "{:.2f}"), ("x3/torch", "x3/torch", "{:.2f}"), ("x3 err", "bf16x3 err", "{:.1e}"),
                ("f32 err", "f32 err", "{:.1e}")]
    print_table(rows_out, columns)
    print(f"sgemm peak (NumPy 2048^2): {peak:.0f} GFLOP/s; load average after: {os.getloadavg()}")
    print("wrote", write_json("kernels_bf16x3", {"peak_gflops": peak, "rows": rows_out}))


if __name__ == "__main__":
    main()
