"""The extra cost of one ControlNet at 512x512 on the SD 1.5-size model: npdiff against diffusers.

    npdiff bench controlnet [--only controlnet,unet,unet_controlnet] [--repeat 2] [--tiny]

What is measured (each side of each row in its own process, the machine's thread count, best of --repeat
after a warm-up), with classifier-free guidance's batch 2, a 64x64 latent, 77 tokens and a 512x512
control picture:
    controlnet       ControlNetModel forward (the control picture's embedding, the copy of the UNet's
                     encoder and middle, the zero convolutions): the extra work of one ControlNet per step
    unet             the UNet alone (what a step costs without a ControlNet)
    unet_controlnet  the ControlNet, then the UNet with its residuals added: a whole step with one net
The extra cost of a ControlNet is controlnet / unet (and unet_controlnet / unet - 1 measured whole).
Weights are benchmarks/models.py's random SD 1.5 weights (~/.cache/npdiff/sd15-random) and a ControlNet
made from that UNet by diffusers' ControlNetModel.from_unet with SD's conditioning embedding, its zero
convolutions made random (a zero net would hide a wrong output), saved once in controlnet/ beside them.
The FLOP count is npdiff's kernel counters' (benchmarks/_kernel_counters.py: convolutions, linear layers,
attention matmuls); GFLOP/s of both sides use it, and "% peak" is against NumPy's sgemm on this machine.
Peak RSS is each worker process's VmHWM at its end (loading, warm-up and the timed runs; weights included).
--tiny: models.py's few-channel profile (seconds in all), to check the benchmark end to end.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, sgemm_peak_gflops, time_call, write_json
from _kernel_counters import install_counters
from _rss import proc_status_gib

import numpy as np

import models  # the random SD 1.5 weights cache (benchmarks/models.py)

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
ROWS = ["controlnet", "unet", "unet_controlnet"]
SIDES = ["npdiff", "torch"]


def ensure_controlnet(cache):
    """A ControlNet made from the cached UNet, zero convolutions random; saved once in cache/controlnet."""
    folder = cache / "controlnet"
    if (folder / "COMPLETE").is_file():
        return folder
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    torch.manual_seed(1)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(cache / "unet"))
    with torch.no_grad():
        for conv in [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, 0.5 / fan_in ** 0.5)
            conv.bias.normal_(0.0, 0.05)
    net.save_pretrained(folder, safe_serialization=True)
    (folder / "COMPLETE").write_text("ControlNetModel.from_unet, torch.manual_seed(1), zero convs random\n")
    return folder


def make_inputs(profile):
    """The UNet's inputs (models.make_inputs) and a random 0/1 control picture [2,3,8h,8w]."""
    inputs = models.make_inputs("unet", profile)
    side = 8 * inputs["sample"].shape[-1]
    rng = np.random.default_rng(1)
    inputs["control"] = (rng.random((2, 3, side, side)) < 0.1).astype(np.float32)  # sparse "edges"
    return inputs


def npdiff_callable(row, cache, inputs):
    from npdiff.models import ControlNetModel, UNet2DConditionModel
    sample, timestep, context = inputs["sample"], inputs["timestep"], inputs["context"]
    net = ControlNetModel.from_pretrained(cache / "controlnet") if row != "unet" else None
    unet = UNet2DConditionModel.from_pretrained(cache / "unet") if row != "controlnet" else None

    def run():
        if net is None:
            return unet(sample, timestep, context)
        down, mid = net(sample, timestep, context, inputs["control"])
        if unet is None:
            return np.concatenate([np.asarray(x).ravel() for x in [*down, mid]])  # all residuals, flat
        return unet(sample, timestep, context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)
    return run


def torch_callable(row, cache, inputs):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    torch.set_num_threads(os.cpu_count() or 1)
    sample, context, control = (torch.from_numpy(inputs[k]) for k in ("sample", "context", "control"))
    timestep = torch.tensor(inputs["timestep"])
    net = ControlNetModel.from_pretrained(cache / "controlnet").eval() if row != "unet" else None
    unet = UNet2DConditionModel.from_pretrained(cache / "unet").eval() if row != "controlnet" else None

    def run():
        with torch.inference_mode():
            if net is None:
                return unet(sample, timestep, context).sample.numpy()
            down, mid = net(sample, timestep, context, controlnet_cond=control, return_dict=False)
            if unet is None:
                return torch.cat([x.reshape(-1) for x in [*down, mid]]).numpy()
            return unet(sample, timestep, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample.numpy()
    return run


def worker(args):
    cache, inputs = Path(args.cache), make_inputs(args.profile)
    t0 = time.perf_counter()
    fn = (npdiff_callable if args.side == "npdiff" else torch_callable)(args.row, cache, inputs)
    result = {"load_seconds": time.perf_counter() - t0}
    out = fn()  # warm-up (Numba compiles on a first run)
    if args.side == "npdiff":  # one call counted per kernel: the FLOPs
        stats, uninstall = install_counters()
        out = fn()
        uninstall()
        result["flops"] = sum(entry["flops"] for entry in stats.values())
    np.save(args.out, np.asarray(out))
    result["seconds"] = time_call(fn, repeat=args.repeat, warmup=0)
    result["peak_rss_gib"] = proc_status_gib("VmHWM")
    print("RESULT " + json.dumps(result))


def run_worker(worker_args):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *worker_args]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.exit(f"benchmark worker failed ({completed.returncode}): {' '.join(worker_args)}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: " + ", ".join(ROWS) + " (default: all)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per side after the warm-up (best kept)")
    parser.add_argument("--tiny", action="store_true", help="few channels: checks the benchmark end to end")
    parser.add_argument("--cache", help="folder of the random weights (default: models.py's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="sd15", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows_asked = [row for row in (args.only or ",".join(ROWS)).split(",") if row]
    unknown = set(rows_asked) - set(ROWS)
    if unknown:
        sys.exit(f"unknown row(s) {sorted(unknown)}; known: {', '.join(ROWS)}")
    profile = "tiny" if args.tiny else "sd15"
    cache = Path(args.cache or models.CACHE_ROOT / models.CACHE_NAMES[profile])
    models.ensure_cache(cache, profile)
    ensure_controlnet(cache)
    peak = sgemm_peak_gflops()
    print(f"sgemm peak (NumPy, 2048^2): {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}"
          + ("; --tiny: few channels, the times say nothing about SD-size speed" if args.tiny else ""))
    results, table = {}, []
    with tempfile.TemporaryDirectory(prefix="npdiff-bench-controlnet-") as scratch:
        for row in rows_asked:
            sides = {}
            for side in SIDES:
                print(f"  {row}: {side} ...", file=sys.stderr, flush=True)
                out = Path(scratch) / f"{row}-{side}.npy"
                sides[side] = run_worker(["--row", row, "--side", side, "--cache", str(cache), "--profile", profile,
                                          "--repeat", str(args.repeat), "--out", str(out)])
                sides[side]["output"] = np.load(out)
            ours, theirs, flops = sides["npdiff"], sides["torch"], sides["npdiff"]["flops"]
            table.append({"what": row, "ours_s": ours["seconds"], "torch_s": theirs["seconds"],
                          "ratio": ours["seconds"] / theirs["seconds"], "gflop": flops / 1e9,
                          "ours_gflops": flops / ours["seconds"] / 1e9, "torch_gflops": flops / theirs["seconds"] / 1e9,
                          "ours_peak_pct": 100.0 * flops / ours["seconds"] / 1e9 / peak,
                          "ours_rss": ours["peak_rss_gib"] or float("nan"),
                          "torch_rss": theirs["peak_rss_gib"] or float("nan"),
                          "rel_err": models.rel_err(ours["output"], theirs["output"])})
            results[row] = {side: {k: v for k, v in sides[side].items() if k != "output"} for side in SIDES}
    print_table(table, [("what", "row", None), ("ours_s", "npdiff s", "{:.3f}"), ("torch_s", "diffusers s", "{:.3f}"),
                        ("ratio", "ours/diffusers", "{:.2f}"), ("gflop", "GFLOP", "{:.0f}"),
                        ("ours_gflops", "npdiff GFLOP/s", "{:.0f}"), ("torch_gflops", "diffusers GFLOP/s", "{:.0f}"),
                        ("ours_peak_pct", "npdiff % peak", "{:.0f}"), ("ours_rss", "npdiff peak RSS GiB", "{:.2f}"),
                        ("torch_rss", "diffusers peak RSS GiB", "{:.2f}"), ("rel_err", "rel err", "{:.1e}")])
    by_row = {entry["what"]: entry for entry in table}
    if "controlnet" in by_row and "unet" in by_row:
        for side, key in (("npdiff", "ours_s"), ("diffusers", "torch_s")):
            print(f"{side}: one ControlNet adds {by_row['controlnet'][key] / by_row['unet'][key]:.0%} "
                  f"of a UNet step")
    payload = {"sgemm_peak_gflops": peak, "profile": profile, "rows": table, "details": results,
               "load_average": os.getloadavg()}
    path = write_json("controlnet" if profile == "sd15" else "controlnet-" + profile, payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
