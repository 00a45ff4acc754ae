"""Stable Diffusion text-to-image, image-to-image and inpainting, step for step as diffusers does them.

    pipe = StableDiffusionPipeline.from_pretrained("path/to/model")       # or () for the shipped model
    out = pipe("a red circle", negative_prompt="blurry", num_inference_steps=25, seed=1)
    out.images[0].save("circle.png")
    out = pipe.img2img("a blue circle", image=out.images[0], strength=0.6, seed=2)
    out = pipe.inpaint("a green square", image=picture, mask_image=mask, seed=3)   # white = repaint

Every mode is one flow, _generate, with these steps (diffusers' StableDiffusionPipeline.__call__):
  0. check the arguments, those of every mode and then the start's own, and refuse a call whose
     memory estimate (memory_estimate.py) cannot fit, all before any long work;
  1. encode the prompts and the negative prompts ("" by default) with CLIP: [B,77,D] each (with
     prompt_syntax="a1111", webui's weights and chunks: [B,77*C,D], the shorter padded; clip_skip picks an
     earlier hidden state; npdiff/prompt_encoding.py);
  2. with guidance_scale > 1 stack them as [uncond; cond] -> [2B,77,D] for one UNet call per step
     (not for an LCM-distilled UNet, which takes the guidance scale as timestep_cond instead);
  3. the timesteps and the initial latents, drawn from TorchGenerator(seed) (the same numbers as
     torch.randn with a CPU torch.Generator) after the text is encoded, as diffusers does;
  4. for each timestep t: scale the model input, predict the noise with the UNet, combine
     eps = eps_uncond + g * (eps_cond - eps_uncond), and let the scheduler step x_t -> x_{t-1};
     a NaN or Inf in the latents stops the call with an NpdiffError naming the step; a callback that
     raises pipeline_utils.StopSampling ends the loop there (an interrupt), and the call goes on to 5
     with the latents it has;
  5. decode latents / scaling_factor with the VAE (NaN/Inf there: NpdiffError, not a black
     picture; in tiles with pipe.enable_vae_tiling(), or when step 0 found the whole picture would not
     fit: npdiff/models/vae_tiling.py) and round to 8-bit pictures.
Between the steps each model whose stage is over (the text encoder after 1, the UNet after 4, the VAE
after 5) releases the resident pages of its memory-mapped weights (release_resident_pages, in
pipeline_memory.py with the VAE and its tiling): they
stay in the page cache and come back on the next call, so at no time are all weights resident, and the
VAE decode runs without the UNet's weights beside its activations.
Models that take more than the text embeddings (SDXL: npdiff/pipeline_sdxl.py) subclass this class and
override hooks of the same flow: text_conditioning (steps 1-2), unet_inputs (what every UNet call of
step 4 takes besides latents and timestep) and step_unet_inputs (what one step's call takes: a ControlNet's
residuals, npdiff/pipeline_controlnet.py), with their own arguments in `extra`.
What differs between the modes is a start object (npdiff/sampling_starts.py): text-to-image
(NoiseStart) starts from noise over all timesteps; image-to-image (ImageStart) starts step 4
part-way, from the encoded picture with noise added; inpainting (InpaintStart) also gives an
inpainting UNet the mask and the masked picture in step 4.2, or with an ordinary UNet puts the kept
part back after each step 4.4. The same seed gives the same picture as diffusers with a CPU generator.
"""

import copy
import inspect
import sys
import threading
from pathlib import Path

import numpy as np

from npdiff import __version__, backend
from npdiff.freed_memory import keep_freed_memory
from npdiff.hires import check_hires, hires_fix
from npdiff.hires_names import DEFAULT_HIRES_STRENGTH, DEFAULT_HIRES_UPSCALER
from npdiff.images import decoded_to_float, to_pil
from npdiff.lora import load_lora_weights, lora_parameters, unload_lora_weights
from npdiff.memory_estimate import check_call_memory
from npdiff.models.blocks import guidance_scale_embedding
from npdiff.pipeline_memory import PipelineMemoryMixin
from npdiff.pipeline_utils import (
    PipelineOutput,
    StopSampling,
    as_prompt_list,
    check_callback,
    check_eta,
    check_finite_decoded,
    check_finite_latents,
    check_guidance,
    check_output_type,
    check_positive_int,
    default_model_path,
    load_components,
    make_generator,
    resolve_scheduler,
)
from npdiff.prompt_encoding import PromptOptions, encode_prompts, match_chunk_counts
from npdiff.sampling_starts import ImageStart, InpaintStart, NoiseStart
from npdiff.textual_inversion import load_textual_inversion


class StableDiffusionPipeline(PipelineMemoryMixin):
    """Text encoder + tokenizer + UNet + VAE + scheduler, called like diffusers' pipeline."""

    text_encoder_names = ("text_encoder",)  # the models stage 1 runs (release_resident_pages after it)
    auto_vae_tiling = False  # this call's memory check switched VAE tiling on (memory_estimate.py)
    # One sampling call at a time in a process, whichever thread calls: a call keeps its state on the pipeline
    # (auto_vae_tiling, steps_done), and the kernels run one parallel kernel at a time anyway (npdiff/jit.py)
    one_call_at_a_time = threading.RLock()

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
        self.show_progress = True  # a tqdm bar over the denoising steps
        self.release_weights_between_stages = True  # see release_resident_pages

    @property
    def precision(self):
        """"fp32" or "bf16": what the UNet's Linear and Conv2d layers hold (from_pretrained's precision)."""
        return getattr(self.unet, "precision", "fp32")

    def do_classifier_free_guidance(self, guidance_scale):
        """diffusers' rule: guide when guidance_scale > 1, except with an LCM-distilled UNet
        (time_cond_proj_dim), which takes the guidance scale as an input (timestep_cond) instead."""
        return guidance_scale > 1.0 and self.unet.config.get("time_cond_proj_dim") is None

    @classmethod
    def from_pretrained(cls, path=None, scheduler=None, variant=None, tokenizer=None, prediction_type=None,
                        precision="fp32"):
        """Load a model: a diffusers folder or a single-file SD 1.x/2.x .safetensors checkpoint.

        path:      None -> the shipped model (default_model_path()).
        scheduler: a name from npdiff.schedulers.SCHEDULERS ("pndm", "euler_a", ...), a scheduler
                   instance, or None for the folder's scheduler/scheduler_config.json (PNDM with SD 1.5's
                   settings for a single file).
        variant:   "fp16" reads diffusion_pytorch_model.fp16.safetensors (widened to float32).
        tokenizer: a tokenizer folder; for a single file it defaults to tokenizer/ beside the file, then
                   the shipped model's, then the CLIP vocabulary rebuilt from the openai-clip package
                   (padded with "!" for SD 2.x).
        prediction_type: "epsilon" or "v_prediction" instead of the model's (an SD 2.x single file:
                   v_prediction, as diffusers; pass "epsilon" for the 512-pixel SD 2.x base models).
        precision: "fp32", or "bf16": the networks' Linear and Conv2d weights held in bfloat16 (half the
                   memory; their products on the CPU's AVX-512 BF16 instructions, summed in float32), norms,
                   attention scores, softmax and the scheduler in float32 (npdiff/models/precision.py); or
                   "mixed": only the UNet's transformer matmuls and attention in bfloat16, the rest float32
                   (float32's picture within a level or two, most of bf16's speed); or "bf16x3".
        """
        path = default_model_path() if path is None else Path(path).expanduser()
        parts = load_components(path, variant=variant, tokenizer=tokenizer, prediction_type=prediction_type,
                                precision=precision)
        instance, name = resolve_scheduler(scheduler, parts["scheduler_config"])
        return cls(parts["text_encoder"], parts["tokenizer"], parts["unet"], parts["vae"], instance,
                   scheduler_config=parts["scheduler_config"], scheduler_name=name, model_name=path.name)

    def set_scheduler(self, scheduler):
        """Switch sampler: a SCHEDULERS name (built from this model's scheduler config) or an instance."""
        self.scheduler, self.scheduler_name = resolve_scheduler(scheduler, self.scheduler_config)

    def load_textual_inversion(self, path, token=None):
        """Add a learned embedding (diffusers or A1111 .safetensors); -> the token(s) added."""
        return load_textual_inversion(self, path, token=token)

    def load_lora_weights(self, path, scale=1.0, adapter_name=None):
        """Fuse a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) into the UNet and text encoder weights,
        W += scale * alpha/r * up @ down, as diffusers' load_lora_weights + fuse_lora(lora_scale=scale)."""
        return load_lora_weights(self, path, scale=scale, adapter_name=adapter_name)

    def unload_lora_weights(self):
        """Put back the original weights of every layer a loaded LoRA changed (nothing loaded: no-op)."""
        unload_lora_weights(self)

    # -----------------------------------------------------------------------------------------
    # The parts of a call
    # -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, clip_skip=None, prompt_syntax="plain",
                      num_images_per_prompt=1, do_classifier_free_guidance=True):
        """-> (prompt_embeds [B*n,77*C,D], negative_prompt_embeds [B*n,77*C,D] or None): what the UNet sees.

        clip_skip: None, or k >= 0 to read the output k layers before the last, through the final layer
        norm (diffusers' clip_skip; webui's "Clip skip: k+1"). prompt_syntax: "plain" (diffusers': one chunk
        of 77 tokens, longer prompts cut with a warning) or "a1111" (webui's weights, BREAK and chunks of 75,
        C chunks; npdiff/prompt_encoding.py)."""
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        options = PromptOptions(clip_skip, prompt_syntax)
        self.check_prompt_options(options)
        n = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        embeddings = self.text_conditioning(prompts, negatives, n, do_classifier_free_guidance, options=options)
        if not do_classifier_free_guidance:
            return embeddings, None
        half = embeddings.shape[0] // 2
        return embeddings[half:], embeddings[:half]  # [uncond; cond] -> cond, uncond

    def check_prompt_options(self, options):
        """NpdiffError when options.clip_skip skips more layers than the text encoder has (step 0)."""
        options.check_layers(self.text_encoder, "last")

    def text_conditioning(self, prompts, negatives, num_images_per_prompt, do_guidance, extra=None, options=None):
        """Steps 1-2: what the UNet is conditioned on, [uncond; cond] when guiding; SD: the text embeddings
        [B*n,77*C,D] or [2*B*n,77*C,D] read as `options` (PromptOptions) says. A subclass returns its own
        (SDXL: both encoders and the pooled embedding), built from its per-call arguments in `extra`."""
        options = PromptOptions() if options is None else options
        cond = encode_prompts(self.tokenizer, self.text_encoder, prompts, options).embeddings  # [B,77*C,D]
        xp = backend.array_module(cond)
        cond = xp.repeat(cond, num_images_per_prompt, axis=0)  # [B,77*C,D] -> [B*n,77*C,D], prompt-major
        if not do_guidance:
            return cond
        negative_options = options.for_negative()  # plain: no clip skip for the negative prompt, as diffusers
        uncond = encode_prompts(self.tokenizer, self.text_encoder, negatives, negative_options).embeddings
        uncond = xp.repeat(uncond, num_images_per_prompt, axis=0)  # [B,77*C',D] -> [B*n,77*C',D]

        def encode_empty():
            return encode_prompts(self.tokenizer, self.text_encoder, [""], negative_options).embeddings  # [1,77,D]

        cond, uncond = match_chunk_counts(cond, uncond, encode_empty)  # a1111: the shorter padded
        return xp.concatenate([uncond, cond], axis=0)  # -> [2*B*n,77*C,D]

    def unet_inputs(self, conditioning, start, extra=None):
        """-> (encoder_hidden_states, keyword arguments for every UNet call) from text_conditioning's result;
        SD: the text embeddings and nothing more (SDXL adds added_cond_kwargs)."""
        return conditioning, {}

    def step_unet_inputs(self, model_input, t, step_index, step_count, encoder_hidden_states, unet_kwargs,
                         do_guidance, extra=None):
        """-> the keyword arguments of step `step_index`'s UNet call: unet_inputs' own for SD and SDXL; a
        ControlNet pipeline (npdiff/pipeline_controlnet.py) adds its nets' residuals for this step, computed
        from the scaled model input [2B,4,h,w] (before an inpainting UNet's extra channels)."""
        return unet_kwargs

    def denoise(self, latents, timesteps, scheduler, text_embeddings, guidance_scale, generator,
                num_inference_steps, callback=None, callback_steps=1, progress=None, start=None,
                eta=0.0, extra=None):
        """The sampling loop (step 4 of the module docstring) over `timesteps`; -> final latents. A callback
        that raises StopSampling ends the loop after the step it was told of (self.steps_done says how many
        steps ran).

        start: the sampling start (npdiff/sampling_starts.py) whose unet_input and after_step hooks run
        in each step; None -> NoiseStart's, which change nothing. text_embeddings: text_conditioning's
        result, turned into the UNet's inputs by unet_inputs(text_embeddings, start, extra)."""
        start = NoiseStart() if start is None else start
        xp = backend.array_module(latents)
        do_guidance = self.do_classifier_free_guidance(guidance_scale)
        # 4.0 an LCM-distilled UNet gets the embedded guidance_scale - 1 as timestep_cond [B,D]; schedulers
        #     whose step takes eta (DDIM, TCD) get the pipeline's eta (diffusers' prepare_extra_step_kwargs)
        text_embeddings, unet_kwargs = self.unet_inputs(text_embeddings, start, extra)  # SDXL: added_cond_kwargs
        step_kwargs = {"generator": generator}
        if self.unet.config.get("time_cond_proj_dim") is not None:
            guidance = np.full(latents.shape[0], guidance_scale - 1, dtype=np.float32)          # [B]
            unet_kwargs["timestep_cond"] = guidance_scale_embedding(guidance, self.unet.config["time_cond_proj_dim"])
        if "eta" in inspect.signature(scheduler.step).parameters:
            step_kwargs["eta"] = eta
        order = getattr(scheduler, "order", 1)
        num_warmup_steps = len(timesteps) - num_inference_steps * order
        bar = self._progress_bar(num_inference_steps, progress)
        self.steps_done = None  # None: every step ran
        for i, t in enumerate(timesteps):
            # 4.1 one batch for both halves when guiding: [B,4,h,w] -> [2B,4,h,w]
            model_input = xp.concatenate([latents, latents], axis=0) if do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)  # [2B,4,h,w] (Euler/LMS: / sqrt(sigma^2+1))
            step_unet_kwargs = self.step_unet_inputs(model_input, t, i, len(timesteps), text_embeddings,
                                                     unet_kwargs, do_guidance, extra)  # ControlNet: residuals
            model_input = start.unet_input(model_input)  # [2B,4,h,w] (inpainting UNets: [2B,9,h,w])
            # 4.2 predict the noise: [2B,4,h,w], text [2B,77,D] -> [2B,4,h,w]
            noise_pred = self.unet(model_input, t, text_embeddings, **step_unet_kwargs)
            # 4.3 classifier-free guidance: u + g * (c - u)
            if do_guidance:
                half = noise_pred.shape[0] // 2
                noise_uncond, noise_cond = noise_pred[:half], noise_pred[half:]  # [B,4,h,w] each
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # [B,4,h,w]
            # 4.4 x_t -> x_{t-1}, then what the start does after a step
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample  # [B,4,h,w]
            latents = start.after_step(latents, i, timesteps, scheduler)  # [B,4,h,w] (inpainting: known part back)
            check_finite_latents(latents, i, len(timesteps), t)  # NaN/Inf -> NpdiffError naming the step
            # 4.5 progress and callback, on the steps diffusers reports them
            if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                if bar is not None:
                    bar.update()
                if callback is not None and i % callback_steps == 0:
                    try:
                        callback(i // order, t, latents)
                    except StopSampling:  # an interrupt: keep the latents of this step, skip the rest
                        self.steps_done = i // order + 1
                        break
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
        single = len(prompts) == 1
        parameters = {"prompt": prompts[0] if single else prompts,
                      "negative_prompt": negatives[0] if single else negatives,
                      "seed": seed, "steps": steps, "sampler": scheduler_name, "guidance_scale": guidance_scale,
                      "height": height, "width": width, "model": self.model_name, "npdiff_version": __version__}
        if self.precision != "fp32":  # bf16 pictures differ from float32 ones by a few levels: --reproduce needs it
            parameters["precision"] = self.precision
        loras = lora_parameters(self)  # [{"name": file stem, "scale", "sha256": 12 hex digits}], never a path
        if loras:
            parameters["loras"] = loras
        return parameters

    # -----------------------------------------------------------------------------------------
    # The one sampling flow, and its three ways to start
    # -----------------------------------------------------------------------------------------
    def _generate(self, start, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                  num_images_per_prompt, callback, callback_steps, output_type, progress, eta=0.0, extra=None,
                  prompt_options=None):
        """Steps 0-5 of the module docstring; `start` says how the latents start and what follows each step;
        `extra`: a subclass's own per-call arguments, for its hooks (None for SD); prompt_options: a
        PromptOptions (clip skip, prompt syntax), None for the defaults."""
        with self.one_call_at_a_time:  # another thread's call on this or any pipeline waits for this one
            return self._generate_now(start, prompt, negative_prompt, num_inference_steps, guidance_scale, seed,
                                      generator, num_images_per_prompt, callback, callback_steps, output_type,
                                      progress, eta, extra, prompt_options)

    def _generate_now(self, start, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                      num_images_per_prompt, callback, callback_steps, output_type, progress, eta, extra,
                      prompt_options):
        """_generate, holding one_call_at_a_time."""
        # 0. check the arguments: those of every mode, then the start's own (size, picture, mask, strength)
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        steps = check_positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = check_guidance(guidance_scale)
        num_images_per_prompt = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        callback, callback_steps = check_callback(callback, callback_steps)
        eta = check_eta(eta)
        check_output_type(output_type)
        prompt_options = PromptOptions() if prompt_options is None else prompt_options
        self.check_prompt_options(prompt_options)
        start.prepare(self, len(prompts) * num_images_per_prompt, steps)
        do_guidance = self.do_classifier_free_guidance(guidance_scale)  # never for an LCM-distilled UNet
        memory = check_call_memory(self, len(prompts) * num_images_per_prompt, start.height, start.width,
                                   do_guidance, encode=start.encodes_picture,  # refuse what cannot fit, before any work
                                   lower=("image",) if start.mode == "img2img" else ("size",))  # what set the size
        self.auto_vae_tiling = bool(memory and memory["vae_tiling_auto"])  # the VAE in tiles: fits then
        if self.auto_vae_tiling:
            print(f"npdiff: note: {memory['vae_tiling_note']}", file=sys.stderr)
        generator, seed = make_generator(seed, generator)
        scheduler = copy.deepcopy(self.scheduler)  # each call starts from a fresh scheduler state

        # 1-2. text embeddings, [uncond; cond] when guiding
        text_embeddings = self.text_conditioning(prompts, negatives, num_images_per_prompt, do_guidance, extra,
                                                 options=prompt_options)
        self._stage_done(*self.text_encoder_names)

        # 3. timesteps and initial latents (drawn after the text is encoded, as diffusers does)
        scheduler.set_timesteps(steps)
        timesteps, denoising_steps = start.timesteps(scheduler, steps)
        latents = start.initial_latents(self, scheduler, timesteps, generator)  # [B*n,4,h,w] float32
        if start.encodes_picture:
            self._stage_done("vae")  # img2img/inpainting encoded the picture; the decoder comes after step 4

        # 4. the sampling loop (each step's UNet reuses the memory the one before freed: npdiff/freed_memory.py)
        with keep_freed_memory():
            latents = self.denoise(latents, timesteps, scheduler, text_embeddings, guidance_scale, generator,
                                   denoising_steps, callback=callback, callback_steps=callback_steps,
                                   progress=progress, start=start, eta=eta, extra=extra)
        self._stage_done("unet")

        # 5. decode
        parameters = self.generation_parameters(prompts, negatives, seed, steps, guidance_scale, start.height,
                                                start.width, self.scheduler_name)
        parameters.update(start.parameters(), eta=eta)  # eta changes DDIM's and TCD's pixels: recorded
        parameters.update(prompt_options.parameters())  # prompt_syntax, clip_skip when not the defaults
        if self.vae_tiling_on():
            parameters["vae_tiling"] = True  # tiles change the pixels slightly: --reproduce turns it on again
        if self.steps_done is not None:  # interrupted (StopSampling): not the picture `steps` would make
            parameters["steps_done"] = self.steps_done
        if extra is not None:
            parameters.update(extra.parameters())
        output = self.package_output(latents, output_type, seed, parameters)
        self._stage_done("vae")
        return output

    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, height=None,
                 width=None, seed=None, generator=None, num_images_per_prompt=1, latents=None, callback=None,
                 callback_steps=1, output_type="pil", progress=None, eta=0.0, clip_skip=None,
                 prompt_syntax="plain", hires_scale=None, hires_strength=DEFAULT_HIRES_STRENGTH, hires_steps=None,
                 hires_upscaler=DEFAULT_HIRES_UPSCALER):
        """Text -> images. Returns PipelineOutput(images, latents, seed, parameters).

        seed / generator: the noise source (npdiff.rng.TorchGenerator); neither -> a random seed, reported
        in the output. latents: initial noise [B*n,4,h,w] (before init_noise_sigma), instead of drawing it.
        callback(step, timestep, latents) runs every `callback_steps` steps. eta: passed to schedulers
        whose step takes one (DDIM's eta, TCD's gamma), 0 by default as in diffusers.
        clip_skip: None, or k >= 0 to condition on the output k layers before the text encoder's last
        (diffusers' clip_skip; webui's "Clip skip: k+1"). prompt_syntax: "plain" (diffusers' reading, the
        default) or "a1111" (webui's (word:1.2), [word], BREAK and prompts of any length); see encode_prompt.
        hires_scale: webui's hires fix (npdiff/hires.py): this call at height x width, upscaled hires_scale
        times with hires_upscaler ("latent", "latent-nearest", "latent-nearest-exact", "latent-bicubic",
        "lanczos"), then img2img at hires_strength with hires_steps steps (None: num_inference_steps).
        """
        if hires_scale is not None:
            shared = {"prompt": prompt, "negative_prompt": negative_prompt, "guidance_scale": guidance_scale,
                      "num_images_per_prompt": num_images_per_prompt, "callback": callback,
                      "callback_steps": callback_steps, "progress": progress, "eta": eta, "clip_skip": clip_skip,
                      "prompt_syntax": prompt_syntax}
            first = dict(shared, num_inference_steps=num_inference_steps, height=height, width=width, seed=seed,
                         generator=generator, latents=latents)
            return hires_fix(self, check_hires(hires_scale, hires_strength, hires_steps, hires_upscaler), first,
                             shared, output_type)
        return self._generate(NoiseStart(height, width, latents), prompt, negative_prompt, num_inference_steps,
                              guidance_scale, seed, generator, num_images_per_prompt, callback, callback_steps,
                              output_type, progress, eta=eta,
                              prompt_options=PromptOptions(clip_skip, prompt_syntax))

    def img2img(self, prompt, image, strength=0.8, negative_prompt=None, num_inference_steps=50,
                guidance_scale=7.5, seed=None, generator=None, num_images_per_prompt=1, callback=None,
                callback_steps=1, output_type="pil", progress=None, eta=0.0, clip_skip=None,
                prompt_syntax="plain"):
        """Picture + text -> pictures: noise the encoded picture to `strength`, then denoise.

        image: PIL image, uint8 array [H,W,3] or float array [H,W,3] in [0,1]; sides are rounded down to
        a multiple of picture_size.size_rule (64 pixels for SD). strength in (0, 1]: 1 starts from pure
        noise, small values stay close. eta, clip_skip, prompt_syntax: as in __call__.
        """
        return self._generate(ImageStart(image, strength), prompt, negative_prompt, num_inference_steps,
                              guidance_scale, seed, generator, num_images_per_prompt, callback, callback_steps,
                              output_type, progress, eta=eta,
                              prompt_options=PromptOptions(clip_skip, prompt_syntax))

    def inpaint(self, prompt, image, mask_image, strength=1.0, negative_prompt=None, num_inference_steps=50,
                guidance_scale=7.5, seed=None, generator=None, num_images_per_prompt=1, height=None, width=None,
                callback=None, callback_steps=1, output_type="pil", progress=None, eta=0.0, clip_skip=None,
                prompt_syntax="plain"):
        """Picture + mask + text -> pictures repainted where the mask is white (diffusers' inpaint pipeline).

        image: PIL image, uint8 array [H,W,3] or float array [H,W,3] in [0,1]. mask_image: the same size,
        a PIL image in any mode or an array [H,W] (bool, uint8, float in [0,1]); >= half white = repaint.
        height, width: the size to work at, multiples of picture_size.size_rule (64 pixels for SD;
        default: the model's, as diffusers); the picture and mask are resized to it. strength in (0, 1]:
        1 repaints from pure noise.
        A 9-channel inpainting UNet (sd-v1-5-inpainting) sees the mask; any 4-channel UNet works too,
        its kept part put back after each step. eta, clip_skip, prompt_syntax: as in __call__.
        """
        return self._generate(InpaintStart(image, mask_image, strength, height, width), prompt, negative_prompt,
                              num_inference_steps, guidance_scale, seed, generator, num_images_per_prompt,
                              callback, callback_steps, output_type, progress, eta=eta,
                              prompt_options=PromptOptions(clip_skip, prompt_syntax))
