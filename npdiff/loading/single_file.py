"""Single-file checkpoints in the original CompVis/Stability layout (SD 1.x, 2.x), read as diffusers parts.

    load_single_file("v1-5-pruned-emaonly.safetensors")
        -> {"unet": (config, Weights), "vae": (config, Weights), "text_encoder": (config, Weights)}

Steps:
  1. open the file (validated; tensors read one by one);
  2. map_checkpoint, over names and shapes only: sort the keys by component (keymap stage 1), infer
     each component's config from the tensor shapes (below), map every key to its diffusers name with
     the key map (keymap stages 2-3); a key no row maps is an error naming it;
  3. wrap each component in a Weights: nothing is read until a model takes a tensor.
SD 2.x files keep their OpenCLIP text encoder under cond_stage_model.model.*: single_file_sd2.py maps it
(and splits its fused q/k/v tensors); the UNet and VAE are read here as for SD 1.x.

What the tensors tell (and what they cannot):
  unet  in/out channels (conv_in, out.2), block_out_channels (each block's first resnet), layers per
        block (where the first downsample sits), which blocks have attention (proj_in present),
        cross_attention_dim (attn2.to_k), use_linear_projection (proj_in is [C,C] rather than
        [C,C,1,1]), transformer layers per block. Not in the tensors: the number of attention heads
        (SD 1.x: 8 heads; linear projection as in SD 2.x: 64 channels per head), sample_size (64),
        norm_num_groups (32).
  vae   in/out channels, block_out_channels, layers_per_block, latent_channels (post_quant_conv).
        Not in the tensors: sample_size (512), scaling_factor (0.18215), norm_num_groups (32).
  clip  vocab_size and hidden_size (token_embedding), max_position_embeddings, num_hidden_layers,
        intermediate_size (fc1), num_attention_heads = hidden_size / 64 (CLIP's head width).
        Not in the tensors: hidden_act (SD 1.x: quick_gelu), layer_norm_eps (1e-5).
        (SD 2.x's OpenCLIP text encoder: single_file_sd2.py.)
"""

import os
import re

from npdiff.errors import NpdiffError
from npdiff.loading import keymap
from npdiff.loading.configs import CLIP_HEAD_WIDTH, clip_text_config
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.single_file_sd2 import is_openclip_key, map_openclip
from npdiff.loading.weights import TensorRef, Weights

SD1_UNET_HEADS = 8

UNSUPPORTED_LAYOUTS = (
    # (key prefix, what it is)
    ("conditioner.embedders.", "an SDXL checkpoint"),
)


def _indices(keys, pattern):
    """The sorted distinct integers captured by `pattern` (one group) over `keys`."""
    compiled = re.compile(pattern)
    found = set()
    for key in keys:
        match = compiled.match(key)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


class _Shapes:
    """Stored shapes of one component's keys, with errors that name the file."""

    def __init__(self, component, stored, source):
        self.component = component
        self.stored = stored  # component-relative original key -> stored shape
        self.source = source

    def __contains__(self, key):
        return key in self.stored

    def __call__(self, key):
        if key not in self.stored:
            raise NpdiffError(f"missing key '{key}' of the {self.component} in {self.source}: cannot infer the "
                              f"{self.component} config (not an SD 1.x checkpoint?)")
        return self.stored[key]


def infer_unet_config(shapes):
    keys = list(shapes.stored)
    conv_in = shapes("input_blocks.0.0.weight")  # [C0, in_channels, 3, 3]
    conv_out = shapes("out.2.weight")  # [out_channels, C0, 3, 3]
    input_indices = _indices(keys, r"input_blocks\.(\d+)\.")
    downsample_indices = [i for i in input_indices if f"input_blocks.{i}.0.op.weight" in shapes]
    layers = downsample_indices[0] - 1 if downsample_indices else input_indices[-1]
    num_blocks = len(downsample_indices) + 1
    if input_indices[-1] != num_blocks * (layers + 1) - 1:
        raise NpdiffError(f"{shapes.source}: unet input_blocks 0..{input_indices[-1]} do not form "
                          f"{num_blocks} blocks of {layers} layers")
    block_out_channels = []
    down_attention = []
    transformer_layers = []
    attention_keys = []
    for i in range(num_blocks):
        first = 1 + i * (layers + 1)
        block_out_channels.append(shapes(f"input_blocks.{first}.0.out_layers.3.weight")[0])  # [C,C,3,3]
        has_attention = f"input_blocks.{first}.1.proj_in.weight" in shapes
        down_attention.append(has_attention)
        if has_attention:
            attention_keys.append(f"input_blocks.{first}.1.")
            pattern = rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."
            transformer_layers.append(len(_indices(keys, pattern)))
        else:
            transformer_layers.append(1)  # diffusers' value for blocks without attention
    up_attention = []
    for i in range(num_blocks):
        up_attention.append(f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in shapes)
    if "middle_block.1.proj_in.weight" not in shapes:
        raise NpdiffError(f"{shapes.source}: the unet has no middle_block.1 attention: not an SD 1.x UNet")
    attention_keys.append("middle_block.1.")
    first_attention = attention_keys[0]
    cross_attention_dim = shapes(first_attention + "transformer_blocks.0.attn2.to_k.weight")[1]  # [C, D_text]
    use_linear_projection = len(shapes(first_attention + "proj_in.weight")) == 2  # [C,C] vs [C,C,1,1]
    if use_linear_projection:
        attention_head_dim = [channels // CLIP_HEAD_WIDTH for channels in block_out_channels]
    else:
        attention_head_dim = SD1_UNET_HEADS
    if len(set(transformer_layers)) == 1:
        transformer_layers_per_block = transformer_layers[0]
    else:  # differs between blocks: one count per down block
        transformer_layers_per_block = transformer_layers
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "only_cross_attention": False,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": transformer_layers_per_block,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": use_linear_projection,
        "upcast_attention": False,
    }


def infer_vae_config(shapes):
    keys = list(shapes.stored)
    num_blocks = len(_indices(keys, r"encoder\.down\.(\d+)\."))
    layers = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
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
    num_layers = len(_indices(list(shapes.stored), rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."))
    intermediate_size = shapes(prefix + "encoder.layers.0.mlp.fc1.weight")[0]  # [I, D]
    return clip_text_config(shapes.source, "CLIP text encoder", vocab_size, hidden_size, intermediate_size,
                            num_layers, max_positions, hidden_act="quick_gelu")


INFER = {"unet": infer_unet_config, "vae": infer_vae_config, "text_encoder": infer_clip_config}
TABLES = {"unet": keymap.unet_block_table, "vae": keymap.vae_block_table,
          "text_encoder": lambda config: keymap.TEXT_ENCODER_TABLE}
FULL_PREFIX = {component: prefix for prefix, component in keymap.COMPONENT_PREFIXES}


def _sort_keys(shapes, source, components=tuple(INFER)):
    """component -> {component-relative key: stored shape}; errors for keys of no known component."""
    stored = {component: {} for component in components}
    for key, shape in shapes.items():
        for prefix, what in UNSUPPORTED_LAYOUTS:
            if key.startswith(prefix):
                raise NpdiffError(f"{source} is {what} (key '{key}'); single-file loading reads "
                                  "SD 1.x checkpoints only. Convert it to a diffusers folder with diffusers' "
                                  "from_single_file(...).save_pretrained(folder) and load that folder.")
        component, rest = keymap.split_component(key)
        if component == "unknown":
            raise NpdiffError(f"unexpected key '{key}' in {source}: it belongs to none of "
                              f"{', '.join(prefix for prefix, _ in keymap.COMPONENT_PREFIXES)}")
        if component is not None:
            stored.setdefault(component, {})[rest] = tuple(shape)
    for component, keys in stored.items():
        if not keys:
            raise NpdiffError(f"{source} has no {component} weights (no keys starting with "
                              f"'{FULL_PREFIX[component]}'): expected an SD 1.x or 2.x single-file checkpoint")
    return stored


def map_checkpoint(shapes, source):
    """The whole single-file mapping over names and shapes only (no tensor is read):
    {original key: stored shape} -> {component: (config, {diffusers key: (original key, shape taken, rows)})}
    rows: None, or (start, stop) along the first axis (the q/k/v thirds of OpenCLIP's in_proj)."""
    openclip = {key: shape for key, shape in shapes.items() if is_openclip_key(key)}
    others = {key: shape for key, shape in shapes.items() if not is_openclip_key(key)}
    stored = _sort_keys(others, source, ("unet", "vae") if openclip else tuple(INFER))
    if openclip and stored.get("text_encoder"):
        raise NpdiffError(f"{source} holds two text encoders, OpenCLIP's (cond_stage_model.model.*, SD 2.x) and "
                          f"OpenAI CLIP's ({FULL_PREFIX['text_encoder']}*, SD 1.x): which one is meant?")
    mapped_parts = {"text_encoder": map_openclip(openclip, source)} if openclip else {}
    for component, shapes_by_key in stored.items():
        config = INFER[component](_Shapes(component, shapes_by_key, source))  # 1. infer the config
        table = TABLES[component](config)
        names = {}
        for key, stored_shape in shapes_by_key.items():  # 2. map every key
            full_key = FULL_PREFIX[component] + key
            mapped = keymap.map_key(key, table)
            if mapped is None:
                raise NpdiffError(f"unexpected key '{full_key}' in {source}: no diffusers name for it "
                                  f"in the {component} key map (not an SD 1.x layout?)")
            diffusers_key, reshape = mapped
            if diffusers_key in names:
                raise NpdiffError(f"keys '{names[diffusers_key][0]}' and '{full_key}' in {source} both map "
                                  f"to '{diffusers_key}'")
            names[diffusers_key] = (full_key, keymap.reshaped(stored_shape, reshape, full_key, source), None)
        mapped_parts[component] = (config, names)
    return {component: mapped_parts[component] for component in INFER}


def load_single_file(path):
    """{"unet"|"vae"|"text_encoder": (config, Weights)} from one original-layout .safetensors file."""
    safetensors_file = SafetensorsFile(os.fspath(path))  # 1. open (validated)
    shapes = {key: safetensors_file.shape(key) for key in safetensors_file.keys()}
    parts = {}
    for component, (config, names) in map_checkpoint(shapes, safetensors_file.path).items():  # 2. map
        refs = {diffusers_key: TensorRef(safetensors_file, stored_key, shape, rows)  # 3. lazy, nothing read
                for diffusers_key, (stored_key, shape, rows) in names.items()}
        parts[component] = (config, Weights(safetensors_file.path, refs, part=component))
    return parts
