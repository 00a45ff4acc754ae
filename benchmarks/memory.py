"""Loading and memory, piece by piece, each in a fresh process (the whole job is benchmarks/pipeline.py).

    python benchmarks/memory.py load            # StableDiffusionPipeline.from_pretrained(folder) alone
    python benchmarks/memory.py decode --size 512   # the KL VAE decode alone: its peak RSS
    python benchmarks/memory.py decode --size 2048 --tiling --sides npdiff,torch   # tiled, against diffusers'
    python benchmarks/memory.py refault         # UNet forward, release its pages, forward again

The folder is benchmarks/models.py's random SD 1.5-size weights (~/.cache/npdiff/sd15-random, 4 GB of
float32), its files read once beforehand so they are in the page cache (what a second run of a user's job
sees; a cold disk adds its read time to both libraries alike). Measured in the worker process:
    load      seconds from before `import npdiff` to the pipeline ready, seconds in from_pretrained alone,
              and VmRSS / RssAnon / RssFile / VmHWM (the peak) after it, from /proc/self/status;
              --no-finite-check leaves out the NaN/Inf check of every weight, to measure its cost
    decode    VmRSS before, the peak within AutoencoderKL.decode (VmHWM after resetting it with clear_refs)
              of latents [1,4,size/8,size/8], and the seconds it took; the weights are paged in before the
              reset by one decode at 64x64, so the peak above VmRSS is the decoder's activations;
              --tiling: vae.enable_tiling() (diffusers' tiles, npdiff/models/vae_tiling.py), --tile PIXELS
              sets tile_sample_min_size (and the latent tile) on both sides instead of the config's
              sample_size; --sides npdiff,torch runs diffusers' AutoencoderKL too, each in its own process,
              and prints the time and peak ratios and how many 8-bit levels the pictures differ by;
              --vae-folder: another VAE folder than the cache's vae/ (e.g. sdxl-random/vae: the same
              network as SD 1.5's, sample_size 1024)
    refault   one UNet forward at 64x64 latents (pages the weights in), RssFile after it, release the UNet's
              resident pages (npdiff.loading.release_resident_pages), RssFile after that, then the same
              forward again: its seconds minus a third forward's are the cost of faulting the weights back
              in from the page cache (noisy on a busy machine; a read of every page once, released and then
              resident, measures the fault cost alone); the outputs must be bit-identical
Every figure comes with the load average.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import proc_status_gib  # this script's folder, first on sys.path

T0 = time.perf_counter()


def status():
    """{VmRSS, RssAnon, RssFile, VmHWM} in GiB from /proc/self/status (Linux)."""
    return {name: proc_status_gib(name) for name in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def work_load(args):
    import npdiff  # noqa: F401
    from npdiff import StableDiffusionPipeline

    if args.no_finite_check:  # to measure what the NaN/Inf check at load costs: the only thing left out
        import npdiff.loading.weights

        npdiff.loading.weights.first_non_finite = lambda values: None
    imported = time.perf_counter() - T0
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.cache)
    seconds = time.perf_counter() - t0
    return {"import_s": imported, "from_pretrained_s": seconds, "total_s": time.perf_counter() - T0,
            "after_load": status(), "unet_tensors": len(vars(pipe.unet))}


def decode_model(args):
    """-> (decode: latents -> image as NumPy, the VAE) of args.side, tiled as asked."""
    folder = Path(args.vae_folder or Path(args.cache) / "vae")
    if args.side == "torch":
        # this folder off the path, as a defence: a module here could shadow a package diffusers imports
        here = Path(__file__).resolve().parent
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
        import torch
        from diffusers import AutoencoderKL as TorchAutoencoderKL

        vae = TorchAutoencoderKL.from_pretrained(folder).eval()

        def decode(latents):
            with torch.no_grad():
                return vae.decode(torch.from_numpy(latents)).sample.numpy()
    else:
        from npdiff.models import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder)
        decode = vae.decode
    if args.tiling:
        vae.enable_tiling()
    if args.tile:
        factor = 2 ** (len(vae.config.block_out_channels if args.side == "torch" else vae.config["block_out_channels"])
                       - 1)
        vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, args.tile // factor
    return decode, vae


def work_decode(args):
    import numpy as np

    decode, vae = decode_model(args)
    rng = np.random.default_rng(0)
    decode(rng.standard_normal((1, 4, 8, 8), dtype=np.float32))  # pages in the weights, compiles kernels
    before = status()
    reset_peak()
    latents = rng.standard_normal((1, 4, args.size // 8, args.size // 8), dtype=np.float32)
    t0 = time.perf_counter()
    image = decode(latents)  # [1,4,h,w] -> [1,3,H,W]
    seconds = time.perf_counter() - t0
    after = status()
    image_gib = image.nbytes / 2**30
    if args.out:  # the picture in 8-bit levels, as diffusers' image processor makes it
        np.save(args.out, np.round(np.clip(image / 2 + 0.5, 0.0, 1.0) * 255).astype(np.uint8))
    return {"side": args.side, "size": args.size, "tiling": bool(args.tiling),
            "tile_pixels": vae.tile_sample_min_size if args.tiling else None, "before": before, "after": after,
            "decode_s": seconds, "peak_above_before_gib": after["VmHWM"] - before["VmRSS"], "image_gib": image_gib}


def work_refault(args):
    import numpy as np

    from npdiff.loading import release_resident_pages
    from npdiff.loading.resident import mapped_arrays
    from npdiff.models import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(args.cache) / "unet")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    text = rng.standard_normal((1, 77, 768), dtype=np.float32)
    after_load = status()
    first = unet(latents, 999, text)
    paged_in = status()
    t0 = time.perf_counter()
    released_bytes = release_resident_pages(unet)
    release_s = time.perf_counter() - t0
    released = status()
    t0 = time.perf_counter()
    second = unet(latents, 999, text)  # faults every weight back in from the page cache
    refault_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet(latents, 999, text)  # all resident: the forward's own time
    resident_s = time.perf_counter() - t0
    # the fault cost alone, without a forward's noise: one read per page of every weight, released / resident
    arrays = mapped_arrays(unet)
    touch = [0.0, 0.0]
    for which in (0, 1):
        if which == 0:
            release_resident_pages(unet)
        t0 = time.perf_counter()
        for array in arrays:
            array.reshape(-1)[::1024].sum()  # every 4 KiB page once
        touch[which] = time.perf_counter() - t0
    return {"after_load": after_load, "after_forward": paged_in, "after_release": released,
            "released_gib": released_bytes / 2**30, "release_s": release_s, "forward_after_release_s": refault_s,
            "forward_resident_s": resident_s, "refault_cost_s": refault_s - resident_s,
            "touch_every_page_released_s": touch[0], "touch_every_page_resident_s": touch[1],
            "bit_identical": bool(np.array_equal(first, second))}


WORK = {"load": work_load, "decode": work_decode, "refault": work_refault}


def warm_page_cache(cache):
    """Read every weight file once so each measurement starts with them in the page cache."""
    for path in sorted(Path(cache).rglob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=sorted(WORK))
    parser.add_argument("--size", type=int, default=512, help="decode: picture side in pixels")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per figure (the best is kept)")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--no-finite-check", action="store_true",
                        help="load: leave out the NaN/Inf check of every weight (to measure its cost)")
    parser.add_argument("--tiling", action="store_true", help="decode: vae.enable_tiling()")
    parser.add_argument("--tile", type=int, default=None, help="decode: tile_sample_min_size in pixels")
    parser.add_argument("--sides", default="npdiff", help="decode: npdiff, torch or npdiff,torch")
    parser.add_argument("--vae-folder", default=None, help="decode: a VAE folder (default: the cache's vae/)")
    parser.add_argument("--side", default="npdiff", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORK[args.what](args)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import DEFAULT_CACHE

    args.cache = args.cache or str(DEFAULT_CACHE)
    warm_page_cache(args.vae_folder or args.cache)
    sides = args.sides.split(",") if args.what == "decode" else ["npdiff"]
    runs = {side: [] for side in sides}
    scratch = tempfile.TemporaryDirectory(prefix="npdiff-bench-memory-")
    for _ in range(args.repeat):
        for side in sides:
            load_start = os.getloadavg()[0]
            command = [sys.executable, __file__, args.what, "--worker", "--size", str(args.size), "--cache",
                       args.cache, "--side", side]
            command += ["--no-finite-check"] if args.no_finite_check else []
            command += ["--tiling"] if args.tiling else []
            command += ["--tile", str(args.tile)] if args.tile else []
            command += ["--vae-folder", args.vae_folder] if args.vae_folder else []
            command += ["--out", str(Path(scratch.name) / f"{side}.npy")] if args.what == "decode" else []
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["loadavg"] = [load_start, os.getloadavg()[0]]
            runs[side].append(result)
            print(json.dumps(result), flush=True)
    if sides == ["npdiff", "torch"]:
        ours = min(runs["npdiff"], key=lambda run: run["decode_s"])
        theirs = min(runs["torch"], key=lambda run: run["decode_s"])
        print(f"decode {args.size}x{args.size}{' tiled' if args.tiling else ''}: npdiff {ours['decode_s']:.1f} s, "
              f"peak RSS {ours['after']['VmHWM']:.2f} GiB; diffusers {theirs['decode_s']:.1f} s, peak RSS "
              f"{theirs['after']['VmHWM']:.2f} GiB; ratios {ours['decode_s'] / theirs['decode_s']:.2f} (time), "
              f"{ours['after']['VmHWM'] / theirs['after']['VmHWM']:.2f} (peak RSS); pictures differ by at most "
              f"{max_level_difference(*(Path(scratch.name) / f'{side}.npy' for side in sides))} levels")
    scratch.cleanup()


def max_level_difference(path_a, path_b):
    """The largest difference of two saved 8-bit pictures, in levels."""
    import numpy as np

    a, b = np.load(path_a).astype(np.int16), np.load(path_b).astype(np.int16)
    return int(np.abs(a - b).max())


if __name__ == "__main__":
    main()
