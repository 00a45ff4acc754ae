"""Whole networks at Stable Diffusion 1.5 (or SDXL) size: npdiff and OpenVINO against diffusers/transformers.

    npdiff bench models [--only unet,vae_decode,vae_encode,text_encoder] [--repeat 2] [--cache DIR]
                        [--sides npdiff,torch,torch_bf16,openvino] [--tiny] [--sdxl] [--precision bf16]
                        [--import-first numpy|torch|npdiff]

What is measured (the machine's thread count on every side, best of --repeat after a warm-up):
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
network waits on. Every process imports numpy first, as a user's script does, or what
--import-first names (benchmarks/_import_first.py); each side also reports the CPU seconds per timed
call of the whole process and of OpenBLAS's own threads (npdiff's should be 0: it runs its GEMMs on
its own threads).
The outputs of the sides are compared with torch's (relative error) before any time is reported.

Sides (--sides, default all; torch always runs: it is the anchor of every ratio and error):
    npdiff         float32, this package (--precision bf16: from_pretrained(..., precision="bf16"))
    torch          float32, diffusers/transformers (torch.inference_mode)
    torch_bf16     the same modules and inputs cast to bfloat16 (module.to(torch.bfloat16): torch's own bf16
                   CPU kernels), the output cast back to float32; its error against torch float32 is bf16's
    openvino_f32   OpenVINO, the engine a CPU user would pick instead (benchmarks/_openvino.py;
    openvino_bf16  "openvino" names both): the torch side's module converted once with
                   openvino.convert_model in its own process and saved as float32 IR beside the
                   weights (openvino-<release>/, about the weights' size again; later runs reuse
                   it; regenerating the weights deletes it), then read and compiled for the
                   CPU with INFERENCE_PRECISION_HINT f32 or bf16. The conversion's seconds and peak
                   RSS, and the read+compile seconds, are reported apart from the call; bf16's error
                   against torch's float32 is its rounding (~1e-2), not a bug. A CPU without bf16
                   gets a row that says so.
--tiny runs the same architectures at a few channels (cache folder sd15-tiny-random, seconds in all)
to check the benchmark end to end; its times say nothing about SD-size speed.

--sdxl: SDXL base 1.0's networks (benchmarks/_sdxl_configs.py; random weights cached in sdxl-random,
about 14 GB, made once: diffusers needs ~11 GB of memory to make and save the UNet):
    unet            batch 2 (guidance), 128x128 latent, context [2,77,2048], text_time conditioning
                    (pooled text [2,1280], 6 time ids)
    vae_decode      [1,4,128,128] -> 1024x1024 (vae_encode on request: --only)
    text_encoder    CLIP ViT-L, batch 2 x 77 (last_hidden_state)
    text_encoder_2  OpenCLIP ViT-bigG (CLIPTextModelWithProjection), batch 2 x 77 (last_hidden_state)
The default sides are then npdiff and torch (--sides openvino adds it). With --tiny, sdxl-tiny-random.

--precision bf16x3: the npdiff side with its Linear layers as three bf16 products on AMX (float32 accuracy).
--precision mixed: the npdiff side with the UNet's transformer matmuls and attention in bf16, the rest float32.
--precision bf16: the npdiff side at bfloat16 (weights packed, products on AVX-512 BF16 summed in float32),
torch_bf16 beside torch by default; the ratio and the error are against torch's float32. The per-kernel
counters wrap the float32 kernels only, so the FLOP columns count the attention matmuls alone: left out.
"""

import _import_first  # noqa: F401, I001  (first, as a user's script: numpy, or --import-first)
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, sgemm_peak_gflops, time_call, write_json
from _kernel_counters import install_counters
from _openvino import (OPENVINO_SIDES, convert_to_ir, ir_path, openvino_callable, openvino_version,
                       read_conversion, unsupported_reason)
from _rss import proc_status_gib
from _sdxl_configs import SDXL_COMPONENTS, SDXL_PROFILES

import numpy as np

# This folder is first on sys.path (the script's own); a module here could shadow a package diffusers imports (as
# kernels.py once did Hugging Face's `kernels`; tests/test_benchmark_names.py now forbids such names): the helpers
# above are imported, so drop it.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

CACHE_ROOT = Path(os.environ.get("NPDIFF_CACHE", Path.home() / ".cache" / "npdiff"))
DEFAULT_CACHE = CACHE_ROOT / "sd15-random"
TINY_CACHE = CACHE_ROOT / "sd15-tiny-random"
CACHE_NAMES = {"sd15": "sd15-random", "tiny": "sd15-tiny-random", "sdxl": "sdxl-random",
               "sdxl-tiny": "sdxl-tiny-random"}

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
# --tiny: the same architectures (4 UNet and VAE blocks, CLIP's layers) at a few channels
TINY_UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, sample_size=16)
TINY_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=[32, 32, 64, 64], sample_size=128)
TINY_TEXT_ENCODER_CONFIG = dict(TEXT_ENCODER_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, projection_dim=64)
# per size: the three configs and the latent's side (the image is 8x it: the VAE has 4 blocks)
PROFILES = {
    "sd15": {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG, "latent": 64},
    "tiny": {"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": TINY_TEXT_ENCODER_CONFIG, "latent": 16},
    **SDXL_PROFILES,
}
COMPONENTS = ["unet", "vae_decode", "vae_encode", "text_encoder", "text_encoder_2"]
SD_COMPONENTS = COMPONENTS[:4]
SIDES = ["npdiff", "torch", "torch_bf16", "openvino_f32", "openvino_bf16"]
# torch's seconds per call on the idle 2-core development machine, measured when the project was
# planned: written to the JSON beside this run's own torch timings, as a yardstick of the load.
TORCH_REFERENCE_SECONDS = {"unet": 7.7, "vae_decode": 11.8, "vae_encode": 4.7, "text_encoder": 0.18}


# ---------------------------------------------------------------------------------------------
# The cache of random SD 1.5-size weights
# ---------------------------------------------------------------------------------------------
def generate_cache(cache, profile="sd15"):
    """Build the three networks with random weights and save them as diffusers/transformers folders."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = PROFILES[profile]
    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    for converted in cache.glob("openvino-*"):  # OpenVINO's saved IR of earlier weights
        shutil.rmtree(converted)
    for name, build in (("unet", lambda: UNet2DConditionModel(**configs["unet"])),
                        ("vae", lambda: AutoencoderKL(**configs["vae"])),
                        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))),
                        ("text_encoder_2", lambda: CLIPTextModelWithProjection(
                            CLIPTextConfig(**configs["text_encoder_2"])))):
        if name not in configs:
            continue
        print(f"  generating random {name} ...", file=sys.stderr, flush=True)
        model = build()
        model.save_pretrained(cache / name, safe_serialization=True)
        del model
    (cache / "COMPLETE").write_text(f"random {profile} weights, torch.manual_seed(0)\n")


def ensure_cache(cache, profile="sd15"):
    if (cache / "COMPLETE").is_file():
        return
    sizes = {"sd15": "SD 1.5-size weights (once; about 4.3 GB)", "sdxl": "SDXL-size weights (once; about 14 GB)"}
    size = sizes.get(profile, f"{profile} weights")
    print(f"making random {size} in {cache} ...", file=sys.stderr, flush=True)
    run_worker(["generate", "--cache", str(cache), "--profile", profile])


# ---------------------------------------------------------------------------------------------
# Inputs and the two sides
# ---------------------------------------------------------------------------------------------
def make_inputs(component, profile="sd15"):
    """The network's inputs, in the order its call takes them."""
    configs, rng = PROFILES[profile], np.random.default_rng(0)
    latent = configs["latent"]
    if component == "unet":
        unet = configs["unet"]
        inputs = {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32), "timestep": 500,
                  "context": rng.standard_normal((2, 77, unet["cross_attention_dim"]), dtype=np.float32)}
        if unet.get("addition_embed_type") == "text_time":  # SDXL: pooled text + (size, crop, target) ids
            pooled = configs["text_encoder_2"]["projection_dim"]
            side = 8 * latent
            inputs["text_embeds"] = rng.standard_normal((2, pooled), dtype=np.float32)
            inputs["time_ids"] = np.array([[side, side, 0, 0, side, side]] * 2, dtype=np.float32)
        return inputs
    if component == "vae_decode":
        return {"latents": rng.standard_normal((1, 4, latent, latent), dtype=np.float32)}
    if component == "vae_encode":
        return {"image": rng.uniform(-1.0, 1.0, size=(1, 3, 8 * latent, 8 * latent)).astype(np.float32)}
    vocab_size = configs[component]["vocab_size"]
    return {"input_ids": rng.integers(0, vocab_size, size=(2, 77)).astype(np.int64)}


def added_conditions(inputs):
    """SDXL's added_cond_kwargs from make_inputs' values (None for SD)."""
    if "text_embeds" not in inputs:
        return None
    return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}


def npdiff_callable(component, cache, inputs, precision="fp32"):
    from npdiff.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel

    if component == "unet":
        model = UNet2DConditionModel.from_pretrained(cache / "unet", precision=precision)
        added = added_conditions(inputs)
        return lambda: model(inputs["sample"], inputs["timestep"], inputs["context"], added_cond_kwargs=added)
    if component in ("vae_decode", "vae_encode"):
        model = AutoencoderKL.from_pretrained(cache / "vae", precision=precision)
        if component == "vae_decode":
            return lambda: model.decode(inputs["latents"])
        return lambda: model.encode(inputs["image"]).mean
    if component == "text_encoder_2":
        model = CLIPTextModelWithProjection.from_pretrained(cache / "text_encoder_2", precision=precision)
        return lambda: model(inputs["input_ids"]).last_hidden_state
    model = CLIPTextModel.from_pretrained(cache / "text_encoder", precision=precision)
    return lambda: model(inputs["input_ids"])


def torch_module(component, cache):
    """The diffusers/transformers network as a torch.nn.Module whose forward takes make_inputs' values
    as tensors, in order, and returns one tensor: what the torch side calls and OpenVINO converts."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self, model, call):
            super().__init__()
            self.model, self.call = model.eval(), call

        def forward(self, *inputs):
            return self.call(self.model, *inputs)

    if component == "unet":
        from diffusers import UNet2DConditionModel

        def unet_call(model, sample, timestep, context, text_embeds=None, time_ids=None):
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return model(sample, timestep, context, added_cond_kwargs=added).sample
        return Forward(UNet2DConditionModel.from_pretrained(cache / "unet"), unet_call)
    if component in ("vae_decode", "vae_encode"):
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(cache / "vae")
        if component == "vae_decode":
            return Forward(model, lambda model, latents: model.decode(latents).sample)
        return Forward(model, lambda model, image: model.encode(image).latent_dist.mean)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return Forward(model_class.from_pretrained(cache / component),
                   lambda model, input_ids: model(input_ids).last_hidden_state)


def torch_callable(component, cache, inputs, dtype="float32"):
    """The torch side: float32, or dtype "bfloat16" (module and float inputs cast; the output back to float32)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    # the timestep goes in as a 0-d int64 tensor (diffusers turns an int into the same)
    tensors = [torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.tensor(value)
               for value in inputs.values()]
    module = torch_module(component, cache)
    if dtype == "bfloat16":
        module = module.to(torch.bfloat16)
        tensors = [tensor.bfloat16() if tensor.is_floating_point() else tensor for tensor in tensors]

    def run():
        with torch.inference_mode():
            return module(*tensors).float().numpy()
    return run


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
        generate_cache(cache, args.profile)
        return
    inputs = make_inputs(args.component, args.profile)
    if args.side == "openvino_convert":  # once per network and OpenVINO release, before its OpenVINO sides
        path = ir_path(cache, args.component)
        result = read_conversion(path, list(inputs.values()))
        if result is None:
            result = dict(convert_to_ir(lambda: torch_module(args.component, cache), list(inputs.values()), path),
                          converted_now=True)
        print("RESULT " + json.dumps(result))
        return
    result = {}
    t0 = time.perf_counter()
    if args.side in OPENVINO_SIDES:
        precision = OPENVINO_SIDES[args.side]
        reason = unsupported_reason(precision)
        if reason:
            print("RESULT " + json.dumps({"unsupported": reason}))
            return
        fn, result = openvino_callable(precision, ir_path(cache, args.component), list(inputs.values()))
    elif args.side == "npdiff":
        fn = npdiff_callable(args.component, cache, inputs, args.precision)
    else:
        fn = torch_callable(args.component, cache, inputs, "bfloat16" if args.side == "torch_bf16" else "float32")
    # RssFile: the part of the RSS that is mapped files (OpenVINO maps its IR: f32 keeps the mapped weights
    # and its own repacked copy, so its RSS is about twice the weights, half of it clean page cache)
    result.update(load_seconds=time.perf_counter() - t0, rss_after_load_gib=proc_status_gib("VmRSS"),
                  rss_file_after_load_gib=proc_status_gib("RssFile"))
    reset_peak_rss()
    # warm-up call (compiles Numba kernels on a first run), then on the npdiff side one call counted per kernel
    out = fn()
    if args.side == "npdiff" and not args.no_counters:  # (benchmarks/goals.py leaves the counted call out)
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
    cpu_before, openblas_before = time.process_time(), _import_first.cpu_seconds(_import_first.OPENBLAS_THREAD_IDS)
    result["seconds"] = time_call(fn, repeat=args.repeat, warmup=0)
    # CPU seconds per timed call: the whole process, and OpenBLAS's own threads (computing or busy-waiting)
    result["cpu_seconds"] = (time.process_time() - cpu_before) / args.repeat
    result["openblas_cpu_seconds"] = (_import_first.cpu_seconds(_import_first.OPENBLAS_THREAD_IDS)
                                      - openblas_before) / args.repeat
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


def parse_sides(text):
    """--sides: a comma-separated subset of SIDES ("openvino" names both precisions); torch always runs."""
    sides = {"torch"}
    for name in filter(None, text.split(",")):
        names = list(OPENVINO_SIDES) if name == "openvino" else [name]
        unknown = set(names) - set(SIDES)
        if unknown:
            sys.exit(f"unknown side {name!r}; known: {', '.join(SIDES)}, openvino")
        sides.update(names)
    return [side for side in SIDES if side in sides]


def torch_bf16_row(component, sides):
    """torch's own bfloat16 against its float32 (and npdiff, when it ran)."""
    bf16, torch_side = sides["torch_bf16"], sides["torch"]
    return {"what": component, "engine": "torch_bf16", "engine_s": bf16["seconds"], "torch_s": torch_side["seconds"],
            "ratio": bf16["seconds"] / torch_side["seconds"],
            "npdiff_ratio": sides["npdiff"]["seconds"] / bf16["seconds"] if "npdiff" in sides else None,
            "rss": bf16["peak_rss_gib"], "run_rss": bf16["run_peak_rss_gib"],
            "rel_err": rel_err(bf16["output"], torch_side["output"]), "note": "module.to(torch.bfloat16)"}


def npdiff_row(component, sides, peak, precision="fp32"):
    ours, theirs = sides["npdiff"], sides["torch"]
    if precision != "fp32":  # the counters see the float32 kernels only (the attention matmuls here)
        return {"what": f"{component} ({precision})", "ours_s": ours["seconds"], "torch_s": theirs["seconds"],
                "ratio": ours["seconds"] / theirs["seconds"], "ours_rss": ours["peak_rss_gib"],
                "torch_rss": theirs["peak_rss_gib"], "ours_run_rss": ours["run_peak_rss_gib"],
                "torch_run_rss": theirs["run_peak_rss_gib"], "rel_err": rel_err(ours["output"], theirs["output"])}
    flops = ours["flops"]
    return {
        "what": component, "ours_s": ours["seconds"], "torch_s": theirs["seconds"],
        "ratio": ours["seconds"] / theirs["seconds"], "gflop": flops / 1e9,
        "ours_gflops": flops / ours["seconds"] / 1e9, "torch_gflops": flops / theirs["seconds"] / 1e9,
        "ours_peak_pct": 100.0 * flops / ours["seconds"] / 1e9 / peak,
        "ours_rss": ours["peak_rss_gib"], "torch_rss": theirs["peak_rss_gib"],
        "ours_run_rss": ours["run_peak_rss_gib"], "torch_run_rss": theirs["run_peak_rss_gib"],
        "rel_err": rel_err(ours["output"], theirs["output"]),
    }


def engine_row(component, side, sides):
    """One OpenVINO precision of one network against torch (and npdiff when it ran)."""
    engine, torch_side = sides[side], sides["torch"]
    row = {"what": component, "engine": side, "torch_s": torch_side["seconds"]}
    if "unsupported" in engine:
        return dict(row, note=engine["unsupported"])
    flops = sides["npdiff"]["flops"] if "npdiff" in sides else None
    conversion = sides["openvino_convert"]
    row.update({
        "engine_s": engine["seconds"], "ratio": engine["seconds"] / torch_side["seconds"],
        "npdiff_ratio": sides["npdiff"]["seconds"] / engine["seconds"] if "npdiff" in sides else None,
        "gflops": flops / engine["seconds"] / 1e9 if flops else None,
        "convert_s": conversion["convert_seconds"], "convert_rss": conversion["peak_rss_gib"],
        "load_s": engine["read_seconds"] + engine["compile_seconds"],
        "rss": engine["peak_rss_gib"], "run_rss": engine["run_peak_rss_gib"],
        "rel_err": rel_err(engine["output"], torch_side["output"]),
        "note": f"runs {engine['precision']}, {engine['threads']} threads"
                + ("" if conversion.get("converted_now") else "; converted by an earlier run"),
    })
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: " + ", ".join(COMPONENTS) + " (default: all of SD's; "
                        "with --sdxl " + ", ".join(SDXL_COMPONENTS) + ")")
    parser.add_argument("--sides", help="comma-separated: " + ", ".join(SIDES) + " (openvino = both precisions; "
                        "torch always runs; default npdiff,openvino, with --sdxl npdiff)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL base 1.0's networks instead of SD 1.5's")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per side after the warm-up (best kept)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same architectures at a few channels, to check the benchmark end to end")
    parser.add_argument("--cache", help=f"folder of the random weights (default {DEFAULT_CACHE}, "
                        f"with --tiny {TINY_CACHE})")
    parser.add_argument("--import-first", choices=("numpy", "torch", "npdiff"), default="numpy",
                        help="what every side's process imports first, as a user's script would (default numpy)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16x3", "mixed"],
                        help="the npdiff side's precision (bf16: torch_bf16 runs beside torch by default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("component", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="sd15", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--no-counters", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    known = COMPONENTS if args.sdxl else SD_COMPONENTS
    components = [c for c in (args.only or ",".join(SDXL_COMPONENTS if args.sdxl else SD_COMPONENTS)).split(",") if c]
    unknown = set(components) - set(known)
    if unknown:
        sys.exit(f"unknown component(s) {sorted(unknown)}; known: {', '.join(known)}")
    default_sides = "npdiff" if args.sdxl else "npdiff,openvino"
    side_names = parse_sides(args.sides or (default_sides + ",torch_bf16" if args.precision == "bf16" else default_sides))
    profile = ("sdxl" if args.sdxl else "sd15") + ("-tiny" if args.tiny else "")
    profile = "tiny" if profile == "sd15-tiny" else profile
    cache = Path(args.cache or CACHE_ROOT / CACHE_NAMES[profile])
    ensure_cache(cache, profile)
    peak = sgemm_peak_gflops()
    print(f"sgemm peak (NumPy, 2048^2): {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}; "
          f"each process imports {args.import_first} first"
          + (f"; {profile}" if args.sdxl else "")
          + ("; --tiny: few channels, the times say nothing about SD-size speed" if args.tiny else ""))
    rows, engine_rows, details = [], [], {}
    with tempfile.TemporaryDirectory(prefix="npdiff-bench-models-") as scratch:
        for component in components:
            sides = {}
            repeat = args.repeat if not component.startswith("text_encoder") else max(args.repeat, 10)
            for side in side_names:
                if side in OPENVINO_SIDES and "openvino_convert" not in sides:  # in its own process too
                    print(f"  {component}: converting for OpenVINO (once) ...", file=sys.stderr, flush=True)
                    sides["openvino_convert"] = run_worker([component, "--side", "openvino_convert", "--cache",
                                                            str(cache), "--profile", profile])
                out = Path(scratch) / f"{component}-{side}.npy"
                print(f"  {component}: {side} ...", file=sys.stderr, flush=True)
                sides[side] = run_worker([component, "--side", side, "--cache", str(cache), "--profile", profile,
                                          "--repeat", str(repeat), "--out", str(out),
                                          "--import-first", args.import_first, "--precision", args.precision])
                if "unsupported" not in sides[side]:
                    sides[side]["output"] = np.load(out)
            if "npdiff" in sides:
                rows.append(npdiff_row(component, sides, peak, args.precision))
            if "torch_bf16" in sides:
                engine_rows.append(torch_bf16_row(component, sides))
            engine_rows += [engine_row(component, side, sides) for side in side_names if side in OPENVINO_SIDES]
            details[component] = {side: {k: v for k, v in sides[side].items() if k != "output"} for side in sides}
    for component, sides in details.items():
        print(f"{component}: CPU seconds per timed call (the whole process / OpenBLAS's own threads): "
              + "; ".join(f"{side} {sides[side]['cpu_seconds']:.2f} / {sides[side]['openblas_cpu_seconds']:.2f}"
                          for side in sides if "cpu_seconds" in sides[side]))
    if rows:
        print()
        print_table(rows, [
            ("what", "network", None), ("ours_s", "npdiff s", "{:.3f}"), ("torch_s", "torch s", "{:.3f}"),
            ("ratio", "ours/torch", "{:.2f}"), ("gflop", "GFLOP", "{:.0f}"),
            ("ours_gflops", "npdiff GFLOP/s", "{:.0f}"), ("torch_gflops", "torch GFLOP/s", "{:.0f}"),
            ("ours_peak_pct", "npdiff % peak", "{:.0f}"),
            ("ours_rss", "npdiff peak RSS GiB", "{:.2f}"), ("torch_rss", "torch peak RSS GiB", "{:.2f}"),
            ("ours_run_rss", "npdiff run RSS", "{:.2f}"), ("torch_run_rss", "torch run RSS", "{:.2f}"),
            ("rel_err", "rel err", "{:.1e}"),
        ])
    if engine_rows:
        uses_openvino = any(side in OPENVINO_SIDES for side in side_names)
        engines = f"OpenVINO {openvino_version().split('-')[0]}" if uses_openvino else "torch bf16"
        openvino_notes = ("; convert: once, its own process, saved as float32 IR; load: read that IR and compile"
                          if uses_openvino else "")
        print(f"\n{engines} against torch float32 (same inputs and thread count{openvino_notes}; rel err against "
              "torch's float32 output)")
        print_table(engine_rows, [
            ("what", "network", None), ("engine", "engine", None), ("engine_s", "engine s", "{:.3f}"),
            ("torch_s", "torch s", "{:.3f}"), ("ratio", "engine/torch", "{:.2f}"),
            ("npdiff_ratio", "npdiff/engine", "{:.2f}"), ("gflops", "GFLOP/s", "{:.0f}"),
            ("convert_s", "convert s", "{:.1f}"), ("convert_rss", "convert RSS GiB", "{:.2f}"),
            ("load_s", "load s", "{:.1f}"),
            ("rss", "peak RSS GiB", "{:.2f}"), ("run_rss", "run RSS", "{:.2f}"),
            ("rel_err", "rel err", "{:.1e}"), ("note", "note", None),
        ])
    for component, sides in details.items():
        if "npdiff" not in sides:
            continue
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
    payload = {"sgemm_peak_gflops": peak, "profile": profile, "import_first": args.import_first,
               "sides": side_names, "rows": rows,
               "engine_rows": engine_rows, "details": details, "load_average": os.getloadavg()}
    if any(side in OPENVINO_SIDES for side in side_names):
        payload["openvino"] = openvino_version()
    if profile == "sd15":
        payload["torch_reference_seconds"] = TORCH_REFERENCE_SECONDS
    # --tiny writes its own file, so a check run never replaces the SD-size figures
    name = "models" if profile == "sd15" else "models-" + profile
    path = write_json(name if args.precision == "fp32" else f"{name}-{args.precision}", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
