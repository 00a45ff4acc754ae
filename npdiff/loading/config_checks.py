"""Every config value type- and range-checked on load, as one table of rules per component.

    check_component_config(component, config, source)   NpdiffError naming `source` (the config file),
                                                         the key, what it must be and what it is

component is "unet", "vae", "text_encoder" or "scheduler". A key absent from the config is not checked
(the model fills in diffusers' default); a key present must satisfy its rule. After the per-key rules,
a few cross-checks that need two keys (group counts that divide the channels, heads that divide the
width, per-block lists as long as block_out_channels, beta_start <= beta_end).

What this prevents: a config.json with `norm_num_groups: 0`, `block_out_channels: []`,
`hidden_size: "64"`, `attention_head_dim: 0` or `beta_start: -1` used to fail deep inside the model with
ZeroDivisionError, IndexError, TypeError or a complex-number TypeError; a VAE `scaling_factor` of 0 or
NaN or a negative `norm_eps` used to give an all-black picture and exit code 0.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError


# ---------------------------------------------------------------------------------------------
# Rules: each returns None when the value is fine, else what the value must be
# ---------------------------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class Int:
    def __init__(self, least=1, odd=False, most=None):
        self.least, self.odd, self.most = least, odd, most

    def __call__(self, value):
        if (not _is_int(value) or value < self.least or (self.odd and value % 2 != 1)
                or (self.most is not None and value > self.most)):
            return (f"an integer >= {self.least}" + (f" and <= {self.most}" if self.most is not None else "")
                    + (" and odd" if self.odd else ""))
        return None


class IntIn:
    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, value):
        return None if _is_int(value) and value in self.choices else f"one of {', '.join(map(str, self.choices))}"


class Float:
    """A finite number in [low, high]; `above` makes the low end open (value > low)."""

    def __init__(self, low=-math.inf, high=math.inf, above=False):
        self.low, self.high, self.above = low, high, above

    def __call__(self, value):
        ok = _is_number(value) and math.isfinite(float(value))
        if ok:
            value = float(value)
            ok = (value > self.low if self.above else value >= self.low) and value <= self.high
        if ok:
            return None
        low = f"> {self.low:g}" if self.above else (f">= {self.low:g}" if self.low > -math.inf else "")
        high = f"<= {self.high:g}" if self.high < math.inf else ""
        return "a finite number" + (" " + " and ".join(x for x in (low, high) if x) if low or high else "")


class Bool:
    def __call__(self, value):
        return None if isinstance(value, (bool, np.bool_)) else "true or false"


class OneOf:
    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, value):
        if isinstance(value, (str, type(None))) and value in self.choices:
            return None
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Text:
    def __call__(self, value):
        return None if isinstance(value, str) and value else "a non-empty string"


class ListOf:
    """A non-empty list of items that each pass `item`."""

    def __init__(self, item):
        self.item = item

    def __call__(self, value):
        if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0 or any(self.item(v) for v in value):
            return f"a non-empty list, each {self.item(None)}"
        return None


class OneOrList:
    """One value or a per-block list (its length is cross-checked against block_out_channels)."""

    def __init__(self, item):
        self.item = item

    def __call__(self, value):
        if isinstance(value, (list, tuple)):
            return ListOf(self.item)(value) and f"{self.item(None)} or a non-empty list of them"
        return self.item(value) and f"{self.item(None)} or a per-block list of them"


class Optional:
    def __init__(self, rule):
        self.rule = rule

    def __call__(self, value):
        return None if value is None else (self.rule(value) and f"null or {self.rule(value)}")


POSITIVE = Int(1)
EPS = Float(0.0, 1.0, above=True)

RULES = {
    "unet": {
        "sample_size": POSITIVE, "in_channels": POSITIVE, "out_channels": POSITIVE,
        "block_out_channels": ListOf(POSITIVE), "down_block_types": ListOf(Text()),
        "up_block_types": ListOf(Text()), "layers_per_block": OneOrList(POSITIVE),
        "attention_head_dim": OneOrList(POSITIVE), "cross_attention_dim": OneOrList(POSITIVE),
        "transformer_layers_per_block": OneOrList(OneOrList(POSITIVE)),  # SDXL: per block, per layer
        "reverse_transformer_layers_per_block": Optional(ListOf(OneOrList(POSITIVE))),
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
        "up_block_types": ListOf(Text()), "layers_per_block": POSITIVE, "norm_num_groups": POSITIVE,
        "scaling_factor": Float(0.0, above=True), "sample_size": OneOrList(POSITIVE), "act_fn": Text(),
        "mid_block_add_attention": Bool(), "use_quant_conv": Bool(), "use_post_quant_conv": Bool(),
        "force_upcast": Bool(),
    },
    "text_encoder": {
        "vocab_size": POSITIVE, "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
        "num_hidden_layers": POSITIVE, "num_attention_heads": POSITIVE, "max_position_embeddings": POSITIVE,
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


# ---------------------------------------------------------------------------------------------
# Cross-checks: rules that need two keys (given the defaults the model would fill in)
# ---------------------------------------------------------------------------------------------
def _defaults(component):
    if component == "unet":
        from npdiff.models.unet import DEFAULTS
    elif component == "vae":
        from npdiff.models.vae import DEFAULTS
    elif component == "text_encoder":
        from npdiff.models.clip import CONFIG_DEFAULTS as DEFAULTS
    else:
        DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02}
    return DEFAULTS


def _cross_checks(component, full):
    """-> (key, message) of the first cross-check that fails, else None."""
    if component in ("unet", "vae"):
        channels = list(full["block_out_channels"])
        groups = full["norm_num_groups"]
        bad = [c for c in channels if c % groups]
        if bad:
            return "norm_num_groups", f"must divide every block_out_channels entry; {groups} does not divide {bad[0]}"
        for key in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                    "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            value = full.get(key)
            if isinstance(value, (list, tuple)) and len(value) != len(channels):
                return key, f"has {len(value)} entries; block_out_channels has {len(channels)} (one per block)"
    if component == "unet":
        heads = full["attention_head_dim"]
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(full["block_out_channels"])
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


def check_component_config(component, config, source=None):
    """NpdiffError naming `source`, the key, the rule and the value for the first value that breaks a rule."""
    where = source or f"{component} config"
    if not isinstance(config, dict):
        raise NpdiffError(f"{where}: expected a JSON object of settings, got {type(config).__name__}")
    rules = RULES[component]
    for key, rule in rules.items():
        if key in config:
            expected = rule(config[key])
            if expected:
                raise NpdiffError(f"{where}: {key} must be {expected}, got {config[key]!r}")
    full = {**_defaults(component), **config}
    failed = _cross_checks(component, full)
    if failed:
        key, message = failed
        raise NpdiffError(f"{where}: {key} {message}")
    return config
