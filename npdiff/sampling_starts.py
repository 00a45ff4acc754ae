"""How sampling starts: the only place text-to-image, image-to-image and inpainting differ.

StableDiffusionPipeline._generate (npdiff/pipeline.py) runs the same numbered steps for every mode and
asks a start object for what differs:

                    NoiseStart (pipe(...))  ImageStart (pipe.img2img)     InpaintStart (pipe.inpaint)
  prepare(...)      size, given latents     picture, strength             picture, mask, size, strength
  timesteps(...)    all of them             the last int(N * strength)    the last int(N * strength)
  initial_latents   noise * init_sigma      picture latents + noise       noise (strength 1) or picture
                                                                          latents + noise; the mask latents
  unet_input(x)     x                       x                             9-channel UNet: [x, mask, masked
                                                                          picture latents]
  after_step(...)   latents                 latents                       4-channel UNet: the kept part put
                                                                          back, noised to the next timestep
  parameters()      mode                    mode, strength                mode, strength

prepare() checks the mode's own arguments before any long work starts; the others run inside the
sampling steps, in diffusers' order of operations and random draws.

What ImageStart and InpaintStart share with diffusers (at the end of this file):
  check_denoising_steps(N, strength)      NpdiffError when strength keeps no step (int(N * strength) = 0),
                                          checked before any long work;
  get_timesteps(scheduler, N, strength)   diffusers' get_timesteps: with N steps keep the last
                                          min(int(N * strength), N) of them (times the scheduler's order)
                                          and tell the scheduler where it begins (set_begin_index);
  encode_image(pipe, pixels, batch, g)    diffusers' _encode_vae_image: pixels [1,3,H,W] in [-1,1] ->
                                          posterior.sample(g) * scaling_factor (one draw of [1,4,h,w];
                                          none with TAESD, whose encoder gives the latents),
                                          repeated to the batch.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.images import (
    image_to_model_input,
    mask_to_model_input,
    picture_size,
    resize_nearest,
)
from npdiff.models.vae_tiling import tiling_argument
from npdiff.picture_size import MAX_SIDE, check_size, size_rule
from npdiff.pipeline_utils import check_strength


class SamplingStart:
    """What every start shares: the whole schedule, the UNet input as it is, nothing done after a step."""

    mode = None
    encodes_picture = False  # whether the VAE's encoder runs too (memory_estimate counts it)
    add_noise = True  # False: the picture's latents are noisy already (SDXL's denoising_start, a refiner)

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
        self.height, self.width = check_size(height, width, *size_rule(pipe.unet.config, pipe.vae_scale_factor))
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


def check_picture_sides(image, multiple):
    """img2img works at its picture's own size (rounded down to `multiple`): a side past MAX_SIDE is an
    NpdiffError naming the picture, as --height/--width past it are. Anything but a PIL picture or an array
    [H,W,...] is left to image_to_model_input to refuse."""
    if hasattr(image, "width") and hasattr(image, "height"):  # PIL
        height, width = image.height, image.width
    elif getattr(image, "ndim", 0) >= 2:
        height, width = image.shape[:2]
    else:
        return
    for name, side in (("height", height), ("width", width)):
        if side - side % multiple > MAX_SIDE:
            raise NpdiffError(f"image: the picture is {width}x{height} pixels, and img2img works at its size: its "
                              f"{name} must be at most {MAX_SIDE} pixels (the largest side npdiff accepts); "
                              "resize it")


class ImageStart(SamplingStart):
    """Image-to-image (diffusers' StableDiffusionImg2ImgPipeline): the encoded picture, noised to `strength`.

    Draws: the posterior sample [1,4,h,w] first, then the noise [B,4,h,w].
    """

    mode = "img2img"
    encodes_picture = True

    def __init__(self, image, strength):
        self.image, self.strength = image, strength
        self.given_latents = None

    def prepare(self, pipe, batch, num_inference_steps):
        require_plain_unet(pipe)
        self.strength = check_strength(self.strength)
        check_denoising_steps(num_inference_steps, self.strength)
        self.batch = batch
        if is_latents(self.image):  # latents [b,4,h,w] (a txt2img call's output_type="latent"): used as they are
            self.given_latents = check_given_latents(pipe, self.image, batch)  # [b,4,h,w]
            self.height = self.given_latents.shape[2] * pipe.vae_scale_factor
            self.width = self.given_latents.shape[3] * pipe.vae_scale_factor
            self.encodes_picture = False
            return
        multiple, _ = size_rule(pipe.unet.config, pipe.vae_scale_factor)  # sides the UNet can take
        check_picture_sides(self.image, multiple)  # before the picture is converted
        self.pixels = image_to_model_input(self.image, multiple)  # [1,3,H,W] in [-1,1]
        self.height, self.width = self.pixels.shape[2:]

    def timesteps(self, scheduler, num_inference_steps):
        return get_timesteps(scheduler, num_inference_steps, self.strength)

    def picture_latents(self, pipe, generator):
        """The picture's latents [B,4,h,w] (one posterior draw; given latents: repeated to the batch)."""
        if self.given_latents is not None:
            return given_latents_for_batch(self.given_latents, self.batch)  # [b,4,h,w] -> [B,4,h,w]
        return encode_image(pipe, self.pixels, self.batch, generator)  # [B,4,h,w]

    def initial_latents(self, pipe, scheduler, timesteps, generator):
        latents = self.picture_latents(pipe, generator)  # [B,4,h,w], first draw
        if not self.add_noise:
            return latents
        noise = backend.to_device(generator.randn(tuple(latents.shape), dtype=np.float32))  # [B,4,h,w]
        first_timestep = np.repeat(np.asarray(timesteps[:1]), self.batch)  # [B]
        return scheduler.add_noise(latents, noise, first_timestep)  # [B,4,h,w]

    def parameters(self):
        return {"mode": self.mode, "strength": self.strength}


class InpaintStart(SamplingStart):
    """Inpainting (diffusers' StableDiffusionInpaintPipeline): repaint where the mask is white.

    Two kinds of UNet:
      9 input channels (sd-v1-5-inpainting): each step the UNet sees [latents, mask, masked picture
        latents] stacked on channels and learned to keep the unmasked part itself;
      4 input channels (any SD UNet): after each step the unmasked part is put back,
        latents = (1 - mask) * picture latents noised to the next timestep + mask * latents.
    Draws, in diffusers' order: the picture's posterior sample [1,4,h,w] (4-channel UNets, or strength
    < 1), the noise [B,4,h,w], then the masked picture's posterior sample [1,4,h,w].
    """

    mode = "inpaint"
    encodes_picture = True

    def __init__(self, image, mask_image, strength=1.0, height=None, width=None):
        self.image, self.mask_image, self.strength = image, mask_image, strength
        self.height, self.width = height, width

    def prepare(self, pipe, batch, num_inference_steps):
        in_channels = pipe.unet.config["in_channels"]
        latent_channels = pipe.vae.config["latent_channels"]
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise NpdiffError(f"inpainting needs a UNet with {latent_channels} or {2 * latent_channels + 1} "
                              f"input channels; this one takes {in_channels}")
        self.concat = in_channels == 2 * latent_channels + 1  # an inpainting UNet: mask and picture as input
        self.strength = check_strength(self.strength)
        default_side = pipe.unet.config["sample_size"] * pipe.vae_scale_factor  # diffusers' default size
        height = default_side if self.height is None else self.height
        width = default_side if self.width is None else self.width
        self.height, self.width = check_size(height, width, *size_rule(pipe.unet.config, pipe.vae_scale_factor))
        f = pipe.vae_scale_factor
        self.batch = batch
        self.latent_shape = (batch, latent_channels, self.height // f, self.width // f)
        self.prepare_picture(pipe)
        check_denoising_steps(num_inference_steps, self.strength)

    def prepare_picture(self, pipe):
        """The picture [1,3,H,W] in [-1,1] and the mask [1,1,H,W] of 0/1 at the working size, checked."""
        self.pixels = image_to_model_input(self.image, pipe.vae_scale_factor, self.height, self.width)
        self.mask = mask_to_model_input(self.mask_image, self.height, self.width)  # [1,1,H,W] of 0/1
        if picture_size(self.image) != picture_size(self.mask_image):
            (image_w, image_h), (mask_w, mask_h) = picture_size(self.image), picture_size(self.mask_image)
            raise NpdiffError(f"image is {image_w}x{image_h} pixels but mask_image is {mask_w}x{mask_h} "
                              "(width x height); give a mask of the picture's size")

    def timesteps(self, scheduler, num_inference_steps):
        return get_timesteps(scheduler, num_inference_steps, self.strength)

    def initial_latents(self, pipe, scheduler, timesteps, generator):
        # diffusers' prepare_latents: the picture's latents when they are needed, then the noise
        is_strength_max = self.strength == 1.0
        if not self.concat or not is_strength_max or not self.add_noise:
            self.image_latents = self.picture_latents(pipe, generator)  # [B,4,h,w]
        self.noise = backend.to_device(generator.randn(self.latent_shape, dtype=np.float32))  # [B,4,h,w]
        if not self.add_noise:  # noisy already (SDXL's denoising_start): the noise serves after_step only
            latents = self.image_latents
        elif is_strength_max:
            latents = self.noise * float(scheduler.init_noise_sigma)  # [B,4,h,w]
        else:
            first_timestep = np.repeat(np.asarray(timesteps[:1]), self.batch)  # [B]
            latents = scheduler.add_noise(self.image_latents, self.noise, first_timestep)  # [B,4,h,w]

        # diffusers' prepare_mask_latents: the mask at latent size, the masked picture's latents
        mask = resize_nearest(self.mask, *self.latent_shape[2:])  # [1,1,H,W] -> [1,1,h,w]
        self.mask_latents = backend.to_device(np.repeat(mask, self.batch, axis=0))  # [B,1,h,w]
        self.masked_image_latents = self.masked_picture_latents(pipe, generator)  # [B,4,h,w] or None
        return latents

    def picture_latents(self, pipe, generator):
        """The picture's latents [B,4,h,w] (one posterior draw)."""
        return encode_image(pipe, self.pixels, self.batch, generator)

    def masked_picture_latents(self, pipe, generator):
        """The masked picture's latents [B,4,h,w] for a 9-channel UNet; None for a 4-channel one, whose
        posterior draw diffusers makes too (it encodes the masked picture, unused): its numbers are drawn, the
        encoder skipped."""
        masked_pixels = self.pixels * (self.mask < 0.5)  # [1,3,H,W], 0 (grey) where repainted
        if self.concat:
            return encode_image(pipe, masked_pixels, self.batch, generator)  # [B,4,h,w]
        generator.randn((1,) + self.latent_shape[1:], dtype=np.float32)  # [1,4,h,w]
        return None

    def unet_input(self, model_input):
        if not self.concat:
            return model_input
        xp = backend.array_module(model_input)
        copies = model_input.shape[0] // self.batch  # 2 when guiding
        mask = xp.concatenate([self.mask_latents] * copies, axis=0)  # [B,1,h,w] -> [2B,1,h,w]
        masked = xp.concatenate([self.masked_image_latents] * copies, axis=0)  # [B,4,h,w] -> [2B,4,h,w]
        return xp.concatenate([model_input, mask, masked], axis=1)  # [2B,4+1+4,h,w]

    def after_step(self, latents, step_index, timesteps, scheduler):
        if self.concat:
            return latents
        known = self.image_latents  # [B,4,h,w]; the last step puts back the picture's latents themselves
        if step_index < len(timesteps) - 1:
            next_timestep = np.asarray(timesteps[step_index + 1:step_index + 2])  # [1]
            known = scheduler.add_noise(self.image_latents, self.noise, next_timestep)  # [B,4,h,w]
        return (1 - self.mask_latents) * known + self.mask_latents * latents  # [B,4,h,w]

    def parameters(self):
        return {"mode": self.mode, "strength": self.strength}


# ---------------------------------------------------------------------------------------------
# Starting from a picture: what image-to-image and inpainting share with diffusers
# ---------------------------------------------------------------------------------------------
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
    tiling = tiling_argument(pipe.vae, getattr(pipe, "auto_vae_tiling", False))  # the memory check's choice
    encoded = pipe.vae.encode(backend.to_device(pixels), **tiling)  # [1,3,H,W] -> posterior (KL) or latents (TAESD)
    # diffusers' retrieve_latents: a KL posterior is sampled (one draw); TAESD gives latents (no draw)
    latents = encoded.latents if hasattr(encoded, "latents") else encoded.sample(generator)  # [1,4,h,w]
    latents = latents * float(pipe.vae.scaling_factor)  # [1,4,h,w]
    xp = backend.array_module(latents)
    return xp.repeat(latents, batch, axis=0)  # [1,4,h,w] -> [batch,4,h,w]


def given_latents_for_batch(latents, batch):
    """Latents given as the picture [b,4,h,w] (b divides the batch) -> [batch,4,h,w] on the backend's device."""
    copies = batch // latents.shape[0]
    return backend.to_device(np.concatenate([latents] * copies, axis=0))  # [b,4,h,w] -> [batch,4,h,w]


def is_latents(image):
    """Whether img2img's `image` is latents [B,C,h,w] (an array of 4 dimensions) rather than a picture."""
    return getattr(image, "ndim", None) == 4


def check_given_latents(pipe, image, batch):
    """img2img's `image` given as latents -> float32 [b,C,h,w] when C is the VAE's latent channels, b divides
    the batch and the UNet can take h x w (picture_size.size_rule); else NpdiffError."""
    latents = np.asarray(backend.to_numpy(image), dtype=np.float32)  # [b,C,h,w]
    channels = pipe.vae.config["latent_channels"]
    if latents.shape[1] != channels or latents.shape[0] < 1 or batch % latents.shape[0] != 0:
        raise NpdiffError(f"image given as latents must have shape [b,{channels},h,w] with b dividing the "
                          f"batch {batch}; got {tuple(latents.shape)}")
    multiple, why = size_rule(pipe.unet.config, pipe.vae_scale_factor)
    check_size(latents.shape[2] * pipe.vae_scale_factor, latents.shape[3] * pipe.vae_scale_factor, multiple, why)
    return latents
