"""AutoencoderTiny (TAESD): a small distilled stand-in for SD's VAE, over diffusers' weights.

    vae = AutoencoderTiny.from_pretrained("taesd")             # a diffusers AutoencoderTiny folder
    pipe.vae = vae                                             # decode (and img2img's encode) with it
    image = vae.decode(latents / vae.scaling_factor)           # [B,4,h,w] -> [B,3,8h,8w], about [-1,1]
    latents = vae.encode(image).latents * vae.scaling_factor   # [B,3,H,W] in [-1,1] -> [B,4,H/8,W/8]

No attention and no norms: plain 3x3 convolutions with ReLU, so decoding costs a small fraction of
the KL VAE's. The encoder is deterministic (it gives latents, not a distribution), so diffusers' img2img
draws no posterior sample with it; scaling_factor is 1.0 for TAESD (its latents are already SD-scaled).

The call tree (diffusers models/autoencoders/vae.py EncoderTiny/DecoderTiny, unet_2d_blocks.py
AutoencoderTinyBlock), each an nn.Sequential whose weights are keyed "<part>.layers.<index>":
    block(x)  = relu(conv_4(act(conv_2(act(conv_0(x))))) + x)
    encode:   (x + 1) / 2 -> [conv (block 0: with bias; later: stride 2, no bias), block x num_encoder_blocks[i]]
              for each block i -> conv to latent_channels
    decode:   tanh(z / 3) * 3 -> conv + act -> [block x num_decoder_blocks[i], 2x nearest upsample + conv
              (no bias)] for each block i, the last without upsampling, its conv to out_channels with bias
              -> x * 2 - 1
Every block of a part has the same width (each conv maps C_i -> C_i, so diffusers' own model only runs
when the per-block channel counts are equal); the block's 1x1 skip conv therefore never exists.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from npdiff import kernels
from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.loading.configs import load_component
from npdiff.models.blocks import Conv2d, child

DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64], "act_fn": "relu", "upsample_fn": "nearest",
    "latent_channels": 4, "upsampling_scaling_factor": 2, "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1], "latent_magnitude": 3, "latent_shift": 0.5, "force_upcast": False,
    "scaling_factor": 1.0, "shift_factor": 0.0,
}


def relu_(x):
    """max(x, 0) in place (nn.ReLU); -> x."""
    xp = array_module(x)
    return xp.maximum(x, 0, out=x)                                      # [B,C,H,W]


ACTIVATIONS = {"relu": relu_, "silu": kernels.silu, "swish": kernels.silu}


def _is_int(value, low=1):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def check_config(config):
    """Config dict -> the same with diffusers' defaults filled in; NpdiffError naming a bad key."""
    full = {**DEFAULTS, **config}
    for key in ("in_channels", "out_channels", "latent_channels"):
        if not _is_int(full[key]):
            raise NpdiffError(f"AutoencoderTiny config: {key} must be an integer >= 1, got {full[key]!r}")
    for part in ("encoder", "decoder"):
        channels, counts = full[f"{part}_block_out_channels"], full[f"num_{part}_blocks"]
        for key, values, low in ((f"{part}_block_out_channels", channels, 1), (f"num_{part}_blocks", counts, 0)):
            if not isinstance(values, (list, tuple)) or not values or not all(_is_int(v, low) for v in values):
                raise NpdiffError(f"AutoencoderTiny config: {key} must be a non-empty list of integers >= {low}, "
                                  f"got {values!r}")
        if len(channels) != len(counts):
            raise NpdiffError(f"AutoencoderTiny config: {part}_block_out_channels has {len(channels)} entries but "
                              f"num_{part}_blocks has {len(counts)}; they must have the same length")
        if len(set(channels)) != 1:
            raise NpdiffError(f"AutoencoderTiny config: {part}_block_out_channels={list(channels)!r} must all be "
                              f"equal (each of diffusers' {part} convs maps C_i -> C_i)")
    if full["act_fn"] not in ACTIVATIONS:
        raise NpdiffError(f"AutoencoderTiny config: act_fn={full['act_fn']!r} is not supported; "
                          f"supported: {', '.join(ACTIVATIONS)}")
    if full["upsample_fn"] != "nearest":
        raise NpdiffError(f"AutoencoderTiny config: upsample_fn={full['upsample_fn']!r} is not supported; expected "
                          "'nearest'")
    if full["upsampling_scaling_factor"] != 2 or isinstance(full["upsampling_scaling_factor"], bool):
        raise NpdiffError(f"AutoencoderTiny config: upsampling_scaling_factor="
                          f"{full['upsampling_scaling_factor']!r} is not supported; expected 2")
    for key in ("latent_magnitude", "latent_shift", "scaling_factor", "shift_factor"):
        value = full[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise NpdiffError(f"AutoencoderTiny config: {key} must be a finite number, got {value!r}")
    if full["scaling_factor"] == 0:
        raise NpdiffError("AutoencoderTiny config: scaling_factor must not be 0 (latents are divided by it)")
    # what diffusers registers: the pipelines read block_out_channels for the VAE's scale factor
    full["block_out_channels"] = list(full["decoder_block_out_channels"])
    full["force_upcast"] = False
    return full


class AutoencoderTinyBlock:
    """conv -> act -> conv -> act -> conv, plus the input, then ReLU (keys "<prefix>.conv.{0,2,4}")."""

    def __init__(self, weights, prefix, channels, act_fn):
        self.convs = [Conv2d(weights, child(prefix, f"conv.{i}"), channels, channels, 3, padding=1)
                      for i in (0, 2, 4)]
        self.act = ACTIVATIONS[act_fn]

    def __call__(self, x):
        h = self.act(self.convs[0](x))                                  # [B,C,H,W]
        h = self.act(self.convs[1](h))                                  # [B,C,H,W]
        h = self.convs[2](h)                                            # [B,C,H,W]
        h += x                                                          # [B,C,H,W] + [B,C,H,W]
        return relu_(h)                                                 # the "fuse" ReLU


class Upsample:
    """nn.Upsample(scale_factor=2, mode="nearest"): no weights."""

    def __call__(self, x):
        return kernels.upsample_nearest2x(x)                            # [B,C,H,W] -> [B,C,2H,2W]


class Activation:
    def __init__(self, act_fn):
        self.act = ACTIVATIONS[act_fn]

    def __call__(self, x):
        return self.act(x)                                              # [B,C,H,W]


class EncoderTiny:
    """Picture [B,3,H,W] in [-1,1] -> latents [B,Lc,H/f,W/f], f = 2 ** (blocks - 1)."""

    def __init__(self, weights, prefix, c):
        channels, counts, act = c["encoder_block_out_channels"], c["num_encoder_blocks"], c["act_fn"]
        self.layers = []

        def key():
            return child(prefix, f"layers.{len(self.layers)}")

        for i, count in enumerate(counts):
            if i == 0:
                self.layers.append(Conv2d(weights, key(), c["in_channels"], channels[0], 3, padding=1))
            else:
                self.layers.append(Conv2d(weights, key(), channels[i], channels[i], 3, stride=2, padding=1,
                                          bias=False))
            for _ in range(count):
                self.layers.append(AutoencoderTinyBlock(weights, key(), channels[i], act))
        self.layers.append(Conv2d(weights, key(), channels[-1], c["latent_channels"], 3, padding=1))

    def __call__(self, x):
        h = (x + np.float32(1.0)) / np.float32(2.0)                     # [-1,1] -> [0,1] (TAESD's convention)
        for layer in self.layers:
            h = layer(h)                                                # [B,C,H,W] -> [B,C',H',W']
        return h                                                        # [B,Lc,h,w]


class DecoderTiny:
    """Latents [B,Lc,h,w] -> picture [B,3,h*f,w*f], about [-1,1]."""

    def __init__(self, weights, prefix, c):
        channels, counts, act = c["decoder_block_out_channels"], c["num_decoder_blocks"], c["act_fn"]
        self.layers = []

        def key():
            return child(prefix, f"layers.{len(self.layers)}")

        self.layers.append(Conv2d(weights, key(), c["latent_channels"], channels[0], 3, padding=1))
        self.layers.append(Activation(act))
        for i, count in enumerate(counts):
            last = i == len(counts) - 1
            for _ in range(count):
                self.layers.append(AutoencoderTinyBlock(weights, key(), channels[i], act))
            if not last:
                self.layers.append(Upsample())
            out = c["out_channels"] if last else channels[i]
            self.layers.append(Conv2d(weights, key(), channels[i], out, 3, padding=1, bias=last))

    def __call__(self, z):
        xp = array_module(z)
        h = xp.tanh(z / np.float32(3.0)) * np.float32(3.0)              # soft clamp of the latents to (-3, 3)
        for layer in self.layers:
            h = layer(h)                                                # [B,C,H,W] -> [B,C',H',W']
        return h * np.float32(2.0) - np.float32(1.0)                    # [0,1] -> [-1,1] (diffusers' convention)


@dataclass
class AutoencoderTinyOutput:
    """encode's result (diffusers' name): the latents themselves; TAESD has no posterior to sample."""

    latents: Any


class AutoencoderTiny:
    """TAESD. Build with `from_pretrained(folder)` or `AutoencoderTiny(config, weights)`."""

    def __init__(self, config, weights):
        self.config = check_config(config)
        c = self.config
        self.encoder = EncoderTiny(weights, "encoder", c)
        self.decoder = DecoderTiny(weights, "decoder", c)
        self.latent_magnitude = float(c["latent_magnitude"])
        self.latent_shift = float(c["latent_shift"])
        self.scaling_factor = float(c["scaling_factor"])
        weights.check_all_used()

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None):
        return cls(*load_component(folder, subfolder, variant))

    def encode(self, x):
        """Picture [B,3,H,W] in [-1,1] -> AutoencoderTinyOutput(latents [B,Lc,H/f,W/f])."""
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise NpdiffError(f"image must have shape [B,{self.config['in_channels']},H,W]; got {tuple(x.shape)}")
        return AutoencoderTinyOutput(latents=self.encoder(x))

    def decode(self, z):
        """Latents [B,Lc,h,w] (already divided by scaling_factor) -> picture [B,3,h*f,w*f], about [-1,1]."""
        if z.ndim != 4 or z.shape[1] != self.config["latent_channels"]:
            raise NpdiffError(f"latents must have shape [B,{self.config['latent_channels']},h,w]; "
                              f"got {tuple(z.shape)}")
        return self.decoder(z)

    def scale_latents(self, x):
        """Raw latents -> [0, 1] (for storing latents as 8-bit pictures, as TAESD does)."""
        xp = array_module(x)
        return xp.clip(x / np.float32(2 * self.latent_magnitude) + np.float32(self.latent_shift), 0, 1)

    def unscale_latents(self, x):
        """[0, 1] -> raw latents (the inverse of scale_latents inside its range)."""
        return (x - np.float32(self.latent_shift)) * np.float32(2 * self.latent_magnitude)
