"""Stable Diffusion text-to-image and image-to-image, step for step as diffusers does it.

    pipe = StableDiffusionPipeline.from_pretrained("path/to/model")       # or () for the shipped model
    out = pipe("a red circle", negative_prompt="blurry", num_inference_steps=25, seed=1)
    out.images[0].save("circle.png")

Text-to-image (diffusers' StableDiffusionPipeline.__call__):
  1. encode the prompts and the negative prompts ("" by default) with CLIP: [B,77,D] each;
  2. with guidance_scale > 1 stack them as [uncond; cond] -> [2B,77,D] for one UNet call per step;
  3. draw the initial noise [B,4,H/f,W/f] from TorchGenerator(seed) (the same numbers as
     torch.randn with a CPU torch.Generator) and scale it by the scheduler's init_noise_sigma;
  4. for each timestep t: scale the model input, predict the noise with the UNet, combine
     eps = eps_uncond + g * (eps_cond - eps_uncond), and let the scheduler step x_t -> x_{t-1};
  5. decode latents / scaling_factor with the VAE and round to 8-bit pictures.
Image-to-image (pipe.img2img, npdiff/img2img.py) starts step 4 part-way, from the encoded picture
with noise added. The same seed gives the same picture as diffusers with a CPU generator.
"""

import copy
from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.images import decoded_to_float, to_pil
from npdiff.memory_estimate import check_call_memory
from npdiff.pipeline_utils import (PipelineOutput, as_prompt_list, check_finite_decoded, check_finite_latents,
                                   check_guidance, check_output_type, check_positive_int, check_size,
                                   default_model_path, load_components, make_generator, resolve_scheduler,
                                   size_rule)


class StableDiffusionPipeline:
    """Text encoder + tokenizer + UNet + VAE + scheduler, called like diffusers' pipeline."""

    def __init__(self, text_encoder, tokenizer, unet, vae, scheduler, scheduler_config=None,
                 scheduler_name=None, model_name="custom"):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.scheduler_config = dict(scheduler_config or getattr(scheduler, "config", {}) or {})
        self.scheduler_name = scheduler_name or type(scheduler).__name__
        self.model_name = model_name
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.show_progress = True  # a tqdm bar over the denoising steps

    @classmethod
    def from_pretrained(cls, path=None, scheduler=None, variant=None, tokenizer=None):
        """Load a model: a diffusers folder or a single-file SD 1.x .safetensors checkpoint.

        path:      None -> the shipped model (default_model_path()).
        scheduler: a name from npdiff.schedulers.SCHEDULERS ("pndm", "euler_a", ...), a scheduler
                   instance, or None for the folder's scheduler/scheduler_config.json (PNDM with SD 1.5's
                   settings for a single file).
        variant:   "fp16" reads diffusion_pytorch_model.fp16.safetensors (widened to float32).
        tokenizer: a tokenizer folder; for a single file it defaults to tokenizer/ beside the file, then
                   the shipped model's, then the CLIP vocabulary rebuilt from the openai-clip package.
        """
        path = default_model_path() if path is None else Path(path).expanduser()
        parts = load_components(path, variant=variant, tokenizer=tokenizer)
        instance, name = resolve_scheduler(scheduler, parts["scheduler_config"])
        return cls(parts["text_encoder"], parts["tokenizer"], parts["unet"], parts["vae"], instance,
                   scheduler_config=parts["scheduler_config"], scheduler_name=name, model_name=path.name)

    def set_scheduler(self, scheduler):
        """Switch sampler: a SCHEDULERS name (built from this model's scheduler config) or an instance."""
        self.scheduler, self.scheduler_name = resolve_scheduler(scheduler, self.scheduler_config)

    def load_textual_inversion(self, path, token=None):
        """Add a learned embedding (diffusers or A1111 .safetensors); -> the token(s) added."""
        from npdiff.textual_inversion import load_textual_inversion

        return load_textual_inversion(self, path, token=token)

    # -----------------------------------------------------------------------------------------
    # The parts of a call
    # -----------------------------------------------------------------------------------------
    def encode_text(self, prompts):
        """List of prompts -> CLIP last hidden states [B,77,D]."""
        ids = self.tokenizer(prompts)  # [B,77] int64
        return self.text_encoder(ids)  # [B,77] -> [B,77,D]

    def encode_prompt(self, prompts, negatives, num_images_per_prompt, do_guidance):
        """-> text embeddings [B*n,77,D], or [2*B*n,77,D] as [uncond; cond] when guiding."""
        cond = self.encode_text(prompts)  # [B,77,D]
        xp = backend.array_module(cond)
        cond = xp.repeat(cond, num_images_per_prompt, axis=0)  # [B,77,D] -> [B*n,77,D], prompt-major
        if not do_guidance:
            return cond
        uncond = self.encode_text(negatives)  # [B,77,D]
        uncond = xp.repeat(uncond, num_images_per_prompt, axis=0)  # [B,77,D] -> [B*n,77,D]
        return xp.concatenate([uncond, cond], axis=0)  # -> [2*B*n,77,D]

    def decode_latents(self, latents):
        """Latents [B,4,h,w] -> images [B,3,h*f,w*f] in [-1,1] (divides by the VAE scaling factor)."""
        latents = backend.to_device(latents)
        return self.vae.decode(latents / self.vae.scaling_factor)  # [B,4,h,w] -> [B,3,H,W]

    def denoise(self, latents, timesteps, scheduler, text_embeddings, guidance_scale, generator,
                num_inference_steps, callback=None, callback_steps=1, progress=None):
        """The sampling loop (step 4 of the module docstring) over `timesteps`; -> final latents."""
        xp = backend.array_module(latents)
        do_guidance = guidance_scale > 1.0
        order = getattr(scheduler, "order", 1)
        num_warmup_steps = len(timesteps) - num_inference_steps * order
        bar = self._progress_bar(num_inference_steps, progress)
        for i, t in enumerate(timesteps):
            # 4.1 one batch for both halves when guiding: [B,4,h,w] -> [2B,4,h,w]
            model_input = xp.concatenate([latents, latents], axis=0) if do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)  # [2B,4,h,w] (Euler/LMS: / sqrt(sigma^2+1))
            # 4.2 predict the noise: [2B,4,h,w], text [2B,77,D] -> [2B,4,h,w]
            noise_pred = self.unet(model_input, t, text_embeddings)
            # 4.3 classifier-free guidance: u + g * (c - u)
            if do_guidance:
                half = noise_pred.shape[0] // 2
                noise_uncond, noise_cond = noise_pred[:half], noise_pred[half:]  # [B,4,h,w] each
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # [B,4,h,w]
            # 4.4 x_t -> x_{t-1}
            latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample  # [B,4,h,w]
            check_finite_latents(latents, i, len(timesteps), t)  # NaN/Inf -> NpdiffError naming the step
            # 4.5 progress and callback, on the steps diffusers reports them
            if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                if bar is not None:
                    bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i // order, t, latents)
        if bar is not None:
            bar.close()
        return latents

    def _progress_bar(self, total, progress):
        show = self.show_progress if progress is None else progress
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="denoising", unit="step")

    def package_output(self, latents, output_type, seed, parameters):
        """Step 5: decode the final latents, convert to output_type, and wrap in a PipelineOutput."""
        images = None
        if output_type != "latent":
            decoded = self.decode_latents(latents)  # [B,4,h,w] -> [B,3,H,W]
            check_finite_decoded(decoded)  # NaN/Inf from the VAE -> NpdiffError, not a black picture
            images = to_pil(decoded) if output_type == "pil" else decoded_to_float(decoded)
        return PipelineOutput(images=images, latents=backend.to_numpy(latents).astype(np.float32), seed=seed,
                              parameters=parameters)

    def generation_parameters(self, prompts, negatives, seed, steps, guidance_scale, height, width, scheduler_name):
        """What made a picture, as stored in its PNG (images.save_png) to make it again."""
        from npdiff import __version__

        single = len(prompts) == 1
        return {"prompt": prompts[0] if single else prompts, "negative_prompt": negatives[0] if single else negatives,
                "seed": seed, "steps": steps, "sampler": scheduler_name, "guidance_scale": guidance_scale,
                "height": height, "width": width, "model": self.model_name, "npdiff_version": __version__}

    # -----------------------------------------------------------------------------------------
    # Text to image
    # -----------------------------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, height=None,
                 width=None, seed=None, generator=None, num_images_per_prompt=1, latents=None, callback=None,
                 callback_steps=1, output_type="pil", progress=None):
        """Text -> images. Returns PipelineOutput(images, latents, seed, parameters).

        seed / generator: the noise source (npdiff.rng.TorchGenerator); neither -> a random seed, reported
        in the output. latents: initial noise [B*n,4,h,w] (before init_noise_sigma), instead of drawing it.
        callback(step, timestep, latents) runs every `callback_steps` steps.
        """
        # 0. check the arguments
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        steps = check_positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = check_guidance(guidance_scale)
        num_images_per_prompt = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        callback_steps = check_positive_int(callback_steps, "callback_steps")
        check_output_type(output_type)
        default_side = self.unet.config["sample_size"] * self.vae_scale_factor
        height = default_side if height is None else height
        width = default_side if width is None else width
        height, width = check_size(height, width, *size_rule(self.unet.config, self.vae_scale_factor))
        batch = len(prompts) * num_images_per_prompt
        check_call_memory(self, batch, height, width, guidance_scale > 1.0)  # refuse what cannot fit
        latent_shape = (batch, self.unet.config["in_channels"], height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if latents is not None:
            latents = backend.to_numpy(latents)
            if tuple(latents.shape) != latent_shape:
                raise NpdiffError(f"latents must have shape {latent_shape} for this prompt batch and size, "
                                  f"got {tuple(latents.shape)}")
        generator, seed = make_generator(seed, generator)
        scheduler = copy.deepcopy(self.scheduler)  # each call starts from a fresh scheduler state

        # 1-2. text embeddings, [uncond; cond] when guiding
        do_guidance = guidance_scale > 1.0
        text_embeddings = self.encode_prompt(prompts, negatives, num_images_per_prompt, do_guidance)

        # 3. timesteps and initial noise (drawn after the text is encoded, as diffusers does)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        if latents is None:
            latents = generator.randn(latent_shape, dtype=np.float32)  # [B*n,4,h,w]
        latents = backend.to_device(latents) * float(scheduler.init_noise_sigma)  # [B*n,4,h,w] float32

        # 4. the sampling loop
        latents = self.denoise(latents, timesteps, scheduler, text_embeddings, guidance_scale, generator, steps,
                               callback=callback, callback_steps=callback_steps, progress=progress)

        # 5. decode
        parameters = self.generation_parameters(prompts, negatives, seed, steps, guidance_scale, height, width,
                                      self.scheduler_name)
        return self.package_output(latents, output_type, seed, parameters)

    # -----------------------------------------------------------------------------------------
    # Image to image
    # -----------------------------------------------------------------------------------------
    def img2img(self, prompt, image, strength=0.8, negative_prompt=None, num_inference_steps=50,
                guidance_scale=7.5, seed=None, generator=None, num_images_per_prompt=1, callback=None,
                callback_steps=1, output_type="pil", progress=None):
        """Picture + text -> pictures: noise the encoded picture to `strength`, then denoise.

        image: PIL image, uint8 array [H,W,3] or float array [H,W,3] in [0,1]; sides are rounded down to
        a multiple of pipeline_utils.size_rule (64 pixels for SD). strength in (0, 1]: 1 starts from pure
        noise, small values stay close.
        """
        from npdiff.img2img import run_img2img

        return run_img2img(self, prompt, image, strength, negative_prompt, num_inference_steps, guidance_scale,
                           seed, generator, num_images_per_prompt, callback, callback_steps, output_type,
                           progress)
