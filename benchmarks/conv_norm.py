"""GroupNorm + SiLU folded into the next conv (kernels.group_norm_silu_conv2d) against the two steps, alternated
in one process: the SD 1.5 VAE decode and single resnet-conv shapes.

    python benchmarks/conv_norm.py [--cache DIR] [--rounds 3] [--only decode,convs,inputs]

decode: AutoencoderKL.decode of a [1,4,64,64] latent to 512x512 with the VAE of DIR/vae (random SD 1.5-size
weights as `npdiff bench models` makes them), fused (as shipped) and unfused (kernels.group_norm_silu_conv2d
replaced by group_norm(silu=True) then conv2d), rounds alternated; wall seconds and the process's CPU
seconds (all threads) per call, and whether the two images are the same bits. convs: GroupNorm(32) + SiLU
+ 3x3 conv at the decoder's shapes, the same way. inputs: the input side alone, on the calling thread
(thread CPU time, so other tenants' load moves it less): Numba's threads set to 1, group_norm_fast(silu)
then input_transform6 over every group of tile rows conv_winograd.blocking makes, against
group_norm_affine then input_transform6_normed over the same groups (the GEMMs and the output
transform are the same code on both sides). Warm-up calls first (Numba compiles or loads its cache).
"""

import argparse
import time
from pathlib import Path

import numpy as np

import numba

import npdiff.kernels as kernels
from npdiff.kernels.conv_winograd import blocking
from npdiff.kernels.conv_winograd6 import input_transform6, input_transform6_normed
from npdiff.kernels.norm import group_norm_affine, group_norm_fast
from npdiff.kernels import conv2d, group_norm
from npdiff.models import AutoencoderKL

FUSED = kernels.group_norm_silu_conv2d
CONV_SHAPES = [(512, 512, 64), (512, 512, 128), (512, 512, 256), (512, 256, 256), (256, 256, 256),
               (256, 256, 512), (256, 128, 512), (128, 128, 512)]  # (C_in, C_out, side), batch 1


def unfused(x, num_groups, norm_weight, norm_bias, eps, weight, bias=None, padding=1):
    """The two steps: the normalised tensor written whole, then the conv."""
    return conv2d(group_norm(x, num_groups, norm_weight, norm_bias, eps, silu=True), weight, bias, padding=padding)


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def alternate(name, call, rounds):
    """call() with the fused kernel and with the two steps, alternated; prints best and all times."""
    times = {"fused": [], "unfused": []}
    outputs = {}
    for variant, kernel in (("fused", FUSED), ("unfused", unfused)):  # warm-up
        kernels.group_norm_silu_conv2d = kernel
        outputs[variant] = call()
    for _ in range(rounds):
        for variant, kernel in (("unfused", unfused), ("fused", FUSED)):
            kernels.group_norm_silu_conv2d = kernel
            _, wall, cpu = timed(call)
            times[variant].append((wall, cpu))
    kernels.group_norm_silu_conv2d = FUSED
    same = np.array_equal(outputs["fused"], outputs["unfused"])
    best = {v: (min(w for w, _ in t), min(c for _, c in t)) for v, t in times.items()}
    print(f"{name:34s} unfused {best['unfused'][0]:7.3f} s wall {best['unfused'][1]:7.3f} s CPU | "
          f"fused {best['fused'][0]:7.3f} s wall {best['fused'][1]:7.3f} s CPU | fused/unfused wall "
          f"{best['fused'][0] / best['unfused'][0]:.3f} CPU {best['fused'][1] / best['unfused'][1]:.3f} | "
          f"same bits {same}", flush=True)
    for variant, rows in times.items():
        print(f"    {variant:8s} " + "  ".join(f"{w:.3f}/{c:.3f}" for w, c in rows), flush=True)


def input_side(x, norm_weight, norm_bias, fused):
    """Step 1 of the F(6,3) conv (group norm included) over all groups of tile rows, on this thread."""
    _, c_in, height, width = x.shape
    tiles_h, tiles_w = -(-height // 6), -(-width // 6)
    groups, _ = blocking(6, c_in, c_in, tiles_h, tiles_w)
    most = max(stop - start for start, stop in groups) * tiles_w
    V = np.empty((64, c_in, most), np.float32)
    gathered, mixed, rows = (np.empty((8, 6, tiles_w + 1), np.float32), np.empty((8, 6, tiles_w + 1), np.float32),
                             np.empty((8, width), np.float32))
    if fused:
        mean, scale, shift = group_norm_affine(x, 32, norm_weight, norm_bias, 1e-6)
    else:
        normed = group_norm_fast(x, 32, norm_weight, norm_bias, 1e-6, silu=True)
    for row0, row1 in groups:
        tiles = (row1 - row0) * tiles_w
        group_V = V[:, :, :tiles]
        if fused:
            input_transform6_normed(x, mean, scale, shift, row0, row1, tiles_h, 0, c_in, rows, gathered, mixed, group_V)
        else:
            input_transform6(normed, row0, row1, tiles_h, 0, c_in, gathered, mixed, group_V)
    return V


def one_thread(name, call, rounds):
    """Thread CPU seconds of call(True) (fused) and call(False), alternated; best of rounds."""
    call(True), call(False)
    times = {True: [], False: []}
    for _ in range(rounds):
        for fused in (False, True):
            start = time.thread_time()
            call(fused)
            times[fused].append(time.thread_time() - start)
    print(f"{name:34s} one thread: unfused {min(times[False]) * 1e3:7.1f} ms | fused {min(times[True]) * 1e3:7.1f} ms"
          f" | fused/unfused {min(times[True]) / min(times[False]):.3f}   (all: unfused "
          + " ".join(f"{t * 1e3:.0f}" for t in times[False]) + ", fused " + " ".join(f"{t * 1e3:.0f}" for t in times[True])
          + ")", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=str(Path.home() / ".cache/npdiff/sd15-random"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="decode,convs")
    args = parser.parse_args()
    only = args.only.split(",")
    rng = np.random.default_rng(0)
    print("load average", open("/proc/loadavg").read().split()[:3], flush=True)
    if "decode" in only:
        vae = AutoencoderKL.from_pretrained(Path(args.cache) / "vae")
        latents = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)
        alternate("VAE decode [1,4,64,64] -> 512x512", lambda: vae.decode(latents), args.rounds)
    if "convs" in only:
        for c_in, c_out, side in CONV_SHAPES:
            x = rng.standard_normal((1, c_in, side, side), dtype=np.float32)
            norm_weight, norm_bias = rng.standard_normal((2, c_in), dtype=np.float32)
            weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
            bias = rng.standard_normal(c_out, dtype=np.float32)
            alternate(f"GN+SiLU+conv {c_in}->{c_out} at {side} px",
                      lambda: kernels.group_norm_silu_conv2d(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, 1),
                      args.rounds)
    if "inputs" in only:
        numba.set_num_threads(1)
        for c_in, _, side in CONV_SHAPES:
            x = rng.standard_normal((1, c_in, side, side), dtype=np.float32)
            norm_weight, norm_bias = rng.standard_normal((2, c_in), dtype=np.float32)
            one_thread(f"GN+SiLU+input transform {c_in} at {side} px",
                       lambda fused: input_side(x, norm_weight, norm_bias, fused), args.rounds)
    print("load average", open("/proc/loadavg").read().split()[:3], flush=True)


if __name__ == "__main__":
    main()
