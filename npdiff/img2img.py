"""Starting from a picture: the pieces image-to-image and inpainting share with diffusers.

  check_denoising_steps(N, strength)      NpdiffError when strength keeps no step (int(N * strength) = 0),
                                          checked before any long work;
  get_timesteps(scheduler, N, strength)   diffusers' get_timesteps: with N steps keep the last
                                          min(int(N * strength), N) of them (times the scheduler's order)
                                          and tell the scheduler where it begins (set_begin_index);
  encode_image(pipe, pixels, batch, g)    diffusers' _encode_vae_image: pixels [1,3,H,W] in [-1,1] ->
                                          posterior.sample(g) * scaling_factor (one draw of [1,4,h,w];
                                          none with TAESD, whose encoder gives the latents),
                                          repeated to the batch.

How they are used, and in what order the random numbers are drawn, is in npdiff/sampling_starts.py
(ImageStart for pipe.img2img, InpaintStart for pipe.inpaint).
"""

from npdiff import backend
from npdiff.errors import NpdiffError


def check_denoising_steps(num_inference_steps, strength):
    """NpdiffError when `strength` keeps no step of `num_inference_steps` (int(N * strength) = 0)."""
    if min(int(num_inference_steps * strength), num_inference_steps) < 1:
        raise NpdiffError(f"strength {strength} with num_inference_steps {num_inference_steps} leaves no "
                          f"denoising step (int(steps * strength) = 0); raise one of them")


def get_timesteps(scheduler, num_inference_steps, strength):
    """-> (the timesteps to run, how many denoising steps that is), setting the scheduler's begin index."""
    check_denoising_steps(num_inference_steps, strength)
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[t_start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return timesteps, num_inference_steps - t_start


def encode_image(pipe, pixels, batch, generator):
    """Pixels [1,3,H,W] in [-1,1] -> scaled latents [batch,4,h,w] (one posterior sample or TAESD's latents,
    repeated)."""
    encoded = pipe.vae.encode(backend.to_device(pixels))  # [1,3,H,W] -> posterior (KL) or latents (TAESD)
    # diffusers' retrieve_latents: a KL posterior is sampled (one draw); TAESD gives latents (no draw)
    latents = encoded.latents if hasattr(encoded, "latents") else encoded.sample(generator)  # [1,4,h,w]
    latents = latents * float(pipe.vae.scaling_factor)  # [1,4,h,w]
    xp = backend.array_module(latents)
    return xp.repeat(latents, batch, axis=0)  # [1,4,h,w] -> [batch,4,h,w]
