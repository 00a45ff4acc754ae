"""Teach the shipped model a concept with npdiff's LoRA training (DreamBooth-style), and judge what the word draws.

    python weights/train_lora.py                                        # purple triangle, the defaults
    python weights/train_lora.py --shape circle --color cyan --seed 1

1. Draw 8 pictures of ONE colour-and-shape concept (train_embedding.draw_concept: random sizes and places,
   backgrounds of the other colours), each with a caption file naming the background and the rare word
   ("sks" by default, DreamBooth's): "a sks on a green background", "sks, green background", ...
2. Train a LoRA on the UNet's attention projections with npdiff.training.train_lora, everything else frozen.
3. Draw "a sks on a <colour> background" for 12 seeds with the LoRA loaded from the saved kohya file
   (pipe.load_lora_weights), and read each picture with shape_classifier.py (train_embedding.judge): right when
   both the shape and its colour are the concept's. The same prompts before training are the baseline.
Writes the LoRA (and its siblings, npdiff/training/lora_files.py), the pictures and a contact sheet into --work.
"""

import npdiff  # noqa: I001  (first: it sets OpenBLAS's variables before numpy loads OpenBLAS)
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from npdiff.training import train_lora

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_embedding import MODEL_DIR, contact_sheet, draw_concept, judge


def caption_with_word(folder, word):
    """The caption files of draw_concept hold "{}" for the word: write the word in (captions as kohya reads them)."""
    for caption_file in sorted(folder.glob("*.txt")):
        caption_file.write_text(caption_file.read_text().replace("{}", word))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="triangle")
    parser.add_argument("--color", default="purple")
    parser.add_argument("--word", default="sks")
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-seeds", type=int, default=12)
    parser.add_argument("--judge-steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiny-shapes-lora"))
    args = parser.parse_args()

    folder = draw_concept(args.work / "pictures", args.shape, args.color, args.pictures, args.seed)
    caption_with_word(folder, args.word)
    pipe = npdiff.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    baseline, _ = judge(pipe, args.word, args.shape, args.color, range(args.judge_seeds), args.judge_steps,
                        args.guidance)
    out = args.work / f"{args.color}-{args.shape}.safetensors"
    started = time.perf_counter()
    result = train_lora(pipe, folder, rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                        batch_size=args.batch_size, seed=args.seed, out=out)
    seconds = time.perf_counter() - started
    pipe.load_lora_weights(out)
    rows, pictures = judge(pipe, args.word, args.shape, args.color, range(args.judge_seeds), args.judge_steps,
                           args.guidance)
    right = sum(row["right"] for row in rows)
    contact_sheet(pictures, args.work / "judged.png")
    summary = {"concept": f"{args.color} {args.shape}", "training_seconds": round(seconds, 1),
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank,
               "alpha": result.lora.alpha, "word": args.word, "loss_first_10": float(np.mean(result.losses[:10])),
               "loss_last_10": float(np.mean(result.losses[-10:])), "right": right, "of": len(rows),
               "right_before_training": sum(row["right"] for row in baseline), "rows": rows}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        print(f"seed {row['seed']:2d} {row['prompt']!r}: {row['color']} {row['shape']} on {row['background']}"
              f"{'' if row['right'] else '  (wrong)'}")
    print(f"{args.color} {args.shape}: trained {args.steps} steps in {seconds:.0f} s; right in {right} of {len(rows)} "
          f"seeds (before training: {summary['right_before_training']}); loss "
          f"{summary['loss_first_10']:.4f} -> {summary['loss_last_10']:.4f} (means of 10 steps)")


if __name__ == "__main__":
    main()
