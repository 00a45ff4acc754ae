"""config.json files, and finding a component's weight file inside a diffusers folder.

A diffusers model folder holds one folder per component, each with a config.json and its weights:

    unet/config.json          unet/diffusion_pytorch_model.safetensors   (.fp16.safetensors variant)
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors             (.fp16.safetensors variant)

Large components may be sharded: <name>.safetensors.index.json maps each key to its shard file.

A single file holds no config.json: clip_text_config writes the text encoder's one from the sizes read
off its tensors (single_file.py for SD 1.x's CLIP, single_file_sd2.py for SD 2.x's OpenCLIP).
"""

import os

from npdiff.errors import NpdiffError
from npdiff.json_files import read_json
from npdiff.loading.safetensors_io import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    refuse_pickle,
)
from npdiff.loading.weights import TensorRef, Weights
from npdiff.paths import path_kind, regular_file

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models
CLIP_HEAD_WIDTH = 64  # channels per attention head in CLIP ViT-L/H (and SD 2.x's UNet)


def read_config(folder):
    """<folder>/config.json as a dict."""
    return read_json(os.path.join(os.fspath(folder), "config.json"))


def _file_name(stem, variant, suffix):
    return f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"


def open_weights(path):
    """Weights over one .safetensors file (read tensor by tensor; pickle files are refused)."""
    return Weights.from_file(SafetensorsFile(path))


def shard_path(folder, shard_name, index_path, key):
    """The path of a shard named by an index: a plain file name of `folder`, nothing else.

    A name read from a file is not a path: "../x", "/abs/path", "sub/x" or "." are refused, so an index
    reaches only what the folder itself holds. The entry it names may be a symlink, like any other file
    of a model folder (the Hugging Face cache links every shard into ../../blobs): npdiff/paths.py.
    """
    plain = (isinstance(shard_name, str) and shard_name not in ("", ".", "..") and "\0" not in shard_name
             and "/" not in shard_name and "\\" not in shard_name)
    if not plain:
        raise NpdiffError(f"{index_path}: key '{key}' names shard {shard_name!r}; expected a file name inside "
                          f"{folder} (no folders, no '..', no absolute path)")
    return regular_file(os.path.join(folder, shard_name), f"shard named by {os.path.basename(index_path)}")


def _shard_paths(index_path):
    """({key: shard file name}, {shard file name: path}) of a .safetensors.index.json, every name checked."""
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NpdiffError(f"{index_path} has no 'weight_map' of key -> shard file")
    folder = os.path.dirname(index_path)
    paths = {}
    for key, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or shard_name not in paths:
            paths[shard_name] = shard_path(folder, shard_name, index_path, key)
    return weight_map, paths


def _open_sharded(index_path):
    """Weights over the shards an index.json names; keys keep their names, each from its shard."""
    weight_map, paths = _shard_paths(index_path)
    shards = {name: SafetensorsFile(path) for name, path in paths.items()}  # shard file name -> file
    refs = {}
    for key, shard_name in weight_map.items():
        shard = shards[shard_name]
        if key not in shard.keys():
            raise NpdiffError(f"missing key '{key}' in {shard.path} (listed there by {index_path})")
        refs[key] = TensorRef(shard, key, shard.shape(key))
    return Weights(index_path, refs)


def find_component_weights(folder, variant=None):
    """-> ("single", path) or ("sharded", index path): the file load_component_weights reads in one
    component folder, diffusion_pytorch_model[.<variant>].safetensors or model[.<variant>].safetensors
    (or a .safetensors.index.json of the same names); NpdiffError saying what was expected."""
    folder = os.fspath(folder)
    if path_kind(folder, "component folder") != "folder":
        raise NpdiffError(f"no such folder: {folder}")
    for stem in WEIGHT_STEMS:
        single = os.path.join(folder, _file_name(stem, variant, ".safetensors"))
        if path_kind(single, "weights") != "missing":
            return "single", regular_file(single, "weights")
        index = os.path.join(folder, _file_name(stem, variant, ".safetensors.index.json"))
        if path_kind(index, "shard index") != "missing":
            return "sharded", regular_file(index, "shard index")
    _raise_no_weights(folder, variant)


def component_weight_files(folder, variant=None):
    """[(file name in the folder, path)] of the .safetensors files load_component_weights(folder, variant)
    reads: the single file, or every shard its index names (sorted by name). What the model hash covers."""
    how, path = find_component_weights(folder, variant)
    if how == "single":
        return [(os.path.basename(path), path)]
    _, paths = _shard_paths(path)
    return sorted(paths.items())


def load_component_weights(folder, variant=None):
    """The weights of one component folder: diffusion_pytorch_model[.<variant>].safetensors or
    model[.<variant>].safetensors (or a sharded .safetensors.index.json of the same names)."""
    how, path = find_component_weights(folder, variant)
    return open_weights(path) if how == "single" else _open_sharded(path)


def _raise_no_weights(folder, variant):
    """NpdiffError: no weight file of the expected names in `folder` (with a hint about variants/pickles)."""
    wanted = " or ".join(_file_name(stem, variant, ".safetensors") for stem in WEIGHT_STEMS)
    # Only weight files are mentioned (a message never lists a folder's contents): one pickle checkpoint
    # (refused, with how to convert), or <stem>.<other variant>.safetensors files.
    present = sorted(os.listdir(folder))
    pickles = [name for name in present if os.path.splitext(name)[1].lower() in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(os.path.join(folder, pickles[0]))  # raises, saying why and how to convert
    others = [name for name in present if name.split(".")[0] in WEIGHT_STEMS
              and name.endswith((".safetensors", ".safetensors.index.json"))]
    hint = ""
    if others:
        hint = f"; it has {', '.join(others)}"
        other_variants = sorted({name.split(".")[1] for name in others if name.count(".") >= 2} - {"safetensors"})
        if variant is None and other_variants:
            hint += f" (pass variant='{other_variants[0]}' to read the .{other_variants[0]}.safetensors file)"
        elif variant is not None:
            hint += f" (variant={variant!r} was asked for; pass variant=None for the plain file)"
    raise NpdiffError(f"no weights in {folder}: expected {wanted}{hint}")


def load_component(folder, subfolder=None, variant=None, precision="fp32"):
    """(config dict, Weights) of one component folder, <folder>[/<subfolder>]: what a model's
    from_pretrained builds itself from; precision ("fp32" or "bf16") is what its layers will hold."""
    path = os.path.join(folder, subfolder) if subfolder else os.fspath(folder)
    return read_config(path), load_component_weights(path, variant).set_precision(precision)


def clip_text_config(source, what, vocab_size, hidden_size, intermediate_size, num_layers, max_positions,
                     hidden_act):
    """The transformers CLIPTextConfig diffusers would use (heads CLIP_HEAD_WIDTH wide); SD 1.x and 2.x."""
    if hidden_size % CLIP_HEAD_WIDTH:
        raise NpdiffError(f"{source}: {what} width {hidden_size} is not a multiple of its head width "
                          f"{CLIP_HEAD_WIDTH}; cannot infer the number of heads")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": hidden_size // CLIP_HEAD_WIDTH,
        "max_position_embeddings": max_positions,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }
