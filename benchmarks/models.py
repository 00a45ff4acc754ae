"""Whole networks at Stable Diffusion 1.5 size: npdiff against diffusers/transformers.

    npdiff bench models [--only unet,vae_decode,vae_encode,text_encoder] [--repeat 2] [--cache DIR]

What is measured (float32, the machine's default thread counts, best of --repeat after a warm-up):
    unet          UNet2DConditionModel forward, batch 2 (classifier-free guidance), 64x64 latent, 77 tokens
    vae_decode    AutoencoderKL.decode of a [1,4,64,64] latent to a 512x512 image
    vae_encode    AutoencoderKL.encode of a 512x512 image (the posterior mean is compared)
    text_encoder  CLIPTextModel (ViT-L/14 text tower), batch 2 x 77 tokens

Weights are random, made once by diffusers/transformers from SD 1.5's own configs (written out
below; nothing is downloaded) and saved as float32 safetensors in the cache folder
(~/.cache/npdiff/sd15-random, about 4.3 GB), which later runs reuse. Each side of each network runs
in its own subprocess, so the peak RSS reported is that side's alone ("peak RSS": load and
calls; "run RSS": the peak during the calls only, VmHWM reset after loading). On the npdiff side one
call after the warm-up runs with every kernel wrapped by a counter: it gives the FLOP count
(convolutions, linear layers and the two attention matmuls; norms and activations are not
counted) and the seconds spent per kernel, printed below the table to show which kernel a slow
network waits on.
The outputs of the two sides are compared (relative error) before any time is reported.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import print_table, sgemm_peak_gflops, time_call, write_json
from _rss import proc_status_gib

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("NPDIFF_CACHE", Path.home() / ".cache" / "npdiff")) / "sd15-random"

# Stable Diffusion 1.5's configs (unet/config.json, vae/config.json, text_encoder/config.json).
UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
COMPONENTS = ["unet", "vae_decode", "vae_encode", "text_encoder"]
# torch's seconds per call on the idle 2-core development machine, measured when the project was
# planned: written to the JSON beside this run's own torch timings, as a yardstick of the load.
TORCH_REFERENCE_SECONDS = {"unet": 7.7, "vae_decode": 11.8, "vae_encode": 4.7, "text_encoder": 0.18}


# ---------------------------------------------------------------------------------------------
# The cache of random SD 1.5-size weights
# ---------------------------------------------------------------------------------------------
def generate_cache(cache):
    """Build the three networks with random weights and save them as diffusers/transformers folders."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    for name, build in (("unet", lambda: UNet2DConditionModel(**UNET_CONFIG)),
                        ("vae", lambda: AutoencoderKL(**VAE_CONFIG)),
                        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)))):
        print(f"  generating random {name} ...", file=sys.stderr, flush=True)
        model = build()
        model.save_pretrained(cache / name, safe_serialization=True)
        del model
    (cache / "COMPLETE").write_text("random SD 1.5-size weights, torch.manual_seed(0)\n")


def ensure_cache(cache):
    if (cache / "COMPLETE").is_file():
        return
    print(f"making random SD 1.5-size weights in {cache} (once; about 4.3 GB) ...", file=sys.stderr, flush=True)
    run_worker(["generate", "--cache", str(cache)])


# ---------------------------------------------------------------------------------------------
# Inputs and the two sides
# ---------------------------------------------------------------------------------------------
def make_inputs(component):
    rng = np.random.default_rng(0)
    if component == "unet":
        return {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32), "timestep": 500,
                "context": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    if component == "vae_decode":
        return {"latents": rng.standard_normal((1, 4, 64, 64), dtype=np.float32)}
    if component == "vae_encode":
        return {"image": rng.uniform(-1.0, 1.0, size=(1, 3, 512, 512)).astype(np.float32)}
    return {"input_ids": rng.integers(0, TEXT_ENCODER_CONFIG["vocab_size"], size=(2, 77)).astype(np.int64)}


def npdiff_callable(component, cache, inputs):
    from npdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    if component == "unet":
        model = UNet2DConditionModel.from_pretrained(cache / "unet")
        return lambda: model(inputs["sample"], inputs["timestep"], inputs["context"])
    if component in ("vae_decode", "vae_encode"):
        model = AutoencoderKL.from_pretrained(cache / "vae")
        if component == "vae_decode":
            return lambda: model.decode(inputs["latents"])
        return lambda: model.encode(inputs["image"]).mean
    model = CLIPTextModel.from_pretrained(cache / "text_encoder")
    return lambda: model(inputs["input_ids"])


def torch_callable(component, cache, inputs):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tensors = {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
               for name, value in inputs.items()}

    def no_grad(fn):
        def run():
            with torch.inference_mode():
                return fn().numpy()
        return run

    if component == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(cache / "unet").eval()
        return no_grad(lambda: model(tensors["sample"], tensors["timestep"], tensors["context"]).sample)
    if component in ("vae_decode", "vae_encode"):
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(cache / "vae").eval()
        if component == "vae_decode":
            return no_grad(lambda: model.decode(tensors["latents"]).sample)
        return no_grad(lambda: model.encode(tensors["image"]).latent_dist.mean)
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(cache / "text_encoder").eval()
    return no_grad(lambda: model(tensors["input_ids"]).last_hidden_state)


# ---------------------------------------------------------------------------------------------
# Per-kernel counters for the npdiff side (FLOPs and seconds)
# ---------------------------------------------------------------------------------------------
def kernel_flops(name, args, out):
    if name == "conv2d":
        x, weight = args[0], args[1]
        return 2.0 * out.size * weight.shape[1] * weight.shape[2] * weight.shape[3]
    if name in ("linear", "linear_activation", "geglu"):
        x, weight = args[0], args[1]
        return 2.0 * (x.size // x.shape[-1]) * weight.shape[0] * weight.shape[1]
    if name == "scaled_dot_product_attention":
        q, k, v = args[0], args[1], args[2]
        queries = q.size // q.shape[-1]
        return 2.0 * queries * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0.0


def install_counters():
    """Wrap npdiff.kernels' public functions (models call them as kernels.NAME) -> the stats dict."""
    import npdiff.kernels as kernels

    stats = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "flops": 0.0})
    originals = {}
    for name in ("conv2d", "linear", "linear_activation", "geglu", "scaled_dot_product_attention", "group_norm", "layer_norm",
                 "silu", "gelu", "quick_gelu", "softmax", "upsample_nearest2x"):
        original = getattr(kernels, name)
        originals[name] = original

        def counted(*args, _name=name, _original=original, **kwargs):
            t0 = time.perf_counter()
            out = _original(*args, **kwargs)
            entry = stats[_name]
            entry["seconds"] += time.perf_counter() - t0
            entry["calls"] += 1
            entry["flops"] += kernel_flops(_name, args, out)
            return out

        setattr(kernels, name, counted)

    def uninstall():
        for name, original in originals.items():
            setattr(kernels, name, original)

    return stats, uninstall


# ---------------------------------------------------------------------------------------------
# Worker (one side of one network, in its own process)
# ---------------------------------------------------------------------------------------------
def peak_rss_gib():
    """Peak resident set of this process since it started (load included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak of the run alone can be read after it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(args):
    cache = Path(args.cache)
    if args.component == "generate":
        generate_cache(cache)
        return
    inputs = make_inputs(args.component)
    t0 = time.perf_counter()
    build = torch_callable if args.side == "torch" else npdiff_callable
    fn = build(args.component, cache, inputs)
    load_seconds = time.perf_counter() - t0
    result = {"load_seconds": load_seconds, "rss_after_load_gib": proc_status_gib("VmRSS")}
    reset_peak_rss()
    # warm-up call (compiles Numba kernels on a first run), then on the npdiff side one call counted per kernel
    out = fn()
    if args.side == "npdiff":
        del out
        stats, uninstall = install_counters()
        t0 = time.perf_counter()
        out = fn()
        result["counted_seconds"] = time.perf_counter() - t0
        uninstall()
        result["kernels"] = dict(stats)
        result["flops"] = sum(entry["flops"] for entry in stats.values())
    np.save(args.out, np.asarray(out))
    del out
    result["seconds"] = time_call(fn, repeat=args.repeat, warmup=0)
    result["run_peak_rss_gib"] = proc_status_gib("VmHWM")   # the calls only (after the load)
    result["peak_rss_gib"] = peak_rss_gib()                  # load and calls
    print("RESULT " + json.dumps(result))


def run_worker(worker_args):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *worker_args]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.exit(f"benchmark worker failed ({completed.returncode}): {' '.join(worker_args)}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def rel_err(ours, ref):
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(COMPONENTS), help="comma-separated: " + ", ".join(COMPONENTS))
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per side after the warm-up (best kept)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of the random SD 1.5-size weights")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("component", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    components = [c for c in args.only.split(",") if c]
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        sys.exit(f"unknown component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    cache = Path(args.cache)
    ensure_cache(cache)
    peak = sgemm_peak_gflops()
    print(f"sgemm peak (NumPy, 2048^2): {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="npdiff-bench-models-") as scratch:
        for component in components:
            sides = {}
            repeat = args.repeat if component != "text_encoder" else max(args.repeat, 10)
            for side in ("torch", "npdiff"):
                out = Path(scratch) / f"{component}-{side}.npy"
                print(f"  {component}: {side} ...", file=sys.stderr, flush=True)
                sides[side] = run_worker([component, "--side", side, "--cache", str(cache),
                                          "--repeat", str(repeat), "--out", str(out)])
                sides[side]["output"] = np.load(out)
            error = rel_err(sides["npdiff"]["output"], sides["torch"]["output"])
            ours, theirs = sides["npdiff"], sides["torch"]
            flops = ours["flops"]
            rows.append({
                "what": component, "ours_s": ours["seconds"], "torch_s": theirs["seconds"],
                "ratio": ours["seconds"] / theirs["seconds"], "gflop": flops / 1e9,
                "ours_gflops": flops / ours["seconds"] / 1e9, "torch_gflops": flops / theirs["seconds"] / 1e9,
                "ours_peak_pct": 100.0 * flops / ours["seconds"] / 1e9 / peak,
                "ours_rss": ours["peak_rss_gib"], "torch_rss": theirs["peak_rss_gib"],
                "ours_run_rss": ours["run_peak_rss_gib"], "torch_run_rss": theirs["run_peak_rss_gib"],
                "rel_err": error,
            })
            details[component] = {side: {k: v for k, v in sides[side].items() if k != "output"} for side in sides}
    print()
    print_table(rows, [
        ("what", "network", None), ("ours_s", "npdiff s", "{:.3f}"), ("torch_s", "torch s", "{:.3f}"),
        ("ratio", "ours/torch", "{:.2f}"), ("gflop", "GFLOP", "{:.0f}"), ("ours_gflops", "npdiff GFLOP/s", "{:.0f}"),
        ("torch_gflops", "torch GFLOP/s", "{:.0f}"), ("ours_peak_pct", "npdiff % peak", "{:.0f}"),
        ("ours_rss", "npdiff peak RSS GiB", "{:.2f}"), ("torch_rss", "torch peak RSS GiB", "{:.2f}"),
        ("ours_run_rss", "npdiff run RSS", "{:.2f}"), ("torch_run_rss", "torch run RSS", "{:.2f}"),
        ("rel_err", "rel err", "{:.1e}"),
    ])
    for component, sides in details.items():
        kernels = sides["npdiff"]["kernels"]
        total = sides["npdiff"]["counted_seconds"]
        print(f"\nnpdiff {component}: seconds per kernel in the counted call ({total:.2f} s in all)")
        kernel_rows = [{"kernel": name, "calls": entry["calls"], "seconds": entry["seconds"],
                        "share": 100.0 * entry["seconds"] / total,
                        "gflops": entry["flops"] / entry["seconds"] / 1e9 if entry["flops"] else None}
                       for name, entry in sorted(kernels.items(), key=lambda item: -item[1]["seconds"])]
        outside = total - sum(entry["seconds"] for entry in kernels.values())
        kernel_rows.append({"kernel": "(outside the wrapped kernels)", "seconds": outside,
                            "share": 100.0 * outside / total})
        print_table(kernel_rows, [("kernel", "kernel", None), ("calls", "calls", "{}"),
                                  ("seconds", "seconds", "{:.3f}"), ("share", "% of call", "{:.0f}"),
                                  ("gflops", "GFLOP/s", "{:.0f}")])
    path = write_json("models", {"sgemm_peak_gflops": peak, "rows": rows, "details": details,
                                 "torch_reference_seconds": TORCH_REFERENCE_SECONDS,
                                 "load_average": os.getloadavg()})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
