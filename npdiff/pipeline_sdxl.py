"""Stable Diffusion XL: text-to-image, image-to-image (the refiner too) and inpainting, as diffusers does them.

    pipe = StableDiffusionXLPipeline.from_pretrained("sdxl-base")        # a diffusers folder or one .safetensors
    out = pipe("a red circle", prompt_2="oil painting", negative_prompt="blurry", num_inference_steps=30, seed=1)
    out = pipe.img2img("a blue circle", image=out.images[0], strength=0.3, seed=2)
    out = pipe.inpaint("a green square", image=picture, mask_image=mask, seed=3)      # white = repaint

    # base + refiner, diffusers' "ensemble of experts": the base runs the first 80% of the schedule
    latents = base("a lion", num_inference_steps=40, denoising_end=0.8, output_type="latent", seed=4).latents
    out = refiner.img2img("a lion", image=latents, num_inference_steps=40, denoising_start=0.8, seed=4)
    # the same for inpainting: the base's inpaint to denoising_end, the refiner's inpaint of its latents
    latents = base.inpaint("a lion", image=picture, mask_image=mask, denoising_end=0.8, output_type="latent").latents
    out = refiner.inpaint("a lion", image=latents, mask_image=mask, denoising_start=0.8)

The flow is StableDiffusionPipeline's (npdiff/pipeline.py: steps 0-5, one sampling loop); this class fills
its two hooks with what SDXL's UNet takes (npdiff/sdxl_conditioning.py):
  text_conditioning  both text encoders' penultimate hidden states side by side [B,77,D1+D2] (clip_skip:
                     earlier ones; prompt_syntax "a1111": webui's chunks, [B,77*C,D1+D2]) and
                     text_encoder_2's pooled projection [B,P]; with guidance and no negative prompt,
                     zeros for both when force_zeros_for_empty_prompt (model_index.json; True for a base);
  unet_inputs        added_cond_kwargs = {"text_embeds": pooled, "time_ids": size/crop (and aesthetic score)
                     rows}, for every UNet call;
and its starts (npdiff/sampling_starts_sdxl.py) cut the schedule at denoising_end / denoising_start.
A refiner (model_index.json without text_encoder, requires_aesthetics_score) works through img2img (and
inpaint); its text_encoder_2 reads `prompt`. An LCM-distilled SDXL UNet (time_cond_proj_dim) takes the
guidance as timestep_cond, without classifier-free guidance, like any npdiff UNet.
"""

from pathlib import Path

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.hires import check_hires, hires_fix
from npdiff.hires_names import DEFAULT_HIRES_STRENGTH, DEFAULT_HIRES_UPSCALER
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_utils import (
    as_prompt_list,
    check_positive_int,
    default_model_path,
    load_components,
    model_family,
    resolve_scheduler,
)
from npdiff.prompt_encoding import CHUNK_TOKENS, PromptOptions, match_chunk_counts
from npdiff.sampling_starts_sdxl import XLImageStart, XLInpaintStart, XLNoiseStart
from npdiff.sdxl_conditioning import (
    SDXLText,
    check_add_embedding_width,
    check_pair,
    check_score,
    encode_prompt_pair,
    second_prompts,
    stack_time_ids,
    time_ids_row,
)
from npdiff.textual_inversion import load_sdxl_textual_inversion


class XLCall:
    """One call's SDXL arguments (diffusers' names), checked on arrival; the hooks read them."""

    def __init__(self, mode, prompt_2=None, negative_prompt=None, negative_prompt_2=None, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5):
        self.mode = mode
        self.prompt_2, self.negative_prompt_2 = prompt_2, negative_prompt_2
        self.negative_given = negative_prompt is not None  # diffusers zeroes only an absent negative prompt
        self.original_size = check_pair(original_size, "original_size")
        self.crops_coords_top_left = check_pair(crops_coords_top_left, "crops_coords_top_left", allow_none=False)
        self.target_size = check_pair(target_size, "target_size")
        self.negative_original_size = check_pair(negative_original_size, "negative_original_size")
        self.negative_crops_coords_top_left = check_pair(negative_crops_coords_top_left,
                                                         "negative_crops_coords_top_left", allow_none=False)
        self.negative_target_size = check_pair(negative_target_size, "negative_target_size")
        self.aesthetic_score = check_score(aesthetic_score, "aesthetic_score")
        self.negative_aesthetic_score = check_score(negative_aesthetic_score, "negative_aesthetic_score")
        self.requires_aesthetics_score = False  # set by the pipeline
        self.batch, self.do_guidance = None, None  # set by text_conditioning

    def time_id_rows(self, height, width):
        """-> (positive row, negative row) of micro-conditioning numbers, with diffusers' defaults and quirks."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        crops = self.crops_coords_top_left
        if self.mode == "txt2img":  # the negative sizes count only when both are given
            positive = time_ids_row(original, crops, target)
            if self.negative_original_size is None or self.negative_target_size is None:
                return positive, positive
            return positive, time_ids_row(self.negative_original_size, self.negative_crops_coords_top_left,
                                          self.negative_target_size)
        negative_original = self.negative_original_size or original
        negative_target = self.negative_target_size or target
        if self.requires_aesthetics_score:  # a refiner: the aesthetic score instead of the target size
            return (time_ids_row(original, crops, (self.aesthetic_score,)),
                    time_ids_row(negative_original, self.negative_crops_coords_top_left,
                                 (self.negative_aesthetic_score,)))
        # (diffusers' img2img/inpaint take the positive crop corner for the negative row here)
        return time_ids_row(original, crops, target), time_ids_row(negative_original, crops, negative_target)

    def parameters(self):
        """What the picture's parameters record besides SD's: the second prompts and non-default conditioning."""
        recorded = {}
        for name in ("prompt_2", "negative_prompt_2", "original_size", "target_size", "negative_original_size",
                     "negative_target_size"):
            if getattr(self, name):
                value = getattr(self, name)
                recorded[name] = list(value) if isinstance(value, tuple) else value
        for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            if getattr(self, name) != (0, 0):
                recorded[name] = list(getattr(self, name))
        if self.requires_aesthetics_score:
            recorded["aesthetic_score"] = self.aesthetic_score
            recorded["negative_aesthetic_score"] = self.negative_aesthetic_score
        return recorded


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """Two text encoders + tokenizers, SDXL UNet, VAE, scheduler; called like diffusers' SDXL pipelines."""

    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 force_zeros_for_empty_prompt=True, requires_aesthetics_score=False, scheduler_config=None,
                 scheduler_name=None, model_name="custom"):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise NpdiffError("an SDXL pipeline needs text_encoder_2 and tokenizer_2 (OpenCLIP bigG); an SD 1.x/2.x "
                              "model goes in npdiff.StableDiffusionPipeline")
        if (text_encoder is None) != (tokenizer is None):
            raise NpdiffError("text_encoder and tokenizer come together (a base) or are both None (a refiner)")
        super().__init__(text_encoder, tokenizer, unet, vae, scheduler, scheduler_config=scheduler_config,
                         scheduler_name=scheduler_name, model_name=model_name)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)

    @classmethod
    def from_pretrained(cls, path=None, scheduler=None, variant=None, tokenizer=None, prediction_type=None,
                        force_zeros_for_empty_prompt=None, requires_aesthetics_score=None, precision="fp32"):
        """Load an SDXL model: a diffusers folder (base: text_encoder/ and text_encoder_2/; refiner:
        text_encoder_2/ alone) or a single .safetensors file.

        scheduler: a SCHEDULERS name, an instance, or None for the model's (SDXL's Euler for a single file).
        force_zeros_for_empty_prompt / requires_aesthetics_score: None -> model_index.json's values (a single
        file: the UNet's add_embedding width says whether it takes the aesthetic score, i.e. is a refiner;
        a refiner does not zero its negative prompt, a base does, as diffusers' configs).
        precision: "fp32", "bf16", "mixed" or "bf16x3", as StableDiffusionPipeline.from_pretrained ("mixed": the
        same picture as diffusers' float32 within a level on the SDXL job measured, at most of bf16's speed).
        An SD 1.x/2.x model is an NpdiffError naming StableDiffusionPipeline.
        """
        path = default_model_path() if path is None else Path(path).expanduser()
        parts = load_components(path, variant=variant, tokenizer=tokenizer, prediction_type=prediction_type,
                                family="sdxl", precision=precision)
        scheduler_config = parts["scheduler_config"]  # SDXL's Euler when the model has none; prediction_type applied
        model_index = parts["model_index"] or {}
        if requires_aesthetics_score is None:
            requires_aesthetics_score = model_index.get("requires_aesthetics_score",
                                                        takes_aesthetic_score(parts["unet"], parts["text_encoder_2"]))
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = model_index.get("force_zeros_for_empty_prompt",
                                                           bool(model_index) or parts["text_encoder"] is not None)
        instance, name = resolve_scheduler(scheduler, scheduler_config)
        return cls(parts["vae"], parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"],
                   parts["tokenizer_2"], parts["unet"], instance,
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                   requires_aesthetics_score=requires_aesthetics_score, scheduler_config=scheduler_config,
                   scheduler_name=name, model_name=path.name)

    def load_textual_inversion(self, path, token=None, text_encoder=None, tokenizer=None):
        """An SDXL embedding file ({"clip_l": [n,768], "clip_g": [n,1280]}) into both encoders under one token;
        or, as diffusers' load_textual_inversion(vectors, token=..., text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2), one file or [n,D] array into the encoder given. -> the tokens added."""
        return load_sdxl_textual_inversion(self, path, token=token, text_encoder=text_encoder, tokenizer=tokenizer)

    def encode_prompt(self, prompt, prompt_2=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
                      negative_prompt=None, negative_prompt_2=None, clip_skip=None, prompt_syntax="plain"):
        """diffusers' SDXL encode_prompt: -> (prompt_embeds [B*n,77*C,D1+D2], negative_prompt_embeds or None,
        pooled_prompt_embeds [B*n,P], negative_pooled_prompt_embeds or None). clip_skip k: both encoders'
        hidden_states[-(k + 2)], no final norm (diffusers'); prompt_syntax "a1111": webui's weights and chunks
        (C chunks, pooled from the first; npdiff/prompt_encoding.py)."""
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        extra = XLCall("txt2img", prompt_2, negative_prompt, negative_prompt_2)
        options = PromptOptions(clip_skip, prompt_syntax)
        self.check_prompt_options(options)
        n = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        text = self.text_conditioning(prompts, negatives, n, do_classifier_free_guidance, extra, options=options)
        if not do_classifier_free_guidance:
            return text.embeddings, None, text.pooled, None
        half = text.embeddings.shape[0] // 2
        return text.embeddings[half:], text.embeddings[:half], text.pooled[half:], text.pooled[:half]

    def check_prompt_options(self, options):
        """NpdiffError when options.clip_skip skips more layers than either text encoder has (step 0)."""
        options.check_layers(self.text_encoder, "penultimate")
        options.check_layers(self.text_encoder_2, "penultimate")

    # -----------------------------------------------------------------------------------------
    # The hooks of StableDiffusionPipeline's flow
    # -----------------------------------------------------------------------------------------
    def text_conditioning(self, prompts, negatives, num_images_per_prompt, do_guidance, extra=None, options=None):
        """-> SDXLText(embeddings [B*n,77*C,D1+D2], pooled [B*n,P]), [uncond; cond] ([2*B*n,...]) when guiding;
        C = 1 unless options.prompt_syntax is "a1111". An absent negative prompt with
        force_zeros_for_empty_prompt: zeros of one chunk (then padded like any shorter negative)."""
        options = PromptOptions() if options is None else options
        extra.batch, extra.do_guidance = len(prompts) * num_images_per_prompt, do_guidance
        cond = encode_prompt_pair(self, prompts, second_prompts(extra.prompt_2, prompts, "prompt_2"), options)
        xp = backend.array_module(cond.embeddings)
        cond = SDXLText(*(xp.repeat(part, num_images_per_prompt, axis=0) for part in cond))  # prompt-major
        if not do_guidance:
            return cond
        if not extra.negative_given and self.force_zeros_for_empty_prompt:
            chunk = cond.embeddings[:, :CHUNK_TOKENS]  # [B*n,77,D]
            uncond = SDXLText(xp.zeros_like(chunk), xp.zeros_like(cond.pooled))  # [B*n,77,D], [B*n,P]
        else:
            negatives_2 = second_prompts(extra.negative_prompt_2, negatives, "negative_prompt_2")
            uncond = encode_prompt_pair(self, negatives, negatives_2, options.for_negative())  # plain: no clip skip
            uncond = SDXLText(*(xp.repeat(part, num_images_per_prompt, axis=0) for part in uncond))

        def encode_empty():
            return encode_prompt_pair(self, [""], [""], options.for_negative()).embeddings  # [1,77,D1+D2]

        cond_embeddings, uncond_embeddings = match_chunk_counts(cond.embeddings, uncond.embeddings, encode_empty)
        return SDXLText(xp.concatenate([uncond_embeddings, cond_embeddings], axis=0),   # [2*B*n,77*C,D1+D2]
                        xp.concatenate([uncond.pooled, cond.pooled], axis=0))           # [2*B*n,P]

    def unet_inputs(self, conditioning, start, extra=None):
        """-> (embeddings, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": [2B,6] or [2B,5]}})."""
        positive, negative = extra.time_id_rows(start.height, start.width)
        time_ids = stack_time_ids(positive, negative, extra.batch, extra.do_guidance,
                                  interleaved=extra.mode == "txt2img")  # [2B,k]
        added = {"text_embeds": conditioning.pooled, "time_ids": backend.to_device(time_ids)}
        return conditioning.embeddings, {"added_cond_kwargs": added}

    def _run(self, start, extra, prompt, negative_prompt, steps, guidance_scale, seed, generator,
             num_images_per_prompt, callback, callback_steps, output_type, progress, eta, prompt_options):
        """Check what SDXL adds (before any work), then the one flow of StableDiffusionPipeline."""
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        second_prompts(extra.prompt_2, prompts, "prompt_2")
        second_prompts(extra.negative_prompt_2, negatives, "negative_prompt_2")
        extra.requires_aesthetics_score = self.requires_aesthetics_score and extra.mode != "txt2img"
        ids_per_row = len(extra.time_id_rows(1, 1)[0])
        check_add_embedding_width(self.unet.config, ids_per_row, self.pooled_width(), extra.requires_aesthetics_score)
        return self._generate(start, prompt, negative_prompt, steps, guidance_scale, seed, generator,
                              num_images_per_prompt, callback, callback_steps, output_type, progress, eta=eta,
                              extra=extra, prompt_options=prompt_options)

    def pooled_width(self):
        """P, the width of text_encoder_2's pooled projection (its config's projection_dim)."""
        config = self.text_encoder_2.config
        return int(config.get("projection_dim") or config["hidden_size"])

    # -----------------------------------------------------------------------------------------
    # The three modes
    # -----------------------------------------------------------------------------------------
    def __call__(self, prompt, prompt_2=None, height=None, width=None, num_inference_steps=50, denoising_end=None,
                 guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1,
                 eta=0.0, seed=None, generator=None, latents=None, output_type="pil", original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, callback=None,
                 callback_steps=1, progress=None, clip_skip=None, prompt_syntax="plain", hires_scale=None,
                 hires_strength=DEFAULT_HIRES_STRENGTH, hires_steps=None, hires_upscaler=DEFAULT_HIRES_UPSCALER):
        """Text -> images, diffusers' StableDiffusionXLPipeline.__call__ arguments and defaults.

        prompt_2 / negative_prompt_2: what text_encoder_2 reads (default: prompt / negative_prompt).
        original_size, crops_coords_top_left, target_size (and the negative_ ones, used only when both
        negative sizes are given): the micro-conditioning, (height, width) pairs; default (height, width).
        denoising_end: stop after this fraction of the schedule (with output_type="latent", for a refiner).
        clip_skip: None, or k >= 0: both encoders' hidden_states[-(k + 2)] (diffusers'; webui's "Clip skip:
        k+1"). prompt_syntax: "plain" (diffusers', the default) or "a1111" (webui's weights, BREAK, chunks).
        hires_scale, hires_strength, hires_steps, hires_upscaler: webui's hires fix, as StableDiffusionPipeline
        (npdiff/hires.py); the second pass is img2img with diffusers' defaults for the micro-conditioning.
        Returns PipelineOutput(images, latents, seed, parameters), as StableDiffusionPipeline.
        """
        if self.requires_aesthetics_score:
            raise NpdiffError("this is an SDXL refiner (its UNet is conditioned on an aesthetic score, and it has "
                              f"{'no text_encoder' if self.text_encoder is None else 'requires_aesthetics_score'}): "
                              "it refines pictures; use pipe.img2img(prompt, image=...) with a picture or a base's "
                              "latents")
        if hires_scale is not None:
            shared = {"prompt": prompt, "prompt_2": prompt_2, "negative_prompt": negative_prompt,
                      "negative_prompt_2": negative_prompt_2, "guidance_scale": guidance_scale,
                      "num_images_per_prompt": num_images_per_prompt, "callback": callback,
                      "callback_steps": callback_steps, "progress": progress, "eta": eta, "clip_skip": clip_skip,
                      "prompt_syntax": prompt_syntax}
            first = dict(shared, num_inference_steps=num_inference_steps, height=height, width=width, seed=seed,
                         generator=generator, latents=latents, original_size=original_size,
                         crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                         negative_original_size=negative_original_size,
                         negative_crops_coords_top_left=negative_crops_coords_top_left,
                         negative_target_size=negative_target_size)
            return hires_fix(self, check_hires(hires_scale, hires_strength, hires_steps, hires_upscaler), first,
                             shared, output_type)
        extra = XLCall("txt2img", prompt_2, negative_prompt, negative_prompt_2, original_size, crops_coords_top_left,
                       target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size)
        start = XLNoiseStart(height, width, latents, denoising_end)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))

    def img2img(self, prompt, image, strength=0.3, prompt_2=None, num_inference_steps=50, denoising_start=None,
                denoising_end=None, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                num_images_per_prompt=1, eta=0.0, seed=None, generator=None, output_type="pil", original_size=None,
                crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                negative_aesthetic_score=2.5, callback=None, callback_steps=1, progress=None, clip_skip=None,
                prompt_syntax="plain"):
        """Picture (or latents [B,4,h,w] from a base's output_type="latent") + text -> pictures, diffusers'
        StableDiffusionXLImg2ImgPipeline arguments and defaults.

        strength in (0, 1]: how far into the schedule to start; denoising_start instead starts at that fraction
        of the schedule with no noise added (the base's latents are noisy already). aesthetic_score /
        negative_aesthetic_score: a refiner's conditioning (requires_aesthetics_score). clip_skip,
        prompt_syntax: as in __call__.
        """
        extra = XLCall("img2img", prompt_2, negative_prompt, negative_prompt_2, original_size, crops_coords_top_left,
                       target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size,
                       aesthetic_score, negative_aesthetic_score)
        start = XLImageStart(image, strength, denoising_start, denoising_end)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))

    def inpaint(self, prompt, image, mask_image, strength=0.9999, prompt_2=None, height=None, width=None,
                num_inference_steps=50, denoising_start=None, denoising_end=None, guidance_scale=7.5,
                negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, seed=None,
                generator=None, output_type="pil", original_size=None, crops_coords_top_left=(0, 0),
                target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                negative_target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5, callback=None,
                callback_steps=1, progress=None, clip_skip=None, prompt_syntax="plain"):
        """Picture + mask + text -> pictures repainted where the mask is white, diffusers'
        StableDiffusionXLInpaintPipeline arguments and defaults (strength 0.9999: the picture's latents,
        almost fully noised). A 9-channel SDXL inpainting UNet sees the mask; a 4-channel one gets the kept
        part put back after each step. denoising_start / denoising_end: as in img2img; `image` may be a base's
        latents [B,4,h,w] (output_type="latent") for a 4-channel UNet, as diffusers' inpainting ensemble hands
        them to its refiner (height x width: their size in pixels). clip_skip, prompt_syntax: as in __call__."""
        extra = XLCall("inpaint", prompt_2, negative_prompt, negative_prompt_2, original_size, crops_coords_top_left,
                       target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size,
                       aesthetic_score, negative_aesthetic_score)
        start = XLInpaintStart(image, mask_image, strength, height, width, denoising_start, denoising_end)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))


def takes_aesthetic_score(unet, text_encoder_2):
    """Whether the UNet's add_embedding is sized for 5 micro-conditioning numbers (a refiner's) rather than 6."""
    config = unet.config
    projection = text_encoder_2.config.get("projection_dim") or text_encoder_2.config["hidden_size"]
    time_dim = config.get("addition_time_embed_dim") or 0
    return config.get("projection_class_embeddings_input_dim") == 5 * time_dim + projection


def load_any_pipeline(path=None, **kwargs):
    """StableDiffusionXLPipeline or StableDiffusionPipeline.from_pretrained(path, **kwargs), whichever the model's
    layout says it is (pipeline_utils.model_family): how the command line and batch workers load --model."""
    path = default_model_path() if path is None else path
    cls = StableDiffusionXLPipeline if model_family(path) == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(path, **kwargs)
