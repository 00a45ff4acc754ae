"""Weights from safetensors files: diffusers folders and original single-file checkpoints.

    read_config(folder) -> dict                     <folder>/config.json
    read_json(path) -> dict                         any JSON object file (npdiff/json_files.py)
    open_weights(path) -> Weights                   one .safetensors file, read tensor by tensor
    load_component_weights(folder, variant=None)    diffusion_pytorch_model[.fp16].safetensors or
                                                    model[.fp16].safetensors in a component folder
    load_component(folder, subfolder=None, variant=None, precision="fp32") -> (config, Weights)   both of the
                                                    above; Weights.precision tells the layers "fp32"/"bf16"
    load_single_file(path)                          {"unet"|"vae"|"text_encoder": (config, Weights)}
                                                    from an original CompVis/Stability SD 1.x/2.x file;
                                                    an SDXL file adds "text_encoder_2", "scheduler" and
                                                    "model_type" ("sdxl" or "sdxl-refiner")
    load_pipeline_components(path, variant=None, prediction_type=None)
                                                    all of the above for a pipeline, from a folder
                                                    or a single file (see components.py)
    Weights                                         take(key, shape), check_all_used(), ...
    release_resident_pages(model)                   drop a model's memory-mapped weight pages from this
                                                    process (they stay in the page cache; resident.py)

Files:
    safetensors_io.py   one file: validation, float32 memory-mapped, fp16/bf16 -> float32, pickle refusal
    weights.py          Weights and TensorRef
    resident.py         release_resident_pages: madvise(MADV_DONTNEED) over mapped weights
    configs.py          config.json, finding a component's weight file (variants, shards)
    config_checks.py    every UNet/VAE/text encoder/scheduler config: defaults, rules, what is supported;
                        checked once (the models import their defaults from here)
    config_rules.py     the rules a config value can be asked to meet (Int, Float, ListOf, ...)
    keymap.py           the one key map, original layout <-> diffusers names
    single_file.py      single-file loading (SD 1.x/2.x; SDXL files go to single_file_sdxl.py)
    single_file_configs.py  configs inferred from a single file's tensor shapes
    single_file_sd2.py  SD 2.x single files: the OpenCLIP text encoder, v-prediction defaults
    single_file_sdxl.py SDXL single files (base, refiner, inpainting): CLIP-L, OpenCLIP bigG, text_time
    components.py       load_pipeline_components
    finite_cache.py     which weights' NaN/Inf checks passed before: finite-checks.json in the cache folder
Loading writes no file but that record (and widened.py's unlinked temporary copies). Every bad input raises
npdiff.errors.NpdiffError naming file and key.
"""

from npdiff.json_files import read_json
from npdiff.loading.components import load_pipeline_components
from npdiff.loading.configs import (
           load_component,
           load_component_weights,
           open_weights,
           read_config,
)
from npdiff.loading.resident import release_resident_pages
from npdiff.loading.single_file import load_single_file
from npdiff.loading.weights import TensorRef, Weights

__all__ = ["Weights", "TensorRef", "read_config", "read_json", "open_weights", "load_component_weights",
           "load_component", "load_single_file", "load_pipeline_components", "release_resident_pages"]
