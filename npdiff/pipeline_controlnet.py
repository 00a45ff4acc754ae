"""Stable Diffusion 1.x/2.x with ControlNets: the picture follows a control picture (edges, depth, pose)
while the prompt sets its content; diffusers' StableDiffusionControlNetPipeline (and its Img2Img and
Inpaint pipelines, here the img2img and inpaint methods), called with diffusers' argument names.

    net = ControlNetModel.from_pretrained("control_v11p_sd15_canny")
    pipe = StableDiffusionControlNetPipeline.from_pretrained("sd15", controlnet=net)     # or [net_a, net_b]
    out = pipe("a red circle", image=edges, controlnet_conditioning_scale=1.0, seed=1)  # image=[a, b] for two
    out = pipe.img2img("a blue circle", image=picture, control_image=edges, strength=0.6, seed=2)
    out = pipe.inpaint("a green square", image=picture, mask_image=mask, control_image=edges, seed=3)

The flow is StableDiffusionPipeline's one sampling loop (npdiff/pipeline.py); this class fills two of its
hooks: unet_inputs sizes the control pictures to the call's picture, and step_unet_inputs gives each
step's UNet call the nets' residuals (npdiff/pipeline_controlnet_call.py says how, step by step). The nets'
weight pages are released after the sampling with the UNet's (release_resident_pages); a net past the UNet's
per-block limit (an SDXL ControlNet in float32) drops each block's pages as soon as it has run, as the UNet.
"""

from pathlib import Path

from npdiff.images import picture_size
from npdiff.loading.resident import release_resident_pages
from npdiff.loading.weights import check_precision
from npdiff.models.controlnet import ControlNetModel
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_controlnet_call import (
    ControlCall,
    as_net_list,
    check_nets_fit,
    control_residuals,
)
from npdiff.sampling_starts import ImageStart, InpaintStart, NoiseStart


def load_controlnet(controlnet, variant=None, precision="fp32"):
    """A ControlNetModel as given, or loaded from a folder path (in `precision`); lists element by element."""
    if isinstance(controlnet, (list, tuple)):
        return [load_controlnet(net, variant, precision) for net in controlnet]
    if isinstance(controlnet, (str, Path)):
        return ControlNetModel.from_pretrained(controlnet, variant=variant, precision=precision)
    return controlnet


class ControlNetHooks:
    """The hooks and call plumbing every ControlNet pipeline shares (SD here, SDXL in pipeline_controlnet_sdxl.py);
    mixed in before the pipeline class it extends."""

    def set_controlnet(self, controlnet):
        """Use other ControlNet(s) from now on; each must have been made for this pipeline's UNet."""
        nets = as_net_list(controlnet)
        check_nets_fit(nets, self.unet.config)
        self.controlnet = nets[0] if not isinstance(controlnet, (list, tuple)) else nets
        self.controlnets = nets

    def release_resident_pages(self, *names):
        """StableDiffusionPipeline's, the ControlNets' pages released with the UNet's ("unet", or none named):
        they run in the same stage, the sampling, and are not needed again until the next call's."""
        names = names or self.text_encoder_names + ("unet", "vae")
        released = super().release_resident_pages(*names)
        if "unet" in names:
            released += release_resident_pages(self.controlnets)
        return released

    def control_of(self, extra):
        """The call's ControlCall (SD: `extra` itself; SDXL: its `control`)."""
        return extra if isinstance(extra, ControlCall) else extra.control

    def unet_inputs(self, conditioning, start, extra=None):
        """Once per call, after the start is prepared: the control pictures at its size."""
        self.control_of(extra).size_pictures(start.height, start.width)
        return super().unet_inputs(conditioning, start, extra)

    def step_unet_inputs(self, model_input, t, step_index, step_count, encoder_hidden_states, unet_kwargs,
                         do_guidance, extra=None):
        """Every step: the nets' summed residuals for the UNet (none outside every net's window)."""
        return control_residuals(self.control_of(extra), model_input, t, step_index, step_count,
                                 encoder_hidden_states, unet_kwargs, do_guidance)

    def inpaint_size(self, image, height, width):
        """diffusers' ControlNet inpainting size: each side not given is the picture's, rounded down to the VAE's
        cell (a picture of another kind is refused by the start, naming it)."""
        if height is not None and width is not None:
            return height, width
        try:
            picture_width, picture_height = picture_size(image)
        except (AttributeError, IndexError, TypeError, ValueError):
            return height, width  # not a picture: the start's checks say so
        cell = self.vae_scale_factor
        height = picture_height - picture_height % cell if height is None else height
        width = picture_width - picture_width % cell if width is None else width
        return height, width

    def make_control(self, image, scale, start, end, guess_mode, name):
        """The call's ControlCall: its pictures and settings checked, the model's precision beside the nets'."""
        return ControlCall(self.controlnets, image, scale, start, end, guess_mode, name=name,
                           model_precision=self.precision)


class StableDiffusionControlNetPipeline(ControlNetHooks, StableDiffusionPipeline):
    """StableDiffusionPipeline with one or more ControlNets (`controlnet`: a ControlNetModel or a list)."""

    def __init__(self, text_encoder, tokenizer, unet, vae, scheduler, controlnet, scheduler_config=None,
                 scheduler_name=None, model_name="custom"):
        super().__init__(text_encoder, tokenizer, unet, vae, scheduler, scheduler_config=scheduler_config,
                         scheduler_name=scheduler_name, model_name=model_name)
        self.set_controlnet(controlnet)

    @classmethod
    def from_pretrained(cls, path=None, controlnet=None, scheduler=None, variant=None, tokenizer=None,
                        prediction_type=None, precision="fp32"):
        """StableDiffusionPipeline.from_pretrained's model and arguments, with `controlnet`: a ControlNetModel,
        a ControlNet folder, or a list of them (checked against the UNet before anything else is done). A
        folder's ControlNet is loaded in `precision` too; a ControlNetModel given keeps its own."""
        check_precision(precision)
        nets = load_controlnet(controlnet, precision=precision)
        as_net_list(nets)  # refuse a missing or wrong controlnet before loading the model
        base = StableDiffusionPipeline.from_pretrained(path, scheduler=scheduler, variant=variant,
                                                       tokenizer=tokenizer, prediction_type=prediction_type,
                                                       precision=precision)
        return cls(base.text_encoder, base.tokenizer, base.unet, base.vae, base.scheduler, nets,
                   scheduler_config=base.scheduler_config, scheduler_name=base.scheduler_name,
                   model_name=base.model_name)

    def __call__(self, prompt, image=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, seed=None, generator=None, latents=None,
                 output_type="pil", callback=None, callback_steps=1, controlnet_conditioning_scale=1.0,
                 guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, progress=None):
        """Text + control picture(s) -> pictures, diffusers' StableDiffusionControlNetPipeline arguments and
        defaults. image: one control picture per net (a list for several). height/width default to the
        first control picture's size rounded down to 8 pixels, as diffusers."""
        control = self.make_control(image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "image")
        if height is None and width is None:
            height, width = control.first_picture_size(self.vae_scale_factor)
        return self._generate(NoiseStart(height, width, latents), prompt, negative_prompt, num_inference_steps,
                              guidance_scale, seed, generator, num_images_per_prompt, callback, callback_steps,
                              output_type, progress, eta=eta, extra=control)

    def img2img(self, prompt, image, control_image=None, strength=0.8, negative_prompt=None, num_inference_steps=50,
                guidance_scale=7.5, seed=None, generator=None, num_images_per_prompt=1, callback=None,
                callback_steps=1, output_type="pil", progress=None, eta=0.0, controlnet_conditioning_scale=0.8,
                guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0):
        """Picture + text + control picture(s) -> pictures, diffusers' StableDiffusionControlNetImg2ImgPipeline
        arguments and defaults (controlnet_conditioning_scale 0.8); the control picture is resized to the
        picture's size."""
        control = self.make_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "control_image")
        return self._generate(ImageStart(image, strength), prompt, negative_prompt, num_inference_steps,
                              guidance_scale, seed, generator, num_images_per_prompt, callback, callback_steps,
                              output_type, progress, eta=eta, extra=control)

    def inpaint(self, prompt, image, mask_image, control_image=None, strength=1.0, negative_prompt=None,
                num_inference_steps=50, guidance_scale=7.5, seed=None, generator=None, num_images_per_prompt=1,
                height=None, width=None, callback=None, callback_steps=1, output_type="pil", progress=None, eta=0.0,
                controlnet_conditioning_scale=0.5, guess_mode=False, control_guidance_start=0.0,
                control_guidance_end=1.0):
        """Picture + mask + text + control picture(s) -> pictures repainted where the mask is white, diffusers'
        StableDiffusionControlNetInpaintPipeline arguments and defaults (controlnet_conditioning_scale 0.5; height and
        width: the picture's size rounded down to the VAE's cell).
        The nets see the 4 latent channels, also beside a 9-channel inpainting UNet."""
        control = self.make_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end, guess_mode, "control_image")
        height, width = self.inpaint_size(image, height, width)
        return self._generate(InpaintStart(image, mask_image, strength, height, width), prompt, negative_prompt,
                              num_inference_steps, guidance_scale, seed, generator, num_images_per_prompt,
                              callback, callback_steps, output_type, progress, eta=eta, extra=control)
