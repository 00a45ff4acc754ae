"""The step before a 3x3 conv folded into it (kernels.group_norm_silu_conv2d, upsample_nearest2x_conv2d) against
the two steps, alternated in one process: the SD 1.5 VAE decode, single convs, the input side alone.

    python benchmarks/conv_fused.py [--cache DIR] [--rounds 3] [--only decode,convs,unet_convs,upsample_convs,inputs]
    python benchmarks/conv_fused.py [--cache DIR] --peak-rss fused|unfused

decode: AutoencoderKL.decode of a [1,4,64,64] latent to 512x512 with the VAE of DIR/vae (random SD 1.5-size
weights as `npdiff bench models` makes them), folded (as shipped) and unfused (both kernels replaced by their
two steps: group_norm(silu=True) then conv2d, upsample_nearest2x then conv2d), rounds alternated; wall
seconds and the process's CPU seconds (all threads) per call, and whether the two images are the same bits.
convs: GroupNorm(32) + SiLU + 3x3 conv at the decoder's shapes, the same way; unet_convs: at the UNet's
resnet shapes, batch 2; upsample_convs: nearest 2x + 3x3 conv at the decoder's Upsample2D shapes. inputs:
the input side alone, on the calling thread (thread CPU time, so other tenants' load moves it less): Numba's
threads set to 1, group_norm_fast(silu) then input_transform6 over every group of tile rows
conv_winograd.blocking makes, against group_norm_affine then input_transform6_rows over the same groups
(the GEMMs and the output transform are the same code on both sides). Warm-up calls first (Numba compiles
or loads its cache). --peak-rss: in this process only that variant, one decode after loading and a warm-up
decode, with the peak RSS (VmHWM) reset before it: the decode's own peak above the resident set before it.
"""

import argparse
import time
from pathlib import Path

import numba
import numpy as np

import npdiff.kernels as kernels
from npdiff.kernels import conv2d, group_norm, upsample_nearest2x
from npdiff.kernels.conv_winograd import blocking
from npdiff.kernels.conv_winograd6 import input_transform6, input_transform6_rows
from npdiff.kernels.norm import group_norm_affine, group_norm_fast
from npdiff.models import AutoencoderKL

FOLDED = (kernels.group_norm_silu_conv2d, kernels.upsample_nearest2x_conv2d)
CONV_SHAPES = [(512, 512, 64), (512, 512, 128), (512, 512, 256), (512, 256, 256), (256, 256, 256),
               (256, 256, 512), (256, 128, 512), (128, 128, 512)]  # (C_in, C_out, side), batch 1
# the UNet's resnet convs (batch 2: guidance), (C_in, C_out, side): F(6,3) at 64 px, F(4,3) at 32 and 16 px
UNET_SHAPES = [(320, 320, 64), (640, 320, 64), (960, 320, 64), (640, 640, 32), (1280, 640, 32), (1280, 1280, 16),
               (2560, 1280, 16)]
UPSAMPLE_SHAPES = [(512, 64), (512, 128), (256, 256)]  # the decoder's Upsample2D: (C, side before), batch 1


def norm_then_conv(x, num_groups, norm_weight, norm_bias, eps, weight, bias=None, padding=1):
    """The two steps: the normalised tensor written whole, then the conv."""
    return conv2d(group_norm(x, num_groups, norm_weight, norm_bias, eps, silu=True), weight, bias, padding=padding)


def upsample_then_conv(x, weight, bias=None, padding=1):
    """The two steps: the upsampled tensor written whole, then the conv."""
    return conv2d(upsample_nearest2x(x), weight, bias, padding=padding)


def use(folded):
    kernels.group_norm_silu_conv2d, kernels.upsample_nearest2x_conv2d = (
        FOLDED if folded else (norm_then_conv, upsample_then_conv))


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def alternate(name, call, rounds):
    """call() with the folded kernels and with the two steps, alternated; prints best and all times."""
    times = {"fused": [], "unfused": []}
    outputs = {}
    for variant in ("fused", "unfused"):  # warm-up
        use(variant == "fused")
        outputs[variant] = call()
    for _ in range(rounds):
        for variant in ("unfused", "fused"):
            use(variant == "fused")
            _, wall, cpu = timed(call)
            times[variant].append((wall, cpu))
    use(True)
    same = np.array_equal(outputs["fused"], outputs["unfused"])
    best = {v: (min(w for w, _ in t), min(c for _, c in t)) for v, t in times.items()}
    print(f"{name:34s} unfused {best['unfused'][0]:7.3f} s wall {best['unfused'][1]:7.3f} s CPU | "
          f"fused {best['fused'][0]:7.3f} s wall {best['fused'][1]:7.3f} s CPU | fused/unfused wall "
          f"{best['fused'][0] / best['unfused'][0]:.3f} CPU {best['fused'][1] / best['unfused'][1]:.3f} | "
          f"same bits {same}", flush=True)
    for variant, rows in times.items():
        print(f"    {variant:8s} " + "  ".join(f"{w:.3f}/{c:.3f}" for w, c in rows), flush=True)


def conv_inputs(rng, batch, c_in, c_out, side):
    x = rng.standard_normal((batch, c_in, side, side), dtype=np.float32)
    norm_weight, norm_bias = rng.standard_normal((2, c_in), dtype=np.float32)
    weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
    return x, norm_weight, norm_bias, weight, rng.standard_normal(c_out, dtype=np.float32)


def norm_convs(rng, shapes, batch, rounds, label):
    for c_in, c_out, side in shapes:
        x, norm_weight, norm_bias, weight, bias = conv_inputs(rng, batch, c_in, c_out, side)
        alternate(f"{label}GN+SiLU+conv {c_in}->{c_out} at {side} px",
                  lambda: kernels.group_norm_silu_conv2d(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, 1), rounds)


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
            input_transform6_rows(x, False, mean, scale, shift, row0, row1, tiles_h, 0, c_in, rows, gathered, mixed,
                                  group_V)
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
    every = {fused: " ".join(f"{t * 1e3:.0f}" for t in times[fused]) for fused in (False, True)}
    print(f"{name:34s} one thread: unfused {min(times[False]) * 1e3:7.1f} ms | fused {min(times[True]) * 1e3:7.1f} ms"
          f" | fused/unfused {min(times[True]) / min(times[False]):.3f}   (all: unfused {every[False]}, "
          f"fused {every[True]})", flush=True)


def status_gib(key):
    """A /proc/self/status size (VmRSS:, VmHWM:) in GiB."""
    line = next(line for line in open("/proc/self/status") if line.startswith(key))
    return int(line.split()[1]) / 2**20


def peak_rss(cache, folded):
    use(folded)
    vae = AutoencoderKL.from_pretrained(cache / "vae")
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64), dtype=np.float32)
    vae.decode(latents)  # warm-up
    before = status_gib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    _, wall, _ = timed(lambda: vae.decode(latents))
    peak = status_gib("VmHWM:")
    print(f"{'fused' if folded else 'unfused':8s} decode: RSS before {before:.2f} GiB, peak during {peak:.2f} GiB "
          f"(+{peak - before:.2f}), wall {wall:.1f} s", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=str(Path.home() / ".cache/npdiff/sd15-random"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="decode,convs")
    parser.add_argument("--peak-rss", choices=["fused", "unfused"])
    args = parser.parse_args()
    if args.peak_rss:
        return peak_rss(Path(args.cache), args.peak_rss == "fused")
    only = args.only.split(",")
    rng = np.random.default_rng(0)
    print("load average", open("/proc/loadavg").read().split()[:3], flush=True)
    if "decode" in only:
        vae = AutoencoderKL.from_pretrained(Path(args.cache) / "vae")
        latents = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)
        alternate("VAE decode [1,4,64,64] -> 512x512", lambda: vae.decode(latents), args.rounds)
    if "convs" in only:
        norm_convs(rng, CONV_SHAPES, 1, args.rounds, "")
    if "unet_convs" in only:
        norm_convs(rng, UNET_SHAPES, 2, args.rounds, "UNet, batch 2: ")
    if "upsample_convs" in only:
        for channels, side in UPSAMPLE_SHAPES:
            x, _, _, weight, bias = conv_inputs(rng, 1, channels, channels, side)
            alternate(f"upsample 2x + conv {channels} ch, {side} -> {2 * side} px",
                      lambda: kernels.upsample_nearest2x_conv2d(x, weight, bias, 1), args.rounds)
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
