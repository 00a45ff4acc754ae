"""ControlNetModel: the copy of a UNet's down path that steers Stable Diffusion with a control picture
(edges, depth, pose), over diffusers' weights, for SD 1.x/2.x and SDXL.

    net = ControlNetModel.from_pretrained("control_v11p_sd15_canny")    # diffusers folder (variant="fp16" too)
    down, mid = net(sample, timestep, encoder_hidden_states, controlnet_cond=picture, conditioning_scale=1.0)
    eps = unet(sample, timestep, encoder_hidden_states,
               down_block_additional_residuals=down, mid_block_additional_residual=mid)

controlnet_cond is the control picture [B,3,H,W] in [0,1] at the picture's size (H = f*h: f = 8 for SD's
VAE, 2 ** (stride-2 convs of the conditioning embedding) in general). The call tree
(diffusers models/controlnets/controlnet.py):
    time_proj -> time_embedding [+ SDXL's add_embedding]                   -> temb [B,4*C0]
    conv_in(sample) + controlnet_cond_embedding(controlnet_cond)            -> [B,C0,h,w]
        controlnet_cond_embedding: conv_in, SiLU, then per pair of blocks (conv, SiLU, stride-2 conv, SiLU),
        conv_out: [B,3,H,W] -> [B,C0,H/8,W/8]
    down_blocks[i] (skips kept) -> mid_block                                 the UNet's own blocks
    controlnet_down_blocks[k](skip k), controlnet_mid_block(middle)          the 1x1 "zero convolutions"
    x conditioning_scale (guess_mode: the k-th of n+1 outputs by 10**(-1 + k/n), diffusers' logspace(-1, 0))
Everything up to the middle is UNet2DConditionModel's down path (models/unet.py), built and run by the
same code; this class adds the conditioning embedding and the zero convolutions.
"""

from pathlib import Path

import numpy as np

from npdiff.backend import to_device
from npdiff.errors import NpdiffError
from npdiff.kernels.activations import silu
from npdiff.loading.config_checks import full_config
from npdiff.loading.configs import find_component_weights, load_component
from npdiff.loading.resident import mapped_arrays
from npdiff.loading.single_file_controlnet_diffusers import load_controlnet_file
from npdiff.models import unet as unet_module
from npdiff.models.blocks import Conv2d
from npdiff.models.unet import UNet2DConditionModel

# what a ControlNet's config.json has beyond a UNet's, with diffusers' defaults
CONTROLNET_DEFAULTS = {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
UP_BLOCK_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def unet_config_of(config):
    """The UNet config a ControlNet's down path is checked and built with: the ControlNet's own keys taken
    out, and up_block_types mirroring its down blocks (a ControlNet has no up path; the UNet checks want one)."""
    if not isinstance(config, dict):
        raise NpdiffError(f"ControlNet config: expected a JSON object of settings, got {type(config).__name__}")
    unet_config = {key: value for key, value in config.items() if key not in CONTROLNET_DEFAULTS}
    down_types = unet_config.get("down_block_types")
    if isinstance(down_types, (list, tuple)):
        unet_config["up_block_types"] = [UP_BLOCK_OF.get(name, name) for name in reversed(down_types)]
    return unet_config


class ControlNetConditioningEmbedding:
    """The control picture [B,3,H,W] -> features [B,C0,H/8,W/8] (a small conv net, diffusers' names)."""

    def __init__(self, weights, prefix, conditioning_channels, block_channels, embedding_channels):
        self.conv_in = Conv2d(weights, f"{prefix}.conv_in", conditioning_channels, block_channels[0], 3, padding=1)
        self.blocks = []
        for i in range(len(block_channels) - 1):
            channels_in, channels_out = block_channels[i], block_channels[i + 1]
            self.blocks.append(Conv2d(weights, f"{prefix}.blocks.{2 * i}", channels_in, channels_in, 3, padding=1))
            self.blocks.append(Conv2d(weights, f"{prefix}.blocks.{2 * i + 1}", channels_in, channels_out, 3,
                                      stride=2, padding=1))
        self.conv_out = Conv2d(weights, f"{prefix}.conv_out", block_channels[-1], embedding_channels, 3, padding=1)
        # each stride-2 conv halves the picture: 3 of them (SD's default channels) make 8 control pixels per
        # latent, as SD's VAE; a net for another VAE (the shipped model's: 4 pixels) has fewer
        self.pixels_per_latent = 2 ** (len(block_channels) - 1)

    def __call__(self, conditioning):
        # 1. conv_in + SiLU
        h = silu(self.conv_in(conditioning))                            # [B,3,H,W] -> [B,c0,H,W]
        # 2. each conv + SiLU (every second one halves the size)
        for conv in self.blocks:
            h = silu(conv(h))                                           # [B,c,H,W] -> [B,c',H or H/2,...]
        # 3. conv_out, no activation
        return self.conv_out(h)                                         # [B,c_last,H/8,W/8] -> [B,C0,H/8,W/8]


class ControlNetModel(UNet2DConditionModel):
    """diffusers' ControlNetModel. Build with `from_pretrained(folder)` or `ControlNetModel(config, weights)`.

    It is a UNet2DConditionModel without the up path: the down path (time embedding, conv_in, down and mid
    blocks) is the UNet's, built and run by the same methods."""

    def __init__(self, config, weights):
        self.name, self.weights_file = "custom", None                 # set by the loaders
        self.controlnet_config = {**CONTROLNET_DEFAULTS, **config}
        self.config = full_config("unet", unet_config_of(config))     # checked as a UNet's down path
        c, own = self.config, self.controlnet_config
        if own["controlnet_conditioning_channel_order"] not in ("rgb", "bgr"):
            raise NpdiffError(f"ControlNet config: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                              f"{own['controlnet_conditioning_channel_order']!r}")
        self.build_down_path(weights)
        channels = list(c["block_out_channels"])

        # the control picture's embedding, added to conv_in's output
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            weights, "controlnet_cond_embedding", int(own["conditioning_channels"]),
            list(own["conditioning_embedding_out_channels"]), channels[0])

        # the zero convolutions: one per skip of the down path, one for the middle
        skip_channels = [channels[0]]                                 # conv_in's output
        for i, block in enumerate(self.down_blocks):
            skip_channels += [channels[i]] * len(block.resnets)        # one per resnet
            if block.downsampler is not None:
                skip_channels.append(channels[i])                      # and the downsampler's
        self.controlnet_down_blocks = [Conv2d(weights, f"controlnet_down_blocks.{k}", width, width, 1)
                                       for k, width in enumerate(skip_channels)]
        self.controlnet_mid_block = Conv2d(weights, "controlnet_mid_block", channels[-1], channels[-1], 1)
        weights.check_all_used()
        # as the UNet: past PER_BLOCK_RELEASE_BYTES of mapped weights, each block's pages go once it has run
        mapped = sum(array.nbytes for array in mapped_arrays(self))
        self.release_weights_after_each_block = mapped > unet_module.PER_BLOCK_RELEASE_BYTES
        self.precision = weights.precision  # "fp32" or "bf16": what the Linear/Conv2d layers hold

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None, precision="fp32"):
        """A diffusers ControlNet folder (config.json + diffusion_pytorch_model[.fp16].safetensors), or a single
        .safetensors file: in the original layout (control_v11p_sd15_canny.safetensors: control_model.* keys) or
        in diffusers' (an SDXL net's diffusion_pytorch_model.safetensors alone), its config read from the shapes.
        precision "bf16": Linear and Conv2d weights packed in bfloat16 (npdiff/models/precision.py)."""
        path = Path(folder) / subfolder if subfolder else Path(folder)
        if path.is_file():
            config, weights = load_controlnet_file(path)
            net = cls(config, weights.set_precision(precision))
            net.name, net.weights_file = path.stem, path
            return net
        net = cls(*load_component(folder, subfolder, variant, precision))
        net.name = path.resolve().name                                 # what a picture's metadata calls it
        net.weights_file = Path(find_component_weights(path, variant)[1])  # hashed for the metadata
        return net

    @property
    def skip_count(self):
        """How many down residuals this net gives: one per skip of the UNet it was made for."""
        return len(self.controlnet_down_blocks)

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode=False, timestep_cond=None, added_cond_kwargs=None):
        """-> (down_block_res_samples: a list of [B,C,H,W], mid_block_res_sample [B,C,H,W]), diffusers' outputs.

        controlnet_cond: the control picture [B,3,f*h,f*w] float32 in [0,1] (diffusers' ControlNet image
        processor's output). guess_mode: scale the k-th of the n+1 outputs by 10**(-1 + k/n) times
        conditioning_scale (diffusers' torch.logspace(-1, 0, n+1)), else all by conditioning_scale."""
        own = self.controlnet_config
        controlnet_cond = to_device(np.asarray(controlnet_cond, dtype=np.float32)
                                    if not hasattr(controlnet_cond, "get") else controlnet_cond)
        factor = self.controlnet_cond_embedding.pixels_per_latent
        expected = (sample.shape[0], int(own["conditioning_channels"]), sample.shape[2] * factor,
                    sample.shape[3] * factor)
        if tuple(controlnet_cond.shape) != expected:
            raise NpdiffError(f"controlnet_cond must have shape {list(expected)} (the control picture at the "
                              f"picture's size, {factor} pixels per latent); got {list(controlnet_cond.shape)}")
        # 1. the control picture's channel order, then its embedding
        if own["controlnet_conditioning_channel_order"] == "bgr":
            controlnet_cond = controlnet_cond[:, ::-1]                  # [B,3,H,W] RGB -> BGR
        conditioning = self.controlnet_cond_embedding(controlnet_cond)  # [B,3,H,W] -> [B,C0,h,w]

        # 2. the UNet's down path with the embedding added after conv_in
        mid, skips, _ = self.down_path(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs,
                                       conditioning=conditioning)      # [B,C,h',w'], skips [B,Ck,hk,wk]

        # 3. the zero convolutions
        down_samples = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]  # [B,Ck,hk,wk] each
        mid_sample = self.controlnet_mid_block(mid)                    # [B,C,h',w']

        # 4. scale: guess mode ramps from 0.1 (highest resolution) to 1.0 (middle)
        if guess_mode and not own["global_pool_conditions"]:
            scales = np.logspace(-1, 0, len(down_samples) + 1) * conditioning_scale  # [n+1] as torch.logspace
            down_samples = [sample_k * np.float32(scale) for sample_k, scale in zip(down_samples, scales)]
            mid_sample = mid_sample * np.float32(scales[-1])
        else:
            down_samples = [sample_k * np.float32(conditioning_scale) for sample_k in down_samples]
            mid_sample = mid_sample * np.float32(conditioning_scale)

        # 5. global pooling (shuffle-style nets): the mean over the picture
        if own["global_pool_conditions"]:
            down_samples = [sample_k.mean(axis=(2, 3), keepdims=True) for sample_k in down_samples]  # [B,C,1,1]
            mid_sample = mid_sample.mean(axis=(2, 3), keepdims=True)  # [B,C,1,1]
        return down_samples, mid_sample
