"""Which layer of the model each key of a LoRA file names (the key tables of npdiff/lora.py).

A LoRA stores, for each layer it changes, two small matrices and optionally a scalar:
    down [r,in] (or [r,in,k,k] for a convolution), up [out,r] (or [out,r,1,1]), alpha.
Files name them in one of these layouts (all map to the module names diffusers and transformers use,
which are the names npdiff's layers carry in `layer.key`):

  kohya / A1111   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                  lora_unet_<...>.lora_up.weight, lora_unet_<...>.alpha
                  LyCORIS files in this naming hold other parts instead of down/up (npdiff/lycoris.py):
                  lora_unet_<...>.hada_w1_a ... (LoHa), lora_unet_<...>.lokr_w1 ... (LoKr), or a third
                  one beside them, lora_unet_<...>.lora_mid.weight (LoCon in Tucker form)
                  lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight (lora_te1_ too)
                  The name is the diffusers module name with "." written as "_"; it is looked up in a
                  table made from the model's own module names (no guessing where "_" was ".").
                  SDXL: lora_te1_* is CLIP-L (text_encoder), lora_te2_* OpenCLIP bigG (text_encoder_2),
                  and the UNet's names may be the original (CompVis/sgm) ones kohya's SDXL trainer
                  writes, lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q: they are looked
                  up in a second table made from the same rows that map single-file checkpoints
                  (npdiff/loading/keymap.py's unet_block_table), read backwards.
  diffusers/PEFT  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight (down)
                  unet.<...>.lora_B.weight (up), text_encoder.text_model.encoder.layers.0.self_attn.q_proj...
                  (text_encoder_2.* for SDXL's second text encoder)
                  older diffusers: unet.<...>.lora.down.weight / .lora.up.weight, and the attention
                  processor names "attn1.processor.to_q_lora.down.weight",
                  "self_attn.to_q_lora.down.weight", "mlp.fc1.lora_linear_layer.down.weight".
                  An "<module>.alpha" key is read as in the kohya layout (diffusers itself refuses such
                  files); a "lora_adapter_metadata" entry in the header (what diffusers'
                  save_lora_weights writes when given the adapter config) gives lora_alpha and
                  alpha_pattern per component, as diffusers reads it.
CLIP module names are used without their "text_model." prefix (transformers 4 and 5 differ there).
"""

import re

from npdiff.errors import NpdiffError
from npdiff.loading.keymap import KEEP, map_key, unet_block_table

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kohya prefix -> component
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# the parts of a LyCORIS layer, as its keys end (".hada_w1_a"); npdiff/lycoris.py says what each is
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

# key ending -> which part of the layer's change it holds
KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
               **{"." + part: part for part in LOHA_PARTS + LOKR_PARTS}}
KOHYA_ENDINGS = ".lora_down.weight, .lora_up.weight, .alpha (LoRA), .hada_w1_a ... (LoHa) or .lokr_w1 ... (LoKr)"
PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
              ".lora.up.weight": "up", ".alpha": "alpha"}

# oldest diffusers names (attention processors, text encoder "lora_linear_layer") -> module names
OLD_DIFFUSERS_NAMES = {
    "unet": [(".processor.to_q_lora", ".to_q.lora"), (".processor.to_k_lora", ".to_k.lora"),
             (".processor.to_v_lora", ".to_v.lora"), (".processor.to_out_lora", ".to_out.0.lora")],
    "text_encoder": [(".to_q_lora", ".q_proj.lora"), (".to_k_lora", ".k_proj.lora"),
                     (".to_v_lora", ".v_proj.lora"), (".to_out_lora", ".out_proj.lora"),
                     (".lora_linear_layer", ".lora")],
}


OLD_DIFFUSERS_NAMES["text_encoder_2"] = OLD_DIFFUSERS_NAMES["text_encoder"]


def module_name(component, name):
    """A module name as the tables use it: CLIP's without "text_model."."""
    if component.startswith("text_encoder") and name.startswith("text_model."):
        return name[len("text_model."):]
    return name


def kohya_table(module_names, original_names=None):
    """{"down_blocks_0_resnets_1_conv1": "down_blocks.0.resnets.1.conv1", ...} for one component;
    original_names: {module name: its original name} (the UNet's, original_unet_names) added as well."""
    table = {}
    for name in module_names:
        flats = [name.replace(".", "_")]
        if original_names and name in original_names:
            flats.append(original_names[name].replace(".", "_"))
        for flat in flats:
            if flat in table:
                raise NpdiffError(f"internal: modules {table[flat]!r} and {name!r} share the kohya name {flat!r}")
            table[flat] = name
    return table


def _backwards(rows):
    """The key map's (original prefix, diffusers prefix, parts) rows turned round, for keymap.map_key."""
    turned = []
    for original_prefix, diffusers_prefix, parts in rows:
        if parts is not KEEP:
            parts = tuple((diffusers_part, original_part, None) for original_part, diffusers_part, _ in parts)
        turned.append((diffusers_prefix, original_prefix, parts))
    return turned


def original_unet_names(module_names, config):
    """{"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.
    attn1.to_q", ...} for the UNet's modules that have an original name ({} when the config's layout has no
    single-file table, e.g. a layers_per_block list)."""
    if not isinstance(config.get("layers_per_block"), int):
        return {}
    rows = _backwards(unet_block_table(config))
    names = {}
    for name in module_names:
        mapped = map_key(name + ".", rows)                              # (original name + ".", None) or None
        if mapped is not None:
            names[name] = mapped[0].rstrip(".")
    return names


def _split_part(key, parts):
    """'x.lora_A.weight' -> ('x', 'down'); None when the key ends in none of `parts`."""
    for ending, part in parts.items():
        if key.endswith(ending):
            return key[:-len(ending)], part
    return None


def parse_key(key, kohya_tables):
    """A LoRA file key -> (component, module name, part) with part "down", "up" or "alpha".

    kohya_tables: {component: kohya_table(...)}. NpdiffError for a key of no known layout or a key
    that names no layer of this model."""
    # 1. kohya / A1111
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            split = _split_part(key[len(prefix):], KOHYA_PARTS)
            if split is None:
                raise NpdiffError(f"LoRA key {key!r}: expected it to end in {KOHYA_ENDINGS} (kohya layout); "
                                  "other LyCORIS kinds (full, IA3, GLoRA, DoRA, norm) are not supported")
            flat, part = split
            if kohya_tables.get(component) is None:
                raise NpdiffError(f"LoRA key {key!r} is for a {component}, which this model does not have "
                                  f"(a LoRA for {'SDXL' if component == 'text_encoder_2' else 'another model'}?)")
            if component.startswith("text_encoder") and flat.startswith("text_model_"):
                flat = flat[len("text_model_"):]
            if flat not in kohya_tables[component]:
                raise NpdiffError(f"LoRA key {key!r} names no layer of this model's {component} "
                                  "(a LoRA for another architecture?)")
            return component, kohya_tables[component][flat], part
    # 2. diffusers / PEFT
    component, _, rest = key.partition(".")
    if component not in COMPONENTS or not rest:
        raise NpdiffError(f"LoRA key {key!r} is in no known layout: expected lora_unet_*/lora_te_*/lora_te1_*/"
                          "lora_te2_* (kohya) or unet.*/text_encoder.*/text_encoder_2.* (diffusers/PEFT)")
    if kohya_tables.get(component) is None:
        raise NpdiffError(f"LoRA key {key!r} is for a {component}, which this model does not have "
                          f"(a LoRA for {'SDXL' if component == 'text_encoder_2' else 'another model'}?)")
    for old, new in OLD_DIFFUSERS_NAMES[component]:
        rest = rest.replace(old, new)
    split = _split_part(rest, PEFT_PARTS)
    if split is None:
        raise NpdiffError(f"LoRA key {key!r}: expected it to end in {', '.join(PEFT_PARTS)} (diffusers layout)")
    name, part = split
    name = module_name(component, name)
    if kohya_tables[component].get(name.replace(".", "_")) != name:
        raise NpdiffError(f"LoRA key {key!r} names no layer of this model's {component} "
                          "(a LoRA for another architecture?)")
    return component, name, part


def shape_text(shape):
    """(4, 32, 1, 1) -> "[4,32,1,1]" (shapes as error messages show them)."""
    return "[" + ",".join(str(int(n)) for n in shape) + "]"


def _pattern_matches(pattern, name):
    """PEFT's alpha_pattern rule: "^regex" matches the whole name; otherwise the name ends in it."""
    if pattern.startswith("^"):
        return re.fullmatch(pattern[1:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def metadata_alpha(metadata, component, name):
    """The lora_alpha diffusers' header metadata gives a module, or None when it gives none."""
    if not metadata:
        return None
    for pattern, alpha in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if _pattern_matches(pattern, name) or _pattern_matches(pattern, "text_model." + name):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)
