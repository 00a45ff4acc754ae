"""Where the SD 1.5 UNet's 3x3 convs (batch 2, 64x64 latent) or its VAE decoder's (--network vae: batch 1, 64x64
latent -> 512x512) spend their time, per shape: CPU seconds per call split into the input transform (with the folded GroupNorm + SiLU or nearest 2x upsampling), the weight transform,
the GEMMs and the output transform, and each shape's share of the UNet's 3x3 conv time.

    taskset -c 0 python benchmarks/winograd_shapes.py [--network unet|vae] [--rounds 3] [--only 64,32,16,8]

Run it on one core (taskset): the block pool then has one worker (the calling thread) and Numba one thread, so
the figures are one core's CPU time (time.thread_time, summed over the blocks: kernels.conv_winograd's
step_seconds). "stats" is group_norm_affine (the group statistics, one float64 pass over x) of the folded
GroupNorm + SiLU; the 8 px convs (im2col, not folded) are timed whole: group_norm(silu) then conv2d. Per shape
the round with the least total CPU time of rounds run back to back (after one warm-up call) is shown.
"""

import argparse
import time

import numba
import numpy as np

from npdiff.kernels import conv2d, group_norm
from npdiff.kernels.conv import conv_method
from npdiff.kernels.conv_winograd import winograd_conv2d
from npdiff.kernels.norm import group_norm_affine

# (what runs before the conv, C_in, C_out, output side, calls per UNet call): the UNet's 3x3 stride-1 convs
# with at least 320 input channels (conv_in, 4 -> 320, and the 3 stride-2 downsamplers are not Winograd's)
UNET_CONVS = [
    ("norm", 320, 320, 64, 7), ("norm", 640, 320, 64, 2), ("norm", 960, 320, 64, 1), ("upsample", 640, 640, 64, 1),
    ("norm", 320, 640, 32, 1), ("norm", 640, 640, 32, 6), ("norm", 960, 640, 32, 1), ("norm", 1280, 640, 32, 1),
    ("norm", 1920, 640, 32, 1), ("upsample", 1280, 1280, 32, 1),
    ("norm", 640, 1280, 16, 1), ("norm", 1280, 1280, 16, 6), ("norm", 1920, 1280, 16, 1), ("norm", 2560, 1280, 16, 2),
    ("upsample", 1280, 1280, 16, 1),
    ("norm", 1280, 1280, 8, 11), ("norm", 2560, 1280, 8, 3),
]
# the same for the VAE decoder (SD 1.5's and SDXL's: 128-512 channels, 3 resnets per up block): every 3x3 conv but
# conv_in (4 -> 512) and conv_out (128 -> 3, direct loops)
VAE_CONVS = [
    ("norm", 512, 512, 64, 10), ("upsample", 512, 512, 128, 1), ("norm", 512, 512, 128, 6),
    ("upsample", 512, 512, 256, 1), ("norm", 512, 256, 256, 1), ("norm", 256, 256, 256, 5),
    ("upsample", 256, 256, 512, 1), ("norm", 256, 128, 512, 1), ("norm", 128, 128, 512, 5),
]
NETWORKS = {"unet": (UNET_CONVS, 2, 1e-5), "vae": (VAE_CONVS, 1, 1e-6)}  # convs, batch, GroupNorm eps
STEPS = ("stats", "input", "weights", "gemm", "output")
GROUPS = 32


def make_inputs(kind, c_in, c_out, side, batch, rng):
    x_side = side // 2 if kind == "upsample" else side
    x = rng.standard_normal((batch, c_in, x_side, x_side), dtype=np.float32)  # [B,C_in,H,W]
    weight = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)  # [C_out,C_in,3,3]
    bias = rng.standard_normal(c_out).astype(np.float32)  # [C_out]
    norm_weight = (1 + 0.1 * rng.standard_normal(c_in)).astype(np.float32)  # [C_in]
    norm_bias = (0.1 * rng.standard_normal(c_in)).astype(np.float32)  # [C_in]
    return x, weight, bias, norm_weight, norm_bias


def one_call(kind, eps, x, weight, bias, norm_weight, norm_bias):
    """One call's CPU seconds per step (and "total")."""
    seconds = {}
    start = time.thread_time()
    side = 2 * x.shape[2] if kind == "upsample" else x.shape[2]
    method = conv_method((x.shape[0], x.shape[1], side, side), weight.shape, (1, 1), (1, 1))
    if method not in ("winograd4", "winograd6"):
        conv2d(group_norm(x, GROUPS, norm_weight, norm_bias, eps, silu=True), weight, bias, padding=1)
        seconds["other"] = time.thread_time() - start
    else:
        m = 4 if method == "winograd4" else 6
        normalized = None
        if kind == "norm":
            normalized = group_norm_affine(x, GROUPS, norm_weight, norm_bias, eps)
            seconds["stats"] = time.thread_time() - start
        winograd_conv2d(x, weight, bias, (1, 1), m, normalized=normalized, upsampled=kind == "upsample",
                        step_seconds=seconds)
    seconds["total"] = time.thread_time() - start
    return method, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="unet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="output sides to run, e.g. 64,32 (default: all)")
    args = parser.parse_args()
    numba.set_num_threads(1)
    convs, batch, eps = NETWORKS[args.network]
    sides = {int(side) for side in args.only.split(",")} if args.only else {side for *_, side, _ in convs}
    rng = np.random.default_rng(0)
    rows = []
    for kind, c_in, c_out, side, count in convs:
        if side not in sides:
            continue
        inputs = make_inputs(kind, c_in, c_out, side, batch, rng)
        one_call(kind, eps, *inputs)  # warm-up: Numba compiles or loads its cache, scratch grows
        best = None
        for _ in range(args.rounds):
            method, seconds = one_call(kind, eps, *inputs)
            if best is None or seconds["total"] < best["total"]:
                best = seconds
        rows.append((kind, c_in, c_out, side, count, method, best))
    total = sum(count * best["total"] for *_, count, _, best in rows)
    print(f"one core, ms per call (best of {args.rounds}); share = calls x total / the sum over these shapes "
          f"({1000 * total:.0f} ms)")
    print("| before the conv | C_in -> C_out @ side | calls | method | " + " | ".join(STEPS)
          + " | other | total | share |")
    print("|---|---|---|---|" + "---|" * (len(STEPS) + 3))
    for kind, c_in, c_out, side, count, method, best in rows:
        cells = " | ".join(f"{1000 * best[step]:.1f}" if step in best else "" for step in STEPS + ("other",))
        print(f"| {kind} | {c_in} -> {c_out} @ {side} | {count} | {method} | {cells} | {1000 * best['total']:.1f} | "
              f"{100 * count * best['total'] / total:.1f}% |")
    steps_sum = {step: sum(count * best.get(step, 0.0) for *_, count, _, best in rows) for step in STEPS + ("other",)}
    print("all calls, ms: " + ", ".join(f"{step} {1000 * value:.0f}" for step, value in steps_sum.items()))


if __name__ == "__main__":
    main()
