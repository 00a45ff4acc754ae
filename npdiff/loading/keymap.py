"""The one key map between the original CompVis/Stability layout and diffusers names (SD 1.x, 2.x, SDXL).

An original checkpoint keeps all three networks in one file; a key is mapped in three stages:

  1. COMPONENT_PREFIXES: which network the key belongs to, by its prefix
         model.diffusion_model.input_blocks.1.0.in_layers.0.weight  -> unet: input_blocks.1.0.in_layers.0.weight
  2. the block table of that network: (original prefix, diffusers prefix, parts table). Block
     numbering depends on the number of blocks and layers per block, so the rows are written out
     from the config (inferred from the file first, see single_file.py):
         input_blocks.1.0.   -> down_blocks.0.resnets.0.      (parts: UNET_RESNET_PARTS)
  3. the parts table of that block renames what follows the prefix (KEEP: the rest is kept as is,
     e.g. transformer blocks, which have the same names in both layouts):
         in_layers.0.        -> norm1.
     giving down_blocks.0.resnets.0.norm1.weight.

SDXL files use the same UNet and VAE names (the UNet adds label_emb, diffusers' add_embedding) and keep
their two text encoders under conditioner.embedders.* (SDXL_COMPONENT_PREFIXES).

One shape changes: the VAE's mid-block attention stores q, k, v and proj_out as 1x1 convolutions
[C,C,1,1]; diffusers has linear layers [C,C]. Those rows carry CONV1X1_TO_LINEAR.

The same tables, read right to left, are the diffusers -> original map (tests/single_file.py writes
its own, independently, and checks it against diffusers' converters).
"""

from npdiff.errors import NpdiffError

KEEP = None  # parts table meaning "the rest of the key is the same in both layouts"
CONV1X1_TO_LINEAR = "conv1x1_to_linear"  # stored [C,C,1,1] -> taken as [C,C] (or already [C,C])

# Stage 1 -----------------------------------------------------------------------------------------
COMPONENT_PREFIXES = (
    # (original prefix,              component)
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.transformer.", "text_encoder"),
)
# SDXL files (Stability's sgm layout): the text encoders are the conditioner's embedders; the refiner's
# file has ViT-bigG alone, at index 0. (ViT-bigG keeps OpenCLIP's names: single_file_sdxl.py maps them.)
SDXL_COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("conditioner.embedders.0.transformer.", "text_encoder"),  # CLIP ViT-L, transformers' names
    ("conditioner.embedders.1.model.", "text_encoder_2"),  # OpenCLIP ViT-bigG (base)
)
SDXL_REFINER_COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("conditioner.embedders.0.model.", "text_encoder_2"),  # OpenCLIP ViT-bigG (refiner)
)
# Keys that belong to no network npdiff runs: the training noise schedule (the scheduler recomputes
# it), EMA copies and the autoencoder's training loss. (Keys that change how a model is sampled, such as
# some SDXL files' "v_pred" marker, are NOT ignored: single_file_sdxl.UNSUPPORTED_MARKERS refuses them.)
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
IGNORED_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
                "denoiser.sigmas")  # SDXL (sgm): the denoiser's training sigmas

# Stage 3 -----------------------------------------------------------------------------------------
UNET_RESNET_PARTS = (
    # (original,        diffusers,        reshape)
    ("in_layers.0.", "norm1.", None),
    ("in_layers.2.", "conv1.", None),
    ("emb_layers.1.", "time_emb_proj.", None),
    ("out_layers.0.", "norm2.", None),
    ("out_layers.3.", "conv2.", None),
    ("skip_connection.", "conv_shortcut.", None),
)
VAE_RESNET_PARTS = (
    ("norm1.", "norm1.", None),
    ("conv1.", "conv1.", None),
    ("norm2.", "norm2.", None),
    ("conv2.", "conv2.", None),
    ("nin_shortcut.", "conv_shortcut.", None),
)
VAE_ATTENTION_PARTS = (
    ("norm.", "group_norm.", None),
    ("q.weight", "to_q.weight", CONV1X1_TO_LINEAR),
    ("q.bias", "to_q.bias", None),
    ("k.weight", "to_k.weight", CONV1X1_TO_LINEAR),
    ("k.bias", "to_k.bias", None),
    ("v.weight", "to_v.weight", CONV1X1_TO_LINEAR),
    ("v.bias", "to_v.bias", None),
    ("proj_out.weight", "to_out.0.weight", CONV1X1_TO_LINEAR),
    ("proj_out.bias", "to_out.0.bias", None),
)


# Stage 2 -----------------------------------------------------------------------------------------
def unet_block_table(config):
    """(original prefix, diffusers prefix, parts) rows of the UNet for this config.

    Original numbering: input_blocks.0 is conv_in; then each down block i has `layers` entries
    [resnet, attention?] and, except the last block, one [downsample]; output_blocks run deepest first,
    layers+1 entries per up block [resnet, attention?, upsample?] (the upsample on the block's last entry).
    """
    layers = config["layers_per_block"]
    num_blocks = len(config["block_out_channels"])
    down_attention = ["CrossAttn" in kind for kind in config["down_block_types"]]
    up_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    rows = [
        ("time_embed.0.", "time_embedding.linear_1.", KEEP),
        ("time_embed.2.", "time_embedding.linear_2.", KEEP),
        ("input_blocks.0.0.", "conv_in.", KEEP),
        ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET_PARTS),
        ("middle_block.1.", "mid_block.attentions.0.", KEEP),
        ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET_PARTS),
        ("out.0.", "conv_norm_out.", KEEP),
        ("out.2.", "conv_out.", KEEP),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL: label_emb = Sequential(Linear, SiLU, Linear)
        rows += [
            ("label_emb.0.0.", "add_embedding.linear_1.", KEEP),
            ("label_emb.0.2.", "add_embedding.linear_2.", KEEP),
        ]
    for i in range(num_blocks):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            rows.append((f"input_blocks.{index}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET_PARTS))
            if down_attention[i]:
                rows.append((f"input_blocks.{index}.1.", f"down_blocks.{i}.attentions.{j}.", KEEP))
        if i < num_blocks - 1:
            index = (i + 1) * (layers + 1)
            rows.append((f"input_blocks.{index}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", KEEP))
    for i in range(num_blocks):
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            rows.append((f"output_blocks.{index}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET_PARTS))
            if up_attention[i]:
                rows.append((f"output_blocks.{index}.1.", f"up_blocks.{i}.attentions.{j}.", KEEP))
        if i < num_blocks - 1:
            index = i * (layers + 1) + layers
            slot = 2 if up_attention[i] else 1
            rows.append((f"output_blocks.{index}.{slot}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", KEEP))
    return rows


def vae_block_table(config):
    """(original prefix, diffusers prefix, parts) rows of the VAE for this config.

    Original numbering: encoder.down.i (i = 0 shallowest) holds `layers` resnets and a downsample except
    the last; decoder.up.i is numbered the same way, so diffusers' decoder.up_blocks.i (deepest first)
    is the original decoder.up.(n-1-i), with layers+1 resnets and an upsample except the last.
    """
    layers = config["layers_per_block"]
    num_blocks = len(config["block_out_channels"])
    rows = [
        ("quant_conv.", "quant_conv.", KEEP),
        ("post_quant_conv.", "post_quant_conv.", KEEP),
    ]
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.conv_in.", f"{part}.conv_in.", KEEP),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET_PARTS),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION_PARTS),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET_PARTS),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", KEEP),
            (f"{part}.conv_out.", f"{part}.conv_out.", KEEP),
        ]
    for i in range(num_blocks):
        for j in range(layers):
            rows.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET_PARTS))
        if i < num_blocks - 1:
            rows.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", KEEP))
    for i in range(num_blocks):
        level = num_blocks - 1 - i
        for j in range(layers + 1):
            rows.append((f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET_PARTS))
        if i < num_blocks - 1:
            rows.append((f"decoder.up.{level}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.", KEEP))
    return rows


TEXT_ENCODER_TABLE = [("", "", KEEP)]  # transformers' names already (with or without "text_model.")


# Applying the tables -----------------------------------------------------------------------------
def split_component(key, prefixes=COMPONENT_PREFIXES):
    """(component, key without its prefix), (None, key) for an ignored key, ("unknown", key) otherwise."""
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):  # first: first_stage_model.loss. is no VAE key
        return None, key
    for prefix, component in prefixes:
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return "unknown", key


def map_key(key, table):
    """(diffusers key, reshape) for a component-relative original key, or None if no row maps it."""
    best = None
    for original_prefix, diffusers_prefix, parts in table:
        if key.startswith(original_prefix) and (best is None or len(original_prefix) > len(best[0])):
            best = (original_prefix, diffusers_prefix, parts)
    if best is None:
        return None
    original_prefix, diffusers_prefix, parts = best
    rest = key[len(original_prefix):]
    if parts is KEEP:
        return diffusers_prefix + rest, None
    for original_part, diffusers_part, reshape in parts:
        if rest.startswith(original_part):
            return diffusers_prefix + diffusers_part + rest[len(original_part):], reshape
    return None


def reshaped(stored_shape, reshape, key, source):
    """The shape a key is taken as, after the table's reshape (if any)."""
    stored_shape = tuple(stored_shape)
    if reshape is None:
        return stored_shape
    if reshape == CONV1X1_TO_LINEAR:
        if len(stored_shape) == 4 and stored_shape[2:] == (1, 1):
            return stored_shape[:2]  # [C_out,C_in,1,1] -> [C_out,C_in]
        if len(stored_shape) == 2:
            return stored_shape  # already linear (some converted checkpoints)
        raise NpdiffError(f"key '{key}' in {source} has shape {stored_shape}; expected a 1x1 convolution "
                          "[C,C,1,1] (or a linear [C,C])")
    raise NpdiffError(f"unknown reshape {reshape!r} in the key map")  # a bug in this file, not in the input


def map_component(component, shapes_by_key, table, prefix, source):
    """Every key of one component through its table: {component-relative original key: stored shape} ->
    {diffusers key: (full original key, shape taken, None)}; NpdiffError naming a key no row maps, or two
    keys that map to one name. (None: no rows taken, see single_file_sd2.map_openclip.)"""
    names = {}
    for key, stored_shape in shapes_by_key.items():
        full_key = prefix + key
        mapped = map_key(key, table)
        if mapped is None:
            raise NpdiffError(f"unexpected key '{full_key}' in {source}: no diffusers name for it "
                              f"in the {component} key map")
        diffusers_key, reshape = mapped
        if diffusers_key in names:
            raise NpdiffError(f"keys '{names[diffusers_key][0]}' and '{full_key}' in {source} both map "
                              f"to '{diffusers_key}'")
        names[diffusers_key] = (full_key, reshaped(stored_shape, reshape, full_key, source), None)
    return names
