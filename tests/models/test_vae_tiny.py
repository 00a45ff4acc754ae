"""npdiff's AutoencoderTiny (TAESD) against diffusers' on tiny random models saved with save_pretrained
(tests/tiny_models.py "taesd" kinds): encode and decode within 1e-4 on fresh random inputs; bad folders
and configs raise NpdiffError naming the key."""

import json

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from safetensors.torch import load_file, save_file
from tiny_models import TAESD_KINDS, tiny_taesd

from npdiff.errors import NpdiffError
from npdiff.loading import load_component_weights
from npdiff.models import AutoencoderTiny


@pytest.fixture(scope="module", params=sorted(TAESD_KINDS))
def taesd_pair(request):
    torch_model, folder = tiny_taesd(request.param, seed=0)
    return request.param, torch_model, AutoencoderTiny.from_pretrained(folder)


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 40, 24), (1, 36, 20)])
def test_encode_matches_diffusers(taesd_pair, rng, batch, height, width):
    kind, torch_model, ours = taesd_pair
    image = rng.uniform(-1.0, 1.0, (batch, 3, height, width)).astype(np.float32)
    out = ours.encode(image).latents
    with torch.no_grad():
        ref = torch_model.encode(torch.from_numpy(image)).latents
    assert out.shape == tuple(ref.shape) and out.dtype == np.float32
    assert_rel_close(out, ref, NETWORK_TOL, f"taesd {kind} encode {height}x{width}")


@pytest.mark.parametrize("batch,height,width", [(1, 8, 8), (2, 5, 3), (1, 4, 7)])
def test_decode_matches_diffusers(taesd_pair, rng, batch, height, width):
    kind, torch_model, ours = taesd_pair
    latents = rng.standard_normal((batch, ours.config["latent_channels"], height, width)).astype(np.float32)
    latents *= np.float32(rng.uniform(0.5, 4.0))  # the tanh clamp at +-3 is exercised too
    out = ours.decode(latents)
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(latents)).sample
    assert out.shape == tuple(ref.shape) and out.dtype == np.float32
    assert_rel_close(out, ref, NETWORK_TOL, f"taesd {kind} decode {height}x{width}")


def test_config_and_latent_scaling_like_diffusers(taesd_pair, rng):
    kind, torch_model, ours = taesd_pair
    assert list(ours.config["block_out_channels"]) == list(torch_model.config.block_out_channels)
    assert ours.scaling_factor == torch_model.config.scaling_factor
    latents = rng.standard_normal((1, ours.config["latent_channels"], 4, 4)).astype(np.float32) * 4
    scaled = ours.scale_latents(latents)
    assert_rel_close(scaled, torch_model.scale_latents(torch.from_numpy(latents)), 1e-6, "scale_latents")
    assert_rel_close(ours.unscale_latents(scaled), torch_model.unscale_latents(torch.from_numpy(scaled)), 1e-6,
                     "unscale_latents")


def copy_folder(folder, tmp_path, change_weights=None, change_config=None):
    """The TAESD folder copied, with its weights dict / config dict changed in place by the given functions."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if change_weights:
        change_weights(tensors)
    if change_config:
        change_config(config)
    target = tmp_path / "taesd-changed"
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"))
    return target


def test_missing_and_extra_keys_are_named(tmp_path):
    _, folder = tiny_taesd("sd", seed=0)
    missing = copy_folder(folder, tmp_path / "a", change_weights=lambda t: t.pop("decoder.layers.6.conv.2.bias"))
    with pytest.raises(NpdiffError, match=r"missing key 'decoder\.layers\.6\.conv\.2\.bias'"):
        AutoencoderTiny.from_pretrained(missing)
    extra = copy_folder(folder, tmp_path / "b",
                        change_weights=lambda t: t.update({"encoder.layers.1.skip.weight": torch.zeros(16, 16, 1, 1)}))
    with pytest.raises(NpdiffError, match=r"unexpected key.*'encoder\.layers\.1\.skip\.weight'"):
        AutoencoderTiny.from_pretrained(extra)
    # a config that disagrees with the weights (one decoder block fewer): the first unused key is named
    fewer = copy_folder(folder, tmp_path / "c", change_config=lambda c: c.update(num_decoder_blocks=[1, 1, 2, 1]))
    with pytest.raises(NpdiffError, match=r"decoder\.layers\."):
        AutoencoderTiny.from_pretrained(fewer)


@pytest.mark.parametrize("key,value,message", [
    ("act_fn", "mish", "act_fn='mish' is not supported"),
    ("upsample_fn", "bilinear", "upsample_fn='bilinear'"),
    ("upsampling_scaling_factor", 4, "upsampling_scaling_factor=4"),
    ("encoder_block_out_channels", [16, 16, 32, 16], "encoder_block_out_channels.*must all be equal"),
    ("num_decoder_blocks", [1, 1, 1], "num_decoder_blocks has 3"),
    ("num_encoder_blocks", "3", "num_encoder_blocks must be a non-empty list"),
    ("latent_channels", 0, "latent_channels must be an integer"),
    ("scaling_factor", "1.0", "scaling_factor must be a finite number"),
])
def test_bad_config_values_name_the_key(key, value, message):
    _, folder = tiny_taesd("sd", seed=0)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(NpdiffError, match=message):
        AutoencoderTiny({**config, key: value}, load_component_weights(folder))


def test_bad_inputs(taesd_pair):
    _, _, ours = taesd_pair
    with pytest.raises(NpdiffError, match=r"image must have shape \[B,3,H,W\]"):
        ours.encode(np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(NpdiffError, match="latents must have shape"):
        ours.decode(np.zeros((1, 5, 4, 4), np.float32))
