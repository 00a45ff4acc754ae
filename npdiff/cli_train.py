"""`npdiff train-embedding DIR --token "<x>" --init-word WORD --out FILE`: textual inversion from the command line,
and `npdiff train-lora DIR --out FILE [--prompt TEXT]`: LoRA training (npdiff.training.textual_inversion and
npdiff.training.train_lora do the work; this parses, checks what it can before loading the model, and reports
the files written)."""

import math
import sys
from pathlib import Path

from npdiff.atomic_files import check_destination
from npdiff.errors import NpdiffError
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_utils import default_model_path, model_family, model_size_config, model_tokenizer
from npdiff.textual_inversion import check_token, new_token_names
from npdiff.training import textual_inversion, train_lora
from npdiff.training.files import check_outputs_apart, output_paths
from npdiff.training.loop import check_learning_rate, check_training_seed
from npdiff.training.lora_files import lora_output_paths
from npdiff.training.lora_train import check_prompt, lora_captions
from npdiff.training.memory import check_training_memory
from npdiff.training.textual_inversion import check_init_word
from npdiff.training.pictures import OBJECT_TEMPLATES, check_same_size, find_pictures

DESCRIPTION = (
    "Learn a new word for the concept shown in the pictures of DIR (textual inversion): the pictures are "
    "center-cropped and resized to the model's size, flipped at random, and captioned with diffusers' "
    "templates ('a photo of a <x>', ...); AdamW trains the word's rows of the text encoder's token embedding, "
    "everything else frozen. Writes FILE (diffusers' learned_embeds layout, {token: [N,C]}), beside it "
    "<stem>-a1111.safetensors (webui's, {'emb_params': [N,C]}), <stem>.loss.csv and <stem>.loss.png, and with "
    "--checkpoint-every <stem>.checkpoint.safetensors (go on with --resume). SD 1.x/2.x models only.")


def add_loop_options(p):
    """The options both training commands take: the model, the loop's length and batch, checkpoints, clip skip."""
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--steps", type=int, default=500, help="training steps in all (default 500)")
    p.add_argument("--batch-size", type=int, default=1, help="pictures per step (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="write <stem>.checkpoint.safetensors every K steps (default 0: never)")
    p.add_argument("--resume", default=None, metavar="FILE", help="go on from a checkpoint to --steps in all")
    p.add_argument("--clip-skip", type=int, default=None, help="train through this text encoder layer "
                   "(diffusers' clip_skip; use the value you will generate with)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--mixed-sizes", action="store_true", help="take pictures of different sizes, each center-cropped "
                   "and resized on its own (refused without it)")


def check_loop_options(args):
    """What add_loop_options' values must be, the learning rate, and --out as given ("dir/" names a folder:
    refused, where the paths made from it would drop the slash); before the model loads."""
    check_destination(args.out, "--out")
    check_count(args.steps, "--steps", 1)
    check_count(args.batch_size, "--batch-size", 1)
    check_count(args.checkpoint_every, "--checkpoint-every", 0)
    check_learning_rate(args.lr)
    check_training_seed(args.seed)
    if args.clip_skip is not None:
        check_count(args.clip_skip, "--clip-skip", 0)
    check_resume_file(args.resume)


def check_count(value, name, least):
    if value < least:
        raise NpdiffError(f"{name} must be >= {least}, got {value}")


def trained_model_path(args):
    """The --model, or the shipped model's path."""
    return default_model_path() if args.model is None else Path(args.model).expanduser()


def trainable_model_path(args, command):
    """The --model (default: the shipped one), refused when it is SDXL (from its layout: nothing loaded)."""
    model = trained_model_path(args)
    if model_family(model) == "sdxl":
        raise NpdiffError(f"--model {model}: an SDXL model; {command} is for SD 1.x/2.x models only for now")
    return model


def load_trainable_model(args, command):
    """The --model (default: the shipped one), refused when it is SDXL, loaded."""
    return StableDiffusionPipeline.from_pretrained(trainable_model_path(args, command))


def check_batch_memory(args, command, pictures):
    """--batch-size against the pictures and the memory (training/memory.py), from the model's configs: refused
    before the model loads when the run cannot fit; a batch larger than the folder is said (drawn with
    replacement, some pictures come more than once a step) and kept."""
    unet_config, vae_factor = model_size_config(trainable_model_path(args, command))
    check_training_memory(unet_config, vae_factor, len(pictures), args.batch_size)
    if args.batch_size > len(pictures):
        print(f"npdiff: note: --batch-size {args.batch_size} is more than the {len(pictures)} picture(s) in "
              f"{args.dir}: each step draws its batch with replacement, so some pictures come more than once "
              "(each with its own flip, caption, timestep and noise)", file=sys.stderr)


def check_new_word(args):
    """--token (not a word of the model yet, nor token_1, ... for --vectors) and --init-word (one token), from
    the model's tokenizer files alone: refused before the weights load, with textual_inversion's messages."""
    model = trainable_model_path(args, "train-embedding")
    tokenizer = model_tokenizer(model)
    new_token_names(tokenizer, check_token(args.token), args.vectors)
    check_init_word(tokenizer, args.init_word)


def check_resume_file(resume):
    if resume is not None and not Path(resume).is_file():
        raise NpdiffError(f"--resume {resume}: no such file")


def report_training(what, losses, paths):
    print(f"{what} in {len(losses)} steps; loss first {losses[0]:.4f}, last {losses[-1]:.4f}")
    for name, path in paths.items():
        print(f"  {name}: {path}")


def run_train_embedding(args):
    # 1. what can be checked before the model loads: the counts, the pictures' folder, the outputs, the model's
    #    kind, the new word and the init word (the tokenizer's files are read, no weight), the memory
    check_count(args.vectors, "--vectors", 1)
    check_loop_options(args)
    pictures = find_pictures(args.dir)
    check_same_size(pictures, args.mixed_sizes)
    for path in output_paths(args.out).values():
        check_destination(path, "--out")
    check_outputs_apart(output_paths(args.out).values(), args.dir, trained_model_path(args), "--out")
    templates = OBJECT_TEMPLATES if args.template is None else args.template
    check_new_word(args)
    check_batch_memory(args, "train-embedding", pictures)
    # 2. load and train (textual_inversion checks the rest, and reads every picture, before the first step)
    pipe = load_trainable_model(args, "train-embedding")
    result = textual_inversion(pipe, args.dir, args.token, args.init_word, vectors=args.vectors, steps=args.steps,
                               lr=args.lr, batch_size=args.batch_size, seed=args.seed, out=args.out,
                               checkpoint_every=args.checkpoint_every, resume=args.resume, templates=templates,
                               clip_skip=args.clip_skip, progress=not args.quiet,
                               mixed_sizes=args.mixed_sizes)
    # 3. report
    report_training(f"learned {result.token!r} ({len(result.names)} vector(s))", result.losses, result.paths)
    return 0


def add_train_embedding_command(subparsers):
    p = subparsers.add_parser("train-embedding", help="learn a new word from a few pictures (textual inversion)",
                              description=DESCRIPTION)
    p.add_argument("dir", metavar="DIR", help="folder of pictures (.png, .jpg, .jpeg, .webp, .bmp)")
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-toy>" (not already a word of the model)')
    p.add_argument("--init-word", required=True, help="one existing word (one token) to start from, e.g. toy")
    p.add_argument("--out", required=True, metavar="FILE", help="the learned embedding, a .safetensors file")
    p.add_argument("--vectors", type=int, default=1, help="vectors the word gets (default 1)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="a caption template with {} for the word (repeat for several; default: diffusers' "
                        "object templates)")
    add_loop_options(p)
    p.set_defaults(run=run_train_embedding)
    return p



LORA_DESCRIPTION = (
    "Learn a LoRA for the concept shown in the pictures of DIR, DreamBooth-style: the pictures are center-cropped "
    "and resized to the model's size, flipped at random, and captioned with --prompt (e.g. 'a photo of sks dog') "
    "or, for a picture with one, its caption file <name>.txt (one caption a line, as kohya's scripts read them); "
    "AdamW trains LoRA pairs (rank --rank, alpha --alpha) on the UNet's attention projections (to_q, to_k, to_v, "
    "to_out.0), everything else frozen. Writes FILE in kohya's layout (lora_unet_*.lora_down.weight / "
    ".lora_up.weight / .alpha; webui, npdiff and diffusers load it), <stem>.loss.csv and <stem>.loss.png, and "
    "with --checkpoint-every <stem>.checkpoint.safetensors (go on with --resume). SD 1.x/2.x models only.")


def run_train_lora(args):
    # 1. what can be checked before the model loads: the counts, the pictures and their captions, the outputs,
    #    the memory the pictures and a step's batch need (the model's configs are read, no weight)
    check_count(args.rank, "--rank", 1)
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise NpdiffError(f"--alpha must be a finite number > 0, got {args.alpha}")
    check_loop_options(args)
    pictures = find_pictures(args.dir)
    check_same_size(pictures, args.mixed_sizes)
    lora_captions(pictures, check_prompt(args.prompt))
    for path in lora_output_paths(args.out).values():
        check_destination(path, "--out")
    check_outputs_apart(lora_output_paths(args.out).values(), args.dir, trained_model_path(args), "--out")
    check_batch_memory(args, "train-lora", pictures)
    # 2. load and train (train_lora checks the rest, and reads every picture, before the first step)
    pipe = load_trainable_model(args, "train-lora")
    result = train_lora(pipe, args.dir, prompt=args.prompt, rank=args.rank, alpha=args.alpha, steps=args.steps,
                        lr=args.lr, batch_size=args.batch_size, seed=args.seed, out=args.out,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, clip_skip=args.clip_skip,
                        progress=not args.quiet, mixed_sizes=args.mixed_sizes)
    # 3. report
    report_training(f"trained a rank-{result.lora.rank} LoRA (alpha {result.lora.alpha:g})", result.losses,
                    result.paths)
    return 0


def add_train_lora_command(subparsers):
    p = subparsers.add_parser("train-lora", help="learn a LoRA from a few pictures (DreamBooth-style)",
                              description=LORA_DESCRIPTION)
    p.add_argument("dir", metavar="DIR", help="folder of pictures (.png, .jpg, .jpeg, .webp, .bmp), optionally "
                   "each with a caption file <name>.txt")
    p.add_argument("--out", required=True, metavar="FILE", help="the LoRA, a .safetensors file (kohya's layout)")
    p.add_argument("--prompt", default=None, help='the caption of every picture without a caption file, e.g. '
                   '"a photo of sks dog"')
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the update is (alpha/r) up @ down "
                   "(default: alpha = r)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw and of the init (default 0)")
    add_loop_options(p)
    p.set_defaults(run=run_train_lora)
    return p
