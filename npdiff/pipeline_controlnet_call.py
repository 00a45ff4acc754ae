"""One call's ControlNet arguments (diffusers' names), checked on arrival, and the residuals of one step.

What the ControlNet pipelines (npdiff/pipeline_controlnet.py, pipeline_controlnet_sdxl.py) add to the one
sampling flow of npdiff/pipeline.py, as diffusers' StableDiffusionControlNetPipeline does it:
  - the control pictures: one per net, resized (Lanczos) to the picture's size, RGB, [0,1] (diffusers'
    ControlNet image processor: no [-1,1] normalisation), [1,3,H,W], repeated to the batch when used;
  - per step i of n, each net's scale: controlnet_conditioning_scale times keep, where keep is 0 outside
    the net's guidance window (i/n < control_guidance_start or (i+1)/n > control_guidance_end), else 1;
  - per step the nets' outputs summed (net 0 first), given to the UNet as down_block_additional_residuals
    and mid_block_additional_residual. guess_mode with classifier-free guidance: the nets see only the
    conditional half (its latents, text and SDXL's added conditioning), and the unconditional half gets
    zero residuals. A net whose scale is 0 at a step is not run (diffusers runs it and adds its zeros).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.images import image_to_model_input, load_image, picture_size
from npdiff.model_identity import SHORT_HASH_DIGITS, file_sha256
from npdiff.models.controlnet import ControlNetModel


def as_net_list(controlnet):
    """A ControlNetModel or a list/tuple of them -> a non-empty list; anything else: NpdiffError."""
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not nets:
        raise NpdiffError("controlnet: an empty list; pass a ControlNetModel or a list of them")
    for index, net in enumerate(nets):
        if not isinstance(net, ControlNetModel):
            raise NpdiffError(f"controlnet[{index}]: expected an npdiff.models.ControlNetModel, got "
                              f"{type(net).__name__}")
    return nets


def check_nets_fit(nets, unet_config):
    """Each net must have been made for this UNet: the same down path (blocks, channels, layers, text width,
    SDXL's added conditioning); else an NpdiffError naming the net, the setting and both values."""
    keys = ("addition_embed_type", "block_out_channels", "down_block_types", "layers_per_block",  # family first
            "cross_attention_dim", "projection_class_embeddings_input_dim", "in_channels")
    for index, net in enumerate(nets):
        for key in keys:
            ours, theirs = net.config.get(key), unet_config.get(key)
            if key == "in_channels" and unet_config.get("in_channels") == 9:
                theirs = 4  # an inpainting UNet's extra channels are not the ControlNet's
            if _plain(ours) != _plain(theirs):
                family = {None: "SD 1.x/2.x", "text_time": "SDXL"}
                hint = ""
                if key == "addition_embed_type":
                    hint = f" (a {family.get(ours, ours)} ControlNet on a {family.get(theirs, theirs)} model)"
                raise NpdiffError(f"controlnet {index} ({net.name}) was made for another model: its {key} is "
                                  f"{_plain(ours)!r}, the UNet's is {_plain(theirs)!r}{hint}")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def per_net(value, count, name, check):
    """A float (the same for every net) or a list with one per net -> a list of `count` checked floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise NpdiffError(f"{name}: {len(values)} values for {count} ControlNet(s); give one per net")
    return [check(item, f"{name}[{index}]" if count > 1 else name) for index, item in enumerate(values)]


def finite_float(value, name, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise NpdiffError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if low is not None else ""
        raise NpdiffError(f"{name} must be a finite number{bounds}, got {value!r}")
    return value


class ControlCall:
    """The control pictures, scales, guidance windows and guess mode of one call, checked before any work."""

    def __init__(self, nets, image, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode=False, name="image", model_precision="fp32"):
        self.nets = nets
        self.model_precision = model_precision  # the pipeline's: a net at another one says so in the parameters
        count = len(nets)
        pictures = list(image) if isinstance(image, (list, tuple)) else [image]
        if image is None or len(pictures) != count:
            given = "none" if image is None else len(pictures)
            raise NpdiffError(f"{name}: {given} control picture(s) for {count} ControlNet(s); give one per net "
                              "(a list of pictures per prompt is not supported)")
        self.pictures = [control_picture(picture, f"{name}[{index}]" if count > 1 else name)
                         for index, picture in enumerate(pictures)]
        self.scales = per_net(controlnet_conditioning_scale, count, "controlnet_conditioning_scale", finite_float)
        if isinstance(control_guidance_start, (list, tuple)) != isinstance(control_guidance_end, (list, tuple)):
            # diffusers repeats the single one to the other's length
            if isinstance(control_guidance_start, (list, tuple)):
                control_guidance_end = [control_guidance_end] * len(control_guidance_start)
            else:
                control_guidance_start = [control_guidance_start] * len(control_guidance_end)

        def fraction(value, what):
            return finite_float(value, what, 0.0, 1.0)

        self.starts = per_net(control_guidance_start, count, "control_guidance_start", fraction)
        self.ends = per_net(control_guidance_end, count, "control_guidance_end", fraction)
        for index, (start, end) in enumerate(zip(self.starts, self.ends)):
            if start >= end:
                raise NpdiffError(f"control_guidance_start ({start}) must be below control_guidance_end ({end})"
                                  + (f" for ControlNet {index}" if count > 1 else ""))
        if not isinstance(guess_mode, (bool, np.bool_)):
            raise NpdiffError(f"guess_mode must be True or False, got {guess_mode!r}")
        self.guess_mode = bool(guess_mode)
        self.inputs = None  # the pictures at the call's size: size_pictures

    def first_picture_size(self, multiple=8):
        """(height, width) of the first control picture rounded down to `multiple` (diffusers' default size)."""
        width, height = picture_size(self.pictures[0])
        return height - height % multiple, width - width % multiple

    def size_pictures(self, height, width):
        """Each control picture at the call's size: [1,3,H,W] float32 in [0,1], beside the weights."""
        self.inputs = []
        for picture in self.pictures:
            pixels = image_to_model_input(picture, height=height, width=width)  # [1,3,H,W] in [-1,1]
            self.inputs.append(backend.to_device((pixels + 1.0) / 2.0))         # -> [0,1]

    def scales_at(self, step_index, step_count):
        """Each net's conditioning scale at step `step_index` of `step_count` (0 outside its window)."""
        scales = []
        for scale, start, end in zip(self.scales, self.starts, self.ends):
            outside = step_index / step_count < start or (step_index + 1) / step_count > end
            scales.append(scale * (0.0 if outside else 1.0))
        return scales

    def parameters(self):
        """What a picture's metadata records: each net's name, short hash, scale and window, and its precision
        where it is not the model's (a net loaded at fp32 beside a bf16 model: --reproduce loads it so); guess
        mode."""
        recorded = []
        for net, scale, start, end in zip(self.nets, self.scales, self.starts, self.ends):
            digest = file_sha256(net.weights_file)[:SHORT_HASH_DIGITS] if net.weights_file else None
            recorded.append({"name": net.name, "sha256": digest, "scale": scale, "start": start, "end": end})
            net_precision = getattr(net, "precision", "fp32")
            if net_precision != self.model_precision:
                recorded[-1]["precision"] = net_precision
        return {"controlnets": recorded, "guess_mode": self.guess_mode}


def control_picture(picture, name):
    """A control picture: a PIL image (decoded now), an array [H,W,3], or a path (opened with load_image)."""
    from PIL import Image

    if isinstance(picture, (str, bytes)) or hasattr(picture, "__fspath__"):
        return load_image(picture, what=f"control picture {name}")
    if isinstance(picture, Image.Image):
        try:
            picture.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise NpdiffError(f"{name}: corrupt or truncated control picture ({exc})") from exc
        return picture
    if isinstance(picture, np.ndarray) and picture.ndim == 3 and picture.shape[2] == 3:
        return picture
    shape = f" of shape {picture.shape}" if isinstance(picture, np.ndarray) else ""
    raise NpdiffError(f"{name}: expected a control picture (PIL image, array [H,W,3] or file path), got "
                      f"{type(picture).__name__}{shape}")


def control_residuals(control, model_input, t, step_index, step_count, encoder_hidden_states, unet_kwargs,
                      do_guidance):
    """-> unet_kwargs with this step's summed residuals of every net (unet_kwargs itself when no net acts)."""
    scales = control.scales_at(step_index, step_count)
    if all(scale == 0.0 for scale in scales):
        return unet_kwargs  # outside every window: the UNet alone (diffusers adds zeros)
    added = unet_kwargs.get("added_cond_kwargs")
    # 1. what the nets see: in guess mode with guidance only the conditional half
    half_only = control.guess_mode and do_guidance
    net_input, net_text, net_added = model_input, encoder_hidden_states, added
    if half_only:
        half = model_input.shape[0] // 2
        net_input, net_text = model_input[half:], encoder_hidden_states[half:]  # [B,4,h,w], [B,77,D]
        net_added = None if added is None else {key: value[half:] for key, value in added.items()}
    xp = backend.array_module(net_input)
    # 2. each net on its picture (repeated to the batch), outputs summed in net order
    down_total, mid_total = None, None
    for net, picture, scale in zip(control.nets, control.inputs, scales):
        if scale == 0.0:
            continue
        cond = xp.repeat(picture, net_input.shape[0], axis=0)          # [1,3,H,W] -> [B',3,H,W]
        down, mid = net(net_input, t, net_text, cond, conditioning_scale=scale, guess_mode=control.guess_mode,
                        added_cond_kwargs=net_added)
        if down_total is None:
            down_total, mid_total = down, mid
        else:
            down_total = [total + part for total, part in zip(down_total, down)]  # [B',C,H,W] each
            mid_total = mid_total + mid                                 # [B',C,h,w]
    # 3. guess mode: zeros for the unconditional half
    if half_only:
        down_total = [xp.concatenate([xp.zeros_like(part), part]) for part in down_total]  # [2B,C,H,W]
        mid_total = xp.concatenate([xp.zeros_like(mid_total), mid_total])  # [2B,C,h,w]
    return {**unet_kwargs, "down_block_additional_residuals": down_total,
            "mid_block_additional_residual": mid_total}
