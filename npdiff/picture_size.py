"""Picture sizes: the rule a model's pictures follow and the largest side npdiff accepts, checked in pixels.

    multiple, why = size_rule(unet.config, vae_scale_factor)   # 64 for SD 1.x/2.x, 32 for SDXL, 16 for weights/
    height, width = check_size(height, width, multiple, why)    # NpdiffError naming the side, with sizes to try
    check_side("--height", value)                                # a positive int, at most MAX_SIDE

The pipelines, the command line, `npdiff batch` and `npdiff serve` check sizes with these before any work; the
memory and self-attention limits that depend on the whole picture are npdiff/memory_estimate.py's.
"""

import numpy as np

from npdiff.errors import NpdiffError, shorten


def size_rule(unet_config, vae_scale_factor):
    """-> (multiple, why): picture sides must be multiples of the VAE's cell times the UNet's downsampling.

    The VAE turns f x f pixels into one latent cell (f = 2^(VAE blocks - 1)); the UNet halves the latent
    (UNet blocks - 1) times and adds the skips back, so the latent side must divide by 2^(blocks - 1).
    In pixels: a multiple of f * 2^(UNet blocks - 1) (64 for SD 1.x/2.x), and at least 8.
    """
    halvings = len(unet_config["block_out_channels"]) - 1
    multiple = max(8, vae_scale_factor * 2 ** halvings)
    why = (f"the VAE works in {vae_scale_factor}-pixel cells and the UNet halves them {halvings} time"
           f"{'s' if halvings != 1 else ''}")
    return multiple, why


def integer_text(value):
    """An integer for a message: as it is up to 30 digits, else its order of magnitude (str() of a huge int is
    slow, and refused past 4300 digits)."""
    value = int(value)
    if value.bit_length() <= 96:
        return str(value)
    sign = "negative " if value < 0 else ""
    return f"a {sign}number of about {value.bit_length() * 30103 // 100000 + 1} digits"


# The largest picture side accepted, in pixels: four times the longest side of SDXL's aspect buckets (2048), twice
# a 4096 hires pass. Past it no model's UNet does useful work in reasonable time (memory_estimate's
# check_attention_size bounds the area).
MAX_SIDE = 8192


def check_side(name, value):
    """One picture side in pixels ("height" or "width"): a positive int, at most MAX_SIDE; -> it. Integer
    arithmetic only: a huge side is told the largest accepted, never a suggestion rounded from it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise NpdiffError(f"{name} must be a positive integer, got {shorten(value)}")
    if value <= 0:  # integer_text: repr() of a negative int of thousands of digits raises ValueError
        raise NpdiffError(f"{name} must be a positive integer, got {integer_text(value)}")
    if value > MAX_SIDE:
        raise NpdiffError(f"{name} must be at most {MAX_SIDE} pixels (the largest side npdiff accepts), "
                          f"got {integer_text(value)}")
    return int(value)


def check_size(height, width, multiple, why=None, names=("height", "width")):
    """Picture height/width in pixels: check_side's, then multiples of `multiple` (size_rule gives it and
    `why`). names: what the caller calls the two sides in messages (a batch line: "'height'", "'width'")."""
    for name, value in zip(names, (height, width)):
        check_side(name, value)
        if value % multiple != 0:
            because = f" pixels ({why})" if why else ""
            lower, upper = max(multiple, value - value % multiple), value - value % multiple + multiple
            raise NpdiffError(f"{name} must be a multiple of {multiple}{because}, got {value}; try "
                              f"{lower}" + (f" or {upper}" if upper != lower else ""))
    return int(height), int(width)
