"""npdiff's kernels against the torch ops at the shapes Stable Diffusion 1.5 uses at 512x512.

    npdiff bench sd15_kernels [--quick] [--repeat N] [--only SUBSTRING]
    python benchmarks/sd15_kernels.py ...

Each row: the best wall time of our kernel and of the torch op on the same inputs (torch with 2
threads, in this process), the ratio ours/torch (below 1: npdiff is faster), the FLOP count and the
achieved GFLOP/s, and that as a fraction of the machine's sgemm peak measured at the start of this
run (NumPy's OpenBLAS, 2048^3), for the GEMM-based kernels (conv, attention, linear, geglu).
Memory-bound kernels (norms, softmax, activations, upsampling) are read by their effective
bandwidth (bytes that must be read and written / time); their FLOP counts are nominal. Attention is measured on each
path (full score matrix, chunked, and the automatic choice), and so are 3x3 stride-1 convs (conv2d's
choice, im2col + GEMM, Winograd F(4x4,3x3) and F(2x2,3x3); GFLOP/s counted as the direct conv's
2*B*C_out*C_in*9*H*W for all, so the rates compare). --quick runs a small subset.

Timing: --rounds rounds, each timing torch then every version of ours (best of --repeat runs and
of as many as fit in --min-time / rounds seconds); the best over the rounds is kept, for ours and
torch alike, so both see the same stretches of the machine's load. The sgemm peak is measured at
the start and at the end, and the higher figure is the one quoted. On a shared machine the first run after a pause waits for the scheduler to wake the worker
threads (measured: 15-25 ms for a 0.6 ms kernel while other processes kept the cores busy), so
the best of many runs is the figure that says something about the kernel.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, sgemm_peak_gflops, time_call, write_json  # noqa: E402  (npdiff first)

import numpy as np  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.kernels import conv, conv_winograd  # noqa: E402

TORCH_THREADS = 2
FLOAT_BYTES = 4


def conv_case(name, batch, c_in, c_out, size, kernel=3, stride=1, quick=False):
    padding = kernel // 2
    size_out = (size + 2 * padding - kernel) // stride + 1
    flops = 2 * batch * c_out * c_in * kernel * kernel * size_out * size_out
    nbytes = FLOAT_BYTES * (batch * c_in * size * size + batch * c_out * size_out * size_out
                            + c_out * c_in * kernel * kernel)

    def make(rng, torch, F):
        x = rng.standard_normal((batch, c_in, size, size), dtype=np.float32)
        weight = (rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32)
                  / math.sqrt(c_in * kernel * kernel))
        bias = rng.standard_normal(c_out, dtype=np.float32)
        x_t, weight_t, bias_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        ours = {"conv2d": lambda: kernels.conv2d(x, weight, bias, stride, padding)}
        if kernel == 3 and stride == 1 and c_out > conv.DIRECT_MAX_C_OUT:  # each path conv2d may pick
            ours["im2col"] = lambda: conv._conv_im2col_tiled(x, weight, bias, 1, 1, padding, padding)
            ours["winograd F(4,3)"] = lambda: conv_winograd.winograd_conv2d(x, weight, bias, (padding,) * 2, 4)
            ours["winograd F(2,3)"] = lambda: conv_winograd.winograd_conv2d(x, weight, bias, (padding,) * 2, 2)
        return ours, lambda: F.conv2d(x_t, weight_t, bias_t, stride=stride, padding=padding)

    shape = f"[{batch},{c_in},{size},{size}] {kernel}x{kernel}/{stride} ->{c_out}"
    return dict(name=name, shape=shape, flops=flops, bytes=nbytes, make=make, quick=quick, gemm=True)


def group_norm_case(name, shape, silu, quick=False):
    count = math.prod(shape)

    def make(rng, torch, F):
        x = rng.standard_normal(shape, dtype=np.float32)
        weight, bias = rng.standard_normal(shape[1], dtype=np.float32), rng.standard_normal(shape[1], dtype=np.float32)
        x_t, weight_t, bias_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        ours = {"group_norm": lambda: kernels.group_norm(x, 32, weight, bias, 1e-5, silu=silu)}
        if silu:
            return ours, lambda: F.silu(F.group_norm(x_t, 32, weight_t, bias_t, 1e-5))
        return ours, lambda: F.group_norm(x_t, 32, weight_t, bias_t, 1e-5)

    label = "+silu" if silu else ""
    return dict(name=name + label, shape=str(list(shape)), flops=(12 if silu else 7) * count,
                bytes=2 * FLOAT_BYTES * count, make=make, quick=quick)


def layer_norm_case(shape, quick=False):
    count = math.prod(shape)

    def make(rng, torch, F):
        x = rng.standard_normal(shape, dtype=np.float32)
        weight, bias = rng.standard_normal(shape[-1], dtype=np.float32), rng.standard_normal(shape[-1], dtype=np.float32)
        x_t, weight_t, bias_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        return ({"layer_norm": lambda: kernels.layer_norm(x, weight, bias)},
                lambda: F.layer_norm(x_t, (shape[-1],), weight_t, bias_t))

    return dict(name="layer_norm", shape=str(list(shape)), flops=7 * count, bytes=2 * FLOAT_BYTES * count,
                make=make, quick=quick)


def softmax_case(shape, quick=False):
    count = math.prod(shape)

    def make(rng, torch, F):
        x = rng.standard_normal(shape, dtype=np.float32)
        x_t = torch.from_numpy(x)
        return {"softmax": lambda: kernels.softmax(x, -1)}, lambda: torch.softmax(x_t, -1)

    return dict(name="softmax", shape=str(list(shape)), flops=5 * count, bytes=2 * FLOAT_BYTES * count,
                make=make, quick=quick)


def attention_case(name, batch, heads, n_queries, n_keys, dim, paths, is_causal=False, quick=False):
    """paths: "auto", "full", "chunked" (scaled_dot_product_attention's paths) or "v3 blocked" (version
    3, query blocks x key chunks with a running softmax: the chunked path before version 5)."""
    flops = 4 * batch * heads * n_queries * n_keys * dim  # q k^T and p v

    def make(rng, torch, F):
        q = rng.standard_normal((batch, heads, n_queries, dim), dtype=np.float32)
        k = rng.standard_normal((batch, heads, n_keys, dim), dtype=np.float32)
        v = rng.standard_normal((batch, heads, n_keys, dim), dtype=np.float32)
        q_t, k_t, v_t = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)
        ours = {}
        for path in paths:
            if path == "v3 blocked":
                ours[path] = lambda: kernels.attention_blocked(q, k, v, scale=1 / math.sqrt(dim),
                                                               is_causal=is_causal)
            else:
                ours[f"attention {path}"] = (lambda path=path: kernels.scaled_dot_product_attention(
                    q, k, v, is_causal=is_causal, path=path))
        return ours, lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=is_causal)

    nbytes = FLOAT_BYTES * batch * heads * (2 * n_queries + 2 * n_keys) * dim
    shape = f"q[{batch},{heads},{n_queries},{dim}] kv {n_keys}" + (" causal" if is_causal else "")
    return dict(name=name, shape=shape, flops=flops, bytes=nbytes, make=make, quick=quick, gemm=True)


def linear_case(name, rows, n_in, n_out, geglu=False, quick=False):
    flops = 2 * rows * n_in * n_out

    def make(rng, torch, F):
        x = rng.standard_normal((2, rows // 2, n_in), dtype=np.float32)
        weight = rng.standard_normal((n_out, n_in), dtype=np.float32) / math.sqrt(n_in)
        bias = rng.standard_normal(n_out, dtype=np.float32)
        x_t, weight_t, bias_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        if geglu:
            def torch_geglu():
                value, gate = F.linear(x_t, weight_t, bias_t).chunk(2, dim=-1)
                return value * F.gelu(gate)
            return {"geglu": lambda: kernels.geglu(x, weight, bias)}, torch_geglu
        return {"linear": lambda: kernels.linear(x, weight, bias)}, lambda: F.linear(x_t, weight_t, bias_t)

    nbytes = FLOAT_BYTES * (rows * n_in + n_in * n_out + rows * (n_out // 2 if geglu else n_out))
    return dict(name=name, shape=f"[{rows},{n_in}] x [{n_out},{n_in}]", flops=flops, bytes=nbytes,
                make=make, quick=quick, gemm=True)


def elementwise_case(name, shape, quick=False):
    count = math.prod(shape)

    def make(rng, torch, F):
        x = rng.standard_normal(shape, dtype=np.float32)
        x_t = torch.from_numpy(x)
        if name == "gelu":
            return {"gelu": lambda: kernels.gelu(x)}, lambda: F.gelu(x_t)
        if name == "silu":
            return {"silu": lambda: kernels.silu(x)}, lambda: F.silu(x_t)
        return ({"upsample_nearest2x": lambda: kernels.upsample_nearest2x(x)},
                lambda: F.interpolate(x_t, scale_factor=2, mode="nearest"))

    out_count = 4 * count if name == "upsample" else count
    return dict(name=name, shape=str(list(shape)), flops=None, bytes=FLOAT_BYTES * (count + out_count),
                make=make, quick=quick)


def all_cases():
    return [
        conv_case("conv unet", 2, 320, 320, 64, quick=True),
        conv_case("conv unet", 2, 640, 640, 32),
        conv_case("conv unet", 2, 1280, 1280, 16, quick=True),
        conv_case("conv unet", 2, 1280, 1280, 8),
        conv_case("conv unet up", 2, 960, 320, 64),
        conv_case("conv unet up", 2, 2560, 1280, 16),
        conv_case("conv unet down", 2, 640, 1280, 16),
        conv_case("conv unet down", 2, 320, 320, 64, stride=2),
        conv_case("conv unet 1x1", 2, 640, 320, 64, kernel=1),
        conv_case("conv unet 1x1", 2, 1280, 1280, 16, kernel=1),
        conv_case("conv vae", 1, 512, 512, 64),
        conv_case("conv vae", 1, 512, 512, 128, quick=True),
        conv_case("conv vae", 1, 256, 256, 256),
        conv_case("conv vae", 1, 128, 128, 512),
        conv_case("conv vae 1x1", 1, 256, 128, 512, kernel=1),
        conv_case("conv unet in", 2, 4, 320, 64),
        conv_case("conv unet out", 2, 320, 4, 64),
        conv_case("conv vae in", 1, 3, 128, 512),
        conv_case("conv vae out", 1, 128, 3, 512),
        group_norm_case("group_norm", (2, 320, 64, 64), silu=False),
        group_norm_case("group_norm", (2, 320, 64, 64), silu=True, quick=True),
        group_norm_case("group_norm", (1, 128, 512, 512), silu=True),
        layer_norm_case((2, 4096, 320), quick=True),
        softmax_case((2, 8, 4096, 77), quick=True),
        softmax_case((2, 8, 1024, 1024)),
        # SD 1.5's UNet at 512x512 (batch 2 for guidance, 8 heads; mid block 64 tokens) and VAE mid block
        attention_case("attention self", 2, 8, 4096, 4096, 40, ["auto", "v3 blocked"], quick=True),
        attention_case("attention self", 2, 8, 4096, 4096, 40, ["full"]),
        attention_case("attention self", 2, 8, 1024, 1024, 80, ["auto", "v3 blocked"]),
        attention_case("attention self", 2, 8, 256, 256, 160, ["auto", "v3 blocked"]),
        attention_case("attention self", 2, 8, 64, 64, 160, ["auto"]),
        attention_case("attention cross", 2, 8, 4096, 77, 40, ["auto", "v3 blocked"], quick=True),
        attention_case("attention cross", 2, 8, 1024, 77, 80, ["auto", "v3 blocked"]),
        attention_case("attention cross", 2, 8, 256, 77, 160, ["auto", "v3 blocked"]),
        attention_case("attention cross", 2, 8, 64, 77, 160, ["auto"]),
        attention_case("attention vae", 1, 1, 4096, 4096, 512, ["auto", "v3 blocked"]),
        attention_case("attention clip", 2, 12, 77, 77, 64, ["auto"], is_causal=True),
        linear_case("linear", 8192, 320, 1280, quick=True),
        linear_case("geglu", 8192, 320, 2560, geglu=True, quick=True),
        elementwise_case("gelu", (2, 4096, 1280), quick=True),
        elementwise_case("silu", (2, 1280, 32, 32)),
        elementwise_case("upsample", (1, 512, 128, 128)),
    ]


def interleaved_best_times(functions, rounds, repeat, min_time):
    """{name: best seconds}: every function is timed in each of `rounds` rounds, one after the other,
    so ours and torch see the same stretches of a shared machine's load; the best over all rounds
    is kept (each round: best of `repeat` runs and of as many as fit in min_time / rounds)."""
    best = {name: float("inf") for name in functions}
    for round_index in range(rounds):
        for name, fn in functions.items():
            seconds = time_call(fn, repeat=repeat, warmup=1 if round_index == 0 else 0,
                                min_time=min_time / rounds)
            best[name] = min(best[name], seconds)
    return best


def print_markdown(rows):
    """The table as Markdown rows, for benchmarks/RESULTS.md."""
    print()
    print("| kernel | version | shape | ours s | torch s | ours/torch | GFLOP | ours GFLOP/s | torch GFLOP/s "
          "| ours/peak | ours GB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    for row in rows:
        print(f"| {row['kernel']} | {row['version']} | {row['shape']} | {row['ours_s']:.4f} | {row['torch_s']:.4f} "
              f"| {row['ratio']:.2f} | {cell(row['gflop'], '{:.2f}')} | {cell(row['ours_gflops'], '{:.0f}')} "
              f"| {cell(row['torch_gflops'], '{:.0f}')} | {cell(row['peak_frac'], '{:.0%}')} | {row['gbytes_s']:.1f} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per kernel and round (best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating ours and torch")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of timing per kernel, split over the rounds (best run kept)")
    parser.add_argument("--only", default=None, help="only rows whose name contains this")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(TORCH_THREADS)
    peak_start = sgemm_peak_gflops()
    print(f"sgemm peak (NumPy/OpenBLAS 2048^3): {peak_start:.0f} GFLOP/s; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    rng = np.random.default_rng(0)
    rows = []
    for case in all_cases():
        if args.quick and not case["quick"]:
            continue
        if args.only and args.only not in case["name"]:
            continue
        ours_fns, torch_fn = case["make"](rng, torch, F)
        best = interleaved_best_times({"torch": torch_fn, **ours_fns}, args.rounds, args.repeat,
                                      args.min_time)
        torch_seconds = best["torch"]
        for label in ours_fns:
            seconds = best[label]
            flops = case["flops"]
            row = {"kernel": case["name"], "version": label, "shape": case["shape"],
                   "ours_s": seconds, "torch_s": torch_seconds, "ratio": seconds / torch_seconds,
                   "gflop": None if flops is None else flops / 1e9,
                   "ours_gflops": None if flops is None else flops / seconds / 1e9,
                   "torch_gflops": None if flops is None else flops / torch_seconds / 1e9,
                   "gbytes_s": case["bytes"] / seconds / 1e9, "gemm": case.get("gemm", False)}
            rows.append(row)
            print(f"  {case['name']:<18} {label:<18} {case['shape']:<32} ours {seconds:.4f} s  "
                  f"torch {torch_seconds:.4f} s  ratio {seconds / torch_seconds:.2f}", flush=True)
        del ours_fns, torch_fn
    # The peak moves with the machine's load too: measured before and after, the higher one is used.
    peak_end = sgemm_peak_gflops()
    peak = max(peak_start, peak_end)
    print(f"sgemm peak at the end: {peak_end:.0f} GFLOP/s; GFLOP/s below are quoted against {peak:.0f}")
    for row in rows:
        # only GEMM-based kernels are compared with the sgemm peak; the rest are memory-bound (GB/s)
        row["peak_frac"] = row["ours_gflops"] / peak if row["gemm"] else None
    print()
    print_table(rows, [("kernel", "kernel", None), ("version", "version", None), ("shape", "shape", None),
                       ("ours_s", "ours s", "{:.4f}"), ("torch_s", "torch s", "{:.4f}"),
                       ("ratio", "ours/torch", "{:.2f}"), ("gflop", "GFLOP", "{:.2f}"),
                       ("ours_gflops", "ours GFLOP/s", "{:.0f}"), ("torch_gflops", "torch GFLOP/s", "{:.0f}"),
                       ("peak_frac", "ours/peak", "{:.0%}"), ("gbytes_s", "ours GB/s", "{:.1f}")])
    if args.markdown:
        print_markdown(rows)
    command = "npdiff bench sd15_kernels " + " ".join(argv or sys.argv[1:])
    path = write_json("sd15_kernels", {"command": command,
                                       "sgemm_peak_gflops": peak, "sgemm_peak_start_end": [peak_start, peak_end],
                                       "torch_threads": TORCH_THREADS, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
