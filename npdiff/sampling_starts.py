"""How sampling starts: the only place text-to-image and image-to-image differ.

StableDiffusionPipeline._generate (npdiff/pipeline.py) runs the same numbered steps for every mode and
asks a start object for what differs:

                      NoiseStart (pipe(...))        ImageStart (pipe.img2img)
  prepare(...)        picture size, given latents   the picture, strength
  timesteps(...)      all of them                   the last int(N * strength) (get_timesteps)
  initial_latents     noise * init_noise_sigma      encoded picture + noise at the first timestep
  unet_input(x)       x                             x
  after_step(...)     latents                       latents
  parameters()        mode                          mode, strength

prepare() checks the mode's own arguments before any long work starts; the others run inside the
sampling steps, in diffusers' order of operations and random draws.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.images import image_to_model_input
from npdiff.img2img import check_denoising_steps, encode_image, get_timesteps
from npdiff.pipeline_utils import check_size, check_strength


class SamplingStart:
    """What every start shares: the whole schedule, the UNet input as it is, nothing done after a step."""

    mode = None

    def timesteps(self, scheduler, num_inference_steps):
        """-> (the timesteps to run, the number of denoising steps); set_timesteps has run."""
        return scheduler.timesteps, num_inference_steps

    def unet_input(self, model_input):
        """The scaled latents [B,4,h,w] -> what the UNet takes (inpainting UNets take more channels)."""
        return model_input

    def after_step(self, latents, step_index, timesteps, scheduler):
        """The latents after the scheduler's step `step_index` -> the latents the next step starts from."""
        return latents

    def parameters(self):
        """What this start adds to the picture's generation parameters."""
        return {"mode": self.mode}


def require_plain_unet(pipe):
    """Text-to-image and image-to-image need a UNet that takes the latents alone."""
    in_channels = pipe.unet.config["in_channels"]
    latent_channels = pipe.vae.config["latent_channels"]
    if in_channels == 2 * latent_channels + 1:
        raise NpdiffError(f"this UNet takes {in_channels} input channels (an inpainting UNet: latents, mask and "
                          "masked picture); use pipe.inpaint(prompt, image=..., mask_image=...)")
    if in_channels != latent_channels:
        raise NpdiffError(f"this UNet takes {in_channels} input channels but the VAE's latents have "
                          f"{latent_channels}")


class NoiseStart(SamplingStart):
    """Text-to-image: Gaussian noise [B,4,h,w] (or the caller's `latents`) times init_noise_sigma."""

    mode = "txt2img"

    def __init__(self, height=None, width=None, latents=None):
        self.height, self.width, self.latents = height, width, latents

    def prepare(self, pipe, batch, num_inference_steps):
        require_plain_unet(pipe)
        default_side = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
        height = default_side if self.height is None else self.height
        width = default_side if self.width is None else self.width
        self.height, self.width = check_size(height, width, max(8, pipe.vae_scale_factor))
        self.shape = (batch, pipe.unet.config["in_channels"], self.height // pipe.vae_scale_factor,
                      self.width // pipe.vae_scale_factor)
        if self.latents is not None:
            self.latents = backend.to_numpy(self.latents)
            if tuple(self.latents.shape) != self.shape:
                raise NpdiffError(f"latents must have shape {self.shape} for this prompt batch and size, "
                                  f"got {tuple(self.latents.shape)}")

    def initial_latents(self, pipe, scheduler, timesteps, generator):
        latents = self.latents
        if latents is None:
            latents = generator.randn(self.shape, dtype=np.float32)  # [B,4,h,w]
        return backend.to_device(latents) * float(scheduler.init_noise_sigma)  # [B,4,h,w] float32


class ImageStart(SamplingStart):
    """Image-to-image (diffusers' StableDiffusionImg2ImgPipeline): the encoded picture, noised to `strength`.

    Draws: the posterior sample [1,4,h,w] first, then the noise [B,4,h,w].
    """

    mode = "img2img"

    def __init__(self, image, strength):
        self.image, self.strength = image, strength

    def prepare(self, pipe, batch, num_inference_steps):
        require_plain_unet(pipe)
        self.strength = check_strength(self.strength)
        self.pixels = image_to_model_input(self.image, pipe.vae_scale_factor)  # [1,3,H,W] in [-1,1]
        check_denoising_steps(num_inference_steps, self.strength)
        self.height, self.width = self.pixels.shape[2:]
        self.batch = batch

    def timesteps(self, scheduler, num_inference_steps):
        return get_timesteps(scheduler, num_inference_steps, self.strength)

    def initial_latents(self, pipe, scheduler, timesteps, generator):
        latents = encode_image(pipe, self.pixels, self.batch, generator)  # [B,4,h,w], first draw
        noise = backend.to_device(generator.randn(tuple(latents.shape), dtype=np.float32))  # [B,4,h,w]
        first_timestep = np.repeat(np.asarray(timesteps[:1]), self.batch)  # [B]
        return scheduler.add_noise(latents, noise, first_timestep)  # [B,4,h,w]

    def parameters(self):
        return {"mode": self.mode, "strength": self.strength}
