"""Everything a text-to-image pipeline needs from one path: a diffusers folder or a single file.

    load_pipeline_components(path, variant=None, prediction_type=None) -> {
        "unet":         (config, Weights),
        "vae":          (config, Weights),
        "text_encoder": (config, Weights), or None (an SDXL refiner: model_index.json lists it as null),
        "text_encoder_2": (config, Weights) of SDXL's second text encoder, or None (SD 1.x/2.x),
        "tokenizer":    folder with vocab.json + merges.txt, or None (single file: none inside),
        "tokenizer_2":  SDXL's second tokenizer folder, or None,
        "scheduler":    scheduler_config.json as a dict, or None (an SD 1.x single file holds none;
                        an SD 2.x one gets SD 2.x's, single_file_sd2.sd2_defaults),
        "model_index":  model_index.json as a dict, or None,
        "source":       the path, for messages,
    }
"""

import os

from npdiff.errors import NpdiffError
from npdiff.loading.config_checks import check_component_config
from npdiff.loading.configs import load_component_weights, read_config, read_json
from npdiff.loading.safetensors_io import refuse_pickle
from npdiff.loading.single_file import load_single_file
from npdiff.loading.single_file_sd2 import check_prediction_type, sd2_defaults

MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
SECOND_TEXT_ENCODER = "text_encoder_2"  # SDXL's OpenCLIP bigG; an SDXL refiner has it alone
EXPECTED_LAYOUT = ("a diffusers folder (model_index.json; unet/, vae/, text_encoder/ each with config.json "
                   "and .safetensors weights; tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/) "
                   "or a single-file SD 1.x/2.x .safetensors checkpoint")


def _component_folder(path, name):
    folder = os.path.join(path, name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise NpdiffError(f"{path} has no {name}/config.json; expected {EXPECTED_LAYOUT}")
    return folder


def _optional_tokenizer(path, name="tokenizer"):
    """The tokenizer/ (or tokenizer_2/) folder: vocab.json + merges.txt, or tokenizer.json (what
    transformers 5 saves)."""
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        return None
    has_pair = all(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt"))
    if not has_pair and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise NpdiffError(f"{folder} holds no tokenizer: a CLIP tokenizer folder has vocab.json and "
                          "merges.txt, or tokenizer.json")
    return folder


def _optional_scheduler(path):
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config_path):
        return None
    return check_component_config("scheduler", read_json(config_path), config_path)


def _left_out(path, name, model_index):
    """Whether component `name` is absent by design: SD 1.x/2.x have no text_encoder_2 folder; an SDXL
    refiner's model_index.json lists text_encoder as [null, null] (diffusers' "none") and has
    text_encoder_2. Anything else missing is an error (_component_folder says which)."""
    if name == SECOND_TEXT_ENCODER:
        return not os.path.isdir(os.path.join(path, name))
    listed_none = (model_index or {}).get(name, ["?"])
    return (name == "text_encoder" and isinstance(listed_none, list) and listed_none[:1] == [None]
            and os.path.isdir(os.path.join(path, SECOND_TEXT_ENCODER)))


def load_pipeline_components(path, variant=None, prediction_type=None):
    """The (config, Weights) of unet, vae and text_encoder, plus tokenizer folder and scheduler config.

    prediction_type: for an SD 2.x single file, "v_prediction" (the default, as diffusers) or "epsilon"
    (the 512-pixel base models); it also sets the UNet's default picture size. Checked here, applied
    to the scheduler config by the caller for every model.
    """
    path = os.fspath(path)
    check_prediction_type(prediction_type)
    if os.path.isfile(path):
        refuse_pickle(path)
        components = load_single_file(path)
        scheduler = None
        text_encoder = components.get("text_encoder")
        if components.get(SECOND_TEXT_ENCODER) is None and text_encoder and text_encoder[0]["hidden_act"] == "gelu":
            # OpenCLIP alone: SD 2.x (SDXL's scheduler defaults are the SDXL pipeline's)
            scheduler = sd2_defaults(components["unet"][0], prediction_type)
        return {"text_encoder_2": None, **components, "tokenizer": None, "tokenizer_2": None,
                "scheduler": scheduler, "model_index": None, "source": path}
    if not os.path.isdir(path):
        raise NpdiffError(f"no such file or folder: {path}; expected {EXPECTED_LAYOUT}")

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "unet")):
        raise NpdiffError(f"{path} is one model's folder (it has config.json), not a pipeline; expected "
                          f"{EXPECTED_LAYOUT}. Load a single model with <Model>.from_pretrained({path!r})")
    present = [name for name in MODEL_COMPONENTS if os.path.isdir(os.path.join(path, name))]
    if not present:
        # (never list the folder's contents in a message: it may be any folder of the user's)
        raise NpdiffError(f"{path} holds none of {', '.join(n + '/' for n in MODEL_COMPONENTS)}; expected "
                          f"{EXPECTED_LAYOUT}")

    model_index_path = os.path.join(path, "model_index.json")
    model_index = read_json(model_index_path) if os.path.isfile(model_index_path) else None
    result = {}
    for name in MODEL_COMPONENTS + (SECOND_TEXT_ENCODER,):
        if _left_out(path, name, model_index):
            result[name] = None
            continue
        folder = _component_folder(path, name)
        kind = "text_encoder" if name == SECOND_TEXT_ENCODER else name  # the same config rules
        config = check_component_config(kind, read_config(folder), os.path.join(folder, "config.json"))
        result[name] = (config, load_component_weights(folder, variant=variant))
    result["tokenizer"] = _optional_tokenizer(path)
    result["tokenizer_2"] = _optional_tokenizer(path, "tokenizer_2")
    result["scheduler"] = _optional_scheduler(path)
    result["model_index"] = model_index
    result["source"] = path
    return result
