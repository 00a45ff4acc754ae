"""Attention at the SD 1.5 UNet's shapes: version 8 (flash.py), version 5 (fused.py), torch's sdpa.

    python benchmarks/attention_flash.py [--repeat 5]

Part 1, both threads: each shape called as the UNet calls it (q, k, v the heads of split_heads: strided
views [B,h,N,d] of [B,N,h*d]; torch's scaled_dot_product_attention on the same views, as diffusers'
attention processor calls it), best wall time of `repeat`, the three sides alternated; GFLOP/s =
4 N M d per (batch, head) slice / time. Part 2, one thread: where each version's time goes for one
slice [4096, 4096, 40] (thread CPU time, each step run alone over the whole slice): version 5's two
BLAS products and its softmax pass, version 8's two micro-kernels and its exp pass.
Writes benchmarks/out/attention_flash.json; prints the load average before and after.
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import sgemm_peak_gflops, write_json

from npdiff.blas import set_num_threads
from npdiff.jit import SERIAL, njit
from npdiff.kernels import block_pool
from npdiff.kernels.attention import flash, fused
from npdiff.models.transformer import split_heads

SHAPES = [("self 64x64", 2, 8, 4096, 4096, 40), ("self 32x32", 2, 8, 1024, 1024, 80),
          ("cross 64x64", 2, 8, 4096, 77, 40), ("cross 32x32", 2, 8, 1024, 77, 80)]


def heads_of(rng, batch, heads, tokens, dim):
    return split_heads(rng.standard_normal((batch, tokens, heads * dim), dtype=np.float32), heads)  # [B,h,N,d]


def compare_at(rng, name, batch, heads, n_queries, n_keys, dim, repeat):
    q = heads_of(rng, batch, heads, n_queries, dim)
    k, v = heads_of(rng, batch, heads, n_keys, dim), heads_of(rng, batch, heads, n_keys, dim)
    q_t, k_t, v_t = (torch.from_numpy(x) for x in (q, k, v))
    sides = {"torch sdpa": lambda: F.scaled_dot_product_attention(q_t, k_t, v_t),
             "v5 fused": lambda: fused.attention_fused(q, k, v),
             "v8 flash": lambda: flash.attention_flash(q, k, v)}
    expected = sides["torch sdpa"]().numpy()
    errors = {side: float(np.linalg.norm(run() - expected) / np.linalg.norm(expected))
              for side, run in sides.items() if side != "torch sdpa"}
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeat):
        for side, run in sides.items():
            start = time.perf_counter()
            run()
            best[side] = min(best[side], time.perf_counter() - start)
    gflop = 4.0 * batch * heads * n_queries * n_keys * dim / 1e9
    return {"shape": name, "dims": [batch, heads, n_queries, n_keys, dim], "gflop": gflop,
            "seconds": best, "gflops": {side: gflop / s for side, s in best.items()}, "rel_err_vs_torch": errors}


def thread_seconds(run, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        run()
        best = min(best, time.thread_time() - start)
    return best


@njit(**SERIAL)
def _v8_scores(keys, q_t, scores_t, col_max, blocks):
    for _ in range(blocks):
        col_max[:] = -np.inf
        for key0 in range(0, keys.shape[0], flash.KEY_ROWS):
            flash._score_tile(keys, key0, q_t, scores_t, col_max)


@njit(**SERIAL)
def _v8_exp(scores_t, n_keys, col_max, col_sum, blocks):
    for _ in range(blocks):
        col_max[:] = 0.0
        for key0 in range(0, n_keys, flash.KEY_CHUNK):
            flash._exp_columns(scores_t[key0:key0 + flash.KEY_CHUNK], col_max, col_sum)


@njit(**SERIAL)
def _v8_values(values, probs_t, out_t, blocks):
    for _ in range(blocks):
        for key0 in range(0, values.shape[0], flash.KEY_CHUNK):
            for col0 in range(0, values.shape[1], flash.VALUE_ROWS):
                flash._value_tile(values[key0:key0 + flash.KEY_CHUNK], col0, probs_t[key0:key0 + flash.KEY_CHUNK], out_t)


def split_one_slice(rng, n_tokens, dim, repeat):
    """Each step of versions 5 and 8 over one slice [n_tokens, n_tokens, dim] on one thread."""
    q, k, v = (rng.standard_normal((n_tokens, dim), dtype=np.float32) for _ in range(3))
    product_gflop = 2.0 * n_tokens * n_tokens * dim / 1e9
    # version 5: per block of Q queries, scores^T = k @ q_block^T, the softmax pass, probs @ v
    block = fused.fused_query_block(n_tokens)
    scores_t = np.empty((n_tokens, block), np.float32)
    col_sum = np.empty(block, np.float32)
    out = np.empty((n_tokens, dim), np.float32)
    q_block = q[:block] * np.float32(0.2)

    def v5_first():
        for start in range(0, n_tokens, block):
            np.matmul(k, q_block.T, out=scores_t)

    def v5_softmax():
        for start in range(0, n_tokens, block):
            fused.softmax_keys_in_place(scores_t, col_sum)

    def v5_second():
        for start in range(0, n_tokens, block):
            np.matmul(scores_t.T, v, out=out[start:start + block])
            fused.normalise_rows(out[start:start + block], col_sum)

    # version 8: per block of 64 queries
    lanes, blocks = flash.LANES, n_tokens // flash.LANES
    q_t = np.ascontiguousarray((q[:lanes] * np.float32(0.2)).T)  # [d,64]
    tile = np.empty((flash.round_up(n_tokens, flash.KEY_ROWS), lanes), np.float32)
    out_t = np.zeros((flash.round_up(dim, flash.VALUE_ROWS), lanes), np.float32)
    col_max, sums = np.empty(lanes, np.float32), np.zeros(lanes, np.float32)
    v5_first()  # scores in the tiles, so the later steps see realistic values
    _v8_scores(k, q_t, tile, col_max, 1)
    steps = {"v5 k @ q^T (BLAS)": (v5_first, product_gflop), "v5 softmax pass": (v5_softmax, None),
             "v5 probs @ v (BLAS) + normalise": (v5_second, product_gflop),
             "v8 score tiles (+ max)": (lambda: _v8_scores(k, q_t, tile, col_max, blocks), product_gflop),
             "v8 exp pass": (lambda: _v8_exp(tile, n_tokens, col_max, sums, blocks), None),
             "v8 value tiles": (lambda: _v8_values(v, tile, out_t, blocks), product_gflop),
             "v5 whole": (lambda: fused.attention_fused(q[None], k[None], v[None]), 2 * product_gflop),
             "v8 whole": (lambda: flash.attention_flash(q[None], k[None], v[None]), 2 * product_gflop)}
    results = {}
    for name, (run, gflop) in steps.items():
        run()
        seconds = thread_seconds(run, repeat)
        results[name] = {"ms": seconds * 1e3, "gflops": gflop / seconds if gflop else None,
                         "ns_per_score": None if gflop else seconds / n_tokens**2 * 1e9}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    peak = sgemm_peak_gflops()
    print(f"load average before: {load_before[0]:.2f}; sgemm peak (NumPy, 2048^3): {peak:.0f} GFLOP/s")
    rows = [compare_at(rng, *shape, args.repeat) for shape in SHAPES]
    print("\nboth threads, best wall time (GFLOP/s; ms)")
    for row in rows:
        sides = "  ".join(f"{side} {row['gflops'][side]:6.1f} ({row['seconds'][side] * 1e3:6.1f} ms)"
                          for side in row["seconds"])
        ratio = row["seconds"]["v8 flash"] / row["seconds"]["torch sdpa"]
        print(f"{row['shape']:12s} {row['dims']!s:24s} {sides}  v8/torch {ratio:.2f}  "
              f"err v5 {row['rel_err_vs_torch']['v5 fused']:.1e} v8 {row['rel_err_vs_torch']['v8 flash']:.1e}")
    set_num_threads(1)  # part 2 on one thread: BLAS too, and a pool of one worker (the caller) for "whole"
    block_pool._shared = block_pool.BlockParallelPool(1)
    split = split_one_slice(rng, 4096, 40, args.repeat)
    print("\none thread, one slice [4096, 4096, 40], thread CPU time per step")
    for name, figures in split.items():
        rate = (f"{figures['gflops']:6.1f} GFLOP/s" if figures["gflops"]
                else f"{figures['ns_per_score']:.3f} ns per score")
        print(f"  {name:34s} {figures['ms']:7.1f} ms  {rate}")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    write_json("attention_flash", {"sgemm_peak_gflops": peak, "rows": rows, "one_thread_split": split,
                                   "load_before": load_before, "load_after": load_after})


if __name__ == "__main__":
    main()
