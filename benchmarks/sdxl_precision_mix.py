"""Which of the SDXL UNet's bf16 op families cost the 1024x1024 picture its levels against diffusers.

    npdiff bench sdxl_precision_mix --reference [--seed 1]     diffusers' float32 picture + latents, saved once
    npdiff bench sdxl_precision_mix [--seed 1] [--mixes all]   npdiff's UNet at each mix, against that file

The job is benchmarks/pipeline.py's euler2-sdxl (its prompt, 2 Euler steps, guidance 5, 1024x1024, the random
SDXL-size weights of ~/.cache/npdiff/sdxl-random). --reference runs diffusers' StableDiffusionXLPipeline once
(~250 s, ~19 GiB: run it alone) and saves its 8-bit picture and its latents after the last step (what npdiff's
`.latents` holds) to ~/.cache/npdiff/sdxl-random-reference-1024px-seed<seed>.npz; pipeline.py --reference-picture reads it too.

Without --reference, one process loads the pipeline with both text encoders and the VAE in float32, then for
each mix loads the UNet again (precision "bf16" with the op families named float32 by the mix turned back to
float32: npdiff/models/precision.py's BF16_FAMILIES["bf16"], changed in this process only), runs the job and compares with the saved reference:
    max level    the largest difference of the two 8-bit pictures (the goal: <= 2)
    px > 2       how many of the 1024*1024*3 channel values differ by more than 2
    latent err   ||ours - diffusers'|| / ||diffusers'|| of the latents after the 2 steps (steadier than levels)
    unet s       the two guided UNet calls' time (a loaded machine: compare within one run only)
The families (precision.py names them): conv (the resnets' 3x3 and the resamplers' convolutions), attention
(softmax(q k^T) v in bf16 on AMX), linear (to_q/k/v/out, ff.net.2), geglu (ff.net.0.proj with its gate),
small (conv_in/out, conv_shortcut, proj_in/out, time_emb_proj, time_embedding, add_embedding).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# a module in this folder could shadow a package diffusers imports (as kernels.py once did): drop the
# folder from the path (as pipeline.py's workers do) and put it back for _common only
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

PROMPT = "a photograph of an astronaut riding a horse"  # benchmarks/pipeline.py's
CACHE = Path.home() / ".cache" / "npdiff"
STEPS, GUIDANCE = 2, 5.0

# a mix: "bf16" (every family bf16), "fp32" (the whole UNet float32), or the families that run float32 joined by
# "+" (every other family bf16), e.g. "conv+small"
DEFAULT_MIXES = "bf16,conv,attention,linear,geglu,small,fp32"
UNET_FAMILIES = ("conv", "attention", "linear", "geglu", "small")


def float32_families(mix):
    """The families a mix runs in float32: () for "bf16", None for "fp32" (the whole UNet)."""
    if mix == "fp32":
        return None
    return () if mix == "bf16" else tuple(mix.split("+"))


def reference_path(folder, size, seed):
    """~/.cache/npdiff/<model folder>-reference-<size>px-seed<seed>.npz"""
    return CACHE / f"{Path(folder).name}-reference-{size}px-seed{seed}.npz"


def make_reference(folder, size, seed):
    """diffusers' float32 picture [H,W,3] uint8 and latents [1,4,h,w] after the last step, into the npz file."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    kept = {}

    def keep_latents(pipeline, step, timestep, tensors):
        kept["latents"] = tensors["latents"].detach().float().numpy().copy()  # [1,4,h,w] after this step
        return tensors

    t0 = time.perf_counter()
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size,
               generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=keep_latents)
    seconds = time.perf_counter() - t0
    picture = np.asarray(out.images[0].convert("RGB"))                  # [H,W,3] uint8
    np.savez(reference_path(folder, size, seed), picture=picture, latents=kept["latents"])
    print(f"wrote {reference_path(folder, size, seed)} (diffusers call {seconds:.0f} s)")


def run_mixes(folder, size, seed, names):
    from npdiff import StableDiffusionXLPipeline
    from npdiff.models import UNet2DConditionModel, precision

    reference = np.load(reference_path(folder, size, seed))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, scheduler="euler", precision="fp32")
    pipe.show_progress = False
    unet_seconds = []
    unet_call = UNet2DConditionModel.__call__

    def timed_unet(*args, **kwargs):  # the class's call, timed (an instance attribute would not be called)
        t0 = time.perf_counter()
        out = unet_call(*args, **kwargs)
        unet_seconds.append(time.perf_counter() - t0)
        return out

    UNet2DConditionModel.__call__ = timed_unet
    rows = []
    for name in names:
        families = float32_families(name)
        pipe.unet = None  # the previous UNet's weights go before the next one loads
        if families is None:
            pipe.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", precision="fp32")
        else:  # "bf16" with these families taken out of it (the UNet's layers read the table as they are built)
            precision.BF16_FAMILIES["bf16"] = frozenset(precision.FAMILIES) - set(families)
            pipe.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", precision="bf16")
        unet_seconds.clear()
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size, seed=seed)
        picture = np.asarray(out.images[0].convert("RGB"))                # [H,W,3] uint8
        diff = np.abs(picture.astype(np.int16) - reference["picture"].astype(np.int16))
        latents = np.asarray(out.latents, dtype=np.float64)               # [1,4,h,w]
        ref_latents = reference["latents"].astype(np.float64)
        row = {"mix": name, "float32": "all" if families is None else ",".join(families) or "-",
               "max_level": int(diff.max()), "px_over_2": int((diff > 2).sum()),
               "latent_rel_err": float(np.linalg.norm(latents - ref_latents) / np.linalg.norm(ref_latents)),
               "unet_s": sum(unet_seconds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="make diffusers' reference file and stop")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024, help="picture height and width (default 1024)")
    parser.add_argument("--cache", default=str(CACHE / "sdxl-random"),
                        help="the SDXL pipeline folder (default: the random SDXL-size weights benchmarks/pipeline.py "
                             "completes; ~/.cache/npdiff/sdxl-tiny-random at --size 128 checks this script)")
    parser.add_argument("--mixes", default=DEFAULT_MIXES,
                        help="comma-separated: bf16, fp32, or the families run in float32 joined by '+' "
                             f"({', '.join(UNET_FAMILIES)}); default {DEFAULT_MIXES}")
    args = parser.parse_args()
    if args.reference:
        return make_reference(args.cache, args.size, args.seed)
    names = [name for name in args.mixes.split(",") if name]
    unknown = {family for name in names for family in float32_families(name) or () if family not in UNET_FAMILIES}
    if unknown:
        sys.exit(f"unknown families {sorted(unknown)}: {', '.join(UNET_FAMILIES)}")
    rows = run_mixes(args.cache, args.size, args.seed, names)
    sys.path.insert(0, str(HERE))
    from _common import print_table, write_json

    print_table(rows, [("mix", "mix", None), ("float32", "float32 families", None), ("max_level", "max level", "{}"),
                       ("px_over_2", "px > 2", "{}"), ("latent_rel_err", "latent err", "{:.2e}"),
                       ("unet_s", "unet s", "{:.1f}")])
    print(f"wrote {write_json(f'sdxl-precision-mix-seed{args.seed}', {'rows': rows})}")


if __name__ == "__main__":
    main()
