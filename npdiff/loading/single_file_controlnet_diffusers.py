"""A ControlNet single file in diffusers' layout, as SDXL ControlNets are shared (controlnet-canny-sdxl-1.0's
diffusion_pytorch_model.safetensors downloaded alone, renamed): the keys are diffusers' own names and only the
config.json is missing, so the config is read from the stored shapes as for a single-file UNet.

    load_controlnet_file(path)      -> (config, Weights) of either layout: this one (controlnet_cond_embedding.*)
                                       or the original one (control_model.*: single_file_controlnet.py)

What each setting is read from (C_i: block i's channels):
    in_channels, C_0                       conv_in.weight [C_0, in, 3, 3]
    block_out_channels                     down_blocks.{i}.resnets.0.conv1.weight [C_i, ., 3, 3]
    layers_per_block                       how many down_blocks.0.resnets.{j} there are
    down_block_types, transformer depths   down_blocks.{i}.attentions.0.transformer_blocks.{k} (none: DownBlock2D)
    cross_attention_dim                    the first attention's attn2.to_k.weight [C, D_text]
    use_linear_projection                  proj_in.weight 2-dimensional (a Linear) rather than a 1x1 conv
    conditioning channels, embedding       controlnet_cond_embedding.conv_in / blocks.{2k+1} / conv_out
    addition_embed_type "text_time"        add_embedding.linear_1.weight [4*C_0, pooled + 6 * time width] (SDXL)
What no tensor stores is assumed as diffusers' and npdiff's single-file loaders assume it: 32 groups in every
norm, heads 64 channels wide with linear projections (SD 2.x, SDXL) and 8 heads otherwise (SD 1.x), and for
SDXL 256 channels per time id (addition_time_embed_dim; every SDXL base and ControlNet uses it). Weights stored
as float16/bfloat16 are widened when read, as in a folder. Nothing is read but the header until a weight is used.
"""

import os

from npdiff.errors import NpdiffError
from npdiff.loading.configs import CLIP_HEAD_WIDTH
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.single_file_configs import (
    NO_ATTENTION,
    SD1_UNET_HEADS,
    StoredShapes,
    indices,
)
from npdiff.loading.single_file_controlnet import (
    is_original_controlnet,
    load_controlnet_single_file,
)
from npdiff.loading.weights import Weights

SDXL_TIME_ID_WIDTH = 256  # addition_time_embed_dim of every SDXL base, refiner and ControlNet
SDXL_TIME_IDS = 6  # original size, crop corner, target size: two numbers each


def is_diffusers_controlnet(keys):
    """Whether a file's keys are a diffusers-layout ControlNet's (controlnet_cond_embedding, zero convolutions)."""
    return any(key.startswith("controlnet_cond_embedding.") for key in keys)


def _transformer_depth(shapes, prefix):
    """How many transformer blocks the attention at `prefix` has (0: no attention there)."""
    return len(indices(list(shapes.stored), prefix.replace(".", r"\.") + r"transformer_blocks\.(\d+)\."))


def _text_time(shapes):
    """SDXL's added conditioning settings from add_embedding.linear_1 ({} for an SD 1.x/2.x net)."""
    if "add_embedding.linear_1.weight" not in shapes:
        return {}
    rows, width = shapes("add_embedding.linear_1.weight")                  # [4*C_0, pooled + 6 * 256]
    if width <= SDXL_TIME_IDS * SDXL_TIME_ID_WIDTH:
        raise NpdiffError(f"key 'add_embedding.linear_1.weight' in {shapes.source} has shape ({rows}, {width}); an "
                          f"SDXL ControlNet takes the pooled text embedding and {SDXL_TIME_IDS} time ids of "
                          f"{SDXL_TIME_ID_WIDTH} channels each: more than {SDXL_TIME_IDS * SDXL_TIME_ID_WIDTH} inputs")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_ID_WIDTH,
            "projection_class_embeddings_input_dim": width}


def infer_diffusers_controlnet_config(shapes):
    """The diffusers ControlNetModel config of a diffusers-layout ControlNet file, from its stored shapes."""
    keys = list(shapes.stored)
    conv_in = shapes("conv_in.weight")                                    # [C_0, in_channels, 3, 3]
    blocks = indices(keys, r"down_blocks\.(\d+)\.")
    if not blocks:
        raise NpdiffError(f"{shapes.source}: no down_blocks.* keys; not a ControlNet in diffusers' layout")
    layers = len(indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    block_out_channels = [shapes(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in blocks]  # [C_i,.,3,3]
    attended = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in blocks]
    depths = [_transformer_depth(shapes, f"down_blocks.{i}.attentions.0.") for i in blocks]
    mid_depth = _transformer_depth(shapes, "mid_block.attentions.0.")
    last_depth = depths[-1] if attended[-1] else NO_ATTENTION
    if mid_depth != last_depth:  # diffusers builds the middle with the last block's depth
        raise NpdiffError(f"{shapes.source}: the middle block has {mid_depth} transformer blocks and the last down "
                          f"block {last_depth}; diffusers' ControlNetModel gives both the same depth")
    first_attention = next((f"down_blocks.{i}.attentions.0." for i in blocks if depths[i]), "mid_block.attentions.0.")
    cross_attention_dim = shapes(first_attention + "transformer_blocks.0.attn2.to_k.weight")[1]  # [C, D_text]
    use_linear_projection = len(shapes(first_attention + "proj_in.weight")) == 2
    embedding = indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")  # 2k: same size, 2k+1: halves
    embedding_channels = [shapes("controlnet_cond_embedding.conv_in.weight")[0]]
    embedding_channels += [shapes(f"controlnet_cond_embedding.blocks.{index}.weight")[0] for index in embedding[1::2]]
    return {
        "_class_name": "ControlNetModel",
        "in_channels": conv_in[1],
        "conditioning_channels": shapes("controlnet_cond_embedding.conv_in.weight")[1],
        "conditioning_embedding_out_channels": embedding_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in attended],
        "block_out_channels": block_out_channels,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": [depth if attention else NO_ATTENTION
                                         for depth, attention in zip(depths, attended)],
        "attention_head_dim": ([channels // CLIP_HEAD_WIDTH for channels in block_out_channels]
                               if use_linear_projection else SD1_UNET_HEADS),
        "use_linear_projection": use_linear_projection,
        **_text_time(shapes),
    }


def load_diffusers_controlnet_file(safetensors_file):
    """(config, Weights) of an open diffusers-layout ControlNet file; the weights under their own names."""
    keys = list(safetensors_file.keys())
    stored = {key: tuple(safetensors_file.shape(key)) for key in keys}
    config = infer_diffusers_controlnet_config(StoredShapes("controlnet", stored, safetensors_file.path))
    return config, Weights.from_file(safetensors_file)


def load_controlnet_file(path):
    """(config, Weights) of a ControlNet .safetensors file in either layout; NpdiffError for anything else."""
    safetensors_file = SafetensorsFile(os.fspath(path))
    keys = list(safetensors_file.keys())
    if is_diffusers_controlnet(keys):
        return load_diffusers_controlnet_file(safetensors_file)
    if is_original_controlnet(keys):
        return load_controlnet_single_file(path)
    raise NpdiffError(f"{safetensors_file.path}: not a ControlNet file (no controlnet_cond_embedding.* keys as in "
                      "diffusers' layout, nor control_model.input_hint_block.* as in the original one)")
