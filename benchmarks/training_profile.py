"""Where the time of the SD 1.5 UNet's training step goes: the tape forward and the backward, per kernel.

    python benchmarks/training_profile.py [--size 64] [--torch] [--forward-check] [--serial]

Builds the SD 1.5-shaped UNet over shared random weights (as training_memory.py), runs
unet_forward_for_backward (the tape forward) and tape.backward once to compile, then once more counted:
the forward kernels (benchmarks/_kernel_counters.py install_counters: the tape forward, and the forward
kernels the backward reruns) and the backward kernels (install_backward_counters), with the block-level
backward functions' inclusive times apart. --torch also times diffusers' UNet forward and backward
(gradient to the hidden states only, weights frozen) in a fresh process, for the split of each side.
--forward-check instead times the tape forward against the plain UNet forward, alternated.
--serial instead runs whole textual-inversion steps (benchmarks/training.py's) under _thread_sampler.py:
the seconds when only one thread of the process wants a core (serial glue between parallel kernels),
by the main thread's npdiff function and line (steady under other processes' load: runnable threads count).
Writes benchmarks/out/training_profile.json.
"""

import npdiff  # noqa: F401, I001  (first: OpenBLAS settings before numpy)
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import write_json
from _kernel_counters import install_backward_counters, install_counters
from _thread_sampler import ThreadSampler
from training import CLIP_L, SCHEDULE, SharedWeights
from training import inputs as step_inputs
from training_memory import SD15, SharedRandomWeights

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]


def inputs(size):
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((1, 4, size, size)).astype(np.float32)     # [1,4,h,w]
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)          # [1,77,768]
    grad = rng.standard_normal((1, 4, size, size)).astype(np.float32)       # d loss / d output
    return sample, context, grad


def table(title, stats):
    """Per kernel: calls, wall seconds, CPU seconds of all threads (steadier than wall when other
    processes share the cores: a kernel's own work, not its waits), GFLOP, GFLOP/s of wall."""
    print(f"{title}\n  {'kernel':34s} {'calls':>5s} {'seconds':>8s} {'cpu s':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
    for name, entry in sorted(stats.items(), key=lambda item: -item[1]["seconds"]):
        rate = entry["flops"] / entry["seconds"] / 1e9 if entry["flops"] else 0.0
        line = f"  {name:34s} {entry['calls']:5d} {entry['seconds']:8.2f} {entry['cpu_seconds']:8.2f}"
        print(f"{line} {entry['flops'] / 1e9:8.1f} {rate:8.1f}" if rate else line)


def npdiff_profile(size):
    from npdiff.models.unet import UNet2DConditionModel
    from npdiff.models.unet_backward import unet_forward_for_backward

    unet = UNet2DConditionModel(dict(SD15), SharedRandomWeights())
    sample, context, grad = inputs(size)
    _, tape = unet_forward_for_backward(unet, sample, 981, context)     # compile and warm
    tape.backward(grad)
    forward_stats, uninstall = install_counters()
    start = time.perf_counter()
    _, tape = unet_forward_for_backward(unet, sample, 981, context)
    forward_s = time.perf_counter() - start
    uninstall()
    rerun_stats, uninstall_rerun = install_counters()
    backward_stats, block_stats, uninstall_backward = install_backward_counters()
    start = time.perf_counter()
    tape.backward(grad)
    backward_s = time.perf_counter() - start
    uninstall_backward()
    uninstall_rerun()
    table(f"npdiff tape forward {forward_s:.2f} s", forward_stats)
    table(f"npdiff backward {backward_s:.2f} s: backward kernels", backward_stats)
    table("  forward kernels rerun by the backward", rerun_stats)
    table("  block-level backward functions (inclusive)", block_stats)
    return {"forward_s": forward_s, "backward_s": backward_s, "forward_kernels": dict(forward_stats),
            "backward_kernels": dict(backward_stats), "rerun_kernels": dict(rerun_stats),
            "blocks": dict(block_stats)}


def forward_check(size, rounds=2):
    """The tape forward against the plain UNet forward (batch 1), alternated in one process: the
    tape should cost only what it keeps. -> best seconds of each and their ratio."""
    from npdiff.models.unet import UNet2DConditionModel
    from npdiff.models.unet_backward import unet_forward_for_backward

    unet = UNet2DConditionModel(dict(SD15), SharedRandomWeights())
    sample, context, _ = inputs(size)
    unet(sample, 981, context)                                          # compile and warm
    unet_forward_for_backward(unet, sample, 981, context)
    best = {"plain": float("inf"), "tape": float("inf")}
    for _ in range(rounds):
        start = time.perf_counter()
        unet(sample, 981, context)
        best["plain"] = min(best["plain"], time.perf_counter() - start)
        start = time.perf_counter()
        tape = unet_forward_for_backward(unet, sample, 981, context)
        best["tape"] = min(best["tape"], time.perf_counter() - start)
        del tape
    print(f"UNet forward, batch 1: plain {best['plain']:.2f} s, tape {best['tape']:.2f} s "
          f"({best['tape'] / best['plain']:.2f}x)")
    return best


def serial_profile(size, steps=3):
    """Whole textual-inversion steps (benchmarks/training.py's npdiff side), the last one sampled: serial
    seconds by npdiff function and line."""
    from types import SimpleNamespace

    from npdiff.freed_memory import keep_freed_memory
    from npdiff.models.clip import CLIPTextModel
    from npdiff.models.unet import UNet2DConditionModel
    from npdiff.schedulers import DDPMScheduler
    from npdiff.training import text_embedding_grad

    weights = SharedWeights()
    pipe = SimpleNamespace(text_encoder=CLIPTextModel(dict(CLIP_L), weights),
                           unet=UNet2DConditionModel(dict(SD15), weights),
                           vae=SimpleNamespace(config={"latent_channels": 4}),
                           scheduler=DDPMScheduler.from_config(SCHEDULE))
    ids, latents, noise, timesteps = step_inputs(1, size)
    sampler = ThreadSampler()
    with keep_freed_memory(heap_only=True):
        for _ in range(steps - 1):                                      # compile, warm, reuse pages
            text_embedding_grad(pipe, ids, latents, noise, timesteps)
        cpu_start = time.process_time()
        with sampler:
            text_embedding_grad(pipe, ids, latents, noise, timesteps)
        cpu_s = time.process_time() - cpu_start
    print(f"one step: {sampler.seconds:.2f} s wall, {cpu_s:.2f} CPU s of all threads")
    return {"cpu_s": cpu_s, **sampler.table()}


def torch_profile(size):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15)
    unet.requires_grad_(False)
    sample, context, grad = (torch.from_numpy(a) for a in inputs(size))
    times = []
    for _ in range(2):
        hidden = context.clone().requires_grad_(True)
        start = time.perf_counter()
        out = unet(sample, 981, hidden).sample
        middle = time.perf_counter()
        out.backward(grad)
        times.append((middle - start, time.perf_counter() - middle))
    return {"forward_s": times[-1][0], "backward_s": times[-1][1], "torch_threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--torch", action="store_true", help="also time diffusers' UNet forward and backward")
    parser.add_argument("--forward-check", action="store_true",
                        help="only time the tape forward against the plain UNet forward (batch 1)")
    parser.add_argument("--serial", action="store_true",
                        help="only sample one whole training step's threads: serial time by npdiff function")
    parser.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(torch_profile(args.size)))
        return
    results = {"load_before": list(os.getloadavg()), "latent": [1, 4, args.size, args.size]}
    if args.forward_check:
        results["forward_check"] = forward_check(args.size)
        results["load_after"] = list(os.getloadavg())
        print(f"load {results['load_before']} -> {results['load_after']}")
        return
    if args.serial:
        results["serial"] = serial_profile(args.size)
        results["load_after"] = list(os.getloadavg())
        print(f"load {results['load_before']} -> {results['load_after']}")
        print("->", write_json("training_serial", results))
        return
    if args.torch:
        command = [sys.executable, __file__, "--worker", "torch", "--size", str(args.size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results["torch"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"torch   forward {results['torch']['forward_s']:.2f} s, backward {results['torch']['backward_s']:.2f} s")
    results["npdiff"] = npdiff_profile(args.size)
    results["load_after"] = list(os.getloadavg())
    print(f"load {results['load_before']} -> {results['load_after']}")
    print("->", write_json("training_profile", results))


if __name__ == "__main__":
    main()
