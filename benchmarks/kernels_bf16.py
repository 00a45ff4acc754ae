"""The bfloat16 GEMM and convolution (npdiff/kernels/matmul_bf16.py, conv_bf16.py) against float32
and against torch's own bfloat16, at Stable Diffusion 1.5's shapes.

    python benchmarks/kernels_bf16.py [--repeat N] [--rounds R] [--quick] [--conv]
    npdiff bench kernels_bf16 ...

Each row, in one process (the script imports numpy first, as a user's script does):
  amx      npdiff's bf16 GEMM on AMX tiles (the default where the CPU has them); for convs version 3 of
           conv_bf16.py, the implicit GEMM (conv_bf16_amx.py)
  amx v2   convs only: version 2 on AMX, the image unfolded into pair words, then matmul_amx's GEMM
           (pack_conv_bf16(..., implicit=False))
  dpbf16   npdiff's bf16 GEMM on the vdpbf16ps micro-kernel (NPDIFF_NO_AMX=1)
  f32      npdiff's float32 path: np.matmul (OpenBLAS sgemm) for linear, conv2d for convolutions
  torch bf16   torch on bfloat16 tensors (F.linear / F.conv2d: oneDNN, AMX where the CPU has it)
  torch f32    torch in float32
GFLOP/s count 2*M*N*K (linear) and the direct conv's 2*B*C_out*C_in*kH*kW*Ho*Wo; the ratios are the
time of npdiff's bf16 kernel over each anchor. Timing: `--rounds` rounds, each timing every side
(best of `--repeat` runs after a warm-up); the best over the rounds is kept for every side alike.
"rel err" is npdiff bf16 against torch float32 on the original float32 inputs: what bf16 costs.
Output: the table and benchmarks/out/kernels_bf16.json.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np  # first, as in a user's script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, sgemm_peak_gflops, time_call, write_json  # noqa: E402

from npdiff.kernels import conv2d, conv2d_bf16, linear_bf16, pack_conv_bf16, pack_linear_bf16  # noqa: E402
from npdiff.kernels.bf16_rounding import bf16_kernel  # noqa: E402

# (name, rows, in, out): SD 1.5's feed-forward layers (GEGLU's projection at 64, 32 and 16 px, batch 2)
# and CLIP's MLP, and the [4096,1280] x [1280,10240] of the brief
LINEAR_CASES = [
    ("ff 64px [8192,320]x[320,2560]", 8192, 320, 2560),
    ("ff out [8192,1280]x[1280,320]", 8192, 1280, 320),
    ("ff 32px [2048,640]x[640,5120]", 2048, 640, 5120),
    ("[4096,1280]x[1280,10240]", 4096, 1280, 10240),
    ("ff 16px [512,1280]x[1280,10240]", 512, 1280, 10240),
    ("CLIP fc1 [154,768]x[768,3072]", 154, 768, 3072),
]
# (name, batch, C_in, size, C_out, kernel, stride)
CONV_CASES = [
    ("UNet 64px 320->320 3x3", 2, 320, 64, 320, 3, 1),
    ("UNet 32px 640->640 3x3", 2, 640, 32, 640, 3, 1),
    ("UNet 16px 1280->1280 3x3", 2, 1280, 16, 1280, 3, 1),
    ("UNet 16px 2560->1280 3x3", 2, 2560, 16, 1280, 3, 1),
    ("UNet 8px 1280->1280 3x3", 2, 1280, 8, 1280, 3, 1),
    ("UNet 64->32px 320 3x3 stride 2", 2, 320, 64, 320, 3, 2),
    ("VAE 128px 512->512 3x3", 1, 512, 128, 512, 3, 1),
    ("VAE 256px 256->256 3x3", 1, 256, 256, 256, 3, 1),
    ("VAE 512px 128->128 3x3", 1, 128, 512, 128, 3, 1),
    ("UNet 64px 640->320 1x1", 2, 640, 64, 320, 1, 1),
    ("VAE 256px 512->256 1x1", 1, 512, 256, 256, 1, 1),
]
QUICK = {"ff 32px [2048,640]x[640,5120]", "UNet 32px 640->640 3x3"}


def with_env(name, value, fn):
    """fn() with os.environ[name] = value (None: unset) for the call."""
    def call():
        saved = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
    return call


def rel_err(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def linear_sides(rng, torch, F, rows, depth, cols):
    x = rng.standard_normal((rows, depth), dtype=np.float32)
    weight = (rng.standard_normal((cols, depth), dtype=np.float32) / np.sqrt(depth)).astype(np.float32)
    packed = pack_linear_bf16(weight)
    x_t, w_t = torch.from_numpy(x), torch.from_numpy(weight)
    x_b, w_b = x_t.bfloat16(), w_t.bfloat16()
    sides = {
        "amx": lambda: linear_bf16(x, packed),
        "dpbf16": with_env("NPDIFF_NO_AMX", "1", lambda: linear_bf16(x, packed)),
        "f32": lambda: np.matmul(x, weight.T),
        "torch bf16": lambda: F.linear(x_b, w_b),
        "torch f32": lambda: F.linear(x_t, w_t),
    }
    return sides, 2.0 * rows * depth * cols, lambda: rel_err(linear_bf16(x, packed), F.linear(x_t, w_t).numpy())


def conv_sides(rng, torch, F, batch, c_in, size, c_out, k, stride):
    x = rng.standard_normal((batch, c_in, size, size), dtype=np.float32)
    weight = (rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) / np.sqrt(c_in * k * k)).astype(np.float32)
    packed = pack_conv_bf16(weight)
    packed_v2 = pack_conv_bf16(weight, implicit=False)  # version 2's layout
    if packed.layout in ("amx", "amx_taps"):
        os.environ["NPDIFF_NO_AMX"] = "1"
        packed_dpbf16 = pack_conv_bf16(weight)  # the vdpbf16ps kernel reads its own weight layout
        del os.environ["NPDIFF_NO_AMX"]
    else:
        packed_dpbf16 = packed
    pad = k // 2
    x_t, w_t = torch.from_numpy(x), torch.from_numpy(weight)
    x_b, w_b = x_t.bfloat16(), w_t.bfloat16()
    sides = {
        "amx": lambda: conv2d_bf16(x, packed, None, stride, pad),
        "amx v2": lambda: conv2d_bf16(x, packed_v2, None, stride, pad),
        "dpbf16": with_env("NPDIFF_NO_AMX", "1", lambda: conv2d_bf16(x, packed_dpbf16, None, stride, pad)),
        "f32": lambda: conv2d(x, weight, None, stride, pad),
        "torch bf16": lambda: F.conv2d(x_b, w_b, None, stride, pad),
        "torch f32": lambda: F.conv2d(x_t, w_t, None, stride, pad),
    }
    if packed.layout != "amx_taps":  # version 3 does not run here (no AMX): no second AMX side
        sides.pop("amx v2")
    size_out = (size + 2 * pad - k) // stride + 1
    flops = 2.0 * batch * c_out * c_in * k * k * size_out * size_out
    reference = F.conv2d(x_t, w_t, None, stride, pad).numpy()
    return sides, flops, lambda: rel_err(conv2d_bf16(x, packed, None, stride, pad), reference)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one linear and one conv shape")
    parser.add_argument("--conv", action="store_true", help="the convolution rows only (version 2 against 3)")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    load_before = os.getloadavg()
    print(f"bf16 kernel here: {bf16_kernel()}; load average before: {load_before[0]:.2f}")
    peak = sgemm_peak_gflops()
    rng = np.random.default_rng(0)
    cases = [("linear", name, linear_sides, shape) for name, *shape in LINEAR_CASES]
    cases += [("conv", name, conv_sides, shape) for name, *shape in CONV_CASES]
    rows = []
    for kind, name, make, shape in cases:
        if (args.quick and name not in QUICK) or (args.conv and kind != "conv"):
            continue
        sides, flops, error = make(rng, torch, F, *shape)
        if bf16_kernel() != "amx":
            sides.pop("amx")
            sides.pop("amx v2", None)
        best = {side: float("inf") for side in sides}
        for _ in range(args.rounds):
            for side, fn in sides.items():
                best[side] = min(best[side], time_call(fn, repeat=args.repeat))
        ours = best.get("amx", best["dpbf16"])
        row = {"kind": kind, "case": name, "rel_err": error(), "flops": flops}
        for side, seconds in best.items():
            row[f"{side} GFLOP/s"] = flops / seconds / 1e9
            row[f"{side} s"] = seconds
        if "amx v2" in best:
            row["v3/v2"] = best["amx"] / best["amx v2"]
        row["bf16/f32"] = ours / best["f32"]
        row["bf16/torch bf16"] = ours / best["torch bf16"]
        row["bf16/torch f32"] = ours / best["torch f32"]
        rows.append(row)
        print(f"  {name}: done", flush=True)
    load_after = os.getloadavg()
    columns = [("case", "case", None)]
    columns += [(f"{side} GFLOP/s", f"{side}", "{:.0f}")
                for side in ("amx", "amx v2", "dpbf16", "f32", "torch bf16", "torch f32")]
    columns += [("v3/v2", "v3/v2", "{:.2f}"), ("bf16/f32", "bf16/f32", "{:.2f}"), ("bf16/torch bf16", "/torch bf16", "{:.2f}"),
                ("bf16/torch f32", "/torch f32", "{:.2f}"), ("rel_err", "rel err", "{:.1e}")]
    print(f"\nGFLOP/s (2 threads each; sgemm peak this run {peak:.0f}); ratios: time of npdiff bf16 / the anchor")
    print_table(rows, columns)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    path = write_json("kernels_bf16", {"rows": rows, "sgemm_peak_gflops": peak, "kernel": bf16_kernel(),
                                       "load_before": load_before, "load_after": load_after})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
