"""bf16 attention on AMX tiles (npdiff/kernels/attention/amx.py, version 6) against the float32 attention
(version 5, fused.py) and torch, at Stable Diffusion 1.5's attention shapes; and the SD 1.5 UNet at bf16 with
each of the two attentions.

    flock /work/bench.lock python benchmarks/attention_bf16.py [--repeat 3] [--unet] [--cache DIR] [--one-core] [--unet-only]

Kernels, in one process (numpy imported first, as a user's script does), q/k/v as split_heads makes them
(strided views [B,h,N,d] of [B,N,h*d]); per row, best of --repeat after a warm-up:
  v6 bf16   attention_amx         v5 f32   attention_fused         torch f32   F.scaled_dot_product_attention
GFLOP/s count the two products, 4*B*h*N*M*d; "cpu" is the process CPU time of the call (both cores busy:
about twice the wall time), whose GFLOP/s per core say more than the wall time when the machine is shared.
--one-core: npdiff's block pool with one worker, Numba and torch with one thread; the "/core" column (process CPU
time) is then the figure to compare when other work shares the machine.
--unet: UNet2DConditionModel.from_pretrained(cache/unet, precision="bf16") (SD 1.5's UNet with random weights,
made by `npdiff bench models`), batch 2, 64x64 latent, 77 tokens; forwards alternate between version 6 and
the float32 attention (each Attention's bf16 flag), best of --repeat each, and the two outputs are compared.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np  # first, as in a user's script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from npdiff.kernels.attention import attention_amx, attention_fused  # noqa: E402
from npdiff.kernels.bf16_rounding import bf16_kernel  # noqa: E402

# (B, heads, N queries, M keys, d): SD 1.5's self- and cross-attention at 64, 32 and 16 px, batch 2
SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (1, 1, 4096, 4096, 512)]


def best_of(function, repeat):
    """(best wall seconds, the process CPU seconds of that call) after one warm-up call."""
    function()
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def heads(rng, batch, n_heads, tokens, dim):
    x = rng.standard_normal((batch, tokens, n_heads * dim), dtype=np.float32)
    return x.reshape(batch, tokens, n_heads, dim).transpose(0, 2, 1, 3)  # [B,h,N,d] view


def kernels(repeat):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    print(f"{'shape (B,h,N,M,d)':28} {'side':10} {'ms':>8} {'GFLOP/s':>8} {'cpu ms':>8} {'/core':>6}  rel err")
    for batch, n_heads, n_queries, n_keys, dim in SHAPES:
        q = heads(rng, batch, n_heads, n_queries, dim) * np.float32(1.5)
        k, v = heads(rng, batch, n_heads, n_keys, dim), heads(rng, batch, n_heads, n_keys, dim)
        flops = 4 * batch * n_heads * n_queries * n_keys * dim
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))
        expected = F.scaled_dot_product_attention(tq, tk, tv).numpy()
        sides = {"v6 bf16": lambda: attention_amx(q, k, v), "v5 f32": lambda: attention_fused(q, k, v),
                 "torch f32": lambda: F.scaled_dot_product_attention(tq, tk, tv)}
        for side, function in sides.items():
            wall, cpu = best_of(function, repeat)
            result = np.asarray(function())
            err = float(np.abs(result - expected).max() / np.abs(expected).max())
            print(f"{str((batch, n_heads, n_queries, n_keys, dim)):28} {side:10} {wall * 1e3:8.1f} "
                  f"{flops / wall / 1e9:8.0f} {cpu * 1e3:8.0f} {flops / cpu / 1e9:6.0f}  {err:.1e}", flush=True)


def unet(cache, repeat):
    from npdiff.models import UNet2DConditionModel
    from npdiff.models.transformer import Attention, AttentionBlock  # noqa: F401  (the flag's owners)

    model = UNet2DConditionModel.from_pretrained(Path(cache) / "unet", precision="bf16")
    attentions = [item for item in _walk(model) if isinstance(item, Attention)]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 64, 64), dtype=np.float32)
    context = rng.standard_normal((2, 77, 768), dtype=np.float32)
    outputs, times = {}, {"v6 bf16 attention": [], "f32 attention": []}
    for side in list(times) * (repeat + 1):  # the first of each: compilation and warm-up, not kept
        for attention in attentions:
            attention.bf16 = side.startswith("v6")
        wall, cpu = time.perf_counter(), time.process_time()
        outputs[side] = model(sample, 500, context)
        times[side].append((round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)))
    for side, seconds in times.items():
        print(f"SD 1.5 UNet bf16, {side}: best {min(seconds[1:])} s (wall, process cpu) of {seconds}")
    a, b = outputs.values()
    print(f"relative difference of the two outputs: {np.abs(a - b).max() / np.abs(b).max():.1e}")


def _walk(root):
    """Every object reachable from root's attributes and lists (the model's layers)."""
    seen, stack, found = set(), [root], []
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (np.ndarray, str, int, float)):
            continue
        seen.add(id(item))
        found.append(item)
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unet", action="store_true", help="also the SD 1.5 UNet at bf16 with each attention")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/npdiff/sd15-random"))
    parser.add_argument("--one-core", action="store_true", help="one pool worker, one Numba and torch thread")
    parser.add_argument("--unet-only", action="store_true", help="skip the kernel rows")
    args = parser.parse_args()
    if args.one_core:
        import numba
        import torch

        from npdiff.kernels import block_pool

        block_pool._shared = block_pool.BlockParallelPool(1)
        numba.set_num_threads(1)
        torch.set_num_threads(1)
    if bf16_kernel() != "amx":
        sys.exit(f"no AMX here (bf16 kernel: {bf16_kernel()}): version 6 does not run")
    print(f"load average before: {os.getloadavg()}")
    if not args.unet_only:
        kernels(args.repeat)
    if args.unet or args.unet_only:
        unet(args.cache, args.repeat)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
