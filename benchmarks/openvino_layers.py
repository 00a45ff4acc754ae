"""Where OpenVINO spends one call of a network, per layer type and CPU kernel: the engine to beat, taken apart.

    python benchmarks/openvino_layers.py [--only unet,vae_decode,text_encoder] [--precision f32|bf16]
                                         [--rounds 2] [--top 15] [--tiny]

benchmarks/models.py times OpenVINO's whole call beside npdiff's and torch's; this script says where that time
goes, so the figures can be set beside npdiff's own per-kernel split (models.py prints it: "linear", "geglu",
"scaled_dot_product_attention", "group_norm_silu_conv2d", ...). It reads the same saved float32 IR that
models.py converts (benchmarks/_openvino.py; converted here, in its own process, when it is not there yet),
compiles it as models.py does (one stream, 2 threads, the precision given) with OpenVINO's per-layer
performance counters on (`PERF_COUNT`), makes one warm-up call, then per round one call and its counters
(`InferRequest.get_profiling_info()`: each executed node's type, the kernel it ran, e.g. brgconv_avx512_f32
or gemm_mlas_f32, and its real time). Per round: the call's wall time, the seconds per node type (with how
many nodes), per (type, kernel), and the slowest single nodes.

How to read it beside npdiff's split (SD 1.5 UNet): "Convolution" holds the 3x3 convs (brgconv: oneDNN's
direct convolution; npdiff runs Winograd) and the 1x1 ones, proj_in / proj_out among them (npdiff counts those
as "linear"); "FullyConnected" every linear layer, the GEGLU projections included (MLAS's sgemm, weights
packed once when the model is compiled); "Subgraph" the fused attention and element-wise chains (OpenVINO's
Snippets); "MVN" the group and layer norms. A node's time is its own thread-parallel wall time; the sum of the
nodes is close to the call's wall time.

Each process imports numpy first, as a user's script does. Share the machine with nothing else while it runs:
2 threads on 2 cores.
"""

import _import_first  # noqa: F401, I001  (first, as a user's script: numpy)
import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import models  # noqa: I001  (benchmarks/models.py: the random weights, inputs and torch modules)
from _openvino import as_arrays, convert_to_ir, ir_path, read_conversion, unsupported_reason


def convert_if_needed(component, cache, profile):
    """The saved IR for this network's inputs, converted now (in this process) when it is missing."""
    inputs = list(models.make_inputs(component, profile).values())
    path = ir_path(cache, component)
    if read_conversion(path, inputs) is None:
        convert_to_ir(lambda: models.torch_module(component, cache), inputs, path)
    return path


def profile_calls(component, cache, profile, precision, rounds):
    """-> [(wall seconds, [(node seconds, node type, kernel, node name), ...]) per round]."""
    import openvino as ov

    inputs = as_arrays(list(models.make_inputs(component, profile).values()))
    core = ov.Core()
    compiled = core.compile_model(core.read_model(ir_path(cache, component)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 2,
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer(inputs)  # warm-up: OpenVINO prepares its kernels and memory on the first call
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        request.infer(inputs)
        wall = time.perf_counter() - start
        nodes = [(info.real_time.total_seconds(), info.node_type, info.exec_type, info.node_name)
                 for info in request.get_profiling_info()]
        results.append((wall, nodes))
    return results


def print_round(number, wall, nodes, top):
    by_type, count, by_kernel = collections.Counter(), collections.Counter(), collections.Counter()
    for seconds, node_type, kernel, _ in nodes:
        by_type[node_type] += seconds
        count[node_type] += 1
        by_kernel[(node_type, kernel)] += seconds
    print(f"round {number}: call {wall:.3f} s wall, nodes' sum {sum(by_type.values()):.3f} s")
    print("  node type                     nodes  seconds")
    for node_type, seconds in by_type.most_common():
        if seconds >= 0.001:
            print(f"  {node_type:28s} {count[node_type]:6d} {seconds:8.3f}")
    print("  node type / kernel                                          seconds")
    for (node_type, kernel), seconds in by_kernel.most_common():
        if seconds >= 0.001:
            print(f"  {node_type + ' / ' + kernel:58s} {seconds:8.3f}")
    print(f"  the {top} slowest nodes:")
    for seconds, node_type, kernel, name in sorted(nodes, reverse=True)[:top]:
        print(f"  {seconds * 1e3:8.1f} ms  {node_type:16s} {kernel:28s} {name[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="unet", help="comma-separated: " + ", ".join(models.SD_COMPONENTS))
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"], help="OpenVINO's inference precision")
    parser.add_argument("--rounds", type=int, default=2, help="profiled calls after the warm-up")
    parser.add_argument("--top", type=int, default=15, help="how many of the slowest nodes to list")
    parser.add_argument("--tiny", action="store_true", help="the few-channel networks: checks the command only")
    parser.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)  # the conversion's own process
    args = parser.parse_args()
    profile = "tiny" if args.tiny else "sd15"
    cache = models.CACHE_ROOT / models.CACHE_NAMES[profile]
    components = [name for name in args.only.split(",") if name]
    unknown = set(components) - set(models.SD_COMPONENTS)
    if unknown or args.rounds < 1 or args.top < 0:
        sys.exit(f"unknown component(s) {sorted(unknown)}; known: {', '.join(models.SD_COMPONENTS)}" if unknown
                 else "--rounds must be at least 1 and --top at least 0")
    if args.convert:  # the child: torch and the converter in a process of their own (their memory goes with it)
        for component in components:
            convert_if_needed(component, cache, profile)
        return
    reason = unsupported_reason(args.precision)
    if reason:
        sys.exit(reason)
    models.ensure_cache(cache, profile)
    subprocess.run([sys.executable, __file__, "--convert", "--only", args.only] + (["--tiny"] if args.tiny else []),
                   check=True)
    print(f"OpenVINO {args.precision}, 2 threads, {profile} weights; load average {os.getloadavg()[0]:.1f}")
    for component in components:
        print(f"\n## {component}")
        for number, (wall, nodes) in enumerate(profile_calls(component, cache, profile, args.precision, args.rounds)):
            print_round(number, wall, nodes, args.top)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
