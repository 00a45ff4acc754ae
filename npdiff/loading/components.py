"""Everything a text-to-image pipeline needs from one path: a diffusers folder or a single file.

    load_pipeline_components(path, variant=None, prediction_type=None) -> {
        "unet":         (config, Weights),
        "vae":          (config, Weights),
        "text_encoder": (config, Weights), or None (an SDXL refiner: model_index.json lists it as null),
        "text_encoder_2": (config, Weights) of SDXL's second text encoder, or None (SD 1.x/2.x),
        "tokenizer":    folder with vocab.json + merges.txt, or None (single file: none inside),
        "tokenizer_2":  SDXL's second tokenizer folder, or None,
        "scheduler":    the folder's scheduler/scheduler_config.json as a dict; else SD 2.1's for an
                        SD 2.x single file (single_file_sd2.py), else SDXL's for an SDXL model
                        (single_file_sdxl.py), else SD 1.5's; its prediction_type
                        replaced by the one asked for (here and nowhere else),
        "model_index":  model_index.json as a dict, or None,
        "source":       the path, for messages,
    }
"""

import os

from npdiff.errors import NpdiffError
from npdiff.json_files import read_json
from npdiff.loading.config_checks import check_component_config
from npdiff.loading.configs import (
    component_weight_files,
    load_component_weights,
    read_config,
)
from npdiff.loading.safetensors_io import refuse_pickle
from npdiff.loading.single_file import load_single_file
from npdiff.loading.single_file_sd2 import (
    SD2_SCHEDULER_CONFIG,
    check_prediction_type,
    sd2_sample_size,
)
from npdiff.loading.single_file_sdxl import SDXL_SCHEDULER_CONFIG
from npdiff.paths import path_kind, regular_file

MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
# The scheduler_config.json of Stable Diffusion 1.5: for a model that carries none (an SD 1.x single file)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SECOND_TEXT_ENCODER = "text_encoder_2"  # SDXL's OpenCLIP bigG; an SDXL refiner has it alone
EXPECTED_LAYOUT = ("a diffusers folder (model_index.json; unet/, vae/, text_encoder/ each with config.json "
                   "and .safetensors weights; tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/) "
                   "or a single-file SD 1.x/2.x .safetensors checkpoint")


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def component_path(path, name, required=True):
    """<path>/<name>, a component folder (unet, vae, tokenizer, ...), through symlinks (npdiff/paths.py);
    None when absent and not `required`; NpdiffError when it is a file, a loop or a special file."""
    folder = os.path.join(path, name)
    kind = path_kind(folder, f"the {name} folder")
    if kind == "folder":
        return folder
    if kind == "file":
        raise NpdiffError(f"{folder} is a file; expected the {name}/ folder of {EXPECTED_LAYOUT}")
    if required:
        raise NpdiffError(f"{path} has no {name}/ folder; expected {EXPECTED_LAYOUT}")
    return None


def _optional_file(path, what):
    """`path` when it is a regular file, None when it is absent; NpdiffError for anything else."""
    return None if path_kind(path, what) == "missing" else regular_file(path, what)


def _component_folder(path, name):
    folder = component_path(path, name, required=False)
    if folder is None or _optional_file(os.path.join(folder, "config.json"), f"{name} config") is None:
        raise NpdiffError(f"{path} has no {name}/config.json; expected {EXPECTED_LAYOUT}")
    return folder


def _optional_tokenizer(path, name="tokenizer"):
    """The tokenizer/ (or tokenizer_2/) folder: vocab.json + merges.txt, or tokenizer.json (what
    transformers 5 saves)."""
    folder = component_path(path, name, required=False)
    if folder is None:
        return None
    present = {name for name in TOKENIZER_FILES
               if _optional_file(os.path.join(folder, name), "tokenizer file") is not None}
    if not {"vocab.json", "merges.txt"} <= present and "tokenizer.json" not in present:
        raise NpdiffError(f"{folder} holds no tokenizer: a CLIP tokenizer folder has vocab.json and "
                          "merges.txt, or tokenizer.json")
    return folder


def _optional_scheduler(path):
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if component_path(path, "scheduler", required=False) is None:
        return None
    if _optional_file(config_path, "scheduler config") is None:
        return None
    return check_component_config("scheduler", read_json(config_path), config_path)


def _scheduler_config(found, prediction_type, default=SD15_SCHEDULER_CONFIG):
    """The model's scheduler config (else `default`: SD 1.5's) with prediction_type, when given, in place of
    its own."""
    config = dict(found or default)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return config


def pipeline_weight_files(path, variant=None):
    """[(name relative to `path`, path)] of every .safetensors file load_pipeline_components(path, variant)
    reads, sorted by that name: [("model.safetensors", path)] for a single file; for a folder the weights
    of each component (unet/diffusion_pytorch_model.safetensors, ...; shards as their index names them).
    Nothing else in the folder: this is what the model hash covers (npdiff.model_identity)."""
    path = os.fspath(path)
    kind = path_kind(path, "model")
    if kind == "file":
        return [(os.path.basename(path), path)]
    if kind == "missing":
        raise NpdiffError(f"no such file or folder: {path}; expected {EXPECTED_LAYOUT}")
    model_index_path = os.path.join(path, "model_index.json")
    model_index = read_json(model_index_path) if _optional_file(model_index_path, "model index") else None
    files = []
    for name in MODEL_COMPONENTS + (SECOND_TEXT_ENCODER,):
        if _left_out(path, name, model_index):
            continue
        folder = component_path(path, name)
        files += [(f"{name}/{file_name}", file) for file_name, file in component_weight_files(folder, variant)]
    return sorted(files)


def _left_out(path, name, model_index):
    """Whether component `name` is absent by design: SD 1.x/2.x have no text_encoder_2 folder; an SDXL
    refiner's model_index.json lists text_encoder as [null, null] (diffusers' "none") and has
    text_encoder_2. Anything else missing is an error (_component_folder says which)."""
    has_second = component_path(path, SECOND_TEXT_ENCODER, required=False) is not None
    if name == SECOND_TEXT_ENCODER:
        return not has_second
    listed_none = (model_index or {}).get(name, ["?"])
    return name == "text_encoder" and isinstance(listed_none, list) and listed_none[:1] == [None] and has_second


def load_pipeline_components(path, variant=None, prediction_type=None):
    """The (config, Weights) of unet, vae and text_encoder, plus tokenizer folder and scheduler config.

    prediction_type: "epsilon" or "v_prediction" in place of the scheduler config's (None: keep it). For
    an SD 2.x single file the default is "v_prediction" (as diffusers), and "epsilon" (the 512-pixel
    base models) also sets the UNet's default picture size.
    """
    path = os.fspath(path)
    check_prediction_type(prediction_type)
    kind = path_kind(path, "model")  # symlinks followed; loops, FIFOs, devices refused by name
    if kind == "file":
        refuse_pickle(path)
        components = load_single_file(path)
        model_type = components.pop("model_type", None)  # an SDXL file's: "sdxl" or "sdxl-refiner"
        sdxl_scheduler = components.pop("scheduler", None)  # an SDXL file's: SDXL's scheduler config
        sd2 = model_type is None and components["text_encoder"][0]["hidden_act"] == "gelu"  # OpenCLIP: SD 2.x
        scheduler = _scheduler_config(sdxl_scheduler or (SD2_SCHEDULER_CONFIG if sd2 else None), prediction_type)
        if sd2:
            unet_config, unet_weights = components["unet"]
            sample_size = sd2_sample_size(scheduler["prediction_type"])
            components["unet"] = (dict(unet_config, sample_size=sample_size), unet_weights)
        for name in MODEL_COMPONENTS + (SECOND_TEXT_ENCODER,):  # configs inferred from the tensors: checked
            if components.get(name) is None:  # like a folder's; SD has no text_encoder_2, a refiner no text_encoder
                components[name] = None
                continue
            config, weights = components[name]
            rules = "text_encoder" if name == SECOND_TEXT_ENCODER else name  # the same config rules
            components[name] = (check_component_config(rules, config, f"{path} ({name})"), weights)
        return {**components, "tokenizer": None, "tokenizer_2": None, "scheduler": scheduler, "model_index": None,
                "source": path}
    if kind == "missing":
        raise NpdiffError(f"no such file or folder: {path}; expected {EXPECTED_LAYOUT}")

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "unet")):
        raise NpdiffError(f"{path} is one model's folder (it has config.json), not a pipeline; expected "
                          f"{EXPECTED_LAYOUT}. Load a single model with <Model>.from_pretrained({path!r})")
    present = [name for name in MODEL_COMPONENTS if component_path(path, name, required=False)]
    if not present:
        # (never list the folder's contents in a message: it may be any folder of the user's)
        raise NpdiffError(f"{path} holds none of {', '.join(n + '/' for n in MODEL_COMPONENTS)}; expected "
                          f"{EXPECTED_LAYOUT}")

    model_index_path = os.path.join(path, "model_index.json")
    model_index = read_json(model_index_path) if _optional_file(model_index_path, "model index") else None
    result = {}
    for name in MODEL_COMPONENTS + (SECOND_TEXT_ENCODER,):
        if _left_out(path, name, model_index):
            result[name] = None
            continue
        folder = _component_folder(path, name)
        rules = "text_encoder" if name == SECOND_TEXT_ENCODER else name  # the same config rules
        config = check_component_config(rules, read_config(folder), os.path.join(folder, "config.json"))
        result[name] = (config, load_component_weights(folder, variant=variant))
    result["tokenizer"] = _optional_tokenizer(path)
    result["tokenizer_2"] = _optional_tokenizer(path, "tokenizer_2")
    default = SD15_SCHEDULER_CONFIG if result[SECOND_TEXT_ENCODER] is None else SDXL_SCHEDULER_CONFIG
    result["scheduler"] = _scheduler_config(_optional_scheduler(path), prediction_type, default)
    result["model_index"] = model_index
    result["source"] = path
    return result
