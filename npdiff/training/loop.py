"""The pieces every training loop here shares (textual_inversion.py, lora_train.py): the checks of the
loop's settings, each step's random draws, the progress bar, resuming from a checkpoint, the loss log.

Each step's randomness depends on (seed, step) alone (draw_batch), so a run resumed from a checkpoint
draws what the uninterrupted run would have drawn and ends with the same parameters.
"""

import math
import numbers

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.training.files import load_checkpoint, write_loss_csv, write_loss_png


def check_learning_rate(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr <= 0:
        raise NpdiffError(f"learning rate must be a finite number > 0, got {lr!r}")
    return float(lr)


def check_training_seed(seed):
    """-> the seed as an int; NpdiffError unless it is an integer >= 0 (numpy's SeedSequence, which every draw
    of training goes through, takes no negative number)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise NpdiffError(f"training seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def check_step_finite(step, loss, params, lr):
    """NpdiffError when step `step` (0-based) diverged: its loss or the parameters after its update are NaN or
    Inf (a learning rate far too large). Checked every step, so no checkpoint or result file ever holds them
    (npdiff, webui and diffusers refuse such files when they load them)."""
    if math.isfinite(loss) and np.isfinite(params).all():
        return
    what = f"the loss is {loss:g}" if not math.isfinite(loss) else "the parameters hold NaN or Inf"
    raise NpdiffError(f"training diverged at step {step + 1}: {what}; lower the learning rate ({lr:g} now). "
                      "No result file was written (checkpoints written before this step are good)")


def check_checkpoint_every(checkpoint_every, out):
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 0:
        raise NpdiffError(f"checkpoint every must be an integer >= 0 (0: no checkpoints), got {checkpoint_every!r}")
    if checkpoint_every and out is None:
        raise NpdiffError("checkpoints need an output file (out=...): they are written beside it")
    return int(checkpoint_every)


def check_resume(resume, settings, same, shape):
    """The checkpoint `resume` -> (its settings, arrays); NpdiffError when its settings named in `same` differ
    from this run's, its parameter vector ("vectors") and AdamW moments are not of `shape`, or it is at or
    past the run's last step."""
    saved, arrays = load_checkpoint(resume)
    for name in same:
        if saved.get(name) != settings[name]:
            raise NpdiffError(f"--resume {resume}: made with {name} {saved.get(name)!r}, this run has "
                              f"{settings[name]!r}")
    for name in ("vectors", "exp_avg", "exp_avg_sq"):
        if tuple(arrays[name].shape) != tuple(shape):
            raise NpdiffError(f"--resume {resume}: {name} has shape {tuple(arrays[name].shape)}, this model "
                              f"needs {tuple(shape)}")
    if len(arrays["losses"]) != saved.get("step") or saved["step"] >= settings["steps"]:
        raise NpdiffError(f"--resume {resume}: it is at step {saved.get('step')}; asked for {settings['steps']} "
                          "steps in all (give more --steps to train on)")
    return saved, arrays


def draw_batch(seed, step, batch_size, captions, train_timesteps, latent_shape):
    """Step `step`'s random choices, from a generator seeded by (seed, step) only. captions: each picture's
    captions or caption templates (a tuple per picture)."""
    rng = np.random.default_rng([seed, step])
    pictures = rng.integers(0, len(captions), batch_size)                  # [B] which picture
    caption_draws = rng.integers(0, 2**31, batch_size)                     # [B] which of its captions
    return {
        "pictures": pictures,
        "flips": rng.integers(0, 2, batch_size),                            # [B] 1: flipped
        "templates": [captions[p][d % len(captions[p])] for p, d in zip(pictures, caption_draws)],
        "timesteps": rng.integers(0, train_timesteps, batch_size).astype(np.int64),  # [B]
        "noise": rng.standard_normal((batch_size, *latent_shape), dtype=np.float32),  # [B,C,h,w]
    }


def progress_bar(total, initial, show):
    # tqdm only when a loop runs: `import npdiff.training` stays light
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not show)


def write_loss_files(paths, losses):
    """The loss per step as CSV and plot -> {"loss_csv", "loss_png"} paths."""
    write_loss_csv(paths["loss_csv"], losses)
    write_loss_png(paths["loss_png"], losses)
    return {"loss_csv": paths["loss_csv"], "loss_png": paths["loss_png"]}
