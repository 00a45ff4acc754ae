"""Stable Diffusion XL with ControlNets: diffusers' StableDiffusionXLControlNetPipeline, called with its names.

    net = ControlNetModel.from_pretrained("controlnet-canny-sdxl-1.0")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained("sdxl-base", controlnet=net)
    out = pipe("a red circle", image=edges, controlnet_conditioning_scale=0.5, seed=1)
    out = pipe.img2img("a blue circle", image=picture, control_image=edges, strength=0.6, seed=2)
    out = pipe.inpaint("a green square", image=picture, mask_image=mask, control_image=edges, seed=3)

StableDiffusionXLPipeline's flow and hooks (npdiff/pipeline_sdxl.py) with the ControlNet hooks of
npdiff/pipeline_controlnet.py: the nets get the step's latents, text and SDXL's added conditioning (in guess
mode the conditional half of each), and their residuals go to the UNet.
"""

from npdiff.loading.weights import check_precision
from npdiff.pipeline_controlnet import ControlNetHooks, load_controlnet
from npdiff.pipeline_controlnet_call import as_net_list
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline, XLCall
from npdiff.prompt_encoding import PromptOptions
from npdiff.sampling_starts_sdxl import XLImageStart, XLInpaintStart, XLNoiseStart


class XLControlCall(XLCall):
    """One call's SDXL arguments with its ControlCall (`control`), both recorded in the picture's parameters."""

    def __init__(self, control, *args):
        super().__init__(*args)
        self.control = control

    def parameters(self):
        return {**super().parameters(), **self.control.parameters()}


class StableDiffusionXLControlNetPipeline(ControlNetHooks, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline with one or more SDXL ControlNets (`controlnet`: a ControlNetModel or a list)."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, controlnet,
                 **options):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, **options)
        self.set_controlnet(controlnet)

    @classmethod
    def from_pretrained(cls, path=None, controlnet=None, **options):
        """StableDiffusionXLPipeline.from_pretrained's model and options, with `controlnet`: a ControlNetModel,
        a ControlNet folder, or a list of them (each checked against the UNet: an SD 1.x net is refused); a
        folder's ControlNet is loaded in options' precision too."""
        precision = check_precision(options.get("precision", "fp32"))
        nets = load_controlnet(controlnet, precision=precision)
        as_net_list(nets)
        base = StableDiffusionXLPipeline.from_pretrained(path, **options)
        return cls(base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2, base.unet,
                   base.scheduler, nets, force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt,
                   requires_aesthetics_score=base.requires_aesthetics_score, scheduler_config=base.scheduler_config,
                   scheduler_name=base.scheduler_name, model_name=base.model_name)

    def __call__(self, prompt, prompt_2=None, image=None, height=None, width=None, num_inference_steps=50,
                 guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0,
                 seed=None, generator=None, latents=None, output_type="pil", controlnet_conditioning_scale=1.0,
                 guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, callback=None, callback_steps=1,
                 progress=None, clip_skip=None, prompt_syntax="plain"):
        """Text + control picture(s) -> pictures, diffusers' StableDiffusionXLControlNetPipeline arguments and
        defaults; height/width default to the first control picture's size rounded down to 8 pixels."""
        control = self.make_control(image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "image")
        if height is None and width is None:
            height, width = control.first_picture_size(self.vae_scale_factor)
        extra = XLControlCall(control, "txt2img", prompt_2, negative_prompt, negative_prompt_2, original_size,
                              crops_coords_top_left, target_size, negative_original_size,
                              negative_crops_coords_top_left, negative_target_size)
        start = XLNoiseStart(height, width, latents, None)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))

    def img2img(self, prompt, image, control_image=None, strength=0.8, prompt_2=None, num_inference_steps=50,
                guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0,
                seed=None, generator=None, output_type="pil", controlnet_conditioning_scale=0.8, guess_mode=False,
                control_guidance_start=0.0, control_guidance_end=1.0, original_size=None,
                crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                negative_aesthetic_score=2.5, callback=None, callback_steps=1, progress=None, clip_skip=None,
                prompt_syntax="plain"):
        """Picture + text + control picture(s) -> pictures, diffusers' StableDiffusionXLControlNetImg2ImgPipeline
        arguments and defaults (controlnet_conditioning_scale 0.8); the control picture is resized to the picture's
        size."""
        control = self.make_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "control_image")
        extra = XLControlCall(control, "img2img", prompt_2, negative_prompt, negative_prompt_2, original_size,
                              crops_coords_top_left, target_size, negative_original_size,
                              negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                              negative_aesthetic_score)
        start = XLImageStart(image, strength, None, None)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))

    def inpaint(self, prompt, image, mask_image, control_image=None, strength=0.9999, prompt_2=None, height=None,
                width=None, num_inference_steps=50, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                num_images_per_prompt=1, eta=0.0, seed=None, generator=None, output_type="pil",
                controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
                control_guidance_end=1.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                aesthetic_score=6.0, negative_aesthetic_score=2.5, callback=None, callback_steps=1, progress=None,
                clip_skip=None, prompt_syntax="plain"):
        """Picture + mask + text + control picture(s) -> pictures repainted where the mask is white, diffusers'
        StableDiffusionXLControlNetInpaintPipeline arguments and defaults (strength 0.9999, guidance 5,
        controlnet_conditioning_scale 1.0; height/width: the picture's size rounded down to the VAE's cell, as
        diffusers' ControlNet inpainting; no negative_* sizes: the negative row is the positive one there). The
        nets see the 4 latent channels, also beside a 9-channel inpainting UNet."""
        control = self.make_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "control_image")
        height, width = self.inpaint_size(image, height, width)
        extra = XLControlCall(control, "inpaint", prompt_2, negative_prompt, negative_prompt_2, original_size,
                              crops_coords_top_left, target_size, None, (0, 0), None, aesthetic_score,
                              negative_aesthetic_score)
        start = XLInpaintStart(image, mask_image, strength, height, width)
        return self._run(start, extra, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                         num_images_per_prompt, callback, callback_steps, output_type, progress, eta,
                         PromptOptions(clip_skip, prompt_syntax))
