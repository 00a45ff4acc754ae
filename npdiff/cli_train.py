"""`npdiff train-embedding DIR --token "<x>" --init-word WORD --out FILE`: textual inversion from the command line
(npdiff.training.textual_inversion does the work; this parses, checks what it can before loading the model,
and reports the files written)."""

from pathlib import Path

from npdiff.atomic_files import check_destination
from npdiff.errors import NpdiffError
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_utils import default_model_path, model_family
from npdiff.training import textual_inversion
from npdiff.training.files import output_paths
from npdiff.training.loop import check_learning_rate
from npdiff.training.pictures import OBJECT_TEMPLATES, find_pictures

DESCRIPTION = (
    "Learn a new word for the concept shown in the pictures of DIR (textual inversion): the pictures are "
    "center-cropped and resized to the model's size, flipped at random, and captioned with diffusers' "
    "templates ('a photo of a <x>', ...); AdamW trains the word's rows of the text encoder's token embedding, "
    "everything else frozen. Writes FILE (diffusers' learned_embeds layout, {token: [N,C]}), beside it "
    "<stem>-a1111.safetensors (webui's, {'emb_params': [N,C]}), <stem>.loss.csv and <stem>.loss.png, and with "
    "--checkpoint-every <stem>.checkpoint.safetensors (go on with --resume). SD 1.x/2.x models only.")


def check_count(value, name, least):
    if value < least:
        raise NpdiffError(f"{name} must be >= {least}, got {value}")


def run_train_embedding(args):
    # 1. what can be checked before the model loads: the counts, the pictures' folder, the outputs, the model's kind
    check_count(args.vectors, "--vectors", 1)
    check_count(args.steps, "--steps", 1)
    check_count(args.batch_size, "--batch-size", 1)
    check_count(args.checkpoint_every, "--checkpoint-every", 0)
    check_learning_rate(args.lr)
    if args.clip_skip is not None:
        check_count(args.clip_skip, "--clip-skip", 0)
    find_pictures(args.dir)
    for path in output_paths(args.out).values():
        check_destination(path, "--out")
    if args.resume is not None and not Path(args.resume).is_file():
        raise NpdiffError(f"--resume {args.resume}: no such file")
    model = default_model_path() if args.model is None else Path(args.model).expanduser()
    if model_family(model) == "sdxl":
        raise NpdiffError(f"--model {model}: an SDXL model; train-embedding is for SD 1.x/2.x models only for now")
    templates = OBJECT_TEMPLATES if args.template is None else args.template
    # 2. load and train (textual_inversion checks the rest, and reads every picture, before the first step)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    result = textual_inversion(pipe, args.dir, args.token, args.init_word, vectors=args.vectors, steps=args.steps,
                               lr=args.lr, batch_size=args.batch_size, seed=args.seed, out=args.out,
                               checkpoint_every=args.checkpoint_every, resume=args.resume, templates=templates,
                               clip_skip=args.clip_skip, progress=not args.quiet)
    # 3. report
    first, last = result.losses[0], result.losses[-1]
    print(f"learned {result.token!r} ({len(result.names)} vector(s)) in {len(result.losses)} steps; "
          f"loss first {first:.4f}, last {last:.4f}")
    for what, path in result.paths.items():
        print(f"  {what}: {path}")
    return 0


def add_train_embedding_command(subparsers):
    p = subparsers.add_parser("train-embedding", help="learn a new word from a few pictures (textual inversion)",
                              description=DESCRIPTION)
    p.add_argument("dir", metavar="DIR", help="folder of pictures (.png, .jpg, .jpeg, .webp, .bmp)")
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-toy>" (not already a word of the model)')
    p.add_argument("--init-word", required=True, help="one existing word (one token) to start from, e.g. toy")
    p.add_argument("--out", required=True, metavar="FILE", help="the learned embedding, a .safetensors file")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--vectors", type=int, default=1, help="vectors the word gets (default 1)")
    p.add_argument("--steps", type=int, default=500, help="training steps in all (default 500)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=int, default=1, help="pictures per step (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="write <stem>.checkpoint.safetensors every K steps (default 0: never)")
    p.add_argument("--resume", default=None, metavar="FILE", help="go on from a checkpoint to --steps in all")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="a caption template with {} for the word (repeat for several; default: diffusers' "
                        "object templates)")
    p.add_argument("--clip-skip", type=int, default=None, help="train through this text encoder layer "
                   "(diffusers' clip_skip; use the value you will generate with)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train_embedding)
    return p

