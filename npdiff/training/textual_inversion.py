"""Textual inversion in NumPy: learn a new word for the concept shown in a few pictures (Gal et al. 2022;
diffusers' examples/textual_inversion/textual_inversion.py), with the rest of the model frozen.

    result = textual_inversion(pipe, "pictures/", token="<x>", init_word="toy", steps=500, out="x.safetensors")
    pipe(f"a {result.token} on the beach")         # the word is in pipe already; result.vectors [N,C]

The loop (numbered as in textual_inversion()):
    0. every check before any work: the model (SD 1.x/2.x), the token (new), the init word (one token),
       the counts, the output paths, the resume file, the memory (memory.py), and every picture read
    1. the new word: N token names (token, token_1, ...) added to the tokenizer, N rows to CLIP's table,
       each row starting as the init word's embedding
    2. the pictures: cropped, resized, encoded once by the VAE, as they are and flipped (pictures.py)
    3. per step: a batch of (picture, flip, caption, timestep, noise) drawn from a generator seeded
       by (seed, step); the loss and d loss/d(token embeddings) (text_embedding_grad); the gradient of the
       new rows (summed over the positions where each appears); one AdamW step on those rows only
    4. every K steps a checkpoint; at the end the embedding files and the loss CSV/plot (files.py)
Each step's randomness depends on (seed, step) alone, so a run resumed from a checkpoint draws what the
uninterrupted run would have drawn and ends with the same embedding.
"""

from pathlib import Path

import numpy as np

from npdiff.atomic_files import check_destination
from npdiff.errors import NpdiffError
from npdiff.pipeline_utils import check_positive_int
from npdiff.prompt_encoding import PromptOptions
from npdiff.textual_inversion import add_rows, check_new_rows, check_token
from npdiff.training.adamw import AdamW
from npdiff.training.embedding_grad import check_trainable_pipeline, text_embedding_grad
from npdiff.training.files import check_outputs_apart, output_paths, save_checkpoint, save_embedding
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
from npdiff.freed_memory import keep_freed_memory
from npdiff.training.memory import check_training_memory
from npdiff.training.pictures import (
    OBJECT_TEMPLATES,
    check_templates,
    encode_training_latents,
    check_same_size,
    find_pictures,
    load_training_pictures,
    picture_captions,
)


class TrainingResult:
    """What textual_inversion returns."""

    def __init__(self, token, names, vectors, losses, paths):
        self.token = token          # the word to write in prompts
        self.names = names          # its token names: token, token_1, ...
        self.vectors = vectors      # [N,C] float32, the learned rows
        self.losses = losses        # the loss of every step, first to last
        self.paths = paths          # the files written ({} without out)


def check_init_word(tokenizer, init_word):
    """-> the id of the init word; NpdiffError when it is not exactly one token."""
    if not isinstance(init_word, str) or not init_word.strip():
        raise NpdiffError(f"init word must be a non-empty word, got {init_word!r}")
    tokens = tokenizer.tokenize(init_word)
    if len(tokens) != 1:
        raise NpdiffError(f"init word {init_word!r} is {len(tokens)} tokens ({', '.join(tokens)}); it must be one "
                          "token: pick a single common word close to the concept")
    return tokenizer.encode(init_word)[0]


def new_rows_grad(grad, ids, new_ids):
    """d loss/d(token embeddings) [B,L,C] -> d loss/d(each new row) [N,C]: summed over where each id appears."""
    rows = np.zeros((len(new_ids), grad.shape[-1]), np.float32)         # [N,C]
    for row, token_id in enumerate(new_ids):
        rows[row] = grad[ids == token_id].sum(axis=0)                   # [k,C] -> [C]
    return rows


def textual_inversion(pipe, folder, token, init_word, vectors=1, steps=500, lr=5e-3, batch_size=1, seed=0,
                      out=None, checkpoint_every=0, resume=None, templates=OBJECT_TEMPLATES, clip_skip=None,
                      weight_decay=1e-2, progress=True, mixed_sizes=False):
    """Learn `token` from the pictures in `folder`; -> TrainingResult. The word stays in `pipe`.

    vectors: rows the word gets (N); steps: AdamW steps in all (a resumed run goes on to this count);
    lr: AdamW's learning rate; batch_size: pictures per step; seed: every random draw;
    out: the diffusers-layout .safetensors file (its siblings: output_paths), or None to write nothing;
    checkpoint_every: K > 0 writes the checkpoint every K steps (needs out); resume: a checkpoint to go on from
    (made for the same token and vector count; the other settings are this call's: give the same ones to end
    where the uninterrupted run would);
    templates: caption templates with "{}" for the word (default diffusers' object templates; a picture's
    sidecar .txt file, one caption a line, replaces them for that picture);
    clip_skip: the text encoder layer trained through (None: the last, as the pipeline's default);
    mixed_sizes: take pictures of different sizes (each cropped and resized on its own); refused otherwise.
    A step whose loss or rows turn NaN/Inf (lr far too large) is an NpdiffError; nothing more is written, and
    the word stays in `pipe` with the last finite rows."""
    # 0. every check before any work
    check_trainable_pipeline(pipe)
    token = check_token(token)
    count = check_positive_int(vectors, "vectors")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch size")
    lr = check_learning_rate(lr)
    seed = check_training_seed(seed)
    templates = check_templates(templates)
    checkpoint_every = check_checkpoint_every(checkpoint_every, out)
    PromptOptions(clip_skip).check_layers(pipe.text_encoder, "last")
    init_id = check_init_word(pipe.tokenizer, init_word)
    table = pipe.text_encoder.token_embedding                           # [V,C]
    start_rows = np.repeat(np.asarray(table[init_id], np.float32)[None], count, axis=0)  # [N,C]
    names = check_new_rows(pipe.tokenizer, pipe.text_encoder, token, start_rows, "the new word")
    if out is not None:
        check_destination(out, "out")  # as given: "dir/" names a folder (Path drops the slash)
    paths = output_paths(out) if out is not None else {}
    for path in paths.values():
        check_destination(path, "output")
    check_outputs_apart(paths.values(), folder)
    settings = {"token": token, "init_word": init_word, "vectors": count, "steps": steps, "lr": lr,
                "batch_size": batch_size, "seed": seed, "weight_decay": weight_decay, "clip_skip": clip_skip}
    optimizer = AdamW(start_rows.shape, lr, weight_decay=weight_decay)
    losses = []
    if resume is not None:
        saved, arrays = check_resume(resume, settings, ("token", "vectors"), (count, table.shape[1]))
        start_rows = np.array(arrays["vectors"], np.float32)
        optimizer.load_state(arrays, saved["step_count"])
        losses = [float(loss) for loss in arrays["losses"]]
    picture_paths = find_pictures(folder)
    check_same_size(picture_paths, mixed_sizes)
    check_training_memory(pipe.unet.config, pipe.vae_scale_factor, len(picture_paths), batch_size, "batch_size")
    size = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    pixels = load_training_pictures(picture_paths, size)                # [P,3,S,S]: every picture read
    captions = picture_captions(picture_paths, templates)               # caption templates, one tuple a picture

    # 1. the new word, starting from the init word's embedding (or the checkpoint's rows)
    add_rows(pipe.tokenizer, pipe.text_encoder, token, names, start_rows)
    new_ids = pipe.tokenizer.convert_tokens_to_ids(names)
    rows = start_rows.copy()                                            # [N,C] the trained parameters
    # 2. the pictures' latents, once: [2,P,C,h,w] (as they are, flipped)
    latents = encode_training_latents(pipe.vae, pixels)
    train_timesteps = len(pipe.scheduler.alphas_cumprod)

    # 3. the steps
    written = {}  # the files this call wrote
    bar = progress_bar(steps, len(losses), progress)
    with keep_freed_memory(heap_only=True):                             # each step reuses the last one's pages
        for step in range(len(losses), steps):
            draw = draw_batch(seed, step, batch_size, captions, train_timesteps, latents.shape[2:])
            batch_latents = latents[draw["flips"], draw["pictures"]]         # [B,C,h,w]
            ids = pipe.tokenizer([template.format(token) for template in draw["templates"]])  # [B,77]
            loss, grad = text_embedding_grad(pipe, ids, batch_latents, draw["noise"], draw["timesteps"], clip_skip)
            optimizer.step(rows, new_rows_grad(grad, ids, new_ids))         # [N,C] in place
            check_step_finite(step, loss, rows, lr)                          # diverged: NpdiffError, no file
            pipe.text_encoder.token_embedding[new_ids] = rows                # the table's new rows only
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            # 4. checkpoints every K steps
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                state = dict(settings, step=step + 1)
                written["checkpoint"] = save_checkpoint(paths["checkpoint"], state, rows, optimizer, losses)
    bar.close()

    # 4. the results
    if paths:
        written["embedding"], written["a1111"] = save_embedding(paths, token, rows)
        written.update(write_loss_files(paths, losses))
    return TrainingResult(token, names, rows.copy(), losses, {name: Path(path) for name, path in written.items()})
