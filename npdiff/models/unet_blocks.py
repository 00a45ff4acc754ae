"""The UNet's down, mid and up blocks (diffusers models/unets/unet_2d_blocks.py):
CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D.

A down block returns (hidden_states, skips): one skip per resnet (after its attention) plus one
after the downsampler. An up block consumes skips from the end, concatenating each to its input
along channels before its resnet. `attention` is a dict of the block's Transformer2DModel settings
(cross_attention_dim, use_linear_projection, norm_num_groups, and transformer_layers: the depth of
each of the block's transformers, one per resnet layer, as SDXL's nested transformer_layers_per_block
gives them); `heads` is the block's head count (diffusers' confusingly named per-block
`attention_head_dim`).
"""

from npdiff.backend import array_module
from npdiff.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, child
from npdiff.models.transformer import Transformer2DModel


def make_transformer(weights, prefix, channels, heads, attention, layer):
    """The Transformer2DModel after resnet `layer` of a block."""
    return Transformer2DModel(
        weights, prefix, channels, heads, channels // heads,
        cross_attention_dim=attention["cross_attention_dim"],
        norm_num_groups=attention["norm_num_groups"],
        use_linear_projection=attention["use_linear_projection"],
        num_layers=attention["transformer_layers"][layer],
    )


class DownBlock2D:
    """resnets x num_layers, then an optional downsampler; optional attention after each resnet
    (CrossAttnDownBlock2D when `heads` is given)."""

    def __init__(self, weights, prefix, in_channels, out_channels, temb_channels, num_layers, groups, eps,
                 add_downsample, downsample_padding=1, heads=None, attention=None, output_scale_factor=1.0):
        self.resnets = []
        self.attentions = []
        for i in range(num_layers):
            resnet_in = in_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(weights, child(prefix, f"resnets.{i}"), resnet_in, out_channels,
                                              temb_channels, groups, eps, output_scale_factor))
            if heads is not None:
                self.attentions.append(
                    make_transformer(weights, child(prefix, f"attentions.{i}"), out_channels, heads, attention, i))
        self.downsampler = None
        if add_downsample:
            self.downsampler = Downsample2D(weights, child(prefix, "downsamplers.0"), out_channels,
                                            padding=downsample_padding)

    def __call__(self, x, temb, context=None):
        skips = []
        # 1. resnet (+ transformer) per layer; each output is kept as a skip for the up path
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)                                         # [B,Cin,H,W] -> [B,C,H,W]
            if self.attentions:
                x = self.attentions[i](x, context)                      # [B,C,H,W]
            skips.append(x)
        # 2. downsample (its output is a skip too)
        if self.downsampler is not None:
            x = self.downsampler(x)                                     # [B,C,H,W] -> [B,C,H/2,W/2]
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""


class UNetMidBlock2DCrossAttn:
    """resnets.0 -> (attentions.i -> resnets.i+1) for each layer (one in SD)."""

    def __init__(self, weights, prefix, channels, temb_channels, groups, eps, heads, attention,
                 output_scale_factor=1.0, num_layers=1):
        self.resnets = [ResnetBlock2D(weights, child(prefix, "resnets.0"), channels, channels, temb_channels,
                                      groups, eps, output_scale_factor)]
        self.attentions = []
        for i in range(num_layers):
            self.attentions.append(
                make_transformer(weights, child(prefix, f"attentions.{i}"), channels, heads, attention, i))
            self.resnets.append(ResnetBlock2D(weights, child(prefix, f"resnets.{i + 1}"), channels, channels,
                                              temb_channels, groups, eps, output_scale_factor))

    def __call__(self, x, temb, context):
        # 1. first resnet
        x = self.resnets[0](x, temb)                                    # [B,C,H,W]
        # 2. transformer then resnet, per layer
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = attention(x, context)                                   # [B,C,H,W]
            x = resnet(x, temb)                                         # [B,C,H,W]
        return x


class UpBlock2D:
    """resnets x num_layers over [x, skip] concatenations, optional attention after each resnet
    (CrossAttnUpBlock2D when `heads` is given), then an optional upsampler."""

    def __init__(self, weights, prefix, in_channels, prev_output_channel, out_channels, temb_channels,
                 num_layers, groups, eps, add_upsample, heads=None, attention=None, output_scale_factor=1.0):
        self.resnets = []
        self.attentions = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(weights, child(prefix, f"resnets.{i}"), resnet_in + skip_channels,
                                              out_channels, temb_channels, groups, eps, output_scale_factor))
            if heads is not None:
                self.attentions.append(
                    make_transformer(weights, child(prefix, f"attentions.{i}"), out_channels, heads, attention, i))
        self.upsampler = None
        if add_upsample:
            self.upsampler = Upsample2D(weights, child(prefix, "upsamplers.0"), out_channels)

    def __call__(self, x, skips, temb, context=None):
        """skips: a list of this block's skips in the order the down path made them; emptied here
        (newest first) so that each skip is freed as soon as it has been used."""
        xp = array_module(x)
        # 1. per layer: concatenate the newest remaining skip, resnet (+ transformer)
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()                                          # [B,Cs,H,W]
            x = xp.concatenate([x, skip], axis=1)                       # [B,C,H,W] + [B,Cs,H,W] -> [B,C+Cs,H,W]
            del skip
            x = resnet(x, temb)                                         # [B,C+Cs,H,W] -> [B,Cout,H,W]
            if self.attentions:
                x = self.attentions[i](x, context)                      # [B,Cout,H,W]
        # 2. upsample
        if self.upsampler is not None:
            x = self.upsampler(x)                                       # [B,Cout,H,W] -> [B,Cout,2H,2W]
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""
