"""Tiled VAE decode and encode: diffusers' `AutoencoderKL.enable_tiling()`, one tile at a time.

    vae.enable_tiling()                      # vae.use_tiling = True (vae.disable_tiling() turns it off)
    vae.tile_sample_min_size = 256           # optional: the tile in pixels, with
    vae.tile_latent_min_size = 32            #   the same tile in latents (pixels / the VAE's factor)
    image = vae.decode(z)                    # tiled when h or w > tile_latent_min_size
    posterior = vae.encode(x)                # tiled when H or W > tile_sample_min_size
    image = vae.decode(z, tiling=True)       # this call in tiles, whatever use_tiling says (False: untiled)

The geometry is diffusers' (models/autoencoders/autoencoder_kl.py: tiled_decode, _tiled_encode), with
tile_sample_min_size = the config's sample_size (512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL),
tile_latent_min_size = that / the VAE's factor, tile_overlap_factor = 0.25. For a decode (in latents
the input, in pixels the output; an encode swaps the two):
  1. tiles of tile_latent_min_size latents start every stride = int(tile * (1 - overlap)) latents, row by
     row, left to right, the last ones cut by the picture's edge; each is decoded on its own;
  2. each decoded tile is blended into the one above and the one to its left over
     blend = int(tile_sample_min_size * overlap) pixels: row y of the overlap is
     above * (1 - y/blend) + this * (y/blend) (blend_v; blend_h the same over columns), the above tile
     and the left one taken as already blended themselves (diffusers blends them in place);
  3. the top-left keep = tile_sample_min_size - blend pixels of each tile go into the picture.
The pieces add up to the picture (keep = stride x factor) when the tile is a multiple of 4 x the factor
at overlap 0.25; other sizes are refused by name (check_tiling), where diffusers would return a picture
of the wrong size.

Memory: diffusers keeps every decoded tile until all are blended (about 1.8x the picture at overlap 0.25).
Here each tile is blended and written into the output as soon as it is decoded; what is kept of it for
its neighbours is its bottom `blend` rows (for the tile below) and its right `blend` columns (for the
tile to its right). The peak is the output [B,3,H,W] plus one tile's activations, whatever the picture's
size: a 2048x2048 SD decode at the default 512-pixel tile needs the activations of a 512x512 decode.
"""

import numbers
import numpy as np

from npdiff.backend import array_module
from npdiff.errors import NpdiffError, shorten

DEFAULT_SAMPLE_SIZE = 32  # diffusers' AutoencoderKL default sample_size, for a config without one
TILE_OVERLAP_FACTOR = 0.25


def default_tile_sizes(config, factor):
    """-> (tile_sample_min_size, tile_latent_min_size) from the config's sample_size, as diffusers sets them."""
    sample_size = config.get("sample_size", DEFAULT_SAMPLE_SIZE)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]  # diffusers takes the first of [height, width] for the latent tile
    return int(sample_size), int(sample_size / factor)


class TileGeometry:
    """One direction's tiling (decode: latents in, pixels out; encode: pixels in, latents out).

    tile, stride: the input tile and the distance between tile starts, in input units; blend, keep: the
    blended and the kept rows of an output tile; scale: output units per input unit."""

    def __init__(self, tile, stride, blend, keep, scale):
        self.tile, self.stride, self.blend, self.keep, self.scale = tile, stride, blend, keep, scale

    def starts(self, size):
        """Where the tiles along an input side of `size` begin: 0, stride, 2*stride, ... < size."""
        return range(0, size, self.stride)


def decode_geometry(vae):
    """diffusers' tiled_decode: latent tiles of tile_latent_min_size, blended over pixels."""
    overlap = vae.tile_overlap_factor
    return TileGeometry(tile=vae.tile_latent_min_size, stride=int(vae.tile_latent_min_size * (1 - overlap)),
                        blend=int(vae.tile_sample_min_size * overlap),
                        keep=vae.tile_sample_min_size - int(vae.tile_sample_min_size * overlap),
                        scale=vae.downscale)


def encode_geometry(vae):
    """diffusers' _tiled_encode: pixel tiles of tile_sample_min_size, blended over latents."""
    overlap = vae.tile_overlap_factor
    return TileGeometry(tile=vae.tile_sample_min_size, stride=int(vae.tile_sample_min_size * (1 - overlap)),
                        blend=int(vae.tile_latent_min_size * overlap),
                        keep=vae.tile_latent_min_size - int(vae.tile_latent_min_size * overlap),
                        scale=1 / vae.downscale)


def check_tiling(vae):
    """NpdiffError naming the attribute when the VAE's tile sizes cannot tile a picture exactly.

    tile_sample_min_size must be a positive multiple of 4 x the VAE's factor (8 for SD) when the overlap is
    0.25 (in general: both strides and blends must land on whole latents and pixels), and
    tile_latent_min_size the same tile in latents."""
    factor = vae.downscale
    sample, latent, overlap = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
    for name, value in (("tile_sample_min_size", sample), ("tile_latent_min_size", latent)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise NpdiffError(f"vae.{name} must be a positive integer, got {value!r}")
    if not isinstance(overlap, numbers.Real) or isinstance(overlap, bool) or not 0 <= overlap < 1:  # NumPy's too
        raise NpdiffError(f"vae.tile_overlap_factor must be a number in [0, 1), got {overlap!r}")
    if sample % factor or latent * factor != sample:
        raise NpdiffError(f"vae.tile_sample_min_size ({sample} pixels) must be a multiple of the VAE's factor "
                          f"{factor}, and vae.tile_latent_min_size ({latent}) that size / {factor} "
                          f"(= {sample / factor:g})")
    decode, encode = decode_geometry(vae), encode_geometry(vae)
    if decode.stride < 1 or decode.keep != decode.stride * factor or encode.keep * factor != encode.stride:
        raise NpdiffError(f"vae.tile_sample_min_size {sample} pixels at tile_overlap_factor {overlap:g} does not "
                          f"tile a picture exactly (the tiles would not add up to it): use a multiple of "
                          f"{4 * factor} pixels (4 x the VAE's factor {factor}) at overlap 0.25, e.g. "
                          f"{max(4 * factor, sample - sample % (4 * factor))}")


def blend_v(above, tile, blend):
    """tile's top rows <- above's bottom rows faded into them (diffusers' blend_v), in place.

    above: [B,C,a,W] (a >= the overlap: its bottom rows are what counts); tile: [B,C,h,W]."""
    extent = min(above.shape[2], tile.shape[2], blend)
    if extent == 0:
        return tile
    xp = array_module(tile)
    fraction = np.arange(extent) / extent                                         # y / extent, float64
    to_tile = xp.asarray(fraction.astype(np.float32)).reshape(extent, 1)          # [e,1]
    to_above = xp.asarray((1 - fraction).astype(np.float32)).reshape(extent, 1)   # [e,1]
    rows = above[:, :, above.shape[2] - extent:, :]                               # [B,C,e,W]
    tile[:, :, :extent, :] = rows * to_above + tile[:, :, :extent, :] * to_tile   # [B,C,e,W]
    return tile


def blend_h(left, tile, blend):
    """tile's left columns <- left's right columns faded into them (diffusers' blend_h), in place."""
    extent = min(left.shape[3], tile.shape[3], blend)
    if extent == 0:
        return tile
    xp = array_module(tile)
    fraction = np.arange(extent) / extent                                         # x / extent, float64
    to_tile = xp.asarray(fraction.astype(np.float32))                             # [e]
    to_left = xp.asarray((1 - fraction).astype(np.float32))                       # [e]
    columns = left[:, :, :, left.shape[3] - extent:]                              # [B,C,H,e]
    tile[:, :, :, :extent] = columns * to_left + tile[:, :, :, :extent] * to_tile  # [B,C,H,e]
    return tile


def run_tiled(source, geometry, run_tile, out_channels):
    """source [B,C,H,W] -> [B,out_channels,H*scale,W*scale]: run_tile on each tile, blended and placed at once.

    Steps 1-3 of the module docstring, with only the strips the next tiles blend with kept."""
    xp = array_module(source)
    batch, _, height, width = source.shape
    out = xp.empty((batch, out_channels, round(height * geometry.scale), round(width * geometry.scale)),
                   dtype=source.dtype)                                            # [B,C',H',W']
    bottom_strips = {}  # column index -> the blended tile's bottom rows, for the tile below it
    top = 0
    for row, y in enumerate(geometry.starts(height)):
        right_strip = None  # the blended tile to the left's right columns
        left = 0
        for column, x in enumerate(geometry.starts(width)):
            # 1. one tile, on its own
            piece = xp.ascontiguousarray(source[:, :, y:y + geometry.tile, x:x + geometry.tile])  # [B,C,t,t]
            tile = run_tile(piece)                                                # [B,C',t',t']
            # 2. blend with the tile above and the tile to the left (both already blended)
            if row > 0:
                blend_v(bottom_strips[column], tile, geometry.blend)
            if column > 0:
                blend_h(right_strip, tile, geometry.blend)
            rows, columns = tile.shape[2], tile.shape[3]
            bottom_strips[column] = tile[:, :, rows - min(geometry.blend, rows):, :].copy()         # [B,C',b,t']
            right_strip = tile[:, :, :, columns - min(geometry.blend, columns):].copy()             # [B,C',t',b]
            # 3. its kept corner into the picture
            kept = tile[:, :, :geometry.keep, :geometry.keep]                    # [B,C',k,k] (less at edges)
            out[:, :, top:top + kept.shape[2], left:left + kept.shape[3]] = kept
            left += kept.shape[3]
            del tile, piece
        top += kept.shape[2]
    if (top, left) != out.shape[2:]:  # check_tiling rules this out; a wrong picture must never pass silently
        raise NpdiffError(f"tiled VAE: the tiles covered {top}x{left} of {out.shape[2]}x{out.shape[3]}")
    return out


def tiling_choice(vae, tiling):
    """A call's tiling argument -> whether tiling is on: True/False (numpy's bools too) decide, None leaves it
    to the VAE's use_tiling (which must be True or False too); anything else is an NpdiffError (tiling="no"
    would be true for bool())."""
    if tiling is None:
        use_tiling = getattr(vae, "use_tiling", False)
        if not isinstance(use_tiling, (bool, np.bool_)):
            raise NpdiffError(f"vae.use_tiling must be True or False (vae.enable_tiling() / disable_tiling() set "
                              f"it), got {shorten(use_tiling)}")
        return bool(use_tiling)
    if not isinstance(tiling, (bool, np.bool_)):
        raise NpdiffError(f"tiling must be True, False or None (the VAE's use_tiling), got {shorten(tiling)}")
    return bool(tiling)


def tiles_decode(vae, height, width, tiling=None):
    """Whether vae.decode tiles latents of h x w (diffusers: use_tiling and a side > tile_latent_min_size);
    tiling: the call's own choice (True: tiles), None: the VAE's use_tiling."""
    return tiling_choice(vae, tiling) and max(height, width) > vae.tile_latent_min_size


def tiles_encode(vae, height, width, tiling=None):
    """Whether vae.encode tiles a picture of H x W (diffusers: use_tiling and a side > tile_sample_min_size)."""
    return tiling_choice(vae, tiling) and max(height, width) > vae.tile_sample_min_size


def tiled_decode(vae, z):
    """Latents [B,Lc,h,w] (already divided by scaling_factor) -> image [B,3,h*f,w*f], tile by tile."""
    check_tiling(vae)

    def decode_tile(tile):
        if vae.post_quant_conv is not None:
            tile = vae.post_quant_conv(tile)                                      # [B,Lc,t,t]
        return vae.decoder(tile)                                                  # [B,Lc,t,t] -> [B,3,tf,tf]

    return run_tiled(z, decode_geometry(vae), decode_tile, vae.config["out_channels"])


def tiled_encode(vae, x):
    """Image [B,3,H,W] -> moments [B,2*Lc,H/f,W/f] (before DiagonalGaussian), tile by tile."""
    check_tiling(vae)

    def encode_tile(tile):
        moments = vae.encoder(tile)                                               # [B,3,t,t] -> [B,2Lc,t/f,t/f]
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)                                     # [B,2Lc,t/f,t/f]
        return moments

    return run_tiled(x, encode_geometry(vae), encode_tile, 2 * vae.config["latent_channels"])


def tiling_argument(vae, on):
    """-> the keyword arguments of vae.decode/vae.encode that tile one call when `on` (the memory check's
    choice): {"tiling": True}; {} when `on` is false (the VAE's own use_tiling then) or for a VAE without
    tiling (TAESD). The VAE itself is left as it is, so another thread's calls meanwhile keep its setting."""
    return {"tiling": True} if on and hasattr(vae, "use_tiling") else {}
