"""The denoising loss of Stable Diffusion and its gradient with respect to the token embeddings fed to CLIP:
what textual inversion descends on (diffusers' examples/textual_inversion/textual_inversion.py, one step).

    loss, grad = text_embedding_grad(pipe, input_ids, latents, noise, timesteps)   # grad [B,77,C]

The steps (numbered as in text_embedding_grad):
    1. noisy latents   x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, a_t = the model's alphas_cumprod[t]
                       (diffusers' DDPMScheduler.add_noise; every npdiff scheduler carries the same table)
    2. target          the noise (prediction_type "epsilon") or v = sqrt(a_t) noise - sqrt(1 - a_t) x_0
                       ("v_prediction", diffusers' get_velocity)
    3. forward         token embeddings -> CLIP -> hidden states -> UNet(x_t, t, hidden) = prediction,
                       keeping only what the two backwards need (clip_backward.py, unet_backward.py)
    4. loss            mean((prediction - target)^2) over every element (F.mse_loss, reduction "mean")
    5. backward        d loss/d prediction = 2 (prediction - target) / count, then the UNet's backward to
                       the hidden states, then CLIP's backward to the token embeddings
The weights are frozen: only d loss/d(token embeddings) is computed, never a weight gradient, and the UNet's
backward makes only the gradients on a path from the hidden states to the loss (no d latents: the ops before
its first transformer are skipped, as torch's autograd skips them for latents without requires_grad).
"""

import numpy as np

from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.models.clip_backward import clip_forward_for_backward, clip_token_embeds
from npdiff.models.unet_backward import unet_forward_for_backward

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_trainable_pipeline(pipe):
    """NpdiffError unless `pipe` is an SD 1.x/2.x text-to-image model on NumPy that training can go through."""
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.add_embedding is not None:
        raise NpdiffError("training is for SD 1.x/2.x models only for now; this is an SDXL "
                          "model (two text encoders, added time embeddings)")
    config = pipe.unet.config
    if config.get("time_cond_proj_dim") is not None:
        raise NpdiffError("training is not supported for an LCM-distilled UNet "
                          "(time_cond_proj_dim): train on its base model")
    latent_channels = pipe.vae.config["latent_channels"]
    if config["in_channels"] != latent_channels:
        raise NpdiffError(f"the UNet takes {config['in_channels']} input channels, the VAE makes {latent_channels} "
                          "(an inpainting model?): train on a text-to-image model")
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise NpdiffError(f"the scheduler's prediction_type {prediction_type!r} cannot be trained; "
                          f"expected one of {PREDICTION_TYPES}")
    weights = {"text_encoder": pipe.text_encoder.token_embedding, "unet": pipe.unet.conv_in.weight}
    for name, weight in weights.items():
        if array_module(weight) is not np:
            raise NpdiffError(f"training runs on NumPy: the pipeline's {name} is on another device")
    return prediction_type


def check_timesteps(timesteps, batch, train_steps):
    """A scalar or [B] integer timesteps in [0, num_train_timesteps) -> int64 [B]."""
    t = np.atleast_1d(np.asarray(timesteps))
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise NpdiffError(f"timesteps must be a scalar or an array of shape [{batch}]; got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise NpdiffError(f"timesteps must be integers (training timesteps); got dtype {t.dtype}")
    if t.min() < 0 or t.max() >= train_steps:
        raise NpdiffError(f"timesteps must lie in [0, {train_steps}); got values in [{t.min()}, {t.max()}]")
    return np.broadcast_to(t, (batch,)).astype(np.int64)                # [B]


def noisy_latents_and_target(scheduler, latents, noise, timesteps, prediction_type):
    """Steps 1-2: -> (x_t [B,C,h,w], target [B,C,h,w]) in float32."""
    alpha_bar = scheduler.alphas_cumprod.astype(np.float32)[timesteps]  # [T][B] -> [B]
    sqrt_alpha = np.sqrt(alpha_bar).reshape(-1, 1, 1, 1)                # [B,1,1,1]
    sqrt_one_minus_alpha = np.sqrt(np.float32(1.0) - alpha_bar).reshape(-1, 1, 1, 1)  # [B,1,1,1]
    noisy = sqrt_alpha * latents + sqrt_one_minus_alpha * noise         # [B,C,h,w]
    if prediction_type == "epsilon":
        return noisy, noise
    velocity = sqrt_alpha * noise - sqrt_one_minus_alpha * latents      # [B,C,h,w]
    return noisy, velocity


def check_latents_and_noise(pipe, latents, noise):
    latents = np.ascontiguousarray(latents, dtype=np.float32)           # [B,C,h,w]
    noise = np.ascontiguousarray(noise, dtype=np.float32)               # [B,C,h,w]
    channels = pipe.unet.config["in_channels"]
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise NpdiffError(f"latents must have shape [B,{channels},h,w]; got {latents.shape}")
    if noise.shape != latents.shape:
        raise NpdiffError(f"noise must have the latents' shape {latents.shape}; got {noise.shape}")
    if not (np.isfinite(latents).all() and np.isfinite(noise).all()):
        raise NpdiffError("latents and noise must be finite (no NaN or Inf)")
    return latents, noise


def check_training_batch(pipe, input_ids, latents, noise, timesteps):
    """Step 0 of a training gradient: -> (prediction_type, ids [B,L], latents, noise [B,C,h,w], timesteps [B])."""
    prediction_type = check_trainable_pipeline(pipe)
    latents, noise = check_latents_and_noise(pipe, latents, noise)
    batch = latents.shape[0]
    ids = pipe.text_encoder.check_input_ids(input_ids)                  # [B,L]
    if ids.shape[0] != batch:
        raise NpdiffError(f"input_ids has {ids.shape[0]} rows but latents have batch {batch}")
    timesteps = check_timesteps(timesteps, batch, len(pipe.scheduler.alphas_cumprod))  # [B]
    return prediction_type, ids, latents, noise, timesteps


def unet_denoising_loss(pipe, latents, noise, timesteps, hidden, prediction_type, weight_grads=None):
    """Steps 1-2, the UNet's part of 3, 4, and the UNet's part of 5 -> (loss, d loss/d hidden [B,L,C]).
    weight_grads: what the UNet backward fills with weight gradients (unet_forward_for_backward), or None."""
    # 1-2. noisy latents and the target, with the model's own schedule
    noisy, target = noisy_latents_and_target(pipe.scheduler, latents, noise, timesteps, prediction_type)
    # 3. the UNet forward, keeping what its backward needs
    prediction, unet_tape = unet_forward_for_backward(pipe.unet, noisy, timesteps, hidden,
                                                      weight_grads=weight_grads)  # [B,C,h,w]
    # 4. mean squared error (summed in float64)
    error = prediction - target                                         # [B,C,h,w]
    loss = float(np.mean(np.square(error, dtype=np.float64)))
    # 5. backward: the loss, then the UNet (to its hidden states)
    grad_prediction = error * np.float32(2.0 / error.size)              # [B,C,h,w]
    _, grad_hidden = unet_tape.backward(grad_prediction, sample_grad=False)  # [B,L,C] (the latents are not trained)
    return loss, grad_hidden


def text_embedding_grad(pipe, input_ids, latents, noise, timesteps, clip_skip=None, token_embeds=None):
    """The denoising loss and d loss/d(token embeddings fed to CLIP) -> (loss float, grad [B,L,C] float32).

    input_ids  [B,L] int: the caption's ids (pipe.tokenizer(captions))
    latents    [B,C,h,w]: clean VAE latents, already multiplied by the VAE's scaling_factor (as the UNet
               sees them)
    noise      [B,C,h,w]: the standard normal noise added
    timesteps  scalar or [B] ints in [0, num_train_timesteps)
    clip_skip  the pipeline's clip_skip (None: CLIP's last layer, final-normed)
    token_embeds [B,L,C] to use instead of the table's rows for input_ids (default: those rows)"""
    # 0. check everything before the long work
    prediction_type, ids, latents, noise, timesteps = check_training_batch(pipe, input_ids, latents, noise, timesteps)
    if token_embeds is None:
        token_embeds = clip_token_embeds(pipe.text_encoder, ids)        # [B,L] -> [B,L,C]

    # 3. forward through CLIP, keeping what its backward needs
    hidden, clip_tape = clip_forward_for_backward(pipe.text_encoder, token_embeds, clip_skip)  # [B,L,C] -> [B,L,C]
    # 1-2, 3-5 through the UNet: the loss and d loss/d hidden states
    loss, grad_hidden = unet_denoising_loss(pipe, latents, noise, timesteps, hidden, prediction_type)
    # 5. CLIP's backward to the token embeddings
    grad_token_embeds = clip_tape.backward(grad_hidden)                 # [B,L,C]
    return loss, grad_token_embeds
