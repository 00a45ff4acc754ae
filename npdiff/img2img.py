"""Image-to-image: start the sampling loop part-way, from a picture with noise added.

As diffusers' StableDiffusionImg2ImgPipeline does it, in the same order of random draws:
  1. the picture -> [1,3,H,W] in [-1,1] (sides rounded down to a multiple of the VAE factor times
     the UNet's downsampling, pipeline_utils.size_rule: 8 x 8 = 64 pixels for SD);
  2. encode it: z = posterior.sample(generator) * scaling_factor   (first draw: [1,4,h,w]);
     repeated to the batch when there are several prompts / images per prompt;
  3. timesteps from strength (diffusers' get_timesteps): with N steps, skip the first
     N - min(int(N * strength), N) of them (times the scheduler's order), and tell the scheduler
     where it begins (set_begin_index);
  4. noise the latents to the first kept timestep: add_noise(z, noise, t0)  (second draw: [B,4,h,w]);
  5. denoise over the kept timesteps and decode, exactly like text-to-image.
"""

import copy

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.images import image_to_model_input
from npdiff.memory_estimate import check_call_memory
from npdiff.pipeline_utils import (as_prompt_list, check_guidance, check_output_type, check_positive_int,
                                   check_strength, make_generator, size_rule)


def get_timesteps(scheduler, num_inference_steps, strength):
    """-> (the timesteps to run, how many denoising steps that is), setting the scheduler's begin index."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise NpdiffError(f"strength {strength} with num_inference_steps {num_inference_steps} leaves no "
                          f"denoising step (int(steps * strength) = 0); raise one of them")
    t_start = max(num_inference_steps - init_timestep, 0)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[t_start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return timesteps, num_inference_steps - t_start


def encode_image(pipe, pixels, batch, generator):
    """Step 2: pixels [1,3,H,W] in [-1,1] -> scaled latents [batch,4,h,w] (one posterior sample, repeated)."""
    posterior = pipe.vae.encode(backend.to_device(pixels))  # [1,3,H,W] -> distribution over [1,4,h,w]
    latents = posterior.sample(generator) * float(pipe.vae.scaling_factor)  # [1,4,h,w]
    xp = backend.array_module(latents)
    return xp.repeat(latents, batch, axis=0)  # [1,4,h,w] -> [batch,4,h,w]


def run_img2img(pipe, prompt, image, strength, negative_prompt, num_inference_steps, guidance_scale, seed,
                generator, num_images_per_prompt, callback, callback_steps, output_type, progress):
    """pipe.img2img's body (see StableDiffusionPipeline.img2img for the arguments)."""
    # 0. check the arguments
    prompts, negatives = as_prompt_list(prompt, negative_prompt)
    steps = check_positive_int(num_inference_steps, "num_inference_steps")
    guidance_scale = check_guidance(guidance_scale)
    strength = check_strength(strength)
    num_images_per_prompt = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
    callback_steps = check_positive_int(callback_steps, "callback_steps")
    check_output_type(output_type)
    generator, seed = make_generator(seed, generator)
    multiple, _ = size_rule(pipe.unet.config, pipe.vae_scale_factor)
    pixels = image_to_model_input(image, multiple)  # 1. [1,3,H,W] in [-1,1], sides the UNet can take
    scheduler = copy.deepcopy(pipe.scheduler)
    batch = len(prompts) * num_images_per_prompt
    check_call_memory(pipe, batch, pixels.shape[2], pixels.shape[3], guidance_scale > 1.0, encode=True)

    # text embeddings, [uncond; cond] when guiding
    text_embeddings = pipe.encode_prompt(prompts, negatives, num_images_per_prompt, guidance_scale > 1.0)

    # 3. timesteps from strength
    scheduler.set_timesteps(steps)
    timesteps, denoising_steps = get_timesteps(scheduler, steps, strength)
    first_timestep = np.repeat(np.asarray(timesteps[:1]), batch)  # [batch]

    # 2, 4. encode, then noise to the first kept timestep (draw order: posterior sample, then noise)
    latents = encode_image(pipe, pixels, batch, generator)  # [batch,4,h,w]
    noise = backend.to_device(generator.randn(tuple(latents.shape), dtype=np.float32))  # [batch,4,h,w]
    latents = scheduler.add_noise(latents, noise, first_timestep)  # [batch,4,h,w]

    # 5. denoise and decode
    latents = pipe.denoise(latents, timesteps, scheduler, text_embeddings, guidance_scale, generator,
                           denoising_steps, callback=callback, callback_steps=callback_steps, progress=progress)
    height = latents.shape[2] * pipe.vae_scale_factor
    width = latents.shape[3] * pipe.vae_scale_factor
    parameters = pipe.generation_parameters(prompts, negatives, seed, steps, guidance_scale, height, width,
                                  pipe.scheduler_name)
    parameters["strength"] = strength
    return pipe.package_output(latents, output_type, seed, parameters)
