"""A ControlNet single file in the original (ControlLDM) layout, as people download them
(control_v11p_sd15_canny.safetensors): `control_model.*` keys -> (diffusers config, Weights).

    control_model.time_embed.{0,2}          time_embedding.linear_{1,2}
    control_model.input_blocks.*            conv_in, down_blocks.*  (the UNet's own rows, keymap.unet_block_table)
    control_model.middle_block.*            mid_block.*
    control_model.input_hint_block.0        controlnet_cond_embedding.conv_in
    control_model.input_hint_block.{2k}     controlnet_cond_embedding.blocks.{k-1}   (k = 1 .. last-1)
    control_model.input_hint_block.{last}   controlnet_cond_embedding.conv_out
    control_model.zero_convs.{i}.0          controlnet_down_blocks.{i}
    control_model.middle_block_out.0        controlnet_mid_block
The config is read from the stored shapes as for a UNet (single_file_configs.py): blocks, layers, channels,
attention depths and text width; the conditioning embedding's channels from input_hint_block. Some files
carry the keys without the `control_model.` prefix: both are read. Nothing is read but the header until a
weight is used.
"""

import os

from npdiff.errors import NpdiffError
from npdiff.loading import keymap
from npdiff.loading.configs import CLIP_HEAD_WIDTH
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.single_file_configs import (
    SD1_UNET_HEADS,
    StoredShapes,
    _attention_depths,
    indices,
)
from npdiff.loading.weights import TensorRef, Weights

PREFIX = "control_model."


def infer_controlnet_config(shapes):
    """The diffusers ControlNetModel config of an original-layout ControlNet, from its stored shapes."""
    keys = list(shapes.stored)
    conv_in = shapes("input_blocks.0.0.weight")                        # [C0, in_channels, 3, 3]
    input_indices = indices(keys, r"input_blocks\.(\d+)\.")
    downsample_indices = [i for i in input_indices if f"input_blocks.{i}.0.op.weight" in shapes]
    layers = downsample_indices[0] - 1 if downsample_indices else input_indices[-1]
    num_blocks = len(downsample_indices) + 1
    block_out_channels, down_depths = [], []
    for i in range(num_blocks):
        first = 1 + i * (layers + 1)
        block_out_channels.append(shapes(f"input_blocks.{first}.0.out_layers.3.weight")[0])  # [C,C,3,3]
        down_depths.append(_attention_depths(shapes, [f"input_blocks.{first + j}.1." for j in range(layers)]))
    (mid_depth,) = _attention_depths(shapes, ["middle_block.1."])
    attention = [f"input_blocks.{1 + i * (layers + 1)}.1." for i in range(num_blocks) if down_depths[i][0]]
    first_attention = (attention + ["middle_block.1."])[0]
    cross_attention_dim = shapes(first_attention + "transformer_blocks.0.attn2.to_k.weight")[1]  # [C, D_text]
    use_linear_projection = len(shapes(first_attention + "proj_in.weight")) == 2
    depths = [depth[0] or 1 for depth in down_depths]
    hint = indices(keys, r"input_hint_block\.(\d+)\.weight")         # conv_in, the blocks, conv_out
    embedding_channels = [shapes(f"input_hint_block.{hint[0]}.weight")[0]]
    embedding_channels += [shapes(f"input_hint_block.{index}.weight")[0] for index in hint[2:-1:2]]
    return {
        "_class_name": "ControlNetModel",
        "in_channels": conv_in[1],
        "conditioning_channels": shapes(f"input_hint_block.{hint[0]}.weight")[1],
        "conditioning_embedding_out_channels": embedding_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if depth[0] else "DownBlock2D" for depth in down_depths],
        "block_out_channels": block_out_channels,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": depths[0] if len(set(depths + [mid_depth])) == 1 else depths,
        "attention_head_dim": ([channels // CLIP_HEAD_WIDTH for channels in block_out_channels]
                               if use_linear_projection else SD1_UNET_HEADS),
        "use_linear_projection": use_linear_projection,
    }


def controlnet_table(config, hint_indices, zero_conv_count):
    """(original prefix, diffusers prefix, parts) rows: the UNet's down-path rows and the ControlNet's own."""
    # keymap.unet_block_table also lists the up path's rows (none match a ControlNet's keys); it reads
    # up_block_types only for their attention slots
    rows = [row for row in keymap.unet_block_table(dict(config, up_block_types=config["down_block_types"]))]
    rows.append((f"input_hint_block.{hint_indices[0]}.", "controlnet_cond_embedding.conv_in.", keymap.KEEP))
    for k, index in enumerate(hint_indices[1:-1]):
        rows.append((f"input_hint_block.{index}.", f"controlnet_cond_embedding.blocks.{k}.", keymap.KEEP))
    rows.append((f"input_hint_block.{hint_indices[-1]}.", "controlnet_cond_embedding.conv_out.", keymap.KEEP))
    rows += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", keymap.KEEP) for i in range(zero_conv_count)]
    rows.append(("middle_block_out.0.", "controlnet_mid_block.", keymap.KEEP))
    return rows


def is_original_controlnet(keys):
    """Whether a file's keys are an original-layout ControlNet's (input_hint_block, zero_convs)."""
    return any(key.startswith(("control_model.input_hint_block.", "input_hint_block.")) for key in keys)


def load_controlnet_single_file(path):
    """(config, Weights) of an original-layout ControlNet .safetensors file; NpdiffError for anything else."""
    safetensors_file = SafetensorsFile(os.fspath(path))
    source = safetensors_file.path
    all_keys = list(safetensors_file.keys())
    if not is_original_controlnet(all_keys):
        raise NpdiffError(f"{source}: not a ControlNet in the original layout (no control_model.input_hint_block.* "
                          "keys); for either layout use single_file_controlnet_diffusers.load_controlnet_file")
    prefix = PREFIX if any(key.startswith(PREFIX) for key in all_keys) else ""
    stored = {}
    for key in all_keys:
        if not key.startswith(prefix):
            raise NpdiffError(f"unexpected key '{key}' in {source}: a ControlNet file's keys all start with "
                              f"'{prefix}'")
        stored[key[len(prefix):]] = tuple(safetensors_file.shape(key))
    shapes = StoredShapes("controlnet", stored, source, prefix)
    config = infer_controlnet_config(shapes)
    hint_indices = indices(list(stored), r"input_hint_block\.(\d+)\.weight")
    zero_conv_count = len(indices(list(stored), r"zero_convs\.(\d+)\."))
    table = controlnet_table(config, hint_indices, zero_conv_count)
    names = keymap.map_component("controlnet", stored, table, prefix, source)
    refs = {diffusers_key: TensorRef(safetensors_file, stored_key, shape, rows, False)
            for diffusers_key, (stored_key, shape, rows) in names.items()}
    return config, Weights(source, refs, part="controlnet")
