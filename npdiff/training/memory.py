"""Whether a training run fits in memory, from the model's configs, before the model loads or any picture is read.

    check_training_memory(unet_config, vae_factor, pictures=3, batch_size=1)   # NpdiffError when it cannot fit

What a run holds (float32, 4 bytes a value; S the model's picture size, s = S / vae_factor its latent size,
C the latent channels):
  pictures  every picture read at once: [P,3,S,S] pixels (twice while they are scaled to [-1,1]) and their
            latents as they are and flipped, [2,P,C,s,s] (pictures.py): ~6 MiB a picture at 512 px;
  step      one step's batch through the UNet: the noise [B,C,s,s] and at least the activations of an inference
            call on B latents (memory_estimate.unet_bytes); a training step keeps more (the backward pass
            reads them), so this is a lower bound, and a run refused here could not have run.
Measured on the tests' tiny SD (tracemalloc's peak of one step of textual_inversion / train_lora, batches of 64
and 256, 3 pictures): the peak was 4.3x to 5.4x this estimate, so it is a lower bound by that much there (not
measured on an SD-size model). The check refuses a --batch-size of 100,000 on the shipped model (~30 GiB by
this count; it ran out of memory after 79 s) or a folder of more pictures than memory holds in under a second;
it is not a promise that what passes fits.

Batches are drawn WITH replacement (loop.draw_batch: each step picks B of the P pictures at random, each with
its own flip, caption, timestep and noise), as diffusers' script does over its dataset of P x repeats (100 by
default): a batch larger than the folder is allowed; some pictures then appear more than once in it.
"""

from npdiff.errors import NpdiffError
from npdiff.memory_estimate import FLOAT_BYTES, available_bytes, human_bytes, unet_bytes


def training_bytes(unet_config, vae_factor, pictures, batch_size):
    """-> {"pictures", "step", "total"}: the bytes a run holds (module docstring)."""
    latent_side = int(unet_config["sample_size"])
    side = latent_side * vae_factor
    channels = int(unet_config.get("in_channels", 4))
    latent = channels * latent_side * latent_side                          # one [C,s,s]
    held = pictures * (2 * 3 * side * side + 2 * latent) * FLOAT_BYTES     # pixels (x2 while scaled), 2 latents
    step = batch_size * latent * FLOAT_BYTES + unet_bytes(unet_config, batch_size, latent_side, latent_side)
    return {"pictures": held, "step": step, "total": held + step}


def check_training_memory(unet_config, vae_factor, pictures, batch_size, batch_name="--batch-size", free=None):
    """NpdiffError naming what to lower when the run's pictures and one step's batch cannot fit in the memory
    available (free: bytes, default memory_estimate.available_bytes(); unknown: no check)."""
    free = available_bytes() if free is None else free
    if free is None:
        return
    need = training_bytes(unet_config, vae_factor, pictures, batch_size)
    if need["total"] <= free:
        return
    side = int(unet_config["sample_size"]) * vae_factor
    lower = f"lower {batch_name}" if need["step"] >= need["pictures"] else "train on fewer pictures"
    raise NpdiffError(f"training on {pictures} picture(s) of {side}x{side} pixels, {batch_size} a step "
                      f"({batch_name}), needs more than {human_bytes(need['total'])} of memory (the pictures "
                      f"{human_bytes(need['pictures'])}, one step's batch through the UNet at least "
                      f"{human_bytes(need['step'])}), but only {human_bytes(free)} is available; {lower}")
