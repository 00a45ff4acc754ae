"""Test helper: write a single-file checkpoint in the original CompVis/Stability layout (SD 1.x, and SD 2.x
with text_encoder_layout="openclip") from diffusers-layout state dicts.

    from single_file import to_original_layout, write_single_file
    written = write_single_file(path, unet=(unet_config, unet_state), vae=(vae_config, vae_state),
                                text_encoder=clip_state, dtype=torch.float16, extra={"betas": ...})

This is the diffusers -> original direction, written independently of npdiff's key map
(npdiff/loading/keymap.py reads the other way, with prefix tables): here every diffusers key is
rewritten by the first regular expression of a rule list that matches it, after the structure of
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any number of
blocks and layers per block. It is checked against diffusers' own converters
(diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint /
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), which must map the written file back to
the original state dicts (tests/models/test_single_file.py).

SD 2.x's text encoder is written as OpenCLIP stores it (after diffusers' convert_diffusers_to_original_
stable_diffusion.py, convert_text_enc_state_dict_v20): q, k, v stacked into one in_proj, plus one more
resblock than the transformers model has (SD 2.x runs all but OpenCLIP's last layer; its values here are
random) and the contrastive head (text_projection, logit_scale), which SD never uses.

SDXL files (write_single_file(..., text_encoder_2=bigG_state); after Stability's sgm layout and diffusers'
convert_open_clip_checkpoint read backwards): the UNet gains label_emb.0.0/0.2 (diffusers' add_embedding),
CLIP-L keeps transformers' names under conditioner.embedders.0.transformer., ViT-bigG is written as OpenCLIP
stores it under conditioner.embedders.1.model. (the refiner: .0.model., and no CLIP-L), every resblock kept
and text_projection stored as OpenCLIP multiplies by it, [D, P] (the Linear weight transposed).
"""

import functools
import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, transformers' names
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, OpenCLIP's names
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner has bigG alone
OPENCLIP_NAMES = (  # transformers CLIPTextModel (after "text_model.") -> OpenCLIP, first match wins
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"final_layer_norm\.(.+)", r"ln_final.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(.+)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(.+)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(.+)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(.+)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
)

UNET_RESNET_NAMES = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_NAMES = {  # diffusers Attention (VAE mid block) -> LDM AttnBlock
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
}


def _resnet_rest(rest):
    """'norm1.weight' -> 'in_layers.0.weight' (UNet resnets)."""
    module, _, leaf = rest.rpartition(".")
    return f"{UNET_RESNET_NAMES[module]}.{leaf}"


def unet_key(key, config):
    """A diffusers UNet2DConditionModel key -> its LDM UNetModel key (without the file prefix)."""
    per_block = config["layers_per_block"] + 1  # LDM entries per down/up level
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's text_time embedding (sgm's label_emb: Sequential(Sequential(Linear, SiLU, Linear)))
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + i * per_block + j}.0.{_resnet_rest(rest)}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + i * per_block + j}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        i, rest = int(match[1]), match[2]
        return f"input_blocks.{(i + 1) * per_block}.0.op.{rest}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet_rest(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{i * per_block + j}.0.{_resnet_rest(rest)}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{i * per_block + j}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i, rest = int(match[1]), match[2]
        slot = 2 if up_has_attention[i] else 1  # after [resnet, attention] or after [resnet]
        return f"output_blocks.{i * per_block + per_block - 1}.{slot}.conv.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key(key, config):
    """A diffusers AutoencoderKL key -> (its LDM key without the file prefix, reshape to 1x1 conv?)."""
    levels = len(config["block_out_channels"])
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = match[3].replace("conv_shortcut", "nin_shortcut")
        return f"encoder.down.{match[1]}.block.{match[2]}.{rest}", False
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.{match[2]}", False
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = match[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{levels - 1 - int(match[1])}.block.{match[2]}.{rest}", False
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.upsample.{match[2]}", False
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}", False
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        name = VAE_ATTENTION_NAMES[match[2]]
        is_projection_weight = name != "norm" and match[3] == "weight"
        return f"{match[1]}.mid.attn_1.{name}.{match[3]}", is_projection_weight
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{match[1]}.norm_out.{match[2]}", False
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key, False
    raise KeyError(f"no LDM name for VAE key {key!r}")


def _openclip_names(clip_state):
    """A transformers CLIPTextModel state (with or without "text_model.") -> {OpenCLIP key: tensor}, q/k/v
    stacked into in_proj; anything else (text_projection.weight of a ...WithProjection) stays out."""
    import torch

    state = {key.removeprefix("text_model."): tensor for key, tensor in clip_state.items()}
    state.pop("embeddings.position_ids", None)  # OpenCLIP keeps no position ids
    state.pop("text_projection.weight", None)  # the caller's (SDXL) or absent (SD 2.x)
    out, qkv = {}, {}
    for key, tensor in state.items():
        if match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(match[1]), match[3]), {})[match[2]] = tensor
            continue
        for pattern, replacement in OPENCLIP_NAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, leaf), parts in qkv.items():  # q, k, v [D,D] each -> in_proj [3D,D]
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def openclip_text_encoder(clip_state, seed=0):
    """A transformers CLIPTextModel state (with or without "text_model.") -> {OpenCLIP key: tensor} as SD 2.x
    files hold it: one more resblock (the one SD 2.x skips) and the contrastive head, random values."""
    import torch

    out = _openclip_names(clip_state)
    # the layer SD 2.x skips, and CLIP's contrastive head: random values of the right shapes
    last = max(int(key.split(".")[2]) for key in out if key.startswith("transformer.resblocks."))
    torch.manual_seed(seed)
    for key in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")]:
        out[key.replace(f".{last}.", f".{last + 1}.", 1)] = torch.randn_like(out[key])
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = torch.randn(width, width // 2, device=out["token_embedding.weight"].device)
    out["logit_scale"] = torch.tensor(4.6052, device=out["token_embedding.weight"].device)
    return out


def openclip_bigg_text_encoder(projection_state):
    """A transformers CLIPTextModelWithProjection state -> {OpenCLIP key: tensor} as SDXL files hold ViT-bigG:
    every resblock (SDXL uses them all), text_projection as OpenCLIP multiplies by it, x @ P: [D, P], the
    transpose of the Linear weight [P, D] (diffusers' convert_open_clip_checkpoint transposes it back),
    and logit_scale."""
    import torch

    out = _openclip_names(projection_state)
    out["text_projection"] = projection_state["text_projection.weight"].T.contiguous()  # [P,D] -> [D,P]
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def to_original_layout(unet, vae, text_encoder, text_encoder_layout="openai"):
    """{original key: tensor} from (unet_config, unet_state), (vae_config, vae_state), clip_state.

    text_encoder_layout: "openai" (SD 1.x: cond_stage_model.transformer.*) or "openclip" (SD 2.x:
    cond_stage_model.model.*)."""
    unet_config, unet_state = unet
    vae_config, vae_state = vae
    checkpoint = {}

    def put(key, tensor):
        assert key not in checkpoint, f"two tensors written as {key}"
        checkpoint[key] = tensor

    for key, tensor in unet_state.items():
        put(UNET_PREFIX + unet_key(key, unet_config), tensor)
    for key, tensor in vae_state.items():
        original, to_conv = vae_key(key, vae_config)
        put(VAE_PREFIX + original, tensor[:, :, None, None] if to_conv else tensor)  # [C,C] -> [C,C,1,1]
    if text_encoder_layout == "openclip":
        for key, tensor in openclip_text_encoder(text_encoder).items():
            put(OPENCLIP_PREFIX + key, tensor)
        return checkpoint
    for key, tensor in text_encoder.items():
        named = key if key.startswith("text_model.") else "text_model." + key  # SD 1.x files have the prefix
        put(CLIP_PREFIX + named, tensor)
    return checkpoint


def to_sdxl_original_layout(unet, vae, text_encoder, text_encoder_2):
    """{original key: tensor} of an SDXL single file (Stability's sgm layout) from (unet_config, unet_state),
    (vae_config, vae_state), the CLIP-L state (None: a refiner, which has none) and the ViT-bigG
    CLIPTextModelWithProjection state. The UNet and VAE keys are SD 1.x's (label_emb added); the text
    encoders sit under conditioner.embedders.<i>.: CLIP-L (transformers' names) at 0, bigG (OpenCLIP's)
    at 1, or at 0 in a refiner."""
    checkpoint = to_original_layout(unet, vae, {}, text_encoder_layout="openai")
    if text_encoder is not None:
        for key, tensor in text_encoder.items():
            named = key if key.startswith("text_model.") else "text_model." + key
            checkpoint[SDXL_CLIP_PREFIX + named] = tensor
    bigg_prefix = SDXL_BIGG_PREFIX if text_encoder is not None else SDXL_REFINER_BIGG_PREFIX
    for key, tensor in openclip_bigg_text_encoder(text_encoder_2).items():
        checkpoint[bigg_prefix + key] = tensor
    return checkpoint


def write_single_file(path, unet, vae, text_encoder, dtype=None, extra=None, text_encoder_layout="openai",
                      text_encoder_2=None):
    """Write the original-layout file to `path` (safetensors) -> the {key: tensor} written.

    dtype: torch dtype for the floating tensors (None: as given); extra: more {key: tensor} to add
    (e.g. the noise schedule buffers real checkpoints carry); text_encoder_layout: see to_original_layout.
    text_encoder_2 (a CLIPTextModelWithProjection state): an SDXL file (to_sdxl_original_layout; then
    text_encoder may be None, a refiner)."""
    from safetensors.torch import save_file

    if text_encoder_2 is not None:
        checkpoint = to_sdxl_original_layout(unet, vae, text_encoder, text_encoder_2)
    else:
        checkpoint = to_original_layout(unet, vae, text_encoder, text_encoder_layout)
    for key, tensor in (extra or {}).items():
        assert key not in checkpoint, key
        checkpoint[key] = tensor
    if dtype is not None:
        checkpoint = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in checkpoint.items()}
    checkpoint = {key: tensor.detach().contiguous() for key, tensor in checkpoint.items()}
    save_file(checkpoint, str(path))
    return checkpoint


# --------------------------------------------------------------------------------------------------
# Tiny SDXL parts for the SDXL single-file tests (tests/models/test_single_file_sdxl*.py)
# --------------------------------------------------------------------------------------------------
# Tiny parts with SDXL's structure. Heads are 64 channels wide and norm groups 32, as the loader assumes
# (the tensors do not say); the text encoders carry SDXL's token ids (bos 0, eos 2, pad 1).
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64, **TOKEN_IDS)
BIGG = dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=10, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32, **TOKEN_IDS)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
UNET_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 64, 128), attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3),
    cross_attention_dim=64 + 128, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=32 + 6 * TIME_EMBED,
)
UNET_KINDS = {
    "base": UNET_BASE,
    "inpaint": dict(UNET_BASE, in_channels=9),
    "refiner": dict(  # 4 blocks, attention in the middle two, depth 4 -> here 2 everywhere; 5 time ids
        UNET_BASE, block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, cross_attention_dim=128, projection_class_embeddings_input_dim=32 + 5 * 8),
    # depths that differ per layer and between down and up blocks (diffusers' nested lists)
    "asymmetric": dict(UNET_BASE, transformer_layers_per_block=(1, (1, 2), (3, 2)),  # mid block: 3
                       reverse_transformer_layers_per_block=((3, 1, 2), (2, 2, 1), (1, 1, 1))),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
           norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
def random_clip(cls, config, seed):
    import torch
    from tiny_models import randomize_
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return randomize_(cls(CLIPTextConfig(**config)), seed + 1)  # 1-d parameters (norms, biases) noised too


def text_state(model, position_ids=False):
    """transformers' names with the "text_model." prefix (5.x's CLIPTextModel saves without it); position_ids:
    with the int64 buffer SDXL files carry for CLIP-L."""
    import torch

    state = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    state = {(key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key): tensor
             for key, tensor in state.items()}
    if position_ids:
        state["text_model.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]  # [1,P]
    return state


def state_of(model):
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tiny_sdxl_parts():
    """kind -> {"unet"|"vae"|"text_encoder"|"text_encoder_2": (config, state, model)}; no CLIP-L in a refiner.
    Built once per process; callers must not change the states in place."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import randomize_
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_l = random_clip(CLIPTextModel, CLIP_L, seed=31)
    bigg = random_clip(CLIPTextModelWithProjection, BIGG, seed=32)
    torch.manual_seed(33)
    vae = randomize_(AutoencoderKL(**VAE), 34)
    result = {}
    for seed, (kind, unet_config) in enumerate(UNET_KINDS.items()):
        torch.manual_seed(40 + seed)
        unet = randomize_(UNet2DConditionModel(**unet_config), 50 + seed)
        result[kind] = {
            "unet": (dict(unet.config), state_of(unet), unet),
            "vae": (dict(vae.config), state_of(vae), vae),
            "text_encoder_2": (bigg.config.to_dict(), text_state(bigg), bigg),
        }
        if kind != "refiner":
            result[kind]["text_encoder"] = (clip_l.config.to_dict(), text_state(clip_l, position_ids=True), clip_l)
    return result


def write_sdxl(kind_parts, path, **kwargs):
    """Write the SDXL file of one kind's parts (see write_single_file for kwargs) -> its path."""
    text_encoder = kind_parts.get("text_encoder")
    write_single_file(path, unet=kind_parts["unet"][:2], vae=kind_parts["vae"][:2],
                      text_encoder=text_encoder[1] if text_encoder else None,
                      text_encoder_2=kind_parts["text_encoder_2"][1], **kwargs)
    return path
