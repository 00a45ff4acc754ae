"""Tiled VAE decode and encode (npdiff/models/vae_tiling.py) against diffusers' AutoencoderKL.enable_tiling().

Both sides load the same tiny random VAE (tests/tiny_models.py) and set the same tile sizes, small enough that a
small picture has several rows and columns of tiles, edge tiles of one latent included. Compared: the decoded
pictures (relative 1e-4 and 2 levels in 8-bit), the encoder's mean and logvar (relative 1e-4); that a picture
no larger than a tile is not tiled (diffusers' rule); diffusers' default tile sizes; that the tiled decode
holds one tile's activations and the output, not the whole picture's activations (traced with tracemalloc);
tile sizes that cannot tile a picture refused by name.
"""

import tracemalloc

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close, rel_err
from tiny_models import VAE_KINDS, tiny_vae

from npdiff import memory_estimate
from npdiff.errors import NpdiffError
from npdiff.kernels.block_pool import worker_count
from npdiff.models import AutoencoderKL

# pixels per tile, per kind: a multiple of 4 x the VAE's factor (8 for "sd", 4 for "deep")
TILE_PIXELS = {"sd": 32, "deep": 16}


@pytest.fixture(scope="module", params=list(VAE_KINDS))
def tiled_pair(request):
    """(kind, diffusers VAE, npdiff VAE), both with tiling on at TILE_PIXELS."""
    torch_model, folder = tiny_vae(request.param, seed=0)
    ours = AutoencoderKL.from_pretrained(folder)
    for model in (torch_model, ours):
        model.enable_tiling()
        model.tile_sample_min_size = TILE_PIXELS[request.param]
        model.tile_latent_min_size = TILE_PIXELS[request.param] // ours.downscale
    yield request.param, torch_model, ours
    torch_model.disable_tiling()


def to_levels(pictures):
    """[-1,1] pictures -> 8-bit levels, as the pipelines round them."""
    return np.round(np.clip(np.asarray(pictures) / 2 + 0.5, 0, 1) * 255).astype(np.int16)


def test_tiled_decode_matches_diffusers(tiled_pair, rng):
    kind, torch_model, ours = tiled_pair
    tile = ours.tile_latent_min_size
    batch = int(rng.integers(1, 3))
    height, width = (int(side) for side in rng.integers(tile + 1, 3 * tile + 2, size=2))  # 2-4 tiles a side
    z = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
    image = ours.decode(z)
    with torch.no_grad():
        theirs = torch_model.decode(torch.from_numpy(z)).sample.numpy()
    assert image.shape == theirs.shape == (batch, 3, height * ours.downscale, width * ours.downscale)
    assert_rel_close(image, theirs, NETWORK_TOL, f"{kind} tiled decode {height}x{width}")
    worst = int(np.abs(to_levels(image) - to_levels(theirs)).max())
    assert worst <= IMAGE_LEVELS_TOL, f"{kind} tiled decode: 8-bit pictures differ by {worst} levels"
    ours.disable_tiling()
    try:
        whole = ours.decode(z)  # the tiles must matter, or this test would not test them
    finally:
        ours.enable_tiling()
    assert rel_err(image, whole) > 100 * NETWORK_TOL


def test_tiled_encode_matches_diffusers(tiled_pair, rng):
    kind, torch_model, ours = tiled_pair
    f, tile = ours.downscale, ours.tile_sample_min_size
    batch = int(rng.integers(1, 3))
    height, width = (int(side) * f for side in rng.integers(tile // f + 1, 3 * tile // f + 2, size=2))
    x = rng.uniform(-1.0, 1.0, size=(batch, 3, height, width)).astype(np.float32)
    posterior = ours.encode(x)
    with torch.no_grad():
        theirs = torch_model.encode(torch.from_numpy(x)).latent_dist
    assert posterior.mean.shape == tuple(theirs.mean.shape) == (batch, 4, height // f, width // f)
    assert_rel_close(posterior.mean, theirs.mean, NETWORK_TOL, f"{kind} tiled encode mean")
    assert_rel_close(posterior.logvar, theirs.logvar, NETWORK_TOL, f"{kind} tiled encode logvar")


def test_no_tiles_up_to_the_tile_size(tiled_pair, rng):
    """diffusers tiles only latents larger than tile_latent_min_size (pictures larger than
    tile_sample_min_size): up to that, tiling on gives the untiled result exactly."""
    kind, _, ours = tiled_pair
    tile = ours.tile_latent_min_size
    z = rng.standard_normal((1, 4, tile, int(rng.integers(1, tile + 1))), dtype=np.float32)
    x = rng.uniform(-1.0, 1.0, size=(1, 3, tile * ours.downscale, tile * ours.downscale)).astype(np.float32)
    tiled_image, tiled_mean = ours.decode(z), ours.encode(x).mean
    ours.disable_tiling()
    try:
        assert np.array_equal(tiled_image, ours.decode(z))
        assert np.array_equal(tiled_mean, ours.encode(x).mean)
    finally:
        ours.enable_tiling()


def test_tiling_argument_decides_for_one_call(tiled_pair, rng):
    """decode/encode(..., tiling=True/False) tile or not for that call whatever use_tiling says, and leave it."""
    kind, _, ours = tiled_pair
    f, tile = ours.downscale, ours.tile_latent_min_size
    z = rng.standard_normal((1, 4, 2 * tile + 1, 2 * tile), dtype=np.float32)          # several tiles
    x = rng.uniform(-1.0, 1.0, size=(1, 3, 2 * tile * f, (2 * tile + 1) * f)).astype(np.float32)
    tiled_image, tiled_mean = ours.decode(z), ours.encode(x).mean                      # use_tiling on
    whole_image, whole_mean = ours.decode(z, tiling=False), ours.encode(x, tiling=False).mean
    assert ours.use_tiling is True
    assert not np.array_equal(tiled_image, whole_image)  # the tiles show: the argument was heard
    ours.disable_tiling()
    try:
        assert np.array_equal(whole_image, ours.decode(z)) and np.array_equal(whole_mean, ours.encode(x).mean)
        assert np.array_equal(tiled_image, ours.decode(z, tiling=True))
        assert np.array_equal(tiled_mean, ours.encode(x, tiling=True).mean)
        assert ours.use_tiling is False
    finally:
        ours.enable_tiling()


@pytest.mark.parametrize("kind", list(VAE_KINDS))
def test_default_tile_sizes_are_diffusers(kind):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    _, folder = tiny_vae(kind, seed=0)
    torch_model = TorchAutoencoderKL.from_pretrained(folder)  # a fresh one: tiled_pair changes the cached one's
    ours = AutoencoderKL.from_pretrained(folder)
    assert ours.use_tiling is False
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (
        torch_model.tile_sample_min_size, torch_model.tile_latent_min_size, torch_model.tile_overlap_factor)
    ours.enable_tiling()
    assert ours.use_tiling is True
    ours.disable_tiling()
    assert ours.use_tiling is False


def traced_peak(call):
    """Peak bytes NumPy allocated during call() (NumPy reports its allocations to tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_tiled_decode_holds_one_tile_not_the_picture():
    """The peak of a tiled decode of 5 x 5 tiles is the output plus about one tile's decode, far below the
    whole picture's decode: each tile is blended and written into the output as soon as it is made."""
    _, folder = tiny_vae("sd", seed=0)
    vae = AutoencoderKL.from_pretrained(folder)
    rng = np.random.default_rng(0)
    tile = vae.tile_latent_min_size  # 8 latents: 64 pixels
    side = tile + 4 * (tile * 3 // 4)  # 5 tiles a side, the last one whole
    z = rng.standard_normal((1, 4, side, side), dtype=np.float32)
    vae.decode(z[:, :, :tile, :tile])  # compile the kernels outside the traced calls
    one_tile, _ = traced_peak(lambda: vae.decode(z[:, :, :tile, :tile]))
    whole, _ = traced_peak(lambda: vae.decode(z))
    vae.enable_tiling()
    tiled, image = traced_peak(lambda: vae.decode(z))
    assert tiled <= image.nbytes + 1.5 * one_tile, (tiled, image.nbytes, one_tile)
    assert tiled < whole / 3, (tiled, whole)


def test_tiled_estimate_is_within_a_factor_of_the_traced_peak():
    """memory_estimate's tiled VAE decode (one tile's activations, the output, the convolutions' im2col
    workspace at the tile's size) against tracemalloc's peak of the decode: between 0.5x and 4x."""
    _, folder = tiny_vae("sd", seed=0)
    vae = AutoencoderKL.from_pretrained(folder)
    vae.enable_tiling()
    tile, side = vae.tile_latent_min_size, 40
    z = np.random.default_rng(0).standard_normal((1, 4, side, side), dtype=np.float32)
    vae.decode(z[:, :, :tile, :tile])  # compile the kernels outside the traced call
    peak, _ = traced_peak(lambda: vae.decode(z))
    pixels = tile * vae.downscale
    estimate = (memory_estimate.vae_tiled_bytes(vae.config, 1, side, side, tile)
                + memory_estimate.conv_workspace_bytes(vae.config, pixels, pixels, worker_count()))
    assert 0.5 <= estimate / peak <= 4.0, f"estimate {estimate} vs traced peak {peak} bytes"


@pytest.mark.parametrize("attribute,value,named", [
    ("tile_sample_min_size", 36, "tile_sample_min_size"),      # not a multiple of the factor 8
    ("tile_sample_min_size", 40, "tile_sample_min_size"),      # a multiple of 8, not of 4 x 8: tiles would not add up
    ("tile_latent_min_size", 5, "tile_latent_min_size"),       # not tile_sample_min_size / 8
    ("tile_sample_min_size", 0, "tile_sample_min_size"),
    ("tile_sample_min_size", 32.0, "tile_sample_min_size"),
    ("tile_overlap_factor", 1.0, "tile_overlap_factor"),
    ("tile_overlap_factor", -0.5, "tile_overlap_factor"),
    ("tile_overlap_factor", True, "tile_overlap_factor"),
    ("tile_overlap_factor", "0.25", "tile_overlap_factor"),
])
def test_bad_tile_sizes_are_refused_by_name(attribute, value, named):
    _, folder = tiny_vae("sd", seed=0)
    vae = AutoencoderKL.from_pretrained(folder)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    if attribute == "tile_sample_min_size" and isinstance(value, int) and value % 8 == 0 and value:
        vae.tile_latent_min_size = value // 8  # the latent tile agrees: only the geometry is wrong
    setattr(vae, attribute, value)
    z = np.zeros((1, 4, 12, 12), dtype=np.float32)
    with pytest.raises(NpdiffError, match=named):
        vae.decode(z)
    with pytest.raises(NpdiffError, match=named):
        vae.encode(np.zeros((1, 3, 96, 96), dtype=np.float32))


@pytest.mark.parametrize("overlap", [np.float32(0.25), np.float64(0.25)])
def test_a_numpy_overlap_factor_tiles_as_the_float_does(overlap, rng):
    """np.float32(0.25) was refused as "must be a number in [0, 1)": a NumPy scalar is a number."""
    _, folder = tiny_vae("sd", seed=0)
    vae = AutoencoderKL.from_pretrained(folder)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    z = rng.standard_normal((1, 4, 12, 12), dtype=np.float32)
    expected = vae.decode(z)
    vae.tile_overlap_factor = overlap
    np.testing.assert_array_equal(vae.decode(z), expected)
