"""SDXL's three sampling starts: npdiff/sampling_starts.py's, with diffusers' SDXL cuts of the schedule.

  denoising_end (all three modes)   run only the first part of the schedule: the timesteps t >= the cutoff
                                    round(T - denoising_end * T) (T = num_train_timesteps), as diffusers'
                                    SDXL pipelines do; with output_type="latent" the latents, still noisy,
                                    go to a refiner ("ensemble of experts").
  denoising_start (img2img, inpaint) start part-way instead of at `strength`: the timesteps t < the cutoff
                                    round(T - denoising_start * T) (one more for a 2nd-order scheduler
                                    that would stop between its two evaluations); no noise is added to the
                                    picture's latents, which are noisy already (the base's output).
  XLImageStart and XLInpaintStart also take latents [B,4,h,w] as their `image` (the base's
  output_type="latent"), used as they are (no VAE encoder, no scaling), as diffusers' img2img and inpaint do
  with a 4-channel image.
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.images import mask_to_model_input
from npdiff.sampling_starts import (
    ImageStart,
    InpaintStart,
    NoiseStart,
    check_given_latents,
    given_latents_for_batch,
    is_latents,
)


def check_fraction(value, what):
    """denoising_start / denoising_end: None or a number strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise NpdiffError(f"{what} must be a number strictly between 0 and 1 (the fraction of the schedule), "
                          f"got {value!r}")
    return float(value)


def check_window(denoising_start, denoising_end):
    start = check_fraction(denoising_start, "denoising_start")
    end = check_fraction(denoising_end, "denoising_end")
    if start is not None and end is not None and start >= end:
        raise NpdiffError(f"denoising_start {start} must be smaller than denoising_end {end}")
    return start, end


def cutoff_timestep(scheduler, fraction):
    """The schedule position `fraction` of the way from T down to 0, as an integer timestep."""
    total = scheduler.config["num_train_timesteps"]
    return int(round(total - fraction * total))


def cut_end(timesteps, steps, scheduler, denoising_end):
    """-> (the timesteps t >= the cutoff, their count); unchanged when denoising_end is None."""
    if denoising_end is None:
        return timesteps, steps
    cutoff = cutoff_timestep(scheduler, denoising_end)
    kept = int(sum(1 for t in np.asarray(timesteps) if t >= cutoff))
    if kept < 1:
        raise NpdiffError(f"denoising_end {denoising_end} keeps none of the {len(timesteps)} timesteps; raise it "
                          "or num_inference_steps")
    return timesteps[:kept], kept


def timesteps_from(scheduler, denoising_start):
    """-> (the timesteps t < the cutoff, their count), telling the scheduler where it begins."""
    cutoff = cutoff_timestep(scheduler, denoising_start)
    all_timesteps = scheduler.timesteps
    count = int((np.asarray(all_timesteps) < cutoff).sum())
    if getattr(scheduler, "order", 1) == 2 and count % 2 == 0:
        count += 1  # end after a 2nd-order scheduler's second evaluation, not between them
    if count < 1:
        raise NpdiffError(f"denoising_start {denoising_start} leaves no timestep to run; lower it or raise "
                          "num_inference_steps")
    t_start = len(all_timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return all_timesteps[t_start:], count


class XLNoiseStart(NoiseStart):
    """Text-to-image, with denoising_end."""

    def __init__(self, height=None, width=None, latents=None, denoising_end=None):
        super().__init__(height, width, latents)
        self.denoising_end = check_fraction(denoising_end, "denoising_end")

    def timesteps(self, scheduler, num_inference_steps):
        timesteps, steps = super().timesteps(scheduler, num_inference_steps)
        return cut_end(timesteps, steps, scheduler, self.denoising_end)

    def parameters(self):
        return {**super().parameters(), **window_parameters(None, self.denoising_end)}


class PartialSchedule:
    """For the starts from a picture: begin at denoising_start (else at `strength`), stop at denoising_end."""

    denoising_start = denoising_end = None

    def timesteps(self, scheduler, num_inference_steps):
        if self.denoising_start is None:
            timesteps, steps = super().timesteps(scheduler, num_inference_steps)
        else:
            timesteps, steps = timesteps_from(scheduler, self.denoising_start)
        return cut_end(timesteps, steps, scheduler, self.denoising_end)

    def parameters(self):
        return {**super().parameters(), **window_parameters(self.denoising_start, self.denoising_end)}


class XLImageStart(PartialSchedule, ImageStart):
    """Image-to-image (a refiner's too): a picture or latents [B,4,h,w]; denoising_start and denoising_end."""

    def __init__(self, image, strength, denoising_start=None, denoising_end=None):
        super().__init__(image, strength)
        self.denoising_start, self.denoising_end = check_window(denoising_start, denoising_end)
        self.add_noise = self.denoising_start is None

    def prepare(self, pipe, batch, num_inference_steps):
        if self.denoising_start is not None:
            self.strength = 1.0  # denoising_start decides where to begin; strength plays no part (diffusers)
        super().prepare(pipe, batch, num_inference_steps)  # latents [b,4,h,w] are taken as they are


class XLInpaintStart(PartialSchedule, InpaintStart):
    """Inpainting (9-channel SDXL inpainting UNets and plain ones), with denoising_start and denoising_end.

    `image` may be latents [b,4,h,w] (a base's inpaint with output_type="latent": the refiner's half of
    diffusers' inpainting ensemble), for a 4-channel UNet: used as the picture's latents, no VAE encoder and no
    masked picture (diffusers' "images in latent space can't be masked"); the mask is read at height x width,
    which must be the latents' size in pixels.
    """

    def __init__(self, image, mask_image, strength, height=None, width=None, denoising_start=None,
                 denoising_end=None):
        super().__init__(image, mask_image, strength, height, width)
        self.denoising_start, self.denoising_end = check_window(denoising_start, denoising_end)
        self.add_noise = self.denoising_start is None
        self.given_latents = None

    def prepare(self, pipe, batch, num_inference_steps):
        if self.denoising_start is not None:
            self.strength = 1.0  # denoising_start decides where to begin; strength plays no part (diffusers)
        super().prepare(pipe, batch, num_inference_steps)

    def prepare_picture(self, pipe):
        if not is_latents(self.image):
            return super().prepare_picture(pipe)
        if self.concat:
            raise NpdiffError("this inpainting UNet (9 input channels) sees the masked picture's latents: give it "
                              "the picture, not latents (latents as the image suit a 4-channel UNet, e.g. a refiner)")
        self.given_latents = check_given_latents(pipe, self.image, self.batch)  # [b,4,h,w]
        latent_size = tuple(self.given_latents.shape[2:])
        if latent_size != self.latent_shape[2:]:
            f = pipe.vae_scale_factor
            raise NpdiffError(f"image given as latents is {latent_size[1] * f}x{latent_size[0] * f} pixels (width x "
                              f"height) but the inpainting works at {self.width}x{self.height}: give the height and "
                              "width the latents were made at")
        self.encodes_picture = False
        self.mask = mask_to_model_input(self.mask_image, self.height, self.width)  # [1,1,H,W] of 0/1

    def picture_latents(self, pipe, generator):
        if self.given_latents is None:
            return super().picture_latents(pipe, generator)
        return given_latents_for_batch(self.given_latents, self.batch)  # [b,4,h,w] -> [B,4,h,w]

    def masked_picture_latents(self, pipe, generator):
        if self.given_latents is None:
            return super().masked_picture_latents(pipe, generator)
        return None  # latents cannot be masked: diffusers encodes nothing here (and draws nothing)


def window_parameters(denoising_start, denoising_end):
    """denoising_start/denoising_end for the picture's parameters, when set."""
    window = {}
    if denoising_start is not None:
        window["denoising_start"] = denoising_start
    if denoising_end is not None:
        window["denoising_end"] = denoising_end
    return window
