"""The whole job as a user runs it: npdiff and diffusers text-to-image, each in a fresh process.

    npdiff bench pipeline [--job pndm20-vae,lcm4-taesd] [--size 512] [--sides npdiff,diffusers] [--seed 1]
    npdiff bench pipeline --sdxl [--size 1024] [--tiny]  the SDXL job below (--tiny: a check run in a minute
                                                         on few-channel SDXL networks, 128x128)

Jobs (one prompt, one picture, float32 on the CPU, each library's default thread count):
    pndm20-vae   20 PNDM steps, guidance 7.5 (two UNet rows per step), AutoencoderKL decode: the default SD job
    lcm4-taesd   4 LCM steps, guidance 1 (no classifier-free guidance, as with an LCM-LoRA), TAESD decode
    pndm4-vae    4 PNDM steps, guidance 7.5, AutoencoderKL decode (the job of the earlier whole-job figures)
    euler2-sdxl  (--sdxl) SDXL base 1.0's networks: 2 Euler steps, guidance 5 (two UNet rows per step), its
                 KL VAE decode to 1024x1024; prompt and prompt_2 the same
The SD model is benchmarks/models.py's random SD 1.5-size weights (~/.cache/npdiff/sd15-random), completed
here into a pipeline folder (tokenizer/, scheduler/ with SD 1.5's PNDM config, model_index.json) plus a
random TAESD (diffusers' AutoencoderTiny default config, the real TAESD's architecture) in taesd/. The
SDXL model is models.py's random SDXL-size weights (~/.cache/npdiff/sdxl-random: unet, vae, text_encoder,
text_encoder_2, float32, 13.9 GB), completed the same way (tokenizer/, tokenizer_2/ padded with "!" as
SDXL's, scheduler/ with SDXL's Euler config, model_index.json of a StableDiffusionXLPipeline).
lcm4-taesd runs the same random UNet with the LCM scheduler: an LCM-LoRA changes weight values only,
not the work per step, so the cost is that of a real LCM-LoRA job.

Each side of each job is one fresh `python` process (a worker of this script) that imports numpy first, as
a user's script does (--import-first npdiff: npdiff first, the order earlier figures used), then its library,
loads the pipeline from the folder and makes the picture as a user would: npdiff with
StableDiffusionPipeline.from_pretrained(folder, scheduler=...) and pipe.vae = AutoencoderTiny.from_pretrained
(what `npdiff generate --vae` does); diffusers with StableDiffusionPipeline.from_pretrained(folder,
scheduler=LCMScheduler.from_config(...), vae=AutoencoderTiny.from_pretrained(...)). Measured:
    wall s       the process from launch to exit (interpreter start, imports and loading included)
    load s       launch to pipeline ready (interpreter start + imports + loading the weights)
    denoise s    the pipeline call up to the decoder (text encoding, noise, every UNet step)
    decode s     the VAE / TAESD decode; the rest of the call (to a PIL picture) is in "call s" only
    phases       import, load, denoise, decode, finish (the rest of the call and the picture as an
                 array; the pipeline object is freed when the job function returns, before this mark,
                 so "after finish" is the process without the model)
    RSS by phase VmRSS after each phase (and its anonymous and file-backed parts: RssFile is weights
                 mapped from the safetensors files) and VmHWM (the peak) within it, from /proc/self/status
                 in the child, the peak reset (clear_refs 5) at each phase boundary
    where the bytes go  at (nearly) each phase's peak, sampled every 50 ms: RssFile (weights mapped from
                 the files: npdiff's float32 weights, diffusers' safetensors maps) and RssAnon (activations,
                 weights held in private memory, interpreter and libraries: ~0.1 GiB for npdiff after
                 import, ~0.4 GiB for torch)
    peak RSS     the largest phase peak (clear_refs also resets the kernel's ru_maxrss, so os.wait4's
                 ru_maxrss of the child, also taken, covers only the time after the last reset)
The weight files are read once before each process starts, so both sides find them in the page cache.
The two pictures (same seed: npdiff's TorchGenerator draws what a CPU torch.Generator draws) are compared
pixel by pixel. The load average is read when each process starts and ends.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _rss import proc_status_gib

# This folder is first on sys.path (the script's own); a module here could shadow a package diffusers imports (as
# kernels.py once did; tests/test_benchmark_names.py now forbids such names): a worker drops it (the parent puts it back
# below, for models.py and _common.py).
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

T0 = time.perf_counter()  # the worker's clock (a worker is this file run with --worker)

JOBS = {
    "pndm20-vae": {"scheduler": "pndm", "steps": 20, "guidance": 7.5, "vae": "kl"},
    "lcm4-taesd": {"scheduler": "lcm", "steps": 4, "guidance": 1.0, "vae": "taesd"},
    "pndm4-vae": {"scheduler": "pndm", "steps": 4, "guidance": 7.5, "vae": "kl"},
    "euler2-sdxl": {"scheduler": "euler", "steps": 2, "guidance": 5.0, "vae": "kl", "sdxl": True},
}
SIDES = ["npdiff", "diffusers"]
PROMPT = "a photograph of an astronaut riding a horse"
# The earlier whole-job figures of pndm4-vae at 512x512 (a quiet machine): printed beside this run's.
EARLIER_PNDM4 = {"npdiff": {"wall_s": 86.0, "load_s": 8.5, "peak_rss_gib": 8.06},
                 "diffusers": {"wall_s": 69.0, "peak_rss_gib": 5.41},
                 "npdiff_read_loader": {"wall_s": 88.9, "peak_rss_gib": 4.96, "diffusers_wall_s": 82.5,
                                        "diffusers_peak_rss_gib": 5.44}}
PHASES = ["import", "load", "denoise", "decode", "finish"]


# ---------------------------------------------------------------------------------------------
# Worker: one side of one job in a fresh process (imports nothing heavy before its clock runs)
# ---------------------------------------------------------------------------------------------
class PhaseClock:
    """mark(name) ends a phase: its end time (since T0), RSS now, and the peak within it; then resets the peak.

    A sampler thread reads RssAnon and RssFile every SAMPLE_S seconds and keeps, per phase, the sample
    with the largest sum: the split of (nearly) the phase's peak into file-backed pages (weights mapped
    from the safetensors files) and anonymous memory (activations, weights copied into private memory,
    the interpreter and libraries). VmHWM stays the exact peak; the sample can only miss a spike shorter
    than SAMPLE_S."""

    SAMPLE_S = 0.05

    def __init__(self):
        import threading

        self.marks = {}
        self.top = (0.0, None, None)  # (anon + file, anon, file) of the largest sample in this phase
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            anon, file = proc_status_gib("RssAnon"), proc_status_gib("RssFile")
            if anon is None or file is None:
                return
            with self.lock:
                if anon + file > self.top[0]:
                    self.top = (anon + file, anon, file)
            time.sleep(self.SAMPLE_S)

    def mark(self, name):
        with self.lock:
            _, top_anon, top_file = self.top
            self.top = (0.0, None, None)
        self.marks[name] = {"t": time.perf_counter() - T0, "rss_gib": proc_status_gib("VmRSS"),
                            "peak_gib": proc_status_gib("VmHWM"), "anon_gib": proc_status_gib("RssAnon"),
                            "file_gib": proc_status_gib("RssFile"), "peak_anon_gib": top_anon,
                            "peak_file_gib": top_file}
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        except OSError:
            pass


def timed_decode(vae, clock):
    """Wrap vae.decode (the one the pipeline calls) to mark the end of denoising and of decoding."""
    decode = vae.decode

    def wrapped(*args, **kwargs):
        clock.mark("denoise")
        out = decode(*args, **kwargs)
        clock.mark("decode")
        return out

    vae.decode = wrapped


def npdiff_job(job, cache, size, seed, clock, precision="fp32"):
    from npdiff import StableDiffusionPipeline
    from npdiff.models import AutoencoderTiny

    clock.mark("import")
    if job.get("sdxl"):
        from npdiff import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(cache, scheduler=job["scheduler"], precision=precision)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(cache, scheduler=job["scheduler"], precision=precision)
    if job["vae"] == "taesd":
        pipe.vae = AutoencoderTiny.from_pretrained(cache / "taesd")
    clock.mark("load")
    timed_decode(pipe.vae, clock)
    out = pipe(PROMPT, num_inference_steps=job["steps"], guidance_scale=job["guidance"], height=size, width=size,
               seed=seed)
    return out.images[0]


def diffusers_job(job, cache, size, seed, clock):
    import torch
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    clock.mark("import")
    extra = {}
    if job["scheduler"] == "lcm":
        extra["scheduler"] = LCMScheduler.from_config(LCMScheduler.load_config(cache, subfolder="scheduler"))
    if job["vae"] == "taesd":
        extra["vae"] = AutoencoderTiny.from_pretrained(cache / "taesd")
    if job.get("sdxl"):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(cache)  # its scheduler/: SDXL's Euler
    else:
        pipe = StableDiffusionPipeline.from_pretrained(cache, safety_checker=None, requires_safety_checker=False,
                                                       **extra)
    clock.mark("load")
    timed_decode(pipe.vae, clock)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=job["steps"], guidance_scale=job["guidance"], height=size, width=size,
               generator=generator)
    return out.images[0]


def worker(args):
    launched = time.time() - (time.perf_counter() - T0) - args.launched  # interpreter start before T0
    clock = PhaseClock()
    import importlib

    importlib.import_module(args.import_first)  # what a user's script imports first (numpy, nearly always)
    if args.side == "npdiff":
        picture = npdiff_job(JOBS[args.job], Path(args.cache), args.size, args.seed, clock, args.precision)
    else:
        picture = diffusers_job(JOBS[args.job], Path(args.cache), args.size, args.seed, clock)
    import numpy as np

    pixels = np.asarray(picture.convert("RGB"))  # [H,W,3] uint8
    clock.mark("finish")
    np.save(args.out + ".npy", pixels)
    Path(args.out + ".json").write_text(json.dumps({"startup_s": launched, "marks": clock.marks}))


# ---------------------------------------------------------------------------------------------
# The pipeline folder: benchmarks/models.py's random weights + tokenizer, scheduler, index, TAESD
# ---------------------------------------------------------------------------------------------
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
    "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def ensure_sdxl_pipeline_folder(cache, profile="sdxl"):
    """Complete models.py's SDXL-size cache (profile "sdxl", or "sdxl-tiny") into an SDXL pipeline folder
    (the weights untouched)."""
    from models import ensure_cache
    from npdiff.clip_vocab import write_clip_tokenizer_folder
    from npdiff.loading.single_file_sdxl import SDXL_SCHEDULER_CONFIG

    ensure_cache(cache, profile)
    if not (cache / "tokenizer" / "vocab.json").is_file():
        write_clip_tokenizer_folder(cache / "tokenizer")
    if not (cache / "tokenizer_2" / "vocab.json").is_file():
        write_clip_tokenizer_folder(cache / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
    if not (cache / "scheduler" / "scheduler_config.json").is_file():
        (cache / "scheduler").mkdir(exist_ok=True)
        (cache / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_CONFIG, indent=2))
    if not (cache / "model_index.json").is_file():
        (cache / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2))


def ensure_pipeline_folder(cache):
    """Complete the SD 1.5-size cache into a pipeline folder (each part made once, the weights untouched)."""
    from models import ensure_cache
    from npdiff.clip_vocab import write_clip_tokenizer_folder
    from npdiff.loading.components import SD15_SCHEDULER_CONFIG

    ensure_cache(cache)
    if not (cache / "tokenizer" / "vocab.json").is_file():
        write_clip_tokenizer_folder(cache / "tokenizer")
    if not (cache / "scheduler" / "scheduler_config.json").is_file():
        (cache / "scheduler").mkdir(exist_ok=True)
        (cache / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    if not (cache / "model_index.json").is_file():
        (cache / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    if not (cache / "taesd" / "config.json").is_file():
        import torch
        from diffusers import AutoencoderTiny

        print(f"  making a random TAESD in {cache / 'taesd'} ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(cache / "taesd", safe_serialization=True)  # the real TAESD's config


# ---------------------------------------------------------------------------------------------
# Parent: one fresh process per side and job
# ---------------------------------------------------------------------------------------------
def warm_page_cache(cache):
    """Read every weight file once so each side starts with them in the page cache: npdiff reads every page
    at load (its NaN/Inf check), diffusers on its first call, so a cold cache would bill the disk to
    whichever side comes first, in a different phase for each."""
    for path in sorted(Path(cache).rglob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def run_side(job, side, args, scratch):
    out = str(Path(scratch) / f"{job}-{side}")
    warm_page_cache(args.cache)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--job", job, "--side", side,
               "--size", str(args.size), "--seed", str(args.seed), "--cache", args.cache, "--out", out,
               "--precision", args.precision, "--import-first", args.import_first]
    print(f"--- {job} {args.size}x{args.size}: {side} (fresh process)", file=sys.stderr, flush=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    process = subprocess.Popen(command + ["--launched", repr(time.time())])
    _, status, usage = os.wait4(process.pid, 0)  # the rusage of this child alone
    wall = time.perf_counter() - t0
    process.returncode = os.waitstatus_to_exitcode(status)
    load_end = os.getloadavg()
    if process.returncode != 0:
        sys.exit(f"{side} {job} failed (exit status {process.returncode})")
    import numpy as np

    result = json.loads(Path(out + ".json").read_text())
    marks = result["marks"]
    end = marks["finish"]["t"]
    return {
        "job": job, "side": side, "size": args.size, "wall_s": wall,
        "load_s": result["startup_s"] + marks["load"]["t"], "import_s": result["startup_s"] + marks["import"]["t"],
        "call_s": end - marks["load"]["t"], "denoise_s": marks["denoise"]["t"] - marks["load"]["t"],
        "decode_s": marks["decode"]["t"] - marks["denoise"]["t"], "exit_s": wall - result["startup_s"] - end,
        # the resets at phase boundaries also reset the kernel's ru_maxrss (both are the mm's hiwater_rss):
        # the process's peak is the largest phase peak, or ru_maxrss (Linux: KiB) since the last reset
        "peak_rss_gib": max([usage.ru_maxrss / 2**20] + [marks[name]["peak_gib"] or 0.0 for name in PHASES]),
        "rss_by_phase": {name: marks[name] for name in PHASES},
        "loadavg_start": load_start, "loadavg_end": load_end, "picture": np.load(out + ".npy"),
    }


def compare(rows, reference_picture=None):
    """Ratios npdiff/diffusers and the pixel difference, onto the npdiff row of each job. reference_picture:
    diffusers' picture [H,W,3] uint8 saved earlier, compared with npdiff's when diffusers' side did not run."""
    import numpy as np

    by_job = {}
    for row in rows:
        by_job.setdefault(row["job"], {})[row["side"]] = row
    for sides in by_job.values():
        for row in sides.values():
            row["picture_std"] = float(row["picture"].std())
        ours, theirs = sides.get("npdiff"), sides.get("diffusers")
        if ours is not None and theirs is not None:
            ours["wall_ratio"] = ours["wall_s"] / theirs["wall_s"]
            ours["rss_ratio"] = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
        reference = theirs["picture"] if theirs is not None else reference_picture
        if ours is None or reference is None:
            continue
        if reference.shape != ours["picture"].shape:
            sys.exit(f"--reference-picture has shape {reference.shape}; npdiff's picture {ours['picture'].shape}")
        diff = np.abs(ours["picture"].astype(np.int16) - reference.astype(np.int16))
        ours["max_pixel_diff"] = int(diff.max())
        ours["pixels_over_2"] = float((diff > 2).mean())


def print_results(rows):
    from _common import print_table

    for row in rows:
        row["loadavg"] = f"{row['loadavg_start'][0]:.1f} -> {row['loadavg_end'][0]:.1f}"
    print()
    print_table(rows, [
        ("job", "job", None), ("side", "side", None), ("wall_s", "wall s", "{:.1f}"), ("load_s", "load s", "{:.1f}"),
        ("import_s", "of it imports", "{:.1f}"), ("denoise_s", "denoise s", "{:.1f}"),
        ("decode_s", "decode s", "{:.1f}"), ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
        ("wall_ratio", "wall npdiff/diffusers", "{:.2f}"), ("rss_ratio", "RSS npdiff/diffusers", "{:.2f}"),
        ("max_pixel_diff", "max px diff", "{}"), ("pixels_over_2", "px > 2", "{:.1e}"),
        ("picture_std", "picture std", "{:.1f}"), ("loadavg", "load avg", None),
    ])
    print("\nRSS by phase (GiB): 'peak' = VmHWM within the phase, 'after' = VmRSS at its end (RssAnon+RssFile)")
    phase_rows = []
    for row in rows:
        entry = {"job": row["job"], "side": row["side"]}
        for name in PHASES:
            mark = row["rss_by_phase"][name]
            entry[f"{name}_after"] = mark["rss_gib"]
            entry[f"{name}_peak"] = mark["peak_gib"]
            if mark["anon_gib"] is not None:
                entry[f"{name}_after"] = f"{mark['rss_gib']:.2f} ({mark['anon_gib']:.2f}+{mark['file_gib']:.2f})"
        phase_rows.append(entry)
    columns = [("job", "job", None), ("side", "side", None)]
    for name in PHASES:
        columns += [(f"{name}_peak", f"{name} peak", "{:.2f}"), (f"{name}_after", "after (anon+file)", None)]
    print_table(phase_rows, columns)
    print("\nWhere the bytes go at each phase's peak (GiB, sampled every 50 ms): file = weights mapped from the "
          "safetensors files (RssFile), anon = activations + weights in private memory + interpreter (RssAnon)")
    split_rows = []
    for row in rows:
        entry = {"job": row["job"], "side": row["side"]}
        for name in PHASES:
            mark = row["rss_by_phase"][name]
            if mark.get("peak_anon_gib") is not None:
                entry[name] = f"{mark['peak_file_gib']:.2f} file + {mark['peak_anon_gib']:.2f} anon"
        split_rows.append(entry)
    print_table(split_rows, [("job", "job", None), ("side", "side", None)] + [(name, name, None) for name in PHASES])
    if any(row["job"] == "pndm4-vae" and row["size"] == 512 for row in rows):
        print(f"\nearlier pndm4-vae 512x512 figures (quiet machine): {json.dumps(EARLIER_PNDM4)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="pndm20-vae,lcm4-taesd", help="comma-separated: " + ", ".join(JOBS))
    parser.add_argument("--size", type=int, default=None,
                        help="picture height and width in pixels (default 512; with --sdxl 1024)")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL job (euler2-sdxl) on SDXL-size weights")
    parser.add_argument("--tiny", action="store_true", help="with --sdxl: few-channel SDXL networks, a check run")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: npdiff, diffusers (default both)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16x3", "mixed"],
                        help="the npdiff side's precision (bf16: weights packed in bfloat16 at load; mixed: "
                             "the UNet's bf16 families of npdiff/models/precision.py, the rest float32)")
    parser.add_argument("--reference-picture", default=None,
                        help="with --sides npdiff: diffusers' picture saved earlier to compare with (an .npz with "
                             "'picture' [H,W,3] uint8, as benchmarks/sdxl_precision_mix.py --reference writes)")
    parser.add_argument("--import-first", choices=("numpy", "npdiff"), default="numpy",
                        help="what the npdiff side's process imports first, as a user's script (default numpy)")
    parser.add_argument("--cache", default=None, help="folder of the random SD 1.5-size weights "
                        "(default ~/.cache/npdiff/sd15-random, as benchmarks/models.py)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)  # before importing npdiff or numpy here: the worker imports only its own library
    from models import CACHE_ROOT, CACHE_NAMES, DEFAULT_CACHE

    if args.sdxl:
        args.job = "euler2-sdxl" if args.job == parser.get_default("job") else args.job
        args.cache = args.cache or str(CACHE_ROOT / CACHE_NAMES["sdxl-tiny" if args.tiny else "sdxl"])
    args.size = args.size or (1024 if args.sdxl and not args.tiny else 128 if args.tiny else 512)
    args.cache = args.cache or str(DEFAULT_CACHE)
    jobs = [job for job in args.job.split(",") if job]
    sides = [side for side in args.sides.split(",") if side]
    unknown = (set(jobs) - set(JOBS)) | (set(sides) - set(SIDES))
    if unknown or args.size % 8 or args.size < 64:
        sys.exit(f"unknown job or side {sorted(unknown)} (jobs: {', '.join(JOBS)}; sides: {', '.join(SIDES)}), "
                 f"or --size {args.size} not a multiple of 8 >= 64")
    if any(JOBS[job].get("sdxl") for job in jobs) != bool(args.sdxl) or len({bool(JOBS[j].get("sdxl")) for j in jobs}) > 1:
        sys.exit("the SDXL job (euler2-sdxl) runs alone, with --sdxl; the SD jobs without it")
    if args.sdxl:
        ensure_sdxl_pipeline_folder(Path(args.cache), "sdxl-tiny" if args.tiny else "sdxl")
    else:
        ensure_pipeline_folder(Path(args.cache))
    import tempfile

    from _common import write_json

    reference = None
    if args.reference_picture:  # read before any side runs: a wrong file is an error now, not after the job
        import numpy as np

        reference = np.load(args.reference_picture)["picture"]  # [H,W,3] uint8

    topic = f"pipeline-{'+'.join(jobs)}-{args.size}px"

    def save(rows):  # after every process, so a run stopped part-way keeps what it measured
        return write_json(topic, {"prompt": PROMPT, "seed": args.seed, "jobs": {job: JOBS[job] for job in jobs},
                                  "rows": [{k: v for k, v in row.items() if k != "picture"} for row in rows],
                                  "earlier_pndm4_vae_512": EARLIER_PNDM4})

    rows = []
    with tempfile.TemporaryDirectory(prefix="npdiff-bench-pipeline-") as scratch:
        for job in jobs:
            for side in sides:
                rows.append(run_side(job, side, args, scratch))
                save(rows)
    compare(rows, reference)
    print_results(rows)
    print(f"\nwrote {save(rows)}")


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
