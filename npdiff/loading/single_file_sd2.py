"""SD 2.x single files: the OpenCLIP text encoder under `cond_stage_model.model.*`, and SD 2.x's defaults.

SD 2.x keeps the UNet and VAE in SD 1.x's layout (single_file.py reads them; the UNet's linear
proj_in/proj_out [C,C] and per-block head counts channels/64 are inferred there), but its text encoder
is OpenCLIP ViT-H's, stored under OpenCLIP's names. Diffusers runs it as a transformers
CLIPTextModel (diffusers.loaders.single_file_utils.convert_open_clip_checkpoint):

    OpenCLIP (after cond_stage_model.model.)       transformers CLIPTextModel
    token_embedding.weight          [V,D]          text_model.embeddings.token_embedding.weight
    positional_embedding            [P,D]          text_model.embeddings.position_embedding.weight
    transformer.resblocks.i.ln_1.*                 text_model.encoder.layers.i.layer_norm1.*
    transformer.resblocks.i.attn.in_proj_weight [3D,D]
                                                   ...self_attn.q_proj.weight = rows [0, D)
                                                   ...self_attn.k_proj.weight = rows [D, 2D)
                                                   ...self_attn.v_proj.weight = rows [2D, 3D)
    transformer.resblocks.i.attn.in_proj_bias [3D] the same split into q/k/v_proj.bias
    transformer.resblocks.i.attn.out_proj.*        ...self_attn.out_proj.*
    transformer.resblocks.i.ln_2.*                 ...layer_norm2.*
    transformer.resblocks.i.mlp.c_fc.*             ...mlp.fc1.*
    transformer.resblocks.i.mlp.c_proj.*           ...mlp.fc2.*
    ln_final.*                                     text_model.final_layer_norm.*

  - SD 2.x conditions on the PENULTIMATE layer's output (then ln_final): diffusers' text encoder has
    one layer fewer than the file (23 of ViT-H's 24) and drops the last resblock's keys; so does npdiff.
  - text_projection and logit_scale belong to CLIP's contrastive head, unused for conditioning: dropped.
  - hidden_act is "gelu" (erf), not SD 1.x's quick_gelu; heads are 64 wide (ViT-H: 1024 / 64 = 16).

Not in the tensors, chosen as diffusers' from_single_file does for SD 2.x (it uses the configs of
stabilityai/stable-diffusion-2-1): prediction_type "v_prediction" (the 768-v models), DDIM, 768-pixel
pictures (sample_size 96). The 512-pixel SD 2.x base models predict noise: pass prediction_type="epsilon"
(CLI --prediction-type epsilon), which also makes the default picture 512 pixels. A single file keeps no
training step count, so diffusers' global_step == 875000 test (base model) cannot be applied here.
"""

import re

from npdiff.errors import NpdiffError
from npdiff.loading.configs import clip_text_config

OPENCLIP_PREFIX = "cond_stage_model.model."
DROPPED_KEYS = ("text_projection", "logit_scale")  # CLIP's contrastive head: not used by SD
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The scheduler_config.json of stabilityai/stable-diffusion-2-1 (prediction_type replaced when one is asked for)
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SAMPLE_SIZE = {"v_prediction": 96, "epsilon": 64}  # latent side: 768 px (SD 2.x-v), 512 px (SD 2.x base)

# resblock part -> transformers layer part (applied to what follows "transformer.resblocks.i.")
RESBLOCK_PARTS = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
FIXED_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
RESBLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def is_openclip_key(key):
    return key.startswith(OPENCLIP_PREFIX)


def check_prediction_type(prediction_type):
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise NpdiffError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    return prediction_type


def _shape(shapes, key, source):
    if key not in shapes:
        raise NpdiffError(f"missing key '{OPENCLIP_PREFIX}{key}' of the OpenCLIP text encoder in {source}")
    return tuple(shapes[key])


def infer_openclip_config(shapes, source):
    """{OpenCLIP key (prefix removed): shape} -> the transformers CLIPTextConfig diffusers would use."""
    vocab_size, hidden_size = _shape(shapes, "token_embedding.weight", source)  # [V, D]
    max_positions = _shape(shapes, "positional_embedding", source)[0]  # [P, D]
    blocks = sorted({int(m.group(1)) for m in map(RESBLOCK_KEY.fullmatch, shapes) if m})
    if len(blocks) < 2 or blocks != list(range(len(blocks))):
        raise NpdiffError(f"{source}: OpenCLIP resblocks {blocks} are not 0..N-1 with N >= 2 (SD 2.x uses all "
                          "but the last)")
    intermediate_size = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", source)[0]  # [I, D]
    # the penultimate layer's output is SD 2.x's conditioning: one layer fewer than the file
    return clip_text_config(source, "OpenCLIP text encoder", vocab_size, hidden_size, intermediate_size,
                            len(blocks) - 1, max_positions, hidden_act="gelu")


def map_openclip_key(key, shape, hidden_size, last_block):
    """One OpenCLIP key -> [(diffusers key, shape taken, rows or None)]; [] for a dropped key; None if unknown.

    rows = (start, stop): the q, k or v third of an in_proj tensor, taken along its first axis.
    """
    if key in FIXED_NAMES:
        return [(FIXED_NAMES[key], tuple(shape), None)]
    if key in DROPPED_KEYS:
        return []
    match = RESBLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    block, rest = int(match.group(1)), match.group(2)
    if block == last_block:
        return []
    layer = f"text_model.encoder.layers.{block}."
    for leaf in ("weight", "bias"):
        if rest == f"attn.in_proj_{leaf}":  # [3D, D] or [3D] -> q, k, v: [D, D] or [D] each
            third = (hidden_size,) + tuple(shape[1:])
            return [(f"{layer}self_attn.{name}_proj.{leaf}", third, (i * hidden_size, (i + 1) * hidden_size))
                    for i, name in enumerate("qkv")]
    for original, diffusers in RESBLOCK_PARTS:
        if rest.startswith(original):
            return [(layer + diffusers + rest[len(original):], tuple(shape), None)]
    return None


def map_openclip_keys(relative, prefix, hidden_size, last_block, source):
    """{OpenCLIP key (prefix removed): shape} -> {diffusers key: (full key, shape taken, rows)}: every key
    renamed, split in three or dropped (resblocks.<last_block> too; None keeps them all, as SDXL does)."""
    names = {}
    for key, shape in relative.items():
        full_key = prefix + key
        mapped = map_openclip_key(key, shape, hidden_size, last_block)
        if mapped is None:
            raise NpdiffError(f"unexpected key '{full_key}' in {source}: no diffusers name for it in the "
                              "OpenCLIP text encoder key map")
        for diffusers_key, taken, rows in mapped:
            if rows is not None and shape[0] != 3 * hidden_size:
                raise NpdiffError(f"key '{full_key}' in {source} has shape {shape}; expected q, k and v "
                                  f"stacked: ({3 * hidden_size}, ...)")
            names[diffusers_key] = (full_key, taken, rows)
    return names


def map_openclip(shapes, source):
    """{full OpenCLIP key: shape} -> (config, {diffusers key: (full key, shape taken, rows)})."""
    relative = {key[len(OPENCLIP_PREFIX):]: tuple(shape) for key, shape in shapes.items()}
    config = infer_openclip_config(relative, source)  # 1. the config
    hidden_size, last_block = config["hidden_size"], config["num_hidden_layers"]
    return config, map_openclip_keys(relative, OPENCLIP_PREFIX, hidden_size, last_block, source)  # 2. every key


def sd2_sample_size(prediction_type):
    """The SD 2.x UNet's default latent side for the kind of model the prediction type says it is."""
    return SAMPLE_SIZE[check_prediction_type(prediction_type)]
