"""One textual-inversion training step at SD 1.5 size: npdiff against PyTorch (diffusers' recipe), time and
peak memory, each side in a fresh process.

    python benchmarks/training.py [--size 64] [--batch 1] [--steps 2]

The step (diffusers' examples/textual_inversion/textual_inversion.py, one batch): token ids -> CLIP ViT-L
text encoder (12 layers, width 768) -> SD 1.5's UNet (860 M parameters) on noisy latents [B,4,size,size]
at random timesteps -> MSE against the noise -> the gradient to the token embeddings -> AdamW.
  torch   transformers' CLIPTextModel + diffusers' UNet2DConditionModel, random init; every parameter frozen
          except the token embedding table (as the recipe: requires_grad on the whole table, AdamW over it);
          autograd keeps the activations it needs
  npdiff  npdiff.training.text_embedding_grad over the same shapes (random weights, one array per distinct
          shape shared by every tensor of that shape: the weights take less memory than real ones would;
          the activations are the same), keeping block inputs and recomputing (unet_backward.py); AdamW on
          one row, and the steps inside npdiff/freed_memory.py's keep_freed_memory, as textual_inversion does
The VAE encode is left out of both (npdiff encodes the pictures once before training; the recipe encodes
per step). Reported: the seconds of each step after the first (the first compiles and warms caches; with each
step's CPU seconds of all threads, steadier than wall time when other processes share the cores), the
peak resident memory of the process (VmHWM) and the memory of the weights; for npdiff also the peak it
would have with real weights (estimate: + the weight arrays and flipped conv kernels that sharing saves). Writes
benchmarks/out/training.json.
"""

import npdiff  # noqa: F401, I001  (first: OpenBLAS settings before numpy)
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from _common import write_json
from _rss import proc_status_gib
from training_memory import SD15, SharedRandomWeights

# This folder is first on sys.path (the script's own); a module here could shadow a package diffusers imports (as
# kernels.py once did): the helpers above are imported, so drop it (as models.py does).
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


class SharedWeights(SharedRandomWeights):
    """SharedRandomWeights with the loader's ignore() (the CLIP model calls it for position_ids)."""

    def ignore(self, key):
        pass


def inputs(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49406, size=(batch, 77)).astype(np.int64)    # [B,77]
    ids[:, 0], ids[:, 20:] = 49406, 49407                               # start, a caption, end padding
    latents = rng.standard_normal((batch, 4, size, size), dtype=np.float32)
    noise = rng.standard_normal((batch, 4, size, size), dtype=np.float32)
    timesteps = rng.integers(0, 1000, batch).astype(np.int64)
    return ids, latents, noise, timesteps


def npdiff_steps(batch, size, steps):
    from npdiff.models.clip import CLIPTextModel
    from npdiff.models.unet import UNet2DConditionModel
    from npdiff.schedulers import DDPMScheduler
    from npdiff.training import text_embedding_grad
    from npdiff.training.adamw import AdamW
    from npdiff.freed_memory import keep_freed_memory

    weights = SharedWeights()
    pipe = SimpleNamespace(text_encoder=CLIPTextModel(dict(CLIP_L), weights),
                           unet=UNet2DConditionModel(dict(SD15), weights),
                           vae=SimpleNamespace(config={"latent_channels": 4}),
                           scheduler=DDPMScheduler.from_config(SCHEDULE))
    ids, latents, noise, timesteps = inputs(batch, size)
    row, optimizer = np.zeros((1, 768), np.float32), AdamW((1, 768), 5e-3)
    built = proc_status_gib("VmRSS")
    times, cpu_times, kernel_use = [], [], []
    with keep_freed_memory(heap_only=True):                             # as textual_inversion's loop
        for _ in range(steps):
            start, cpu_start, usage_start = time.perf_counter(), time.process_time(), sys_time_and_faults()
            _, grad = text_embedding_grad(pipe, ids, latents, noise, timesteps)  # [B,77,768]
            optimizer.step(row, grad[ids == ids[0, 1]].sum(axis=0)[None])     # one "new word" row
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            kernel_use.append([end - begin for begin, end in zip(usage_start, sys_time_and_faults())])
    return {"step_s": times, "step_cpu_s": cpu_times, "step_sys_s_and_minor_faults": kernel_use, "built_rss_GiB": built,
            "weights_GiB_as_built": weights.parameters * 4 / 2**30, **shared_weight_memory(weights, pipe.unet)}


def sys_time_and_faults():
    """(kernel CPU seconds, minor page faults) of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def conv_parameters(model):
    """Parameters of every Conv2d layer reachable from model (each layer once, shared arrays counted per layer)."""
    seen, total, stack = set(), 0, [model]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if type(item).__name__ == "Conv2d":
            total += item.weight.size
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and type(item).__module__.startswith("npdiff"):
            stack.extend(vars(item).values())
    return total


def shared_weight_memory(weights, unet):
    """What the shared random weights save against real ones: the weight arrays themselves (one per shape
    here), and the conv backward's kept flipped kernels (conv_backward.FlippedKernels: one per weight
    array, so one per shape here, one per conv layer with real weights)."""
    from npdiff.kernels.conv_backward import FLIPPED_KERNELS

    flipped_kept = sum(entry[1].nbytes for entry in FLIPPED_KERNELS.entries.values())
    return {"shared_weights_GiB": sum(a.nbytes for a in weights.by_shape.values()) / 2**30,
            "flipped_kernels_GiB": flipped_kept / 2**30,
            "flipped_kernels_GiB_real_weights": conv_parameters(unet) * 4 / 2**30}


def torch_steps(batch, size, steps):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    unet = UNet2DConditionModel(**SD15)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    table = text_encoder.get_input_embeddings().weight
    table.requires_grad_(True)                                          # the recipe: the whole table trains
    optimizer = torch.optim.AdamW([table], lr=5e-3)
    scheduler = DDPMScheduler(**SCHEDULE)
    ids, latents, noise, timesteps = (torch.from_numpy(a) for a in inputs(batch, size))
    built = proc_status_gib("VmRSS")
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        hidden = text_encoder(ids)[0]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    parameters = sum(p.numel() for p in text_encoder.parameters()) + sum(p.numel() for p in unet.parameters())
    return {"step_s": times, "step_cpu_s": cpu_times, "built_rss_GiB": built,
            "weights_GiB_as_built": parameters * 4 / 2**30, "torch_threads": torch.get_num_threads()}


def worker(side, batch, size, steps):
    result = (npdiff_steps if side == "npdiff" else torch_steps)(batch, size, steps)
    result["vmhwm_GiB"] = proc_status_gib("VmHWM")
    if side == "npdiff":  # the peak with real weights: + the weights and flipped kernels the sharing saved
        result["vmhwm_GiB_real_weights_estimate"] = (
            result["vmhwm_GiB"] + result["weights_GiB_as_built"] - result["shared_weights_GiB"]
            + result["flipped_kernels_GiB_real_weights"] - result["flipped_kernels_GiB"])
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64: 512x512 pictures)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="steps per side; the first is not counted")
    parser.add_argument("--worker", choices=["npdiff", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch, args.size, args.steps)
    results = {"load_before": list(os.getloadavg())}
    for side in ("torch", "npdiff"):
        command = [sys.executable, __file__, "--worker", side, "--size", str(args.size), "--batch", str(args.batch),
                   "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {side} worker failed:\n{done.stderr}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        counted = results[side]["step_s"][1:] or results[side]["step_s"]
        results[side]["best_step_s"] = min(counted)
        print(f"{side:7s} step {results[side]['best_step_s']:7.1f} s (all: "
              f"{', '.join(f'{t:.1f}' for t in results[side]['step_s'])}; CPU s of all threads: "
              f"{', '.join(f'{t:.1f}' for t in results[side]['step_cpu_s'])}), peak RSS {results[side]['vmhwm_GiB']:.2f} "
              f"GiB, weights as built {results[side]['weights_GiB_as_built']:.2f} GiB", flush=True)
        if "step_sys_s_and_minor_faults" in results[side]:
            print("        per step: sys s, minor faults " + ", ".join(
                f"{sys_s:.2f} / {faults:.0f}" for sys_s, faults in results[side]["step_sys_s_and_minor_faults"]))
        if "vmhwm_GiB_real_weights_estimate" in results[side]:
            print(f"        peak RSS with real weights (estimate) {results[side]['vmhwm_GiB_real_weights_estimate']:.2f} "
                  f"GiB (flipped conv kernels kept: {results[side]['flipped_kernels_GiB_real_weights']:.2f} GiB)")
    results["load_after"] = list(os.getloadavg())
    results["ratio_time"] = results["npdiff"]["best_step_s"] / results["torch"]["best_step_s"]
    results["latent"] = [args.batch, 4, args.size, args.size]
    print(f"npdiff / torch step time: {results['ratio_time']:.2f}x; load {results['load_before']} -> "
          f"{results['load_after']}")
    print("->", write_json("training", results))
    return None


if __name__ == "__main__":
    main()
