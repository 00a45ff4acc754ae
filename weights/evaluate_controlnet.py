"""Does the shipped ControlNet put the shape where the edge map says? Position error, with and without it.

    python weights/evaluate_controlnet.py --count 50

For each of COUNT random specs (seed 30_000: pictures the ControlNet never saw) a picture is drawn, its
Canny edges (npdiff.preprocess, 100/200) are the control, and the canonical prompt "a {colour} {shape}
on a {background} background" is drawn by diffusers' StableDiffusionControlNetPipeline (guidance 7.5,
20 DDIM steps, seed 0) and, for comparison, by the plain StableDiffusionPipeline from the same seed.
Position error: the distance in pixels between the centroid of the drawn shape (weights/shape_classifier's
mask: the largest group of pixels far from the border colour) and the centroid of the control's edge
pixels. A picture with no shape found counts as a miss.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import shape_classifier  # noqa: E402
import shapes_data  # noqa: E402


def control_set(count, seed=30_000):
    """-> prompts, control edge maps uint8 [N,32,32], drawn pictures uint8 [N,32,32,3]."""
    from npdiff.preprocess import canny_array
    rng = np.random.default_rng(seed)
    prompts, edges, pictures = [], [], []
    for _ in range(count):
        shape, color, background, side, center_x, center_y = shapes_data.sample_spec(rng)
        picture = np.asarray(shapes_data.draw_shape(shape, color, background, side, center_x, center_y))
        prompts.append(f"a {color} {shape} on a {background} background")
        edges.append(canny_array(picture, 100, 200))
        pictures.append(picture)
    return prompts, np.stack(edges), np.stack(pictures)


def centroid(mask):
    """bool [H,W] -> (x, y) or None when empty."""
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else (xs.mean(), ys.mean())


def position_errors(pictures, edges):
    """-> float [N]: shape centroid to edge centroid in pixels (nan where no shape is found)."""
    errors = []
    for picture, edge in zip(pictures, edges):
        shape_at, edges_at = centroid(shape_classifier.shape_mask(picture)), centroid(edge > 0)
        if shape_at is None or edges_at is None:
            errors.append(np.nan)
        else:
            errors.append(float(np.hypot(shape_at[0] - edges_at[0], shape_at[1] - edges_at[1])))
    return np.array(errors)


def summary(errors):
    found = errors[~np.isnan(errors)]
    return dict(mean=float(found.mean()) if len(found) else np.nan,
                median=float(np.median(found)) if len(found) else np.nan,
                within_2px=float((found <= 2).sum() / len(errors)), within_4px=float((found <= 4).sum() / len(errors)),
                missed=int(np.isnan(errors).sum()))


def diffusers_pictures(model, controlnet_folder, prompts, edges, guidance=7.5, steps=20, seed=0):
    """-> uint8 [N,32,32,3] with the ControlNet (controlnet_folder) or without it (None)."""
    import diffusers
    import torch
    from PIL import Image
    torch.set_num_threads(1)
    common = dict(safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
    if controlnet_folder is None:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, **common)
        extra = {}
    else:
        net = diffusers.ControlNetModel.from_pretrained(controlnet_folder, torch_dtype=torch.float32)
        pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=net, **common)
        extra = dict(image=[Image.fromarray(np.repeat(edge[:, :, None], 3, axis=2)) for edge in edges])
    pipe.set_progress_bar_config(disable=True)
    result = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                  generator=torch.Generator().manual_seed(seed), output_type="np", **extra)
    return (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)  # [N,32,32,3]


def npdiff_pictures(model, controlnet_folder, prompts, edges, guidance=7.5, steps=20, seed=0):
    """The same as diffusers_pictures, drawn by npdiff (one call per prompt, seeds seed, seed + 1, ...)."""
    from PIL import Image

    import npdiff
    if controlnet_folder is None:
        pipe = npdiff.StableDiffusionPipeline.from_pretrained(model)
    else:
        pipe = npdiff.StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=controlnet_folder)
    pipe.show_progress = False
    pictures = []
    for index, (prompt, edge) in enumerate(zip(prompts, edges)):
        extra = {} if controlnet_folder is None else dict(image=Image.fromarray(np.repeat(edge[:, :, None], 3, axis=2)))
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   seed=seed + index, output_type="np", **extra)
        pictures.append(np.clip(out.images[0], 0, 1))
    return (np.stack(pictures) * 255).round().astype(np.uint8)  # [N,32,32,3]


def report(model, controlnet_folder, count):
    prompts, edges, drawn = control_set(count)
    rows = {"drawn pictures (the ceiling)": position_errors(drawn, edges),
            "without ControlNet": position_errors(diffusers_pictures(model, None, prompts, edges), edges),
            "with ControlNet": position_errors(diffusers_pictures(model, controlnet_folder, prompts, edges), edges)}
    for name, errors in rows.items():
        print(f"{name:30s} " + " ".join(f"{key} {value:.3g}" for key, value in summary(errors).items()), flush=True)
    return {name: summary(errors) for name, errors in rows.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE / "tiny-shapes"))
    parser.add_argument("--controlnet", default=str(HERE / "tiny-shapes" / "controlnet-edges"))
    parser.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    report(args.model, args.controlnet, args.count)


if __name__ == "__main__":
    main()
