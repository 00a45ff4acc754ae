"""The backward kernels of the SD 1.5 training step at its 64x64-latent shapes: each version against torch's
autograd of the same op (torch with 2 threads, in this process), best of rounds.

    python benchmarks/training_kernels.py [--repeat 3] [--rounds 3] [--only "attention,conv dx,geglu"]

Rows (the "before" versions are the ones this session replaced; kept importable or written out here):
  attention self [1,8,4096,40], [1,8,1024,80], [1,8,256,160] and cross [1,8,4096x77,40], q/k/v/dO as
  split_heads views of [1,N,h*d]:
      v2 query blocks (np.matmul on OpenBLAS's threads; the 4096 rows only) | v3 slices on the block pool |
      v4 (Numba register tiles, softmax rows recomputed) | v4 given the forward's out (key blocks outermost,
      lse recomputed) | v4 given out and lse | torch SDPA backward (which has its forward's out and lse)
      Each attention row also gives the process CPU seconds per call of every side (`cpu` in the JSON).
  conv dx 3x3, frozen weight: the flipped kernel made per call | kept (FlippedKernels) | kept, through im2col and
      through Winograd F(4,3) whatever conv_method picks | torch conv2d backward
  group norm + SiLU dx [1,320,64,64], 32 groups: with the weight grads | need_weight_grad=False | torch
  geglu dx [1,4096,320] -> [1,4096,2x1280]: NumPy element-wise passes | one Numba pass | the hidden layer
      kept by the forward (geglu_input_grad) | torch
  linear dx of frozen projections (linear_input_grad) at the UNet's shapes | torch
  conv forward at batch 1, 16x16 (the tape forward's): conv2d as conv_method picks | im2col | Winograd | torch
Each row's torch figure is the autograd of the forward op with only the input requiring a gradient, timed
from the forward's output (the backward alone: torch keeps what its forward saved; ours recompute theirs).
Writes benchmarks/out/training_kernels.json.
"""

import npdiff  # noqa: F401, I001  (first: OpenBLAS settings before numpy)
import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import time_call, write_json  # noqa: E402

from npdiff.kernels import conv, conv_backward, conv_winograd, norm_backward  # noqa: E402
from npdiff.kernels.activations import gelu  # noqa: E402
from npdiff.kernels.activations_backward import gelu_backward  # noqa: E402
from npdiff.kernels.attention import backward as attention_bwd  # noqa: E402
from npdiff.kernels.attention.backward_fused import attention_backward_fused  # noqa: E402
from npdiff.kernels.attention.backward_stats import attention_backward_with_stats  # noqa: E402
from npdiff.kernels.linear import linear  # noqa: E402
from npdiff.kernels.linear_backward import linear_backward  # noqa: E402

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]


def heads(rng, tokens, width=320, count=8):
    flat = rng.standard_normal((1, tokens, width), dtype=np.float32)   # [1,N,320]
    return flat.reshape(1, tokens, count, width // count).transpose(0, 2, 1, 3)  # [1,8,N,40] view


def torch_backward_timer(torch, forward, inputs, grad):
    """Seconds of out.backward(grad) alone (a fresh forward before each, not timed); the call's process
    CPU seconds of the backward alone are left in run.last_cpu."""
    import resource
    import time

    def run():
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(i == 0 or requires)
                   for i, (a, requires) in enumerate(inputs)]
        out = forward(*tensors)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        out.backward(torch.from_numpy(grad))
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        run.last_cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        return seconds

    return run


def process_cpu_seconds(fn):
    """Process CPU seconds (user + system, every thread) of one fn() call. Steadier than wall time on a
    shared machine: another process's load adds waiting, not CPU time."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def torch_forward_seconds(torch, forward):
    """Seconds of one forward call, no autograd."""
    import time

    with torch.no_grad():
        start = time.perf_counter()
        forward()
        return time.perf_counter() - start


def geglu_backward_numpy_passes(x, weight, bias, grad_out):
    """geglu_backward as it was: the element-wise part in NumPy passes with temporaries."""
    hidden = linear(x, weight, bias)                                    # [..., 2D]
    half = hidden.shape[-1] // 2
    value, gate = hidden[..., :half], np.ascontiguousarray(hidden[..., half:])
    grad_hidden = np.empty_like(hidden)                                 # [..., 2D]
    grad_hidden[..., :half] = grad_out * gelu(gate)
    grad_hidden[..., half:] = gelu_backward(gate, np.ascontiguousarray(grad_out * value))
    return linear_backward(x, weight, grad_hidden, False)


def forward_statistics(torch, q, k, v):
    """The forward's output [...,N,dv] and log-sum-exp [...,N] (what a training tape would keep), by torch."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = torch.from_numpy(np.ascontiguousarray(q)) @ torch.from_numpy(np.ascontiguousarray(k)).transpose(-1, -2)
    scores = scores * scale                                             # [...,N,M]
    out = torch.softmax(scores, dim=-1) @ torch.from_numpy(np.ascontiguousarray(v))
    return out.numpy(), torch.logsumexp(scores, dim=-1).numpy()


def attention_cases(rng, torch, F):
    out = []
    shapes = (("attention self [1,8,4096,40]", 4096, 4096, 320), ("attention self [1,8,1024,80]", 1024, 1024, 640),
              ("attention self [1,8,256,160]", 256, 256, 1280), ("attention cross [1,8,4096x77,40]", 4096, 77, 320))
    for name, n_queries, n_keys, width in shapes:
        q, d_out = heads(rng, n_queries, width), heads(rng, n_queries, width)  # [1,8,N,d]
        k, v = heads(rng, n_keys, width), heads(rng, n_keys, width)          # [1,8,M,d]
        forward_out, lse = forward_statistics(torch, q, k, v)
        versions = {}
        if n_queries == n_keys == 4096:
            versions["v2 query blocks"] = lambda q=q, k=k, v=v, g=d_out: \
                attention_bwd.attention_backward_fast(q, k, v, g)
        versions["v3 slices"] = lambda q=q, k=k, v=v, g=d_out: attention_bwd.attention_backward_slices(q, k, v, g)
        versions["v4 tiles"] = lambda q=q, k=k, v=v, g=d_out: attention_backward_fused(q, k, v, g)
        versions["v4 given out"] = lambda q=q, k=k, v=v, g=d_out, o=forward_out: \
            attention_backward_with_stats(q, k, v, g, o)
        versions["v4 given out, lse"] = lambda q=q, k=k, v=v, g=d_out, o=forward_out, s=lse: \
            attention_backward_with_stats(q, k, v, g, o, s)
        torch_timer = torch_backward_timer(torch, F.scaled_dot_product_attention, [(q, True), (k, True), (v, True)],
                                           np.ascontiguousarray(d_out))
        out.append((name, versions, torch_timer))
    return out


def cases(rng, torch, F):
    out = attention_cases(rng, torch, F)
    for c_in, c_out, size in ((320, 320, 64), (1920, 640, 32), (640, 640, 32), (1280, 1280, 16), (2560, 1280, 16)):
        x = rng.standard_normal((1, c_in, size, size), dtype=np.float32)
        weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
        grad = rng.standard_normal((1, c_out, size, size), dtype=np.float32)
        out.append((f"conv dx {c_in}->{c_out} @{size}", {
            "flip per call": lambda x=x, w=weight, g=grad: conv_backward.conv2d_input_grad(x.shape, w, g, (1, 1), (1, 1)),
            "flip kept": lambda x=x, w=weight, g=grad: conv_backward.conv2d_input_grad(x.shape, w, g, (1, 1), (1, 1),
                                                                                    frozen=True),
            "kept, im2col": lambda w=weight, g=grad: conv._conv_im2col_tiled(
                g, conv_backward.FLIPPED_KERNELS.get(w), None, 1, 1, 1, 1),
            "kept, winograd": lambda w=weight, g=grad: conv_winograd.winograd_conv2d(
                g, conv_backward.FLIPPED_KERNELS.get(w), None, (1, 1), 4),
        }, torch_backward_timer(torch, lambda a, w: F.conv2d(a, w, padding=1), [(x, True), (weight, False)], grad)))
    # the tape forward's convs at batch 1 where conv_method's rule (measured at batch 2) may not hold
    for c_in, c_out, size in ((640, 1280, 16), (1280, 1280, 16), (1920, 1280, 16), (2560, 1280, 16)):
        x = rng.standard_normal((1, c_in, size, size), dtype=np.float32)
        weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
        xt, wt = torch.from_numpy(x), torch.from_numpy(weight)
        out.append((f"conv forward b1 {c_in}->{c_out} @{size}", {
            "conv2d (conv_method: " + conv.conv_method(x.shape, weight.shape, (1, 1), (1, 1)) + ")":
                lambda x=x, w=weight: conv.conv2d(x, w, None, 1, 1),
            "im2col": lambda x=x, w=weight: conv._conv_im2col_tiled(x, w, None, 1, 1, 1, 1),
            "winograd": lambda x=x, w=weight: conv_winograd.winograd_conv2d(x, w, None, (1, 1), 4),
        }, lambda xt=xt, wt=wt: torch_forward_seconds(torch, lambda: F.conv2d(xt, wt, padding=1))))
    x = rng.standard_normal((1, 320, 64, 64), dtype=np.float32)
    scale, shift = (rng.standard_normal(320, dtype=np.float32) for _ in range(2))
    grad = rng.standard_normal(x.shape, dtype=np.float32)
    out.append(("group norm+SiLU dx [1,320,64,64]", {
        "with weight grads": lambda x=x, g=grad: norm_backward.group_norm_backward(x, 32, scale, shift, g, 1e-5, True),
        "dx only": lambda x=x, g=grad: norm_backward.group_norm_backward(x, 32, scale, shift, g, 1e-5, True, False),
    }, torch_backward_timer(torch, lambda a, w, b: F.silu(F.group_norm(a, 32, w, b)),
                            [(x, True), (scale, False), (shift, False)], grad)))
    tokens = rng.standard_normal((1, 4096, 320), dtype=np.float32)
    weight = (rng.standard_normal((2560, 320), dtype=np.float32) / np.sqrt(320)).astype(np.float32)
    bias = rng.standard_normal(2560, dtype=np.float32)
    grad = rng.standard_normal((1, 4096, 1280), dtype=np.float32)

    def torch_geglu(a, w, b):
        value, gate = F.linear(a, w, b).chunk(2, dim=-1)
        return value * F.gelu(gate)

    from npdiff.kernels.linear_backward import (
        geglu_backward,
        geglu_forward_saved,
        geglu_input_grad,
    )
    _, hidden = geglu_forward_saved(tokens, weight, bias)               # [1,4096,2560]
    out.append(("geglu dx [1,4096,320]->1280", {
        "numpy passes": lambda w=weight, g=grad: geglu_backward_numpy_passes(tokens, w, bias, g),
        "one Numba pass": lambda w=weight, g=grad: geglu_backward(tokens, w, bias, g, need_weight_grad=False),
        "hidden kept": lambda w=weight, g=grad: geglu_input_grad(hidden, w, g),
    }, torch_backward_timer(torch, torch_geglu, [(tokens, True), (weight, False), (bias, False)], grad)))
    # frozen projections' dx (linear_input_grad: dy W) and a q projection's (linear_backward, dx only)
    from npdiff.kernels.linear_backward import linear_input_grad
    for tokens_n, n_in, n_out, what in ((4096, 1280, 320, "ff.net.2"), (4096, 320, 320, "to_out / proj"),
                                        (1024, 2560, 640, "ff.net.2"), (256, 5120, 1280, "ff.net.2")):
        x = rng.standard_normal((1, tokens_n, n_in), dtype=np.float32)
        weight = (rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)
        grad = rng.standard_normal((1, tokens_n, n_out), dtype=np.float32)
        out.append((f"linear dx {what} [1,{tokens_n},{n_in}]->{n_out}", {
            "linear_input_grad": lambda w=weight, g=grad: linear_input_grad(w, g),
        }, torch_backward_timer(torch, lambda a, w: F.linear(a, w), [(x, True), (weight, False)], grad)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the rows whose name contains one of these comma-separated texts")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    load_before = list(os.getloadavg())
    rows = {}
    for name, ours, theirs in cases(rng, torch, F):
        if not any(part in name for part in args.only.split(",")):
            continue
        best = {label: float("inf") for label in list(ours) + ["torch"]}
        cpu = {label: float("inf") for label in best}
        for _ in range(args.rounds):
            best["torch"] = min(best["torch"], min(theirs() for _ in range(args.repeat + 1)))
            if name.startswith("attention"):
                theirs()
                cpu["torch"] = min(cpu["torch"], theirs.last_cpu)
            for label, fn in ours.items():
                best[label] = min(best[label], time_call(fn, repeat=args.repeat))
                if name.startswith("attention"):
                    cpu[label] = min(cpu[label], process_cpu_seconds(fn))
        rows[name] = {"wall": best, "cpu": cpu} if name.startswith("attention") else best
        text = ", ".join(f"{label} {seconds * 1e3:.1f} ms ({seconds / best['torch']:.2f}x)"
                         for label, seconds in best.items() if label != "torch")
        print(f"{name:36s} torch {best['torch'] * 1e3:7.1f} ms | {text}", flush=True)
        if name.startswith("attention"):
            text = ", ".join(f"{label} {seconds * 1e3:.1f} ms ({seconds / cpu['torch']:.2f}x)"
                             for label, seconds in cpu.items() if label != "torch")
            print(f"{'  process CPU per call':36s} torch {cpu['torch'] * 1e3:7.1f} ms | {text}", flush=True)
    load_after = list(os.getloadavg())
    print(f"load {load_before} -> {load_after}")
    print("->", write_json("training_kernels", {"rows": rows, "load_before": load_before, "load_after": load_after}))


if __name__ == "__main__":
    main()
