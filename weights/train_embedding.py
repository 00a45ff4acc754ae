"""Teach the shipped model a new word with npdiff's textual inversion, and judge what the word draws.

    python weights/train_embedding.py                                   # purple triangle, the defaults
    python weights/train_embedding.py --shape circle --color cyan --seed 1

1. Draw 8 pictures of ONE colour-and-shape concept (shapes_data.draw_shape: random sizes and places,
   backgrounds of the other colours), each with a caption file naming the background and "{}" for the word:
   "a {} on a green background", "{}, green background", "a green background with a {}".
2. Train the word ("<x>" by default) with npdiff.training.textual_inversion from --init-word (a word the
   shipped model never saw in training: its row is noise to the model), everything else frozen.
3. Draw "a <x> on a <colour> background" for 12 seeds (the backgrounds cycle over the other colours) with
   npdiff (DDIM, 15 steps, guidance 7, as tests/pipeline/test_shipped_model.py), and read each picture with
   shape_classifier.py: right when both the shape and its colour are the concept's.
Writes the embedding (and its siblings, npdiff/training/files.py), the pictures and a contact sheet into --work.
"""

import npdiff  # noqa: I001  (first: it sets OpenBLAS's variables before numpy loads OpenBLAS)
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from npdiff.training import textual_inversion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import shape_classifier
import shapes_data

MODEL_DIR = HERE / "tiny-shapes"
CAPTIONS = ("a {{}} on a {background} background", "{{}}, {background} background",
            "a {background} background with a {{}}")


def draw_concept(folder, shape, color, count, seed):
    """`count` pictures of one shape in one colour on other colours' backgrounds, with caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = [name for name in shapes_data.COLOR_NAMES if name != color]
    for index in range(count):
        background = backgrounds[index % len(backgrounds)]
        side = int(rng.integers(shapes_data.SIZE_RANGE[0], shapes_data.SIZE_RANGE[1] + 1))
        margin = side / 2 + 1
        center_x, center_y = rng.uniform(margin, shapes_data.IMAGE_SIZE - margin, size=2)
        picture = shapes_data.draw_shape(shape, color, background, side, float(center_x), float(center_y))
        picture.save(folder / f"{index:02d}.png")
        captions = [caption.format(background=background) for caption in CAPTIONS]
        (folder / f"{index:02d}.txt").write_text("\n".join(captions) + "\n")
    return folder


def judge(pipe, token, shape, color, seeds, steps, guidance):
    """-> (rows, right count): 'a <token> on a <bg> background' per seed, read by shape_classifier."""
    backgrounds = [name for name in shapes_data.COLOR_NAMES if name != color]
    rows, pictures = [], []
    for index, seed in enumerate(seeds):
        background = backgrounds[index % len(backgrounds)]
        prompt = f"a {token} on a {background} background"
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="np",
                   progress=False)
        picture = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)  # [H,W,3]
        found = shape_classifier.classify_picture(picture)
        right = found["shape"] == shape and found["color"] == color
        rows.append({"seed": seed, "prompt": prompt, "shape": found["shape"], "color": found["color"],
                     "background": found["background"], "right": bool(right)})
        pictures.append(picture)
    return rows, pictures


def contact_sheet(pictures, path, scale=4):
    """One row of pictures, enlarged `scale` times (nearest), -> path."""
    strip = np.concatenate(pictures, axis=1)                            # [H, N*W, 3]
    image = Image.fromarray(strip)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="triangle", choices=shapes_data.SHAPES)
    parser.add_argument("--color", default="purple", choices=shapes_data.COLOR_NAMES)
    parser.add_argument("--token", default="<x>")
    parser.add_argument("--init-word", default="thing")
    parser.add_argument("--vectors", type=int, default=1)
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-seeds", type=int, default=12)
    parser.add_argument("--judge-steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiny-shapes-embedding"))
    args = parser.parse_args()

    folder = draw_concept(args.work / "pictures", args.shape, args.color, args.pictures, args.seed)
    pipe = npdiff.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    baseline, _ = judge(pipe, args.init_word, args.shape, args.color, range(args.judge_seeds), args.judge_steps,
                        args.guidance)
    started = time.perf_counter()
    result = textual_inversion(pipe, folder, args.token, args.init_word, vectors=args.vectors, steps=args.steps,
                               lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                               out=args.work / "embedding.safetensors")
    seconds = time.perf_counter() - started
    rows, pictures = judge(pipe, args.token, args.shape, args.color, range(args.judge_seeds), args.judge_steps,
                           args.guidance)
    right = sum(row["right"] for row in rows)
    contact_sheet(pictures, args.work / "judged.png")
    summary = {"concept": f"{args.color} {args.shape}", "training_seconds": round(seconds, 1),
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "vectors": args.vectors,
               "init_word": args.init_word, "loss_first_10": float(np.mean(result.losses[:10])),
               "loss_last_10": float(np.mean(result.losses[-10:])), "right": right, "of": len(rows),
               "right_with_init_word": sum(row["right"] for row in baseline), "rows": rows}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        print(f"seed {row['seed']:2d} {row['prompt']!r}: {row['color']} {row['shape']} on {row['background']}"
              f"{'' if row['right'] else '  (wrong)'}")
    print(f"{args.color} {args.shape}: trained {args.steps} steps in {seconds:.0f} s; right in {right} of {len(rows)} "
          f"seeds (the init word {args.init_word!r} before training: {summary['right_with_init_word']}); loss "
          f"{summary['loss_first_10']:.4f} -> {summary['loss_last_10']:.4f} (means of 10 steps)")


if __name__ == "__main__":
    main()
