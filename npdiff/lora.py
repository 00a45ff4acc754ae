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
attention-processor names the most common alpha (files with one alpha for every layer agree). LyCORIS
LoHa and LoKr layers (npdiff/lycoris.py) give their update another way and fuse the same way. Steps:
  1. check the scale, refuse pickles, open and validate the file (npdiff.loading.SafetensorsFile);
  2. map every key to a layer and check every shape, dtype, alpha and value (NaN/Inf, a scale * alpha/r
     beyond float32): all before anything changes;
  3. per layer: read its parts and make the new weight as a NEW array (weights may be read-only memory
     maps, and the original is kept to be put back on unload), refused when the update overflows
     float32 or is absurdly large for the layer (UPDATE_LIMIT); only when every new weight is made are
     they put in place (layer.weight), so an error changes nothing;
  4. record the file's name, the scale and its SHA-256 for the picture's parameters.
Layers read layer.weight at every call (no transposed copy of a weight is kept anywhere), so replacing it
is the whole change. A precision="bf16" layer holds its weight packed in bfloat16 (npdiff/models/precision.py):
its new weight is made from the packed weight's exact float32 values plus the update, rounded and packed
again; the packed original is kept and put back on unload, so unloading restores it bit for bit.
"""

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npdiff import backend, lycoris
from npdiff.errors import NpdiffError, shorten
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.lora_keys import (
    COMPONENTS,
    kohya_table,
    metadata_alpha,
    module_name,
    original_unet_names,
    parse_key,
    shape_text,
)
from npdiff.model_identity import file_sha256
from npdiff.models import precision
from npdiff.models.blocks import Conv2d, Linear

FLOAT_DTYPES = ("F32", "F16", "BF16")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# An update larger than this many times the layer's largest weight (or than this, for weights below 1) is
# refused: real LoRAs change weights by a fraction of their size even at scales of 10 or more, while an
# alpha of 1e38 or a scale of 1e30 gives weights whose products overflow float32 in the first UNet step.
UPDATE_LIMIT = 1e6
# alpha_pattern regexes come from a file's header and Python's re has no time limit: a repeated group such as
# "(.*)*x" backtracks exponentially (measured: 0.8 s on a 24-character name, x4 per 2 characters more; module
# names have ~60), and k quantifiers in a row (".*" * k + "x", ".?" * k ...) polynomially: on a 73-character
# name 0.2 ms for k=3, 6 ms for 4, 50 ms for 5, 0.5 s for 6, per layer. Real patterns ("^down_blocks\.\d+\..*")
# need neither: repeated groups and more than MOST_QUANTIFIERS quantifiers (*, +, ?, {m,n}) are refused.
REPEATED_GROUP = re.compile(r"(?<!\\)\)[*+{]")
QUANTIFIER = re.compile(r"(?<![\\(])[*+?{]")  # not escaped, not a group's "(?"
MOST_QUANTIFIERS = 4
# ... and many such patterns times many layers still add up (each match of ".*.*.*.*x" ~6 ms): the alphas of a
# file whose patterns take longer than this to match the model's layers are refused by name.
PATTERN_SECONDS = 10.0


@dataclass
class LoraLayer:
    """One layer a LoRA file changes: where it is, which file keys hold its change, and its multiplier."""
    component: str          # "unet", "text_encoder" or "text_encoder_2" (SDXL)
    name: str               # module name, e.g. "down_blocks.0.attentions.0.proj_in"
    layer: object           # the npdiff Linear or Conv2d
    keys: dict              # {part: key}: "down", "up", "alpha" (optional), or LyCORIS parts (npdiff/lycoris.py)
    kind: str = "lora"      # "lora", "loha" or "lokr" (filled in by plan_lora, as the rest)
    rank: int = 0           # LoRA: r
    multiplier: float = 1.0  # alpha / r for LoRA; LyCORIS: alpha / dim or 1

    def first_key(self):
        """A key of the layer's file entries, to name in a message (a weight's, not the alpha's)."""
        return next((key for part, key in self.keys.items() if part != "alpha"), next(iter(self.keys.values())))


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
    """{module name: Linear or Conv2d} for every layer reachable from `model` (an npdiff model; None: {})."""
    found, stack, seen = {}, [] if model is None else [model], set()
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


def check_scale(scale, path=None):
    where = "" if path is None else f" (for {path})"
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise NpdiffError(f"LoRA scale must be a number, got {shorten(scale)}{where}")
    try:
        value = float(scale)
    except OverflowError:  # an int of hundreds of digits
        value = math.inf
    if not math.isfinite(value):
        raise NpdiffError(f"LoRA scale must be finite, got {shorten(scale)}{where}")
    return value


def read_adapter_metadata(path):
    """The "lora_adapter_metadata" JSON diffusers' save_lora_weights may write into the header, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and an integer of over 4300 digits (Python's int limit)
        raise NpdiffError(f"{path}: header entry 'lora_adapter_metadata' is not JSON: {exc}") from exc
    check_adapter_metadata(path, metadata)
    return metadata


def check_adapter_metadata(path, metadata):
    """NpdiffError naming the entry unless the metadata is an object whose alphas are finite numbers and whose
    alpha_patterns are {pattern: number} with patterns that compile (what metadata_alpha reads)."""
    where = f"{path}: header entry 'lora_adapter_metadata'"
    if not isinstance(metadata, dict):
        raise NpdiffError(f"{where} is a JSON {type(metadata).__name__}; expected an object")

    def check_number(name, value):
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        try:
            finite = number is not None and math.isfinite(float(number))
        except OverflowError:  # an int of hundreds of digits
            finite = False
        if not finite:
            raise NpdiffError(f"{where}: {name} is {shorten(value)}; expected a finite number")

    for component in COMPONENTS:
        if metadata.get(f"{component}.lora_alpha") is not None:
            check_number(f"{component}.lora_alpha", metadata[f"{component}.lora_alpha"])
        patterns = metadata.get(f"{component}.alpha_pattern")
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise NpdiffError(f"{where}: {component}.alpha_pattern is a JSON {type(patterns).__name__}; expected an "
                              "object {module pattern: alpha}")
        for pattern, alpha in patterns.items():
            check_number(f"{component}.alpha_pattern[{pattern[:40]!r}]", alpha)
            if pattern.startswith("^"):
                try:
                    re.compile(pattern[1:])
                except re.error as exc:
                    raise NpdiffError(f"{where}: {component}.alpha_pattern {pattern[:40]!r} is not a regular "
                                      f"expression ({exc})") from None
                if REPEATED_GROUP.search(pattern) or len(QUANTIFIER.findall(pattern)) > MOST_QUANTIFIERS:
                    raise NpdiffError(f"{where}: {component}.alpha_pattern {pattern[:40]!r} repeats a group "
                                      f"('(...)*', '(...)+', '(...){{n}}') or has more than {MOST_QUANTIFIERS} of "
                                      "*, +, ?, {m,n}, which Python's re can take minutes or years to match against "
                                      "a module name ('(.*)*x', '.*.*.*.*.*.*x'); write it without")


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
            f"{path}: LoRA key {entry.keys['down']!r} has shape {shape_text(down_shape)} and "
            f"{entry.keys['up']!r} has shape {shape_text(up_shape)}; they do not fit the {entry.component} layer "
            f"{entry.name!r}, whose weight is {shape_text(weight_shape)} (expected down [r,{','.join(map(str, rest))}] "
            f"and up [{out},r]): a LoRA for another model?")
    return rank


def read_alpha(path, file, entry, metadata):
    """The layer's alpha from its ".alpha" key or diffusers' header metadata, or None when neither gives one."""
    if "alpha" in entry.keys:
        value = file.read_float32(entry.keys["alpha"])
        if value.size != 1:
            raise NpdiffError(f"{path}: LoRA key {entry.keys['alpha']!r} must be one number, got shape "
                              f"{shape_text(value.shape)}")
        alpha = float(value.reshape(()))
    else:
        alpha = metadata_alpha(metadata, entry.component, entry.name)
    if alpha is not None and not math.isfinite(alpha):
        raise NpdiffError(f"{path}: the alpha of {entry.component} layer {entry.name!r} is {alpha}; "
                          "expected a finite number")
    return alpha


def check_finite_values(path, file, key):
    """NpdiffError naming the key when the tensor holds NaN or Inf (it would only fail at sampling step 1)."""
    values = file.read_float32(key)
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite]
        raise NpdiffError(f"{path}: LoRA key {key!r} holds {bad.size} non-finite values (e.g. {bad[0]}); "
                          "a damaged or badly trained file")


def check_multiplier(path, entry, scale):
    """NpdiffError when scale * alpha/r is beyond float32's range (a scale like 1e308, an alpha like 1e38)."""
    product = scale * entry.multiplier
    if not math.isfinite(product) or abs(product) > FLOAT32_MAX:
        raise NpdiffError(f"{path}: for the {entry.component} layer {entry.name!r} (key {entry.first_key()!r}), "
                          f"scale {scale:g} x alpha/rank {entry.multiplier:g} = {product:g} is beyond float32's "
                          f"range ({FLOAT32_MAX:.3g}): a mistyped scale or alpha?")


def plan_lora(pipe, file, path, scale):
    """Step 2: every key -> a LoraLayer with its kind, rank and multiplier; every shape, dtype, value and
    multiplier checked. Nothing changes."""
    layers = {component: named_layers(getattr(pipe, component, None), component) for component in COMPONENTS}
    originals = {"unet": original_unet_names(layers["unet"], pipe.unet.config)}  # kohya's SDXL names
    tables = {component: kohya_table(layers[component], originals.get(component)) if layers[component] else None
              for component in COMPONENTS}
    metadata = read_adapter_metadata(path)

    # 1. group the keys by layer
    entries = {}
    for key in file.keys():
        try:
            component, name, part = parse_key(key, tables)
        except NpdiffError as exc:
            raise NpdiffError(f"{path}: {exc}") from None
        entry = entries.setdefault((component, name), LoraLayer(component, name, layers[component][name], {}))
        if part in entry.keys:
            raise NpdiffError(f"{path}: keys {entry.keys[part]!r} and {key!r} both give the {part} of "
                              f"{component} layer {name!r}")
        entry.keys[part] = key
    if not entries:
        raise NpdiffError(f"{path} holds no LoRA weights (no keys)")

    # 2. each layer: float parts that fit its weight, a finite alpha
    alpha_seconds = 0.0  # time spent finding alphas: the header's alpha_pattern regexes (PATTERN_SECONDS)
    for entry in entries.values():
        entry.kind = lycoris.kind_of(path, entry.component, entry.name, entry.keys)
        for part, key in entry.keys.items():
            if file.dtype(key) not in FLOAT_DTYPES:
                raise NpdiffError(f"{path}: LoRA key {key!r} has dtype {file.dtype(key)}; expected a float "
                                  f"({', '.join(FLOAT_DTYPES)})")
        started = time.monotonic()
        alpha = read_alpha(path, file, entry, metadata)
        if "alpha" not in entry.keys:  # the header's patterns gave it; reading a file's own .alpha key is not counted
            alpha_seconds += time.monotonic() - started
        if alpha_seconds > PATTERN_SECONDS:
            raise NpdiffError(f"{path}: matching the alpha_pattern regexes of its header 'lora_adapter_metadata' "
                              f"against this model's layers took over {PATTERN_SECONDS:g} s; write fewer or simpler "
                              "patterns")
        shapes = {part: file.shape(key) for part, key in entry.keys.items() if part != "alpha"}
        if entry.kind != "lora":
            entry.multiplier = lycoris.plan_update(path, entry, shapes, alpha)
        else:
            for part in ("down", "up"):
                if part not in entry.keys:
                    raise NpdiffError(f"{path}: key {entry.first_key()!r} has no matching {part} weight for "
                                      f"{entry.component} layer {entry.name!r}")
            entry.rank = check_layer_shapes(path, entry, shapes["down"], shapes["up"])
            entry.multiplier = 1.0 if alpha is None else alpha / entry.rank
            if "alpha" not in entry.keys and alpha is not None and metadata.get(f"{entry.component}.use_rslora"):
                entry.multiplier = alpha / math.sqrt(entry.rank)  # rsLoRA: alpha / sqrt(r) instead of alpha / r

    # 3. the values: finite tensors, a multiplier within float32
    for entry in entries.values():
        check_multiplier(path, entry, scale)
        for part, key in entry.keys.items():
            if part != "alpha":
                check_finite_values(path, file, key)
    return list(entries.values())


def layer_update(entry, file):
    """The layer's update before scale and multiplier, float32 in its weight's shape."""
    if entry.kind != "lora":
        tensors = {part: file.read_float32(key) for part, key in entry.keys.items() if part != "alpha"}
        return lycoris.update(entry, tensors)
    down = file.read_float32(entry.keys["down"])                    # [r,in] or [r,in,k,k]
    up = file.read_float32(entry.keys["up"])                        # [out,r] or [out,r,1,1]
    rank = entry.rank
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # [out,r] @ [r,in*k*k] -> [out,in*k*k]
    return delta.reshape(entry.layer.weight.shape)


def fused_weight(entry, file, scale, path="LoRA"):
    """W + scale * multiplier * update as a new array beside W (same backend and dtype); NpdiffError naming
    the file and key when the result overflows, or the update is absurdly large for the layer."""
    weight = entry.layer.weight
    with np.errstate(over="ignore", invalid="ignore"):              # an overflow is reported below, by name
        update = layer_update(entry, file)                          # [out,in(,k,k)] float32
        update *= np.float32(scale * entry.multiplier)
    current = backend.to_numpy(precision.float32_values(weight)).astype(np.float32)  # [out,in(,k,k)] (a copy)
    largest_weight = float(np.max(np.abs(current), initial=0.0))
    largest_update = float(np.max(np.abs(update), initial=0.0))     # inf or nan when the update overflowed
    where = f"{path}: the {entry.component} layer {entry.name!r} (key {entry.first_key()!r}) at scale {scale:g}"
    if not math.isfinite(largest_update):
        raise NpdiffError(f"{where}: its update overflows float32 (values beyond {FLOAT32_MAX:.3g})")
    if largest_update > UPDATE_LIMIT * max(1.0, largest_weight):
        raise NpdiffError(f"{where}: its update reaches {largest_update:.3g}, more than {UPDATE_LIMIT:g} times the "
                          f"layer's largest weight ({largest_weight:.3g}); refused as absurd (a mistyped scale or "
                          "alpha, or a broken file)")
    current += update                                               # into the copy, never into W
    dtype = np.float32 if precision.is_packed(weight) else weight.dtype  # bf16 has float32's range
    dtype_max = float(np.finfo(dtype).max)
    if float(np.max(np.abs(current), initial=0.0)) > dtype_max:
        raise NpdiffError(f"{where}: the fused weight overflows {np.dtype(dtype).name} (beyond {dtype_max:.3g})")
    if precision.is_packed(weight):
        return precision.pack_like(weight, current)                 # [out,in(,k,k)] -> packed bf16 again
    return backend.to_device(current, dtype=weight.dtype)


def load_lora_weights(pipe, path, scale=1.0, adapter_name=None):
    """Fuse the LoRA in `path` into pipe.unet and the text encoder(s) -> the LoadedLora record."""
    # 1. the arguments and the file (pickles and renamed pickles are refused by SafetensorsFile)
    if not isinstance(path, (str, os.PathLike)):  # before check_scale, whose message quotes the path
        raise NpdiffError(f"LoRA: expected the path of a .safetensors file, got {shorten(path)}")
    scale = check_scale(scale, path)
    path = Path(path).expanduser()
    file = SafetensorsFile(path)
    stack = lora_stack(pipe)
    adapter_name = f"default_{len(stack.loaded)}" if adapter_name is None else str(adapter_name)
    if any(lora.adapter_name == adapter_name for lora in stack.loaded):
        raise NpdiffError(f"adapter_name {adapter_name!r} is already loaded; pass another name")

    # 2. every key, shape, value and alpha checked before anything changes
    entries = plan_lora(pipe, file, path, scale)
    sha256 = file_sha256(path)[:12]

    # 3. every new weight made (and checked) before any is put in place: an error leaves the model as it was.
    #    The new arrays are what the model holds afterwards anyway; only a layer that already holds an earlier
    #    LoRA's fused weight has two private copies alive until the swap.
    new_weights = [(entry.layer, fused_weight(entry, file, scale, path)) for entry in entries]
    for layer, new_weight in new_weights:
        if id(layer) not in stack.originals:
            stack.originals[id(layer)] = (layer, layer.weight)
        layer.weight = new_weight

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
