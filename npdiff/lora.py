"""LoRA: low-rank changes to the UNet's and the text encoder's weights, fused into them at load.

    pipe.load_lora_weights("style.safetensors", scale=0.8)     # kohya/A1111 or diffusers/PEFT layout
    pipe.load_lora_weights("detail.safetensors", scale=0.5)    # several stack
    pipe.unload_lora_weights()                                 # the original weights back, bit for bit

For each layer the file names (npdiff/lora_keys.py), with down [r,in] or [r,in,k,k] and up [out,r]
or [out,r,1,1]:
    W' = W + scale * (alpha / r) * (up @ down)
(for a convolution up [out,r] @ down [r,in*k*k] -> [out,in*k*k], reshaped to [out,in,k,k]); alpha
defaults to r. This is the weight diffusers' load_lora_weights(path) + fuse_lora(lora_scale=scale)
leaves in the model, with one difference: each layer here gets its own alpha, as kohya's trainer and
A1111 apply them, where diffusers 0.42 gives SD 1.x layers whose kohya alpha key it cannot match to its
attention-processor names the most common alpha (files with one alpha for every layer agree). Steps:
  1. check the scale, refuse pickles, open and validate the file (npdiff.loading.SafetensorsFile);
  2. map every key to a layer and check every shape, dtype and alpha: all before anything changes;
  3. per layer: read down and up, make the new weight as a NEW array and put it in layer.weight
     (weights may be read-only memory maps, and the original is kept to be put back on unload);
     an error part-way puts back what this load changed;
  4. record the file's name, the scale and its SHA-256 for the picture's parameters.
Layers read layer.weight at every call (no transposed or packed copy of a weight is kept anywhere), so
replacing it is the whole change.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.lora_keys import COMPONENTS, kohya_table, metadata_alpha, module_name, parse_key
from npdiff.model_identity import file_sha256
from npdiff.models.blocks import Conv2d, Linear

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass
class LoraLayer:
    """One layer a LoRA file changes: where it is, and the file keys of its down, up and alpha."""
    component: str          # "unet" or "text_encoder"
    name: str               # module name, e.g. "down_blocks.0.attentions.0.proj_in"
    layer: object           # the npdiff Linear or Conv2d
    keys: dict              # {"down": key, "up": key, "alpha": key (optional)}
    alpha: float = 0.0      # filled in by plan_lora
    rank: int = 0


@dataclass
class LoadedLora:
    name: str               # the file's stem
    scale: float
    sha256: str             # first 12 hex digits of the file's SHA-256
    adapter_name: str
    layer_count: int


class LoraStack:
    """What the loaded LoRAs changed: each layer's original weight (to put back), and the loads."""

    def __init__(self):
        self.originals = {}  # id(layer) -> (layer, its weight before any LoRA)
        self.loaded = []     # LoadedLora, in load order


def lora_stack(pipe):
    """The pipeline's LoraStack (made on first use)."""
    if getattr(pipe, "_lora_stack", None) is None:
        pipe._lora_stack = LoraStack()
    return pipe._lora_stack


def lora_parameters(pipe):
    """[{"name", "scale", "sha256"}, ...] of the loaded LoRAs, for generation parameters ([] if none)."""
    stack = getattr(pipe, "_lora_stack", None)
    return [] if stack is None else [{"name": lora.name, "scale": lora.scale, "sha256": lora.sha256}
                                     for lora in stack.loaded]


def named_layers(model, component):
    """{module name: Linear or Conv2d} for every layer reachable from `model` (an npdiff model)."""
    found, stack, seen = {}, [model], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (Linear, Conv2d)):
            found[module_name(component, obj.key)] = obj
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("npdiff.models"):
            stack.extend(vars(obj).values())
    return found


def check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise NpdiffError(f"LoRA scale must be a number, got {scale!r}")
    if not math.isfinite(float(scale)):
        raise NpdiffError(f"LoRA scale must be finite, got {scale!r}")
    return float(scale)


def read_adapter_metadata(path):
    """The "lora_adapter_metadata" JSON diffusers' save_lora_weights may write into the header, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NpdiffError(f"{path}: header entry 'lora_adapter_metadata' is not JSON: {exc}") from exc


def _shape(shape):
    return "[" + ",".join(str(int(n)) for n in shape) + "]"


def check_layer_shapes(path, entry, down_shape, up_shape):
    """NpdiffError naming both keys, their shapes and the layer's weight shape, unless they fit."""
    weight_shape = tuple(entry.layer.weight.shape)  # Linear [out,in] (also a 1x1 conv's), Conv2d [out,in,k,k]
    out, rest = weight_shape[0], weight_shape[1:]
    rank = down_shape[0] if down_shape else 0
    if isinstance(entry.layer, Linear):
        downs, ups = [(rank, *rest), (rank, *rest, 1, 1)], [(out, rank), (out, rank, 1, 1)]
    else:
        downs, ups = [(rank, *rest)], [(out, rank, 1, 1), (out, rank)]
        if rest[1:] == (1, 1):
            downs.append((rank, rest[0]))
    if rank < 1 or tuple(down_shape) not in downs or tuple(up_shape) not in ups:
        raise NpdiffError(
            f"{path}: LoRA key {entry.keys['down']!r} has shape {_shape(down_shape)} and "
            f"{entry.keys['up']!r} has shape {_shape(up_shape)}; they do not fit the {entry.component} layer "
            f"{entry.name!r}, whose weight is {_shape(weight_shape)} (expected down [r,{','.join(map(str, rest))}] "
            f"and up [{out},r]): a LoRA for another model?")
    return rank


def plan_lora(pipe, file, path):
    """Step 2: every key -> a LoraLayer with its rank and alpha, every shape checked; nothing changes."""
    layers = {"unet": named_layers(pipe.unet, "unet"),
              "text_encoder": named_layers(pipe.text_encoder, "text_encoder")}
    tables = {component: kohya_table(layers[component]) for component in COMPONENTS}
    metadata = read_adapter_metadata(path)

    # 1. group the keys by layer
    entries = {}
    for key in file.keys():
        component, name, part = parse_key(key, tables)
        entry = entries.setdefault((component, name), LoraLayer(component, name, layers[component][name], {}))
        if part in entry.keys:
            raise NpdiffError(f"{path}: keys {entry.keys[part]!r} and {key!r} both give the {part} of "
                              f"{component} layer {name!r}")
        entry.keys[part] = key
    if not entries:
        raise NpdiffError(f"{path} holds no LoRA weights (no keys)")

    # 2. each layer: a down and an up that fit its weight, a finite alpha
    for entry in entries.values():
        for part in ("down", "up"):
            if part not in entry.keys:
                other = next(iter(entry.keys.values()))
                raise NpdiffError(f"{path}: key {other!r} has no matching {part} weight for {entry.component} "
                                  f"layer {entry.name!r}")
        for part, key in entry.keys.items():
            if file.dtype(key) not in FLOAT_DTYPES:
                raise NpdiffError(f"{path}: LoRA key {key!r} has dtype {file.dtype(key)}; expected a float "
                                  f"({', '.join(FLOAT_DTYPES)})")
        entry.rank = check_layer_shapes(path, entry, file.shape(entry.keys["down"]), file.shape(entry.keys["up"]))
        entry.alpha = float(entry.rank)
        if "alpha" in entry.keys:
            value = file.read_float32(entry.keys["alpha"])
            if value.size != 1:
                raise NpdiffError(f"{path}: LoRA key {entry.keys['alpha']!r} must be one number, got shape "
                                  f"{_shape(value.shape)}")
            entry.alpha = float(value.reshape(()))
        elif metadata_alpha(metadata, entry.component, entry.name) is not None:
            entry.alpha = metadata_alpha(metadata, entry.component, entry.name)
            if metadata.get(f"{entry.component}.use_rslora"):
                entry.alpha *= math.sqrt(entry.rank) / entry.rank  # rsLoRA: alpha / sqrt(r) instead of alpha / r
        if not math.isfinite(entry.alpha):
            raise NpdiffError(f"{path}: the alpha of {entry.component} layer {entry.name!r} is {entry.alpha}; "
                              "expected a finite number")
    return list(entries.values())


def fused_weight(entry, file, scale):
    """W + scale * (alpha / r) * (up @ down) as a new array beside W (same backend and dtype)."""
    down = file.read_float32(entry.keys["down"])                    # [r,in] or [r,in,k,k]
    up = file.read_float32(entry.keys["up"])                        # [out,r] or [out,r,1,1]
    rank = entry.rank
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # [out,r] @ [r,in*k*k] -> [out,in*k*k]
    delta *= np.float32(scale * entry.alpha / rank)
    weight = entry.layer.weight
    current = backend.to_numpy(weight).astype(np.float32)           # [out,in(,k,k)] float32 (a copy)
    current += delta.reshape(current.shape)                         # into the copy, never into W
    return backend.to_device(current, dtype=weight.dtype)


def load_lora_weights(pipe, path, scale=1.0, adapter_name=None):
    """Fuse the LoRA in `path` into pipe.unet and pipe.text_encoder -> the LoadedLora record."""
    # 1. the arguments and the file (pickles and renamed pickles are refused by SafetensorsFile)
    scale = check_scale(scale)
    path = Path(path).expanduser()
    file = SafetensorsFile(path)
    stack = lora_stack(pipe)
    adapter_name = f"default_{len(stack.loaded)}" if adapter_name is None else str(adapter_name)
    if any(lora.adapter_name == adapter_name for lora in stack.loaded):
        raise NpdiffError(f"adapter_name {adapter_name!r} is already loaded; pass another name")

    # 2. every key, shape and alpha checked before anything changes
    entries = plan_lora(pipe, file, path)
    sha256 = file_sha256(path)[:12]

    # 3. new weights, one layer at a time; on any error put back what this load replaced
    replaced, first_seen = [], []
    try:
        for entry in entries:
            layer = entry.layer
            new_weight = fused_weight(entry, file, scale)
            if id(layer) not in stack.originals:
                stack.originals[id(layer)] = (layer, layer.weight)
                first_seen.append(id(layer))
            replaced.append((layer, layer.weight))
            layer.weight = new_weight
    except BaseException:
        for layer, weight in reversed(replaced):
            layer.weight = weight
        for key in first_seen:
            del stack.originals[key]
        raise

    # 4. the record
    record = LoadedLora(path.stem, scale, sha256, adapter_name, len(entries))
    stack.loaded.append(record)
    return record


def unload_lora_weights(pipe):
    """Put every weight a LoRA changed back to the original array (a no-op when none is loaded)."""
    stack = getattr(pipe, "_lora_stack", None)
    if stack is None:
        return
    for layer, original in stack.originals.values():
        layer.weight = original
    stack.originals.clear()
    stack.loaded.clear()
