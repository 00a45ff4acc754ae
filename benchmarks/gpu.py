"""npdiff on an NVIDIA GPU (CuPy) against torch on the same GPU, float32 and float16, in one run.

    npdiff bench gpu [--only unet,vae_decode,txt2img] [--dtypes float32,float16] [--repeat 5] [--cache DIR]

What is measured (best of --repeat after a warm-up, each call synchronised with the device):
    unet        UNet2DConditionModel forward, batch 2 (classifier-free guidance), 64x64 latent, 77 tokens
    vae_decode  AutoencoderKL.decode of a [1,4,64,64] latent to a 512x512 image
    txt2img     a whole 512x512 text-to-image: 20 steps of PNDM with guidance 7.5 and the VAE decode
                (npdiff's pipeline vs diffusers' StableDiffusionPipeline, the same random weights)
Both sides use the SD 1.5-size random weights of benchmarks/models.py (made once, ~4.3 GB, in
~/.cache/npdiff/sd15-random). float32 runs with TF32 off on both sides (torch's default for
matmuls; turned off for cuDNN convolutions too), so both do true float32 arithmetic; float16 is
npdiff's backend.use("cupy", dtype="float16") against torch's float16 model. The outputs of the two
sides are compared (relative error, same dtype on both sides) before any time is reported; in
float16 txt2img the initial noise differs a little (diffusers draws it in half on the CPU, npdiff
in float32), so its error there says only that the pictures are alike. The GPU's name,
the CUDA, CuPy and torch versions are printed and written to benchmarks/out/gpu.json.
Needs: pip install -e '.[bench,gpu]' and a CUDA GPU.
"""

import argparse
import sys
import time

from _common import print_table, time_call, write_json
from models import DEFAULT_CACHE, ensure_cache, make_inputs

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
TXT2IMG = dict(num_inference_steps=20, guidance_scale=7.5, height=512, width=512)
# FLOP of one call at 512x512, the estimates the project was planned with (the UNet's leaves out the
# attention matmuls); benchmarks/models.py, which counts every kernel call, finds 1607e9 and 2515e9.
FLOPS = {"unet": 1354e9, "vae_decode": 2480e9}


def synchronized(fn):
    """fn, then wait for both cupy's and torch's queues: GPU work is asynchronous."""
    import cupy
    import torch

    def run():
        out = fn()
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()
        return out
    return run


def npdiff_callable(component, cache, inputs, dtype):
    from npdiff import backend
    from npdiff.models import AutoencoderKL, UNet2DConditionModel

    backend.use("cupy", dtype=dtype)
    if component == "unet":
        model = UNet2DConditionModel.from_pretrained(cache / "unet")
        sample, context = backend.to_device(inputs["sample"]), backend.to_device(inputs["context"])
        return lambda: model(sample, inputs["timestep"], context)
    if component == "vae_decode":
        model = AutoencoderKL.from_pretrained(cache / "vae")
        latents = backend.to_device(inputs["latents"])
        return lambda: model.decode(latents)
    from npdiff.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder(cache), scheduler="pndm")
    pipe.show_progress = False
    return lambda: pipe(PROMPT, seed=0, output_type="np", **TXT2IMG).images


def torch_callable(component, cache, inputs, dtype):
    import torch

    torch_dtype = torch.float32 if dtype == "float32" else torch.float16
    tensors = {name: torch.from_numpy(value).cuda().to(torch_dtype) if isinstance(value, np.ndarray) else value
               for name, value in inputs.items()}
    if component == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(cache / "unet", torch_dtype=torch_dtype).cuda().eval()
        return inference(lambda: model(tensors["sample"], tensors["timestep"], tensors["context"]).sample)
    if component == "vae_decode":
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(cache / "vae", torch_dtype=torch_dtype).cuda().eval()
        return inference(lambda: model.decode(tensors["latents"]).sample)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_folder(cache)), torch_dtype=torch_dtype,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator()  # CPU noise, as npdiff's TorchGenerator: the same picture
    return inference(lambda: pipe(PROMPT, generator=generator.manual_seed(0), output_type="np", **TXT2IMG).images)


def inference(fn):
    import torch

    def run():
        with torch.inference_mode():
            return fn()
    return run


def pipeline_folder(cache):
    """The random SD 1.5 networks as a diffusers pipeline folder (links to the cached networks, the CLIP
    tokenizer rebuilt from openai-clip's BPE file, SD 1.5's scheduler config)."""
    import json

    from npdiff.clip_vocab import write_clip_tokenizer_folder
    from npdiff.loading.components import SD15_SCHEDULER_CONFIG

    folder = cache / "pipeline"
    if (folder / "model_index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        if not (folder / name).exists():
            (folder / name).symlink_to(cache / name, target_is_directory=True)
    write_clip_tokenizer_folder(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def to_float32_numpy(array):
    if hasattr(array, "detach"):
        return array.detach().float().cpu().numpy()
    if type(array).__module__.startswith("cupy"):
        return array.get().astype(np.float32)
    return np.asarray(array, dtype=np.float32)


def rel_err(ours, ref):
    ours, ref = to_float32_numpy(ours).astype(np.float64), to_float32_numpy(ref).astype(np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def gpu_info():
    import cupy
    import torch

    properties = torch.cuda.get_device_properties(0)
    return {"gpu": properties.name, "sms": properties.multi_processor_count,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "cupy": cupy.__version__,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}


def measure(component, dtype, cache, repeat):
    import cupy
    import torch

    from npdiff import backend

    inputs = make_inputs(component) if component != "txt2img" else {}
    row = {"what": component, "dtype": dtype}
    ours_fn = synchronized(npdiff_callable(component, cache, inputs, dtype))
    ours_out = to_float32_numpy(ours_fn())  # also the warm-up: compiles the kernels
    row["npdiff_s"] = time_call(ours_fn, repeat=repeat, warmup=0)
    backend.use("numpy")
    cupy.get_default_memory_pool().free_all_blocks()
    torch_fn = synchronized(torch_callable(component, cache, inputs, dtype))
    torch_out = to_float32_numpy(torch_fn())
    row["torch_s"] = time_call(torch_fn, repeat=repeat, warmup=0)
    row["ratio"] = row["npdiff_s"] / row["torch_s"]
    row["rel_err"] = rel_err(ours_out, torch_out)
    if component in FLOPS:
        row["npdiff_tflops"] = FLOPS[component] / row["npdiff_s"] / 1e12
        row["torch_tflops"] = FLOPS[component] / row["torch_s"] / 1e12
    del torch_fn
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="unet,vae_decode,txt2img")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args()
    from pathlib import Path

    import torch

    if not torch.cuda.is_available():
        sys.exit("npdiff bench gpu: torch sees no CUDA device (this benchmark needs a GPU, CuPy and torch with CUDA)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cache = Path(args.cache)
    ensure_cache(cache)
    info = gpu_info()
    print(f"GPU: {info['gpu']} ({info['sms']} SMs, {info['memory_gib']} GiB), CUDA runtime {info['cuda_runtime']}, "
          f"CuPy {info['cupy']}, torch {info['torch']} (CUDA {info['torch_cuda']})", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        for component in args.only.split(","):
            started = time.perf_counter()
            rows.append(measure(component, dtype, cache, args.repeat))
            print(f"  {component} {dtype} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print_table(rows, [("what", "what", None), ("dtype", "dtype", None), ("npdiff_s", "npdiff s", "{:.4f}"),
                       ("torch_s", "torch s", "{:.4f}"), ("ratio", "npdiff/torch", "{:.2f}"),
                       ("npdiff_tflops", "npdiff TFLOP/s", "{:.1f}"), ("torch_tflops", "torch TFLOP/s", "{:.1f}"),
                       ("rel_err", "rel err", "{:.1e}")])
    print(f"wrote {write_json('gpu', {'gpu': info, 'rows': rows})}")


if __name__ == "__main__":
    main()
