"""Single-file checkpoints in the original CompVis/Stability layout (SD 1.x, 2.x, SDXL), read as diffusers parts.

    load_single_file("v1-5-pruned-emaonly.safetensors")
        -> {"unet": (config, Weights), "vae": (config, Weights), "text_encoder": (config, Weights)}
    load_single_file("sd_xl_base_1.0.safetensors")
        -> the same with "text_encoder_2", "scheduler" and "model_type": "sdxl" (single_file_sdxl.py)

Steps:
  1. open the file (validated; tensors read one by one);
  2. map_checkpoint, over names and shapes only: sort the keys by component (keymap stage 1), infer
     each component's config from the tensor shapes (below), map every key to its diffusers name with
     the key map (keymap stages 2-3); a key no row maps is an error naming it;
  3. wrap each component in a Weights: nothing is read until a model takes a tensor.
SD 2.x files keep their OpenCLIP text encoder under cond_stage_model.model.*: single_file_sd2.py maps it
(and splits its fused q/k/v tensors); the UNet and VAE are read here as for SD 1.x.

The configs are inferred from the tensor shapes (single_file_configs.py says what the tensors tell).
SDXL files (conditioner.embedders.*) go to single_file_sdxl.py, which returns the same structure with
text_encoder_2 and the scheduler config added.
"""

import os

from npdiff.errors import NpdiffError
from npdiff.loading import keymap
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.single_file_configs import (
    StoredShapes,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
)
from npdiff.loading.single_file_sd2 import is_openclip_key, map_openclip
from npdiff.loading.single_file_sdxl import is_sdxl_checkpoint, map_sdxl_checkpoint
from npdiff.loading.weights import TensorRef, Weights

INFER = {"unet": infer_unet_config, "vae": infer_vae_config, "text_encoder": infer_clip_config}
TABLES = {"unet": keymap.unet_block_table, "vae": keymap.vae_block_table,
          "text_encoder": lambda config: keymap.TEXT_ENCODER_TABLE}
FULL_PREFIX = {component: prefix for prefix, component in keymap.COMPONENT_PREFIXES}


def _sort_keys(shapes, source, components=tuple(INFER)):
    """component -> {component-relative key: stored shape}; errors for keys of no known component."""
    stored = {component: {} for component in components}
    for key, shape in shapes.items():
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
        config = INFER[component](StoredShapes(component, shapes_by_key, source))  # 1. infer the config
        table = TABLES[component](config)
        names = keymap.map_component(component, shapes_by_key, table, FULL_PREFIX[component], source)  # 2.
        mapped_parts[component] = (config, names)
    return {component: mapped_parts[component] for component in INFER}


def load_single_file(path):
    """{"unet"|"vae"|"text_encoder": (config, Weights)} from one original-layout .safetensors file (SD 1.x/2.x);
    an SDXL file gives single_file_sdxl's parts: those, "text_encoder_2", "scheduler" (a config dict) and
    "model_type" ("sdxl" or "sdxl-refiner"; a refiner's has no "text_encoder")."""
    safetensors_file = SafetensorsFile(os.fspath(path))  # 1. open (validated)
    shapes = {key: safetensors_file.shape(key) for key in safetensors_file.keys()}
    if is_sdxl_checkpoint(shapes):  # 2. map
        mapped = map_sdxl_checkpoint(shapes, safetensors_file.path)
    else:
        mapped = {component: (config, {key: (*value, False) for key, value in names.items()})
                  for component, (config, names) in map_checkpoint(shapes, safetensors_file.path).items()}
    parts = {}
    for component, value in mapped.items():
        if component in ("model_type", "scheduler"):
            parts[component] = value
            continue
        config, names = value
        refs = {diffusers_key: TensorRef(safetensors_file, stored_key, shape, rows, transpose)  # 3. lazy: nothing read
                for diffusers_key, (stored_key, shape, rows, transpose) in names.items()}
        parts[component] = (config, Weights(safetensors_file.path, refs, part=component))
    return parts
