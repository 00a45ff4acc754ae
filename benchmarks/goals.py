"""The perf issue's goal table in one command: every figure its goals name, measured, then goal / measured / met.

    python benchmarks/goals.py [--parts models,pipeline,tiled,large,colours] [--repeat 2] [--tiny]
    npdiff bench goals ...                                   (the same)

About 15-18 minutes on a quiet 2-core AVX-512 machine once the random weights and OpenVINO's converted IR
are cached (estimated from each part's quiet figures; 49 minutes at load average 3-10). The first run makes
them: ~4.3 GB of weights, then ~4.3 GB of IR (about 10 minutes of conversion under load).
Parts (each side of each figure in its own fresh process, each process importing numpy first, as a
user's script does):
    models   benchmarks/models.py's workers for the SD 1.5 UNet (batch 2, 64x64 latent), the VAE decode to
             512x512 and the CLIP text encoder (batch 2 x 77), random SD 1.5-size weights: torch float32
             (the anchor), npdiff float32, npdiff bf16, OpenVINO f32 and bf16 (the torch module converted
             once to float32 IR, compiled at each precision with the same thread count as torch); seconds
             per call (best of --repeat after a warm-up), peak RSS, relative error against torch float32
    pipeline benchmarks/pipeline.py's pndm4-vae job at 512x512 (4 PNDM steps, guidance 7.5, KL decode):
             npdiff against diffusers, wall time and peak RSS of the whole process, the two pictures
    tiled    benchmarks/memory.py's tiled decode at 768x768 (2 x 2 tiles of 512, the config's tile),
             npdiff against diffusers' enable_tiling(): seconds, the two pictures in 8-bit levels
    large    npdiff's tiled decode at 2048x2048 (6 x 6 tiles): its peak RSS (about 5 of the 15 minutes)
    colours  tests/pipeline/test_bf16_pipeline.py's shipped-model check at bf16: how many of 12 prompts
             are drawn in the named colours (needs the test extra: pytest)
Every figure carries the load average (1 minute) at the start and end of the processes it came from: on a
shared machine the seconds move with the load, torch's OpenMP pool more than npdiff's or OpenVINO's,
so a ratio against torch measured under load flatters the others. Writes benchmarks/out/goals.json after
every part (a stopped run keeps what it measured) and prints two markdown tables: each network's sides,
and the goals. --tiny runs the same parts on few-channel networks at small sizes (about 3 minutes): it
checks the command end to end; its figures say nothing about the goals.
"""

import _import_first  # noqa: F401, I001  (first, as a user's script: numpy)
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _goal_table import GOAL_COLUMNS, NETWORK_COLUMNS, goal_rows, markdown_table, network_rows

HERE = Path(__file__).resolve().parent
PARTS = ["models", "pipeline", "tiled", "large", "colours"]
COMPONENTS = ["unet", "vae_decode", "text_encoder"]
# goals.py side -> (models.py side, npdiff precision); torch first: the anchor of every ratio and error
MODEL_SIDES = {"torch": ("torch", "fp32"), "npdiff": ("npdiff", "fp32"), "npdiff_bf16": ("npdiff", "bf16"),
               "openvino_f32": ("openvino_f32", "fp32"), "openvino_bf16": ("openvino_bf16", "fp32")}
# picture sides: the whole job, the tiled decode timed against diffusers', the large tiled decode
SIZES = {"sd15": {"pipeline": 512, "tiled": 768, "large": 2048},
         "tiny": {"pipeline": 64, "tiled": 192, "large": 512}}


def sibling(name):
    """Import benchmarks/<name>.py (models.py and pipeline.py take this folder off sys.path as they load)."""
    sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]


def run_json_worker(command):
    """Run a worker process; -> (its last stdout line starting with `marker` as JSON, load before/after),
    or a record {"error": ...} when it failed, so one failure leaves the other figures."""
    load_start = os.getloadavg()[0]
    completed = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    load = [load_start, os.getloadavg()[0]]
    lines = [line for line in completed.stdout.splitlines() if line.startswith(("RESULT ", "{"))]
    if completed.returncode != 0 or not lines:
        return {"error": f"worker failed (exit status {completed.returncode}): {' '.join(command[1:4])}",
                "loadavg": load}
    return dict(json.loads(lines[-1].removeprefix("RESULT ")), loadavg=load)


def measure_models(args, models, scratch):
    """Every side of the three networks: {component: {side: record}}, outputs compared with torch's."""
    profile = "tiny" if args.tiny else "sd15"
    results = {}
    for component in COMPONENTS:
        sides, outputs = {}, {}
        repeat = args.repeat if component != "text_encoder" else max(args.repeat, 10)
        for side, (worker_side, precision) in MODEL_SIDES.items():
            common = [sys.executable, models.__file__, "--worker", component, "--cache", str(args.cache),
                      "--profile", profile]
            if side == "openvino_f32":  # the conversion, once per OpenVINO release (kept beside the weights)
                progress(f"{component}: converting for OpenVINO (once; later runs reuse the IR)")
                conversion = run_json_worker(common + ["--side", "openvino_convert"])
                sides["openvino_convert"] = conversion
                if "error" in conversion:
                    sides.update(openvino_f32=conversion, openvino_bf16=conversion)
                    break
            out = Path(scratch) / f"{component}-{side}.npy"
            progress(f"{component}: {side}")
            record = run_json_worker(common + ["--side", worker_side, "--repeat", str(repeat), "--out", str(out),
                                               "--import-first", "numpy", "--precision", precision, "--no-counters"])
            if "seconds" in record:
                outputs[side] = np.load(out).astype(np.float64)
                if side != "torch" and "torch" in outputs:
                    reference = outputs["torch"]
                    record["rel_err"] = float(np.linalg.norm(outputs[side] - reference) / np.linalg.norm(reference))
                if "precision" in record:
                    record["note"] = f"runs {record['precision']}, {record['threads']} threads"
            sides[side] = record
        results[component] = sides
    return results


def measure_pipeline(args, pipeline, scratch):
    """The whole pndm4-vae job, npdiff and diffusers each in a fresh process, and the pictures' difference."""
    folder = tiny_pipeline_folder() if args.tiny else args.cache
    job_args = argparse.Namespace(size=args.sizes["pipeline"], seed=1, cache=str(folder), precision="fp32",
                                  import_first="numpy")
    if not args.tiny:
        pipeline.ensure_pipeline_folder(Path(folder))
    result, pictures = {}, {}
    for side in ("npdiff", "diffusers"):
        progress(f"whole job: {side}")
        try:
            row = pipeline.run_side("pndm4-vae", side, job_args, scratch)
        except SystemExit as failure:  # run_side exits when its worker fails
            result[side] = {"error": str(failure)}
            continue
        pictures[side] = row.pop("picture").astype(np.int16)
        row["loadavg"] = [row["loadavg_start"][0], row["loadavg_end"][0]]
        result[side] = row
    if len(pictures) == 2:
        result["max_pixel_diff"] = int(np.abs(pictures["npdiff"] - pictures["diffusers"]).max())
    return result


def tiny_pipeline_folder():
    """--tiny: the tests' tiny random pipeline (models.py's tiny networks do not fit together: the text
    encoder is wider than the UNet's cross-attention), built by diffusers in a folder removed at exit."""
    for folder in (HERE.parent / "tests", HERE.parent / "tests" / "pipeline"):
        sys.path.insert(0, str(folder))
    from tiny_sd import tiny_sd_folder

    return tiny_sd_folder()


def decode_side(args, memory, side, size, scratch):
    """One tiled decode in memory.py's worker; -> its record with peak_rss_gib, and the picture (or None)."""
    out = Path(scratch) / f"decode-{size}-{side}.npy"
    memory.warm_page_cache(Path(args.cache) / "vae")
    record = run_json_worker([sys.executable, memory.__file__, "decode", "--worker", "--size", str(size),
                              "--cache", str(args.cache), "--side", side, "--tiling", "--out", str(out)])
    if "after" in record:
        record["peak_rss_gib"] = record["after"]["VmHWM"]
        return record, np.load(out).astype(np.int16)
    return record, None


def measure_tiled(args, memory, scratch):
    size = args.sizes["tiled"]
    result, pictures = {"size": size}, {}
    for side in ("npdiff", "torch"):
        progress(f"tiled decode {size}x{size}: {side}")
        result[side], pictures[side] = decode_side(args, memory, side, size, scratch)
    if pictures["npdiff"] is not None and pictures["torch"] is not None:
        result["max_pixel_diff"] = int(np.abs(pictures["npdiff"] - pictures["torch"]).max())
    return result


def measure_large(args, memory, scratch):
    size = args.sizes["large"]
    progress(f"tiled decode {size}x{size}: npdiff (its peak RSS)")
    record, _ = decode_side(args, memory, "npdiff", size, scratch)
    return {"size": size, "npdiff": record}


def measure_colours(args):
    """The shipped model at bf16 (a pytest run of its test, which prints how many prompts came out right)."""
    progress("shipped model at bf16: the named colours")
    repository = HERE.parent
    load_start = os.getloadavg()[0]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/pipeline/test_bf16_pipeline.py", "-k", "named_colours"],
        check=False, cwd=repository, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(repository)))
    found = re.search(r"seed (\d+): colours right in (\d+) of (\d+)", completed.stdout)
    if not found:
        return {"error": f"no count in the test's output (exit status {completed.returncode})"}
    return {"seed": int(found[1]), "right": int(found[2]), "of": int(found[3]),
            "loadavg": [load_start, os.getloadavg()[0]]}


def progress(text):
    print(f"[{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}] {text} ...", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--repeat", type=int, default=2, help="timed calls per network side after the warm-up")
    parser.add_argument("--tiny", action="store_true", help="few-channel networks, small sizes: a check run")
    parser.add_argument("--cache", help="the random weights (default: benchmarks/models.py's cache folder)")
    args = parser.parse_args()
    # every refusal before any work: the random weights alone are 4.3 GB written to the cache folder
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not parts or set(parts) - set(PARTS):
        sys.exit(f"--parts takes {', '.join(PARTS)} (one or more, comma-separated); got {args.parts!r}")
    if args.repeat < 1:
        sys.exit(f"--repeat must be >= 1, got {args.repeat}")
    if args.cache is not None and Path(args.cache).exists() and not Path(args.cache).is_dir():
        sys.exit(f"--cache {args.cache} is not a folder: it names where the random weights are kept")

    models = sibling("models")
    from _common import write_json

    profile = "tiny" if args.tiny else "sd15"
    args.cache = Path(args.cache or models.CACHE_ROOT / models.CACHE_NAMES[profile])
    args.sizes = SIZES[profile]
    if set(parts) & {"models", "pipeline", "tiled", "large"}:  # colours runs the shipped model only
        models.ensure_cache(args.cache, profile)
    started, load_start = time.perf_counter(), os.getloadavg()
    measurements = {}
    header = {"command": " ".join(["python", "benchmarks/goals.py", *sys.argv[1:]]), "profile": profile,
              "import_first": "numpy", "loadavg_start": load_start, "parts": parts}

    def save():  # after every part
        payload = dict(header, measurements=measurements, seconds=time.perf_counter() - started,
                       loadavg_end=os.getloadavg(), goals=goal_rows(measurements))
        return write_json("goals" if profile == "sd15" else "goals-tiny", payload)

    with tempfile.TemporaryDirectory(prefix="npdiff-bench-goals-") as scratch:
        if "models" in parts:
            measurements["models"] = measure_models(args, models, scratch)
            save()
        if "pipeline" in parts:
            measurements["pipeline"] = measure_pipeline(args, sibling("pipeline"), scratch)
            save()
        memory = sibling("memory")
        if "tiled" in parts:
            measurements["tiled"] = measure_tiled(args, memory, scratch)
            save()
        if "large" in parts:
            measurements["large"] = measure_large(args, memory, scratch)
            save()
    if "colours" in parts:
        measurements["colours"] = measure_colours(args)
    path = save()
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{minutes:.1f} minutes; load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
          f"the end; each side in its own process, numpy imported first"
          + ("; --tiny: few-channel networks, the figures say nothing about the goals" if args.tiny else ""))
    if "models" in measurements:
        print("\n" + markdown_table(network_rows(measurements), NETWORK_COLUMNS))
    print("\n" + markdown_table(goal_rows(measurements), GOAL_COLUMNS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
