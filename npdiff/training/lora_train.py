"""LoRA training in NumPy, DreamBooth-style (Ruiz et al. 2022 with Hu et al.'s LoRA; diffusers'
examples/dreambooth/train_dreambooth_lora.py without prior preservation): a few pictures of one concept, an
instance prompt ("a photo of sks dog") or a caption per picture, and LoRA pairs on the UNet's attention
projections learning them; the rest of the model frozen.

    result = train_lora(pipe, "pictures/", prompt="a photo of sks dog", rank=4, steps=500, out="sks.safetensors")
    pipe.load_lora_weights("sks.safetensors")     # or result.lora.apply(): the pairs into this pipe's UNet

The loop (numbered as in train_lora()):
    0. every check before any work: the model (SD 1.x/2.x, float32), rank and alpha, the counts, the output
       paths, the resume file, every picture read and every caption found
    1. the LoRA: peft's init (down kaiming-uniform, up zeros: the model unchanged at step 0), or the checkpoint's
    2. the pictures: cropped, resized, encoded once by the VAE, as they are and flipped (pictures.py)
    3. per step: a batch of (picture, flip, caption, timestep, noise) drawn from a generator seeded by
       (seed, step) (loop.draw_batch); the loss and its gradient for every factor (lora_grad); one AdamW step
       on the factors only
    4. every K steps a checkpoint; at the end the UNet's weights as they were, the LoRA file in kohya's layout
       (lora_files.py) and the loss CSV/plot
Captions: a picture's sidecar `<name>.txt` (one caption a line, as kohya's scripts read them) when it has one,
else the prompt; a picture with neither is refused before any work.
"""

import time
from pathlib import Path

from npdiff.atomic_files import check_destination
from npdiff.errors import NpdiffError
from npdiff.pipeline_utils import check_positive_int
from npdiff.training.adamw import AdamW
from npdiff.training.embedding_grad import check_trainable_pipeline
from npdiff.training.files import check_outputs_apart, save_checkpoint
from npdiff.training.loop import (
    check_checkpoint_every,
    check_learning_rate,
    check_resume,
    check_step_finite,
    check_training_seed,
    draw_batch,
    progress_bar,
    write_loss_files,
)
from npdiff.training.lora_files import (
    kohya_metadata,
    lora_output_paths,
    save_kohya_lora,
)
from npdiff.training.lora_grad import UNetLora, check_rank_alpha, lora_grad
from npdiff.freed_memory import keep_freed_memory
from npdiff.training.memory import check_training_memory
from npdiff.training.pictures import (
    encode_training_latents,
    check_same_size,
    find_pictures,
    load_training_pictures,
    sidecar_lines,
)


class LoraTrainingResult:
    """What train_lora returns."""

    def __init__(self, lora, losses, paths):
        self.lora = lora            # the UNetLora (lora.down, lora.up, lora.alpha; lora.apply() fuses it)
        self.losses = losses        # the loss of every step, first to last
        self.paths = paths          # the files written ({} without out)


def check_prompt(prompt):
    if prompt is None:
        return None
    if not isinstance(prompt, str) or not prompt.strip():
        raise NpdiffError(f"prompt must be a non-empty caption such as 'a photo of sks dog', got {prompt!r}")
    return prompt.strip()


def lora_captions(paths, prompt):
    """Each picture's captions: its sidecar's lines, else (prompt,) -> tuples, one a picture."""
    captions = []
    for path in paths:
        lines = sidecar_lines(path)
        if lines is None and prompt is None:
            raise NpdiffError(f"training picture {path}: no caption file ({Path(path).with_suffix('.txt').name}) "
                              "and no prompt given: give --prompt \"a photo of sks dog\" or a caption file per picture")
        captions.append(tuple(lines) if lines is not None else (prompt,))
    return captions


def train_lora(pipe, folder, prompt=None, rank=4, alpha=None, steps=500, lr=1e-4, batch_size=1, seed=0,
               out=None, checkpoint_every=0, resume=None, clip_skip=None, weight_decay=1e-2, progress=True,
               mixed_sizes=False):
    """Learn a LoRA on the UNet's attention projections from the pictures in `folder`; -> LoraTrainingResult.
    The pipe's weights are as they were when it returns.

    prompt: the caption of every picture without a sidecar .txt; rank, alpha: the pairs' r and alpha (None:
    alpha = r; the update is (alpha / r) up @ down); steps: AdamW steps in all (a resumed run goes on to this
    count); lr: AdamW's learning rate; batch_size: pictures per step; seed: every random draw (the init too);
    out: the kohya-layout .safetensors file (its siblings: lora_files.lora_output_paths), or None;
    checkpoint_every: K > 0 writes the checkpoint every K steps (needs out); resume: a checkpoint to go on from
    (made with the same rank and alpha on the same model); clip_skip: the text encoder layer (None: the last);
    mixed_sizes: take pictures of different sizes (each cropped and resized on its own); refused otherwise.
    A step whose loss or factors turn NaN/Inf (lr far too large) is an NpdiffError; nothing more is written."""
    # 0. every check before any work
    check_trainable_pipeline(pipe)
    rank, alpha = check_rank_alpha(rank, alpha)
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch size")
    lr = check_learning_rate(lr)
    seed = check_training_seed(seed)
    prompt = check_prompt(prompt)
    checkpoint_every = check_checkpoint_every(checkpoint_every, out)
    lora = UNetLora.create(pipe, rank, alpha, seed)
    if out is not None:
        check_destination(out, "out")  # as given: "dir/" names a folder (Path drops the slash)
    paths = lora_output_paths(out) if out is not None else {}
    for path in paths.values():
        check_destination(path, "output")
    check_outputs_apart(paths.values(), folder)
    settings = {"rank": rank, "alpha": alpha, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "weight_decay": weight_decay, "clip_skip": clip_skip, "prompt": prompt}
    optimizer = AdamW(lora.params.shape, lr, weight_decay=weight_decay)
    losses = []
    if resume is not None:
        saved, arrays = check_resume(resume, settings, ("rank", "alpha"), lora.params.shape)
        lora.params[:] = arrays["vectors"]                              # [P] the factors, flat
        optimizer.load_state(arrays, saved["step_count"])
        losses = [float(loss) for loss in arrays["losses"]]
    picture_paths = find_pictures(folder)
    check_same_size(picture_paths, mixed_sizes)
    check_training_memory(pipe.unet.config, pipe.vae_scale_factor, len(picture_paths), batch_size, "batch_size")
    captions = lora_captions(picture_paths, prompt)
    size = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    pixels = load_training_pictures(picture_paths, size)                # [P,3,S,S]: every picture read
    started_at = time.time()

    # 1. the LoRA is made (peft's init, or the checkpoint's factors); 2. the pictures' latents, once
    latents = encode_training_latents(pipe.vae, pixels)                 # [2,P,C,h,w]: as they are, flipped
    train_timesteps = len(pipe.scheduler.alphas_cumprod)

    # 3. the steps
    written = {}  # the files this call wrote
    bar = progress_bar(steps, len(losses), progress)
    try:
        with keep_freed_memory(heap_only=True):                       # each step reuses the last one's pages
            for step in range(len(losses), steps):
                draw = draw_batch(seed, step, batch_size, captions, train_timesteps, latents.shape[2:])
                batch_latents = latents[draw["flips"], draw["pictures"]]     # [B,C,h,w]
                ids = pipe.tokenizer(draw["templates"])                      # [B,77]
                loss, grads = lora_grad(pipe, lora, ids, batch_latents, draw["noise"], draw["timesteps"], clip_skip)
                optimizer.step(lora.params, lora.flat(grads))                # [P] in place
                check_step_finite(step, loss, lora.params, lr)               # diverged: NpdiffError, no file
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                # 4. checkpoints every K steps
                if checkpoint_every and (step + 1) % checkpoint_every == 0:
                    state = dict(settings, step=step + 1)
                    written["checkpoint"] = save_checkpoint(paths["checkpoint"], state, lora.params, optimizer, losses)
    finally:
        bar.close()
        lora.remove()                                                   # the UNet's weights as they were

    # 4. the results
    if paths:
        metadata = kohya_metadata(pipe, settings, len(picture_paths), [c for cs in captions for c in cs], started_at)
        written["lora"] = save_kohya_lora(paths["lora"], lora, metadata)
        written.update(write_loss_files(paths, losses))
    return LoraTrainingResult(lora, losses, {name: Path(path) for name, path in written.items()})
