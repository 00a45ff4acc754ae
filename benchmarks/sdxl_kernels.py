"""The float32 kernels of the SDXL UNet (128x128 latent, batch 2) at its own shapes, npdiff against torch in
one process: GEGLU, the linear layers around it, and attention (self and cross, head size 64).

    flock /work/bench.lock python benchmarks/sdxl_kernels.py [--repeat 5] [--only geglu,linear,attention]

numpy is imported first, as in a user's script. Per row, best of --repeat after a warm-up: wall ms, GFLOP/s,
and the process CPU time of that call ("cpu ms": both cores busy is about twice the wall time; its GFLOP/s
per core say more than the wall time when other work shares the machine).
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np  # first, as in a user's script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_bf16 import best_of, heads  # the same timing and split_heads views

# (rows, in, out): the UNet's rows are batch 2 x tokens; 64 px = 4096 tokens at 640 channels, 32 px = 1024
# tokens at 1280 channels (the level with 10 transformer layers per block: 60 of the UNet's 70 layers)
GEGLU_SHAPES = [(8192, 640, 2 * 2560), (2048, 1280, 2 * 5120)]
LINEAR_SHAPES = [(8192, 640, 640), (8192, 2560, 640), (2048, 1280, 1280), (2048, 5120, 1280)]
# (B, heads, N queries, M keys, d): self-attention at 64 and 32 px, cross-attention with 77 tokens
ATTENTION_SHAPES = [(2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64), (2, 10, 4096, 77, 64),
                    (2, 20, 1024, 77, 64), (2, 8, 4096, 4096, 40)]


def row(label, side, flop, timing, error=None):
    wall, cpu = timing
    per_core = flop / max(cpu, 1e-9) / 1e9
    tail = "" if error is None else f"  {error:.1e}"
    print(f"{label:30} {side:8} {wall * 1e3:9.1f} {flop / wall / 1e9:8.1f} {cpu * 1e3:9.1f} {per_core:7.1f}{tail}",
          flush=True)


def relative_error(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def diffusers_geglu(torch, x, weight, bias):
    """diffusers' GEGLU: the first half of the projection times gelu of the second."""
    value, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    return value * torch.nn.functional.gelu(gate)


def bench_geglu(rng, repeat, torch):
    from npdiff.kernels.linear import geglu

    for rows, width, out in GEGLU_SHAPES:
        x = rng.standard_normal((2, rows // 2, width), dtype=np.float32)
        weight = rng.standard_normal((out, width), dtype=np.float32) * np.float32(width ** -0.5)
        bias = rng.standard_normal(out, dtype=np.float32)
        flop = 2 * rows * width * out
        ours = geglu(x, weight, bias)
        tx, tw, tb = (torch.from_numpy(a) for a in (x, weight, bias))

        torch_geglu = partial(diffusers_geglu, torch, tx, tw, tb)
        with torch.no_grad():
            error = relative_error(ours, torch_geglu().numpy())
            row(f"geglu [{rows},{width}]->{out}", "npdiff", flop, best_of(partial(geglu, x, weight, bias), repeat),
                error)
            row("", "torch", flop, best_of(torch_geglu, repeat))


def bench_linear(rng, repeat, torch):
    from npdiff.kernels.linear import linear

    for rows, width, out in LINEAR_SHAPES:
        x = rng.standard_normal((2, rows // 2, width), dtype=np.float32)
        weight = rng.standard_normal((out, width), dtype=np.float32)
        bias = rng.standard_normal(out, dtype=np.float32)
        flop = 2 * rows * width * out
        tx, tw, tb = (torch.from_numpy(a) for a in (x, weight, bias))
        with torch.no_grad():
            row(f"linear [{rows},{width}]->{out}", "npdiff", flop, best_of(partial(linear, x, weight, bias), repeat))
            row("", "torch", flop, best_of(partial(torch.nn.functional.linear, tx, tw, tb), repeat))


def bench_attention(rng, repeat, torch):
    from npdiff.kernels.attention import scaled_dot_product_attention

    for batch, n_heads, n_queries, n_keys, dim in ATTENTION_SHAPES:
        q = heads(rng, batch, n_heads, n_queries, dim) * np.float32(1.5)
        k = heads(rng, batch, n_heads, n_keys, dim)
        v = heads(rng, batch, n_heads, n_keys, dim)
        flop = 4 * batch * n_heads * n_queries * n_keys * dim
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).transpose(1, 2)
                      for a in (q, k, v))
        with torch.no_grad():
            reference = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()
            error = relative_error(scaled_dot_product_attention(q, k, v), reference)
            label = f"attention {batch},{n_heads},{n_queries},{n_keys},{dim}"
            row(label, "npdiff", flop, best_of(partial(scaled_dot_product_attention, q, k, v), repeat), error)
            row("", "torch", flop,
                best_of(partial(torch.nn.functional.scaled_dot_product_attention, tq, tk, tv), repeat))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="geglu,linear,attention")
    args = parser.parse_args()
    import torch

    import npdiff  # noqa: F401  (after numpy and torch: the user's order)

    rng = np.random.default_rng(0)
    print(f"{'kernel':30} {'side':8} {'wall ms':>9} {'GFLOP/s':>8} {'cpu ms':>9} {'/core':>7}  rel err")
    benches = {"geglu": bench_geglu, "linear": bench_linear, "attention": bench_attention}
    for name in args.only.split(","):
        benches[name](rng, args.repeat, torch)


if __name__ == "__main__":
    main()
