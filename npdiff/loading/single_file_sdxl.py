"""SDXL single files (Stability's "sgm" layout, as model sites ship them) read as diffusers parts.

    map_sdxl_checkpoint({original key: stored shape}, source) -> {
        "model_type":     "sdxl" (base, also the 9-channel inpainting UNet) or "sdxl-refiner",
        "unet":           (config, {diffusers key: (original key, shape taken, rows, transpose)}),
        "vae":            (config, names),
        "text_encoder":   (config, names)      CLIP ViT-L (absent from a refiner's file),
        "text_encoder_2": (config, names)      OpenCLIP ViT-bigG with its projection,
        "scheduler":      the scheduler config diffusers' SDXL pipelines ship (EulerDiscrete),
    }
single_file.load_single_file calls this for any file with conditioner.embedders.* keys and wraps each
component's names in a Weights (nothing is read until a model takes a tensor).

The layout (keymap.SDXL_COMPONENT_PREFIXES):
    model.diffusion_model.*                  the UNet, SD 1.x's names (keymap.unet_block_table) plus
                                             label_emb.0.0 / label_emb.0.2 = add_embedding.linear_1 / _2
    first_stage_model.*                      the VAE, as SD 1.x
    conditioner.embedders.0.transformer.*    CLIP ViT-L, transformers' names already (base only)
    conditioner.embedders.1.model.*          OpenCLIP ViT-bigG (base); the refiner's is at embedders.0.model.*
OpenCLIP's names become transformers' as for SD 2.x (single_file_sd2.map_openclip_keys: in_proj [3D,D]
split into q/k/v by rows, views of the file's map), except that SDXL uses every resblock (the pipeline
takes the penultimate hidden state itself) and keeps the projection: text_projection [D,P] (OpenCLIP
computes x @ P) is transformers' text_projection.weight [P,D] transposed (diffusers'
convert_open_clip_checkpoint transposes it; here TensorRef.transpose: taken as a transposed view, made
contiguous once, D*P*4 bytes = 6.5 MB for bigG); files re-saved from a Linear store text_projection.weight
[P,D], taken as it is. logit_scale (CLIP's contrastive head) is dropped.

What the tensors tell beyond SD 1.x (single_file_configs.py has the rest):
  - base or refiner: which embedders hold which encoder; inpainting: conv_in's 9 input channels;
  - the UNet's text_time embedding: label_emb.0.0 [T, N] gives projection_class_embeddings_input_dim N =
    P + ids * addition_time_embed_dim, where P is bigG's projection width (the pooled text embedding) and
    ids the time ids: 6 for the base (original size, crop corner, target size), 5 for the refiner
    (original size, crop corner, aesthetic score): base 1280 + 6 * 256 = 2816, refiner 1280 + 5 * 256 = 2560;
  - per-block heads: SDXL's heads are 64 channels wide (attention_head_dim [5, 10, 20] for 320/640/1280);
  - transformer depth per block from the transformer_blocks.<k> counts (base [1, 2, 10], refiner 4).
Not in the tensors, set as in diffusers' stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 configs:
sample_size 128 (1024 pixels), the VAE's scaling_factor 0.13025 and force_upcast (meaningless in float32),
the text encoders' bos/eos/pad ids 0/2/1, and the scheduler below.
A file must agree with itself before anything is read: the UNet's cross_attention_dim is the two encoders'
widths together (768 + 1280 = 2048; the refiner: 1280), and N - P splits into whole time-id embeddings.
"""

from npdiff.errors import NpdiffError
from npdiff.loading import keymap
from npdiff.loading.configs import clip_text_config
from npdiff.loading.single_file_configs import (
    StoredShapes,
    indices,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
)
from npdiff.loading.single_file_sd2 import map_openclip_keys

SDXL_PREFIX = "conditioner.embedders."
BASE, REFINER = "sdxl", "sdxl-refiner"
PREFIXES = {BASE: keymap.SDXL_COMPONENT_PREFIXES, REFINER: keymap.SDXL_REFINER_COMPONENT_PREFIXES}
TIME_IDS = {BASE: 6, REFINER: 5}  # (height, width) x3, or x2 and the aesthetic score

# diffusers' scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 (the refiner's is the same)
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# keys some SDXL-family files carry to say they are sampled differently: refused by name (diffusers'
# from_single_file would silently treat them as epsilon-prediction SDXL)
UNSUPPORTED_MARKERS = {
    "v_pred": "a v-prediction SDXL model (its \"v_pred\" marker)",
    "ztsnr": "a zero-terminal-SNR SDXL model (its \"ztsnr\" marker)",
    "edm_mean": "Playground v2.5 (EDM latents, \"edm_mean\")",
    "edm_std": "Playground v2.5 (EDM latents, \"edm_std\")",
}
SDXL_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # both encoders' config.json
SDXL_UNET_SAMPLE_SIZE = 128
SDXL_VAE = {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


def is_sdxl_checkpoint(shapes):
    """True when any key belongs to SDXL's conditioner (conditioner.embedders.*)."""
    return any(key.startswith(SDXL_PREFIX) for key in shapes)


def _model_type(shapes, source):
    refiner = any(key.startswith("conditioner.embedders.0.model.") for key in shapes)
    base = any(key.startswith(("conditioner.embedders.0.transformer.", "conditioner.embedders.1."))
               for key in shapes)
    if refiner and base:
        raise NpdiffError(f"{source} mixes an SDXL refiner's text encoder (conditioner.embedders.0.model.*) with a "
                          "base model's (conditioner.embedders.0.transformer.* / conditioner.embedders.1.*)")
    return REFINER if refiner else BASE


def _sort_keys(shapes, source, model_type):
    """component -> {component-relative key: stored shape}; errors for keys of no component and for a
    component without keys."""
    prefixes = PREFIXES[model_type]
    stored = {component: {} for _, component in prefixes}
    for key, shape in shapes.items():
        component, rest = keymap.split_component(key, prefixes)
        if component is None:
            continue  # the training noise schedule, EMA copies, the VAE's loss: as in SD 1.x files
        if key in UNSUPPORTED_MARKERS:
            raise NpdiffError(f"{source} is {UNSUPPORTED_MARKERS[key]} (key '{key}'): npdiff samples SDXL files as "
                              "the epsilon-prediction SDXL base and refiner only")
        if component == "unknown":
            raise NpdiffError(f"unexpected key '{key}' in {source}: it belongs to none of the {model_type} "
                              f"file's parts ({', '.join(prefix for prefix, _ in prefixes)})")
        stored[component][rest] = tuple(shape)
    for prefix, component in prefixes:
        if not stored[component]:
            raise NpdiffError(f"{source} has no {component} weights (no keys starting with '{prefix}'): "
                              f"expected an {model_type} single-file checkpoint")
    return stored


def _projection(shapes, source, hidden_size):
    """(key, (P, D) as taken, transpose?) of bigG's projection, stored as OpenCLIP keeps it, text_projection
    [D,P] (x @ P), or as a Linear weight, text_projection.weight [P,D] (files re-saved from a Linear, e.g. by
    ComfyUI); a square matrix cannot tell the two apart, only the name can."""
    present = [key for key in ("text_projection", "text_projection.weight") if key in shapes]
    if len(present) != 1:
        raise NpdiffError(f"{source}: {'both' if present else 'neither'} '{shapes.prefix}text_projection' "
                          f"{'and' if present else 'nor'} '{shapes.prefix}text_projection.weight' (bigG's projection; "
                          "exactly one is expected)")
    (key,) = present
    shape = shapes(key)
    transpose = key == "text_projection"
    width = shape[0] if transpose else shape[-1]
    if len(shape) != 2 or width != hidden_size:
        wanted = f"({hidden_size}, P)" if transpose else f"(P, {hidden_size})"
        raise NpdiffError(f"key '{shapes.prefix}{key}' in {source} has shape {tuple(shape)}; expected {wanted} "
                          f"for width {hidden_size}")
    return key, (shape[1], shape[0]) if transpose else tuple(shape), transpose


def _bigg_config(shapes, source):
    """CLIPTextModelWithProjection's config (transformers) from bigG's OpenCLIP shapes."""
    vocab_size, hidden_size = shapes("token_embedding.weight")  # [V, D]
    max_positions = shapes("positional_embedding")[0]  # [P, D]
    _, (projection_dim, _), _ = _projection(shapes, source, hidden_size)
    blocks = indices(list(shapes.stored), r"transformer\.resblocks\.(\d+)\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise NpdiffError(f"{source}: {shapes.prefix}transformer.resblocks.* are numbered {blocks}; expected 0..N-1")
    intermediate_size = shapes("transformer.resblocks.0.mlp.c_fc.weight")[0]  # [I, D]
    config = clip_text_config(source, "OpenCLIP ViT-bigG text encoder", vocab_size, hidden_size, intermediate_size,
                              len(blocks), max_positions, hidden_act="gelu")
    config.update(architectures=["CLIPTextModelWithProjection"], projection_dim=projection_dim, **SDXL_TOKEN_IDS)
    return config


def _map_bigg(shapes, source):
    """bigG's OpenCLIP keys -> (config, {transformers key: (original key, shape, rows, transpose)})."""
    config = _bigg_config(shapes, source)  # 1. the config
    key, taken, transpose = _projection(shapes, source, config["hidden_size"])
    names = {"text_projection.weight": (shapes.prefix + key, taken, None, transpose)}  # 2. the projection [P,D]
    others = {name: shape for name, shape in shapes.stored.items() if name != key}
    for name, (full_key, shape, rows) in map_openclip_keys(others, shapes.prefix, config["hidden_size"], None,
                                                           source).items():  # 3. the rest as SD 2.x's, every resblock
        names[name] = (full_key, shape, rows, False)
    return config, names


def _unet_config(shapes, source, model_type, text_widths, pooled_width):
    """The SDXL UNet config: SD 1.x's inference plus the text_time embedding and SDXL's conventions."""
    config = infer_unet_config(shapes)
    if config["cross_attention_dim"] != sum(text_widths):
        raise NpdiffError(f"{source}: the UNet's cross-attention takes {config['cross_attention_dim']} text channels "
                          f"(attn2.to_k), but the file's text encoders give {' + '.join(map(str, text_widths))}")
    label_rows, label_input = shapes("label_emb.0.0.weight")  # [T, N]
    time_ids = TIME_IDS[model_type]
    time_embed_dim, remainder = divmod(label_input - pooled_width, time_ids)
    if remainder or time_embed_dim <= 0:
        raise NpdiffError(f"key '{shapes.prefix}label_emb.0.0.weight' in {source} has shape ({label_rows}, "
                          f"{label_input}); an {model_type} UNet takes the pooled text embedding ({pooled_width}) and "
                          f"{time_ids} time ids of equal width: {pooled_width} + {time_ids} * k")
    config.update(sample_size=SDXL_UNET_SAMPLE_SIZE, addition_embed_type="text_time",
                  addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=label_input)
    return config


def map_sdxl_checkpoint(shapes, source):
    """The whole SDXL mapping over names and shapes only (see the module docstring); nothing is read."""
    model_type = _model_type(shapes, source)
    stored = _sort_keys(shapes, source, model_type)
    full_prefix = {component: prefix for prefix, component in PREFIXES[model_type]}
    views = {component: StoredShapes(component, keys, source, full_prefix[component])
             for component, keys in stored.items()}
    parts = {"model_type": model_type, "scheduler": dict(SDXL_SCHEDULER_CONFIG)}
    # 1. the text encoders: their widths and projection size shape the UNet's inputs
    parts["text_encoder_2"] = _map_bigg(views["text_encoder_2"], source)
    text_widths = [parts["text_encoder_2"][0]["hidden_size"]]
    if model_type == BASE:
        clip_config = infer_clip_config(views["text_encoder"])
        clip_config.update(projection_dim=clip_config["hidden_size"], **SDXL_TOKEN_IDS)  # 768 as SDXL's config
        clip_names = keymap.map_component("text_encoder", stored["text_encoder"], keymap.TEXT_ENCODER_TABLE,
                                          full_prefix["text_encoder"], source)
        parts["text_encoder"] = (clip_config, clip_names)
        text_widths.insert(0, clip_config["hidden_size"])  # CLIP-L's channels come first in the UNet's context
    # 2. the UNet and the VAE, through the SD 1.x tables
    unet_config = _unet_config(views["unet"], source, model_type, text_widths,
                               parts["text_encoder_2"][0]["projection_dim"])
    vae_config = dict(infer_vae_config(views["vae"]), **SDXL_VAE)
    for component, config, table in (("unet", unet_config, keymap.unet_block_table(unet_config)),
                                     ("vae", vae_config, keymap.vae_block_table(vae_config))):
        parts[component] = (config, keymap.map_component(component, stored[component], table,
                                                         full_prefix[component], source))
    # 3. one form for every name: (original key, shape taken, rows, transpose)
    for component in ("unet", "vae", "text_encoder"):
        if component in parts:
            config, names = parts[component]
            parts[component] = (config, {key: (*value, False) for key, value in names.items()})
    return parts
