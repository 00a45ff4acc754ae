"""CLIP-L's text encoder from the inside: where one prompt's time goes, and its weights' pages.

    python benchmarks/clip_steps.py steps [--folder F] [--repeat 6]
        one prompt through the 12 layers on one thread, calling the serial steps clip_layers_by_prompt's task
        runs (layer norm, q, k, v, 12 heads, out_proj, layer norm, fc1, fc2): each step's thread CPU time
        (best of --repeat, summed over the layers) and the GEMMs' GFLOP/s, the weights streamed as in a call
    python benchmarks/clip_steps.py pages [--folder F] [--batch 2] [--rounds 10] [--calls 5]
        the model as loaded (every panel in one block of 2 MiB pages: models/packed_linear.PanelBlock)
        against the same panels copied into one array a layer (what the model held before), alternated in one
        process: wall and process CPU time per call (the same bytes out, asserted); the threads are Numba's
        (NUMBA_NUM_THREADS=1 for one thread); and a second model loaded as before (clip.PANELS_IN_ONE_BLOCK = False)

F: a transformers CLIPTextModel folder (default: benchmarks/models.py's random SD 1.5 weights,
~/.cache/npdiff/sd15-random/text_encoder, made by `npdiff bench models --only text_encoder`).
Run under `flock /work/bench.lock` on a shared machine and give the load average beside the figures.
"""

import argparse
import re
import time
from pathlib import Path

import numpy as np

from npdiff.kernels.attention.causal_rows import attention_head_rows, work_floats
from npdiff.kernels.linear_packed import ACTIVATIONS, aligned_empty, gemm_panels
from npdiff.kernels.linear_packed_tile import NO_ACTIVATION
from npdiff.kernels.norm import _layer_norm_serial
from npdiff.kernels.vecmath import LOG2E
import npdiff.models.clip as clip_module
from npdiff.models import CLIPTextModel

DEFAULT_FOLDER = Path.home() / ".cache" / "npdiff" / "sd15-random" / "text_encoder"
STEPS = ("layer norm 1", "q", "k", "v", "attention", "out_proj", "layer norm 2", "fc1", "fc2")


def one_prompt_steps(model, h, buffers):
    """One prompt through every layer, step by step -> {step: thread CPU seconds over the layers}."""
    normed, q, k, v, attended, attention_out, hidden, out, work = buffers
    spent = dict.fromkeys(STEPS, 0.0)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.layer_norm1, layer.layer_norm2
        heads, head_dim = attn.heads, q.shape[1] // attn.heads
        steps = (
            lambda: _layer_norm_serial(h, norm1.weight, norm1.bias, norm1.eps, normed),
            lambda: gemm_panels(normed, attn.q_proj.panels, 0, attn.q_proj.panels.shape[0], attn.q_proj.bias, True,
                                NO_ACTIVATION, normed, False, q),
            lambda: gemm_panels(normed, attn.k_proj.panels, 0, attn.k_proj.panels.shape[0], attn.k_proj.bias, True,
                                NO_ACTIVATION, normed, False, k),
            lambda: gemm_panels(normed, attn.v_proj.panels, 0, attn.v_proj.panels.shape[0], attn.v_proj.bias, True,
                                NO_ACTIVATION, normed, False, v),
            lambda: [attention_head_rows(q, k, v, head * head_dim, head_dim, np.float32(attn.scale * LOG2E), attended,
                                         work) for head in range(heads)],
            lambda: gemm_panels(attended, attn.out_proj.panels, 0, attn.out_proj.panels.shape[0], attn.out_proj.bias,
                                True, NO_ACTIVATION, h, True, attention_out),
            lambda: _layer_norm_serial(attention_out, norm2.weight, norm2.bias, norm2.eps, normed),
            lambda: gemm_panels(normed, mlp.fc1.panels, 0, mlp.fc1.panels.shape[0], mlp.fc1.bias, True,
                                ACTIVATIONS[mlp.activation_name], normed, False, hidden),
            lambda: gemm_panels(hidden, mlp.fc2.panels, 0, mlp.fc2.panels.shape[0], mlp.fc2.bias, True,
                                NO_ACTIVATION, attention_out, True, out),
        )
        for name, step in zip(STEPS, steps):
            start = time.thread_time()
            step()
            spent[name] += time.thread_time() - start
    return spent


def steps(model, repeat):
    length, dim = 77, model.config["hidden_size"]
    inner = model.layers[0].mlp.fc1.weight.shape[0]
    h = aligned_empty((length, dim))  # [L, D]
    h[...] = np.random.default_rng(0).standard_normal((length, dim), dtype=np.float32)
    buffers = [aligned_empty((length, dim)) for _ in range(4)] + [aligned_empty((length, dim)),
                                                                  aligned_empty((length, dim)),
                                                                  aligned_empty((length, inner)),
                                                                  aligned_empty((length, dim)),
                                                                  aligned_empty((work_floats(length, 64),))]
    best = dict.fromkeys(STEPS, np.inf)
    for _ in range(repeat):
        for name, seconds in one_prompt_steps(model, h, buffers).items():
            best[name] = min(best[name], seconds)
    layers = len(model.layers)
    flops = {"q": dim * dim, "k": dim * dim, "v": dim * dim, "out_proj": dim * dim, "fc1": dim * inner,
             "fc2": dim * inner}
    print(f"one prompt ({length} tokens), {layers} layers, one thread: thread CPU ms, best of {repeat}")
    for name in STEPS:
        rate = f"  {2 * length * flops[name] * layers / best[name] / 1e9:6.1f} GFLOP/s" if name in flops else ""
        print(f"  {name:13s} {best[name] * 1e3:7.2f}{rate}")
    gemms = sum(best[name] for name in flops)
    print(f"  GEMMs {gemms * 1e3:.1f} ms of {sum(best.values()) * 1e3:.1f}")


def huge_page_lines(array):
    """The smaps Size and AnonHugePages lines of the mapping that holds `array`."""
    lines, address = Path("/proc/self/smaps").read_text().split("\n"), array.ctypes.data
    for index, line in enumerate(lines):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            low, high = (int(value, 16) for value in line.split()[0].split("-"))
            if low <= address < high:
                return [entry for entry in lines[index:index + 25] if entry.startswith(("Size", "AnonHugePages"))]
    return []


def pages(model, folder, batch, rounds, calls):
    ids = np.random.default_rng(0).integers(0, model.config["vocab_size"], size=(batch, 77)).astype(np.int64)
    linears = [projection for layer in model.layers for projection in layer.projections()]
    block = [linear.panels for linear in linears]
    per_layer = []
    for panels in block:
        copy = aligned_empty(panels.shape)
        copy[...] = panels
        per_layer.append(copy)
    clip_module.PANELS_IN_ONE_BLOCK = False  # a second model, loaded as before the block
    loaded_before = CLIPTextModel.from_pretrained(folder)
    as_before = [projection.panels for layer in loaded_before.layers for projection in layer.projections()]
    print("the block's mapping:", huge_page_lines(block[0]))
    variants = {"one block, 2 MiB pages": block, "an array a layer, copied": per_layer,
                "as loaded before": as_before}
    outputs = []
    for panels in variants.values():
        for linear, chosen in zip(linears, panels):
            linear.panels = chosen
        outputs.append(model(ids).copy())
    assert all(np.array_equal(outputs[0], other) for other in outputs)
    times = {name: [] for name in variants}
    for round_index in range(rounds):
        order = list(variants.items()) if round_index % 2 == 0 else list(reversed(variants.items()))
        for name, panels in order:
            for linear, chosen in zip(linears, panels):
                linear.panels = chosen
            for _ in range(calls):
                wall, cpu = time.perf_counter(), time.process_time()
                model(ids)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"batch {batch}, {rounds} rounds x {calls} calls, ms:")
    for name, spent in times.items():
        spent = np.array(spent) * 1e3  # [calls, 2]
        print(f"  {name:24s} wall best {spent[:, 0].min():6.1f} median {np.median(spent[:, 0]):6.1f};"
              f" process CPU best {spent[:, 1].min():6.1f} median {np.median(spent[:, 1]):6.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("steps", "pages"))
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    model = CLIPTextModel.from_pretrained(args.folder)
    if args.what == "steps":
        steps(model, args.repeat)
    else:
        pages(model, args.folder, args.batch, args.rounds, args.calls)


if __name__ == "__main__":
    main()
