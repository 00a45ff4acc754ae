"""Component configs inferred from the tensor shapes of a single-file checkpoint (SD 1.x, 2.x, SDXL).

    infer_unet_config(StoredShapes("unet", {"input_blocks.0.0.weight": (320, 4, 3, 3), ...}, source))

Each function reads only names and shapes (no tensor is read) and returns the config diffusers would
use; a key it needs and cannot find is an NpdiffError naming the file and key. single_file.py (SD 1.x,
2.x) and single_file_sdxl.py both build on this module.

What the tensors tell (and what they cannot):
  unet  in/out channels (conv_in, out.2), block_out_channels (each block's first resnet), layers per
        block (where the first downsample sits), which blocks have attention (proj_in present),
        cross_attention_dim (attn2.to_k), use_linear_projection (proj_in is [C,C] rather than
        [C,C,1,1]), transformer layers per block and per layer, down, mid and up (how many
        transformer_blocks.<k> each attention holds). Not in the tensors: the number of attention heads
        (SD 1.x: 8 heads; linear projection as in SD 2.x and SDXL: 64 channels per head), sample_size (64),
        norm_num_groups (32). SDXL's text_time embedding (label_emb): single_file_sdxl.py.
  vae   in/out channels, block_out_channels, layers_per_block, latent_channels (post_quant_conv).
        Not in the tensors: sample_size (512), scaling_factor (0.18215), norm_num_groups (32).
  clip  vocab_size and hidden_size (token_embedding), max_position_embeddings, num_hidden_layers,
        intermediate_size (fc1), num_attention_heads = hidden_size / 64 (CLIP's head width).
        Not in the tensors: hidden_act (SD 1.x: quick_gelu), layer_norm_eps (1e-5).

transformer_layers_per_block, as diffusers reads it: an int (every attention, down, mid and up, has that
many layers: SD 1.x/2.x 1, the SDXL refiner 4), else one entry per down block, an int or a list per
layer. The mid block takes the LAST entry (its first layer's count if a list), so a last block without
attention carries the mid block's count there; other blocks without attention carry diffusers' 1. The
up blocks take the down list reversed, unless the file's up blocks differ: then
reverse_transformer_layers_per_block holds one list per up block (layers_per_block + 1 entries).
"""

import re

from npdiff.errors import NpdiffError
from npdiff.loading.configs import CLIP_HEAD_WIDTH, clip_text_config

SD1_UNET_HEADS = 8
NO_ATTENTION = 1  # diffusers' transformer_layers_per_block entry for a block without attention


def indices(keys, pattern):
    """The sorted distinct integers captured by `pattern` (one group) over `keys`."""
    compiled = re.compile(pattern)
    found = set()
    for key in keys:
        match = compiled.match(key)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


class StoredShapes:
    """Stored shapes of one component's keys, with errors that name the file."""

    def __init__(self, component, stored, source, prefix=""):
        self.component = component
        self.stored = stored  # component-relative original key -> stored shape
        self.source = source
        self.prefix = prefix  # the component's key prefix in the file, for messages

    def __contains__(self, key):
        return key in self.stored

    def __call__(self, key):
        if key not in self.stored:
            raise NpdiffError(f"missing key '{self.prefix}{key}' of the {self.component} in {self.source}: cannot "
                              f"infer the {self.component} config")
        return self.stored[key]


def _attention_depths(shapes, attention_prefixes):
    """[transformer layers in each attention] for prefixes like 'input_blocks.4.1.' (None: no attention)."""
    keys = list(shapes.stored)
    depths = []
    for prefix in attention_prefixes:
        if prefix + "proj_in.weight" not in shapes:
            depths.append(None)
            continue
        found = indices(keys, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
        if found != list(range(len(found))) or not found:
            raise NpdiffError(f"{shapes.source}: {shapes.prefix}{prefix}transformer_blocks.* are numbered {found}; "
                              "expected 0..N-1 with N >= 1")
        depths.append(len(found))
    return depths


def _collapse(depths):
    """[n, n, n] -> n; a list that differs per layer stays a list."""
    return depths[0] if len(set(depths)) == 1 else list(depths)


def _transformer_layers(shapes, down, mid, up, layers):
    """(transformer_layers_per_block, reverse_transformer_layers_per_block or None) from the depths found:
    down/up: per block, per layer (None: no attention); mid: the mid block's count (see the module doc)."""
    every_count = {depth for block in down + up for depth in block if depth is not None} | {mid}
    if len(every_count) == 1:
        return mid, None
    per_block = []
    for i, block in enumerate(down):
        if block[0] is not None:
            per_block.append(_collapse(block))
        elif i == len(down) - 1:
            per_block.append(mid)  # diffusers' mid block reads the last entry
        else:
            per_block.append(NO_ATTENTION)
    last = per_block[-1][0] if isinstance(per_block[-1], list) else per_block[-1]  # diffusers' mid block reads this
    if last != mid:
        raise NpdiffError(f"{shapes.source}: the mid block has {mid} transformer layers but the last down block's "
                          f"first layer {last}; diffusers' UNet2DConditionModel gives both the same count")
    reversed_blocks = list(reversed(per_block))
    for i, block in enumerate(up):
        expected = reversed_blocks[i]
        expected = expected if isinstance(expected, list) else [expected] * (layers + 1)
        if block[0] is not None and list(block) != expected:
            break
    else:
        return per_block, None
    reverse = [list(block) if block[0] is not None else [NO_ATTENTION] * (layers + 1) for block in up]
    return per_block, reverse


def infer_unet_config(shapes):
    keys = list(shapes.stored)
    conv_in = shapes("input_blocks.0.0.weight")  # [C0, in_channels, 3, 3]
    conv_out = shapes("out.2.weight")  # [out_channels, C0, 3, 3]
    input_indices = indices(keys, r"input_blocks\.(\d+)\.")
    downsample_indices = [i for i in input_indices if f"input_blocks.{i}.0.op.weight" in shapes]
    layers = downsample_indices[0] - 1 if downsample_indices else input_indices[-1]
    num_blocks = len(downsample_indices) + 1
    if input_indices[-1] != num_blocks * (layers + 1) - 1:
        raise NpdiffError(f"{shapes.source}: unet input_blocks 0..{input_indices[-1]} do not form "
                          f"{num_blocks} blocks of {layers} layers")
    # 1. per down block: channels and the attention of each layer
    block_out_channels = []
    down_depths = []
    for i in range(num_blocks):
        first = 1 + i * (layers + 1)
        block_out_channels.append(shapes(f"input_blocks.{first}.0.out_layers.3.weight")[0])  # [C,C,3,3]
        down_depths.append(_attention_depths(shapes, [f"input_blocks.{first + j}.1." for j in range(layers)]))
    # 2. per up block (deepest first): the attention of each of its layers + 1 entries
    up_depths = []
    for i in range(num_blocks):
        up_depths.append(_attention_depths(shapes, [f"output_blocks.{i * (layers + 1) + j}.1."
                                                    for j in range(layers + 1)]))
    if "middle_block.1.proj_in.weight" not in shapes:
        raise NpdiffError(f"{shapes.source}: the unet has no middle_block.1 attention: not a Stable Diffusion UNet")
    (mid_depth,) = _attention_depths(shapes, ["middle_block.1."])
    # 3. the attention's width, projection and heads, from the first attention
    attention_prefixes = [f"input_blocks.{1 + i * (layers + 1)}.1." for i in range(num_blocks)
                          if down_depths[i][0] is not None] + ["middle_block.1."]
    first_attention = attention_prefixes[0]
    cross_attention_dim = shapes(first_attention + "transformer_blocks.0.attn2.to_k.weight")[1]  # [C, D_text]
    use_linear_projection = len(shapes(first_attention + "proj_in.weight")) == 2  # [C,C] vs [C,C,1,1]
    if use_linear_projection:
        attention_head_dim = [channels // CLIP_HEAD_WIDTH for channels in block_out_channels]
    else:
        attention_head_dim = SD1_UNET_HEADS
    transformer_layers, reverse_layers = _transformer_layers(shapes, down_depths, mid_depth, up_depths, layers)
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if d[0] is not None else "DownBlock2D" for d in down_depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if d[0] is not None else "UpBlock2D" for d in up_depths],
        "only_cross_attention": False,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": use_linear_projection,
        "upcast_attention": False,
    }
    if reverse_layers is not None:
        config["reverse_transformer_layers_per_block"] = reverse_layers
    return config


def infer_vae_config(shapes):
    keys = list(shapes.stored)
    num_blocks = len(indices(keys, r"encoder\.down\.(\d+)\."))
    layers = len(indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    if num_blocks == 0 or layers == 0:
        raise NpdiffError(f"{shapes.source}: no VAE encoder blocks (first_stage_model.encoder.down.*)")
    block_out_channels = [shapes(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(num_blocks)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes("encoder.conv_in.weight")[1],  # [C0, in, 3, 3]
        "out_channels": shapes("decoder.conv_out.weight")[0],  # [out, C0, 3, 3]
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": shapes("post_quant_conv.weight")[0],  # [z, z, 1, 1]
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def infer_clip_config(shapes):
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in shapes else ""
    vocab_size, hidden_size = shapes(prefix + "embeddings.token_embedding.weight")  # [V, D]
    max_positions = shapes(prefix + "embeddings.position_embedding.weight")[0]  # [P, D]
    num_layers = len(indices(list(shapes.stored), rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."))
    intermediate_size = shapes(prefix + "encoder.layers.0.mlp.fc1.weight")[0]  # [I, D]
    return clip_text_config(shapes.source, "CLIP text encoder", vocab_size, hidden_size, intermediate_size,
                            num_layers, max_positions, hidden_act="quick_gelu")
