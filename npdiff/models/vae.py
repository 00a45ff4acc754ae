"""AutoencoderKL: Stable Diffusion's VAE, over diffusers' weights.

    vae = AutoencoderKL.from_pretrained("sd15/vae")                # or AutoencoderKL(config, weights)
    image = vae.decode(latents / vae.scaling_factor)                # [B,4,h,w] -> [B,3,8h,8w] (SD's 4 blocks)
    posterior = vae.encode(image)                                   # [B,3,H,W] in [-1,1] -> DiagonalGaussian
    latents = posterior.sample(TorchGenerator(seed)) * vae.scaling_factor
    vae.enable_tiling()                                             # large pictures in overlapping tiles
                                                                    # (diffusers' rule; npdiff/models/vae_tiling.py)

The call tree (diffusers models/autoencoders/vae.py Encoder/Decoder, autoencoder_kl.py):
    encode: encoder.conv_in -> encoder.down_blocks[i] (DownEncoderBlock2D) -> encoder.mid_block
            -> conv_norm_out + SiLU -> conv_out -> quant_conv -> (mean, logvar)
    decode: post_quant_conv -> decoder.conv_in -> decoder.mid_block -> decoder.up_blocks[i]
            (UpDecoderBlock2D) -> conv_norm_out + SiLU -> conv_out
Every GroupNorm in the VAE uses eps 1e-6; the resnets have no time embedding.

SDXL's VAE is the same network (4 blocks, 128-512 channels, layers_per_block 2) with scaling_factor
0.13025 and force_upcast true. force_upcast tells diffusers' pipelines to decode a float16 model in
float32 (the SDXL VAE overflows float16); npdiff decodes in float32 always, so it changes nothing here.

Memory of a decode (benchmarks/memory.py decode): at 512x512 the peak was ~0.7 GiB of activations above
the weights, in up_blocks.3.resnets.0: its 256-channel 512x512 input (256 MiB, still held by the
calling block), the GroupNorm+SiLU of it (256 MiB), conv1's 128-channel output (128 MiB) and the
convolution's buffers. The resnets' GroupNorm+SiLU and the upsamplers' nearest 2x are now folded into the
convolution after them (kernels/conv_fused.py): neither tensor is made, and the decode's own peak (above the
resident set before it) fell from 0.75-0.77 to 0.63 GiB (benchmarks/conv_fused.py --peak-rss). Every other
intermediate is dropped as soon as the next one is made (each `h = f(h)` frees the old map). With tiling on
(enable_tiling) a large picture's peak is the output plus one tile's (a 512x512 decode's for SD).
"""

import numpy as np

from npdiff.backend import array_module, to_device
from npdiff.errors import NpdiffError
from npdiff.loading.config_checks import full_config
from npdiff.loading.configs import load_component
from npdiff.models.blocks import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    child,
    norm_silu_conv,
)
from npdiff.models.transformer import AttentionBlock
from npdiff.models.vae_tiling import default_tile_sizes, tiled_decode, tiled_encode, tiles_decode, tiles_encode

VAE_EPS = 1e-6


class UNetMidBlock2D:
    """resnets.0 -> attentions.0 -> resnets.1 (attention left out with mid_block_add_attention=False)."""

    def __init__(self, weights, prefix, channels, groups, add_attention):
        self.resnets = [ResnetBlock2D(weights, child(prefix, f"resnets.{i}"), channels, channels, None, groups,
                                      VAE_EPS) for i in range(2)]
        self.attentions = []
        if add_attention:
            self.attentions.append(AttentionBlock(weights, child(prefix, "attentions.0"), channels, groups, VAE_EPS))

    def __call__(self, x):
        # 1. resnet
        h = self.resnets[0](x)                                          # [B,C,H,W]
        # 2. single-head attention over all positions (unless mid_block_add_attention=False)
        for attention in self.attentions:
            h = attention(h)                                            # [B,C,H,W]
        # 3. resnet
        return self.resnets[1](h)                                       # [B,C,H,W]


class DownEncoderBlock2D:
    """resnets x layers_per_block, then (except in the last block) a stride-2 conv with bottom/right padding."""

    def __init__(self, weights, prefix, in_channels, out_channels, num_layers, groups, add_downsample):
        self.resnets = [ResnetBlock2D(weights, child(prefix, f"resnets.{i}"), in_channels if i == 0 else out_channels,
                                      out_channels, None, groups, VAE_EPS) for i in range(num_layers)]
        self.downsampler = None
        if add_downsample:
            self.downsampler = Downsample2D(weights, child(prefix, "downsamplers.0"), out_channels, padding=0)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)                                               # [B,Cin,H,W] -> [B,C,H,W]
        if self.downsampler is not None:
            x = self.downsampler(x)                                     # [B,C,H,W] -> [B,C,H/2,W/2]
        return x


class UpDecoderBlock2D:
    """resnets x (layers_per_block + 1), then (except in the last block) nearest 2x upsampling + conv."""

    def __init__(self, weights, prefix, in_channels, out_channels, num_layers, groups, add_upsample):
        self.resnets = [ResnetBlock2D(weights, child(prefix, f"resnets.{i}"), in_channels if i == 0 else out_channels,
                                      out_channels, None, groups, VAE_EPS) for i in range(num_layers)]
        self.upsampler = None
        if add_upsample:
            self.upsampler = Upsample2D(weights, child(prefix, "upsamplers.0"), out_channels)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)                                               # [B,Cin,H,W] -> [B,C,H,W]
        if self.upsampler is not None:
            x = self.upsampler(x)                                       # [B,C,H,W] -> [B,C,2H,2W]
        return x


class Encoder:
    def __init__(self, weights, prefix, c):
        channels, groups = list(c["block_out_channels"]), c["norm_num_groups"]
        blocks = len(channels)
        self.conv_in = Conv2d(weights, child(prefix, "conv_in"), c["in_channels"], channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(weights, child(prefix, f"down_blocks.{i}"), channels[max(i - 1, 0)], channels[i],
                               c["layers_per_block"], groups, add_downsample=i < blocks - 1)
            for i in range(blocks)
        ]
        self.mid_block = UNetMidBlock2D(weights, child(prefix, "mid_block"), channels[-1], groups,
                                        c["mid_block_add_attention"])
        self.conv_norm_out = GroupNorm(weights, child(prefix, "conv_norm_out"), groups, channels[-1], VAE_EPS)
        self.conv_out = Conv2d(weights, child(prefix, "conv_out"), channels[-1], 2 * c["latent_channels"], 3,
                               padding=1)

    def __call__(self, x):
        h = self.conv_in(x)                                             # [B,3,H,W] -> [B,C0,H,W]
        for block in self.down_blocks:
            h = block(h)                                                # [B,C,H,W] -> [B,C',H/2,W/2]
        h = self.mid_block(h)                                           # [B,C,h,w]
        return norm_silu_conv(self.conv_norm_out, self.conv_out, h)     # [B,C,h,w] -> [B,2*Lc,h,w] (+ SiLU)


class Decoder:
    def __init__(self, weights, prefix, c):
        channels, groups = list(c["block_out_channels"]), c["norm_num_groups"]
        blocks = len(channels)
        reversed_channels = channels[::-1]
        self.conv_in = Conv2d(weights, child(prefix, "conv_in"), c["latent_channels"], channels[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(weights, child(prefix, "mid_block"), channels[-1], groups,
                                        c["mid_block_add_attention"])
        self.up_blocks = [
            UpDecoderBlock2D(weights, child(prefix, f"up_blocks.{i}"), reversed_channels[max(i - 1, 0)],
                             reversed_channels[i], c["layers_per_block"] + 1, groups, add_upsample=i < blocks - 1)
            for i in range(blocks)
        ]
        self.conv_norm_out = GroupNorm(weights, child(prefix, "conv_norm_out"), groups, channels[0], VAE_EPS)
        self.conv_out = Conv2d(weights, child(prefix, "conv_out"), channels[0], c["out_channels"], 3, padding=1)

    def __call__(self, z):
        h = self.conv_in(z)                                             # [B,Lc,h,w] -> [B,C,h,w]
        h = self.mid_block(h)                                           # [B,C,h,w]
        for block in self.up_blocks:
            h = block(h)                                                # [B,C,H,W] -> [B,C',2H,2W]
        return norm_silu_conv(self.conv_norm_out, self.conv_out, h)     # [B,C0,H,W] -> [B,3,H,W] (+ SiLU)


class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2) per latent element (diffusers DiagonalGaussianDistribution).

    logvar is clamped to [-30, 20] as in diffusers; std = exp(logvar / 2)."""

    def __init__(self, moments):
        xp = array_module(moments)
        channels = moments.shape[1] // 2
        self.mean = xp.ascontiguousarray(moments[:, :channels])                        # [B,Lc,h,w]
        self.logvar = xp.clip(moments[:, channels:], -30.0, 20.0)                      # [B,Lc,h,w]
        self.std = xp.exp(0.5 * self.logvar)                                           # [B,Lc,h,w]
        self.var = xp.exp(self.logvar)                                                 # [B,Lc,h,w]

    def mode(self):
        return self.mean

    def sample(self, generator):
        """mean + std * noise, the noise drawn as diffusers' randn_tensor(mean.shape, generator=g) on CPU.

        generator: an npdiff.rng.TorchGenerator (anything with .randn(shape, dtype=...))."""
        noise = generator.randn(tuple(self.mean.shape), dtype=np.float32)               # [B,Lc,h,w]
        noise = to_device(noise, dtype=self.mean.dtype)                                # beside the mean
        return self.mean + self.std * noise                                            # [B,Lc,h,w]


class AutoencoderKL:
    """SD's KL autoencoder. Build with `from_pretrained(folder)` or `AutoencoderKL(config, weights)`."""

    def __init__(self, config, weights):
        self.config = full_config("vae", config)  # defaults filled in; checked unless the loader did
        c = self.config
        latent = c["latent_channels"]
        self.encoder = Encoder(weights, "encoder", c)
        self.decoder = Decoder(weights, "decoder", c)
        self.quant_conv = Conv2d(weights, "quant_conv", 2 * latent, 2 * latent, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = None
        if c["use_post_quant_conv"]:
            self.post_quant_conv = Conv2d(weights, "post_quant_conv", latent, latent, 1)
        self.scaling_factor = float(c["scaling_factor"])
        self.downscale = 2 ** (len(c["block_out_channels"]) - 1)
        # tiling (diffusers' attribute names and defaults; npdiff/models/vae_tiling.py)
        self.use_tiling = False
        self.tile_sample_min_size, self.tile_latent_min_size = default_tile_sizes(c, self.downscale)
        self.tile_overlap_factor = 0.25
        weights.check_all_used()
        self.precision = weights.precision  # "fp32" or "bf16": what the Linear/Conv2d layers hold

    def enable_tiling(self):
        """Decode and encode large pictures in overlapping tiles blended as diffusers' enable_tiling() does:
        memory bounded by one tile's activations; pictures differ slightly from the untiled ones."""
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None, precision="fp32"):
        """precision "bf16": Linear and Conv2d weights packed in bfloat16 (npdiff/models/precision.py)."""
        return cls(*load_component(folder, subfolder, variant, precision))

    def encode(self, x, tiling=None):
        """Image [B,3,H,W] in [-1,1] (H, W multiples of the downscale factor) -> DiagonalGaussian.
        tiling: this call in tiles (True) or whole (False); None: as use_tiling says."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c["in_channels"]:
            raise NpdiffError(f"image must have shape [B,{c['in_channels']},H,W]; got {tuple(x.shape)}")
        if x.shape[2] % self.downscale or x.shape[3] % self.downscale:
            raise NpdiffError(f"image height and width must be multiples of {self.downscale}; got "
                              f"{x.shape[2]}x{x.shape[3]}")
        if tiles_encode(self, x.shape[2], x.shape[3], tiling):
            return DiagonalGaussian(tiled_encode(self, x))              # [B,3,H,W] -> [B,2*Lc,h,w], in tiles
        moments = self.encoder(x)                                       # [B,3,H,W] -> [B,2*Lc,h,w]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)                          # [B,2*Lc,h,w]
        return DiagonalGaussian(moments)

    def decode(self, z, tiling=None):
        """Latents [B,Lc,h,w] (already divided by scaling_factor) -> image [B,3,h*f,w*f], roughly in [-1,1].
        tiling: this call in tiles (True) or whole (False); None: as use_tiling says (the model is not changed,
        so a pipeline's per-call choice does not reach another thread's decode)."""
        c = self.config
        if z.ndim != 4 or z.shape[1] != c["latent_channels"]:
            raise NpdiffError(f"latents must have shape [B,{c['latent_channels']},h,w]; got {tuple(z.shape)}")
        if tiles_decode(self, z.shape[2], z.shape[3], tiling):
            return tiled_decode(self, z)                                # [B,Lc,h,w] -> [B,3,H,W], in tiles
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)                                 # [B,Lc,h,w]
        return self.decoder(z)                                          # [B,Lc,h,w] -> [B,3,H,W]
