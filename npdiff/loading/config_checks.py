"""The configs of the UNet, the VAE, the text encoder and the scheduler in one place: diffusers'/
transformers' defaults, a rule for every value, the cross-checks that need two keys, and what the
networks built here support. (TAESD's few keys are checked in models/vae_tiny.py, which nothing else
reads.)

    check_component_config(component, config, source=None) -> CheckedConfig
        NpdiffError naming `source` (the config file; else "<component> config"), the key, what it must
        be and what it is. Returns the config as given, marked as checked.
    full_config(component, config) -> dict      the checked config with the defaults filled in: what a
                                                model's constructor builds itself from
    per_block(config, key, count) -> list       one value or a per-block list -> `count` values
    transformer_depths(full, layers) -> (down, mid, up)   SDXL's transformer depth of every resnet layer

component is "unet", "vae", "text_encoder" or "scheduler". A key absent from the config is not checked
(the default fills it in); a key present must satisfy its rule (config_rules.py). Then the cross-checks
(group counts that divide the channels, heads that divide the width, every per-block list as long as
block_out_channels: checked here and nowhere else, beta_start <= beta_end), then what is supported
(the SD 1.x/2.x and SDXL UNet: no class embeddings, known block types, ...).

Each config is checked once: the loader checks what it reads (so the message names the file) and
returns a CheckedConfig; a model's constructor calls full_config, which checks only a config that is
not one already (a dict made by hand). This module imports nothing from npdiff.models: the models
import their defaults from here.

What this prevents: a config.json with `norm_num_groups: 0`, `block_out_channels: []`,
`hidden_size: "64"`, `attention_head_dim: 0` or `beta_start: -1` used to fail deep inside the model with
ZeroDivisionError, IndexError, TypeError or a complex-number TypeError; a VAE `scaling_factor` of 0 or
NaN or a negative `norm_eps` used to give an all-black picture and exit code 0.
"""

from npdiff.errors import NpdiffError
from npdiff.loading.config_rules import (
    EPS,
    LAYER_COUNT,
    POSITIVE,
    Bool,
    Float,
    Int,
    IntIn,
    ListOf,
    OneOrList,
    Optional,
    Text,
)

# ---------------------------------------------------------------------------------------------
# Defaults and what is supported, per component
# ---------------------------------------------------------------------------------------------
# diffusers' defaults for the keys a config.json may leave out (UNet2DConditionModel.__init__).
UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "mid_block_only_cross_attention": None, "addition_embed_type_num_heads": 64,
}

# Keys whose value must be exactly this (None/False/"default"...) for the SD/SDXL network built here.
# (num_attention_heads: diffusers' UNet2DConditionModel refuses it too.)
UNET_MUST_BE = {
    "class_embed_type": None, "num_class_embeds": None,
    "num_attention_heads": None, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None,
    "attention_type": "default", "class_embeddings_concat": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "cross_attention_norm": None,
}
UNET_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")  # models/unet.py builds these
UNET_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}

# transformers' CLIPTextConfig defaults, for config.json files that leave a key out
CLIP_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512, "eos_token_id": 49407,
}
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")  # models/clip.py runs these

SCHEDULER_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02}  # what the cross-check needs
DEFAULTS = {"unet": UNET_DEFAULTS, "vae": VAE_DEFAULTS, "text_encoder": CLIP_DEFAULTS,
            "scheduler": SCHEDULER_DEFAULTS}

# ---------------------------------------------------------------------------------------------
# A rule for every value
# ---------------------------------------------------------------------------------------------
RULES = {
    "unet": {
        "sample_size": POSITIVE, "in_channels": POSITIVE, "out_channels": POSITIVE,
        "block_out_channels": ListOf(POSITIVE), "down_block_types": ListOf(Text()),
        "up_block_types": ListOf(Text()), "layers_per_block": OneOrList(LAYER_COUNT),
        "attention_head_dim": OneOrList(POSITIVE), "cross_attention_dim": OneOrList(POSITIVE),
        "transformer_layers_per_block": OneOrList(OneOrList(LAYER_COUNT)),  # SDXL: per block, per layer
        "reverse_transformer_layers_per_block": Optional(ListOf(OneOrList(LAYER_COUNT))),
        "addition_embed_type": Optional(Text()), "addition_time_embed_dim": Optional(POSITIVE),
        "projection_class_embeddings_input_dim": Optional(POSITIVE), "norm_num_groups": POSITIVE, "norm_eps": EPS,
        "mid_block_scale_factor": Float(), "downsample_padding": IntIn(0, 1), "conv_in_kernel": Int(1, odd=True),
        "conv_out_kernel": Int(1, odd=True), "time_embedding_dim": Optional(POSITIVE),
        "flip_sin_to_cos": Bool(), "center_input_sample": Bool(), "use_linear_projection": Bool(),
        "upcast_attention": Optional(Bool()), "freq_shift": Float(), "act_fn": Text(),
        "mid_block_type": Optional(Text()), "resnet_out_scale_factor": Float(above=True, low=0.0),
    },
    "vae": {
        "in_channels": POSITIVE, "out_channels": POSITIVE, "latent_channels": POSITIVE,
        "block_out_channels": ListOf(POSITIVE), "down_block_types": ListOf(Text()),
        "up_block_types": ListOf(Text()), "layers_per_block": LAYER_COUNT, "norm_num_groups": POSITIVE,
        "scaling_factor": Float(0.0, above=True), "sample_size": OneOrList(POSITIVE), "act_fn": Text(),
        "mid_block_add_attention": Bool(), "use_quant_conv": Bool(), "use_post_quant_conv": Bool(),
        "force_upcast": Bool(),
    },
    "text_encoder": {
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
        "num_hidden_layers": LAYER_COUNT, "num_attention_heads": POSITIVE, "max_position_embeddings": POSITIVE,
        "layer_norm_eps": EPS, "hidden_act": Text(), "projection_dim": POSITIVE,
    },
    "scheduler": {
        # num_train_timesteps: SD has 1000; the schedules are arrays of this length, so 10**9 is refused
        "num_train_timesteps": Int(1, most=100_000), "beta_start": Float(0.0, 1.0, above=True),
        "beta_end": Float(0.0, 1.0, above=True), "beta_schedule": Text(), "trained_betas": Optional(
            ListOf(Float(0.0, 1.0, above=True))), "steps_offset": Int(0), "clip_sample": Bool(),
        "clip_sample_range": Float(0.0, above=True), "set_alpha_to_one": Bool(), "skip_prk_steps": Bool(),
        "prediction_type": Text(), "timestep_spacing": Text(), "use_karras_sigmas": Bool(),
        "thresholding": Bool(), "solver_order": Int(1), "lower_order_final": Bool(),
        "rescale_betas_zero_snr": Bool(), "variance_type": Optional(Text()),
    },
}
COMPONENTS = tuple(RULES)


def per_block(config, key, count):
    """A config value given as one value or as a per-block list -> a list of `count` values.

    The list's length was checked with the config (_cross_checks)."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count


def per_layer(value, count, key, block):
    """One block's transformer depth (an int, or one per resnet layer) -> a list of `count` depths.
    diffusers reads a list's first `count` entries; a shorter list is refused."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) < count:
        raise NpdiffError(f"{key} entry {block} is {list(value)}; the block has {count} resnet "
                          f"layers, so it needs {count} depths")
    return list(value[:count])


def transformer_depths(full, layers):
    """-> (down, mid, up): the transformer depth of every resnet layer of every block, read as diffusers
    reads transformer_layers_per_block (an int, one per block, or per block one per layer: SDXL) and
    reverse_transformer_layers_per_block (the up blocks' own, required with nested lists); the mid block
    takes the last block's (first) depth. `full`: a config with the defaults; `layers`: layers_per_block
    per block (an up block has one more). NpdiffError (without the config's name: check_component_config
    adds it) for lists too short or nested ones without the reverse."""
    blocks = len(layers)
    given = per_block(full, "transformer_layers_per_block", blocks)     # per block: an int or a list
    down = [per_layer(given[i], layers[i], "transformer_layers_per_block", i) for i in range(blocks)]
    mid = per_layer(given[-1], 1, "transformer_layers_per_block", blocks - 1)[0]
    if full["reverse_transformer_layers_per_block"] is None:
        if any(isinstance(value, (list, tuple)) for value in given):
            raise NpdiffError("transformer_layers_per_block is a nested list; diffusers then needs "
                              "reverse_transformer_layers_per_block (the up blocks' depths), and it is missing")
        up_given, key = given[::-1], "transformer_layers_per_block"
    else:
        up_given = per_block(full, "reverse_transformer_layers_per_block", blocks)
        key = "reverse_transformer_layers_per_block"
    up = [per_layer(up_given[i], layers[blocks - 1 - i] + 1, key, i) for i in range(blocks)]
    return down, mid, up


# ---------------------------------------------------------------------------------------------
# Cross-checks: rules that need two keys (given the defaults the model fills in)
# ---------------------------------------------------------------------------------------------
PER_BLOCK_KEYS = ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                  "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block")


def _cross_checks(component, full):
    """-> (key, message) of the first cross-check that fails, else None."""
    if component in ("unet", "vae"):
        channels = list(full["block_out_channels"])
        groups = full["norm_num_groups"]
        bad = [c for c in channels if c % groups]
        if bad:
            return "norm_num_groups", f"must divide every block_out_channels entry; {groups} does not divide {bad[0]}"
        for key in PER_BLOCK_KEYS:
            value = full.get(key)
            if isinstance(value, (list, tuple)) and len(value) != len(channels):
                return key, f"has {len(value)} entries; block_out_channels has {len(channels)} (one per block)"
    if component == "unet":
        heads = per_block(full, "attention_head_dim", len(full["block_out_channels"]))
        for channels, count in zip(full["block_out_channels"], heads):
            if channels % count:
                return "attention_head_dim", (f"(the head count) must divide the block's channels; {count} does "
                                              f"not divide {channels}")
    if component == "text_encoder" and full["hidden_size"] % full["num_attention_heads"]:
        return "num_attention_heads", (f"must divide hidden_size; {full['num_attention_heads']} does not divide "
                                       f"{full['hidden_size']}")
    if component == "scheduler" and full.get("trained_betas") is None:
        if float(full["beta_start"]) > float(full["beta_end"]):  # both passed their Float rules
            return "beta_start", f"{full['beta_start']} is above beta_end {full['beta_end']}"
    return None


# ---------------------------------------------------------------------------------------------
# What the networks built here support (SD 1.x/2.x, SDXL): "<where>: key=value is not supported ..."
# ---------------------------------------------------------------------------------------------
def _unet_unsupported(full):
    """-> why the UNet config asks for a network models/unet.py does not build, else None."""
    for key, expected in UNET_MUST_BE.items():
        if full[key] != expected:
            return (f"{key}={full[key]!r} is not supported (npdiff runs SD 1.x/2.x and SDXL UNets, which have "
                    f"{key}={expected!r})")
    if full["addition_embed_type"] not in (None, "text_time"):
        return (f"addition_embed_type={full['addition_embed_type']!r} is not supported; expected null (SD 1.x/2.x) "
                "or 'text_time' (SDXL)")
    if full["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if full[key] is None:
                return f"addition_embed_type 'text_time' needs {key}; it is missing"
    for key in ("only_cross_attention", "mid_block_only_cross_attention"):
        only_cross = full[key]
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            return f"{key}={only_cross!r} is not supported (SD and SDXL UNets have False)"
    if full["act_fn"] not in ("silu", "swish"):
        return f"act_fn={full['act_fn']!r} is not supported; expected 'silu'"
    if full["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        return f"mid_block_type={full['mid_block_type']!r} is not supported; expected 'UNetMidBlock2DCrossAttn'"
    for key, known in (("down_block_types", UNET_DOWN_BLOCK_TYPES), ("up_block_types", UNET_UP_BLOCK_TYPES)):
        for name in full[key]:
            if name not in known:
                return f"{key} entry {name!r} is not supported; known: {', '.join(known)}"
    try:  # nested transformer depths: one per resnet layer, and the reverse list for the up blocks
        transformer_depths(full, per_block(full, "layers_per_block", len(full["block_out_channels"])))
    except NpdiffError as error:
        return str(error)
    return None


def _vae_unsupported(full):
    blocks = len(full["block_out_channels"])
    for key, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(full[key]) != [name] * blocks:
            return f"{key}={full[key]!r} is not supported; expected {blocks} x {name!r}"
    if full["act_fn"] not in ("silu", "swish"):
        return f"act_fn={full['act_fn']!r} is not supported; expected 'silu'"
    if full["shift_factor"] not in (None, 0, 0.0) or full["latents_mean"] is not None:
        return ("shift_factor/latents_mean belong to SD3- and Playground-style VAEs; not supported (the SD and SDXL "
                "VAEs have null)")
    return None


def _text_encoder_unsupported(full):
    if full["hidden_act"] not in CLIP_ACTIVATIONS:
        return f"hidden_act {full['hidden_act']!r} is not supported; known: {', '.join(CLIP_ACTIVATIONS)}"
    return None


UNSUPPORTED = {"unet": _unet_unsupported, "vae": _vae_unsupported, "text_encoder": _text_encoder_unsupported,
               "scheduler": lambda full: None}  # the scheduler classes say what they support


# ---------------------------------------------------------------------------------------------
# The check, once per config
# ---------------------------------------------------------------------------------------------
class CheckedConfig(dict):
    """A config that passed check_component_config for `component` (not to be changed afterwards: a
    changed config is a new dict, checked again)."""

    def __init__(self, component, config):
        super().__init__(config)
        self.component = component


def check_component_config(component, config, source=None):
    """The config as given, marked as checked; NpdiffError naming `source`, the key, the rule and the
    value for the first value that breaks a rule (or asks for what is not supported)."""
    if isinstance(config, CheckedConfig) and config.component == component:
        return config
    where = source or f"{component} config"
    if not isinstance(config, dict):
        raise NpdiffError(f"{where}: expected a JSON object of settings, got {type(config).__name__}")
    # 1. each value against its rule
    for key, rule in RULES[component].items():
        if key in config:
            expected = rule(config[key])
            if expected:
                raise NpdiffError(f"{where}: {key} must be {expected}, got {config[key]!r}")
    # 2. the rules that need two keys, with the defaults filled in
    full = {**DEFAULTS[component], **config}
    failed = _cross_checks(component, full)
    if failed:
        key, message = failed
        raise NpdiffError(f"{where}: {key} {message}")
    # 3. what the network built here supports
    unsupported = UNSUPPORTED[component](full)
    if unsupported:
        raise NpdiffError(f"{where}: {unsupported}")
    return CheckedConfig(component, config)


def full_config(component, config):
    """The config (checked here unless the loader checked it) with the defaults filled in."""
    return {**DEFAULTS[component], **check_component_config(component, config)}
