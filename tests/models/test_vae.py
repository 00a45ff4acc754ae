"""npdiff's AutoencoderKL against diffusers' on tiny random VAEs (tests/tiny_models.py).

decode, encode (mean, std, logvar) and the posterior sample with the torch-exact generator are
compared with diffusers; intermediate activations of the encoder/decoder blocks through forward
hooks. Tolerance 1e-5 (the policy allows 1e-4 for a network; measured ~1e-6 on these models).
"""

import json

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, assert_rel_close
from tiny_models import VAE_KINDS, record_npdiff, record_torch, tiny_vae

from npdiff.errors import NpdiffError
from npdiff.models import AutoencoderKL

FORWARD_TOL = KERNEL_TOL


@pytest.fixture(scope="module", params=list(VAE_KINDS))
def vae_pair(request):
    """(kind, torch model, npdiff model) loaded from the same diffusers folder."""
    torch_model, folder = tiny_vae(request.param, seed=0)
    return request.param, torch_model, AutoencoderKL.from_pretrained(folder)


def random_latents(rng, batch, height, width):
    return rng.standard_normal((batch, 4, height, width), dtype=np.float32)


def random_image(rng, batch, height, width):
    return rng.uniform(-1.0, 1.0, size=(batch, 3, height, width)).astype(np.float32)


@pytest.mark.parametrize("batch,height,width", [(2, 4, 6), (1, 6, 10)])
def test_vae_decode_matches_diffusers(vae_pair, rng, batch, height, width):
    kind, torch_model, ours = vae_pair
    z = random_latents(rng, batch, height, width)
    image = ours.decode(z)
    f = ours.downscale
    assert image.shape == (batch, 3, height * f, width * f) and image.dtype == np.float32
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(z)).sample
    assert_rel_close(image, ref, FORWARD_TOL, f"vae {kind} decode")


@pytest.mark.parametrize("batch,height,width", [(1, 8, 8), (2, 4, 6)])
def test_vae_encode_matches_diffusers(vae_pair, rng, batch, height, width):
    kind, torch_model, ours = vae_pair
    f = ours.downscale
    x = random_image(rng, batch, height * f, width * f)
    posterior = ours.encode(x)
    with torch.no_grad():
        ref = torch_model.encode(torch.from_numpy(x)).latent_dist
    assert posterior.mean.shape == (batch, 4, height, width)
    assert_rel_close(posterior.mean, ref.mean, FORWARD_TOL, f"vae {kind} encode mean")
    assert_rel_close(posterior.logvar, ref.logvar, FORWARD_TOL, f"vae {kind} encode logvar")
    assert_rel_close(posterior.std, ref.std, FORWARD_TOL, f"vae {kind} encode std")


def test_vae_scaling_factor_from_config(vae_pair):
    kind, torch_model, ours = vae_pair
    assert ours.scaling_factor == VAE_KINDS[kind]["scaling_factor"] == torch_model.config.scaling_factor


def test_vae_scaling_factor_default():
    _, folder = tiny_vae("sd", seed=0)
    from npdiff.loading import load_component_weights

    config = json.loads((folder / "config.json").read_text())
    del config["scaling_factor"]
    assert AutoencoderKL(config, load_component_weights(folder)).scaling_factor == 0.18215


ENCODER_PATHS = ["encoder.down_blocks.0", "encoder.down_blocks.1.resnets.0", "encoder.mid_block",
                 "encoder.mid_block.attentions.0"]
DECODER_PATHS = ["decoder.mid_block", "decoder.mid_block.attentions.0", "decoder.up_blocks.0",
                 "decoder.up_blocks.1.resnets.0", "decoder.up_blocks.2"]


def test_vae_block_activations_match_diffusers(vae_pair, rng):
    kind, torch_model, _ = vae_pair
    _, folder = tiny_vae(kind, seed=0)
    ours = AutoencoderKL.from_pretrained(folder)        # fresh: its blocks get wrapped
    f = ours.downscale
    x = random_image(rng, 2, 4 * f, 6 * f)
    z = random_latents(rng, 2, 4, 6)
    paths = ENCODER_PATHS + DECODER_PATHS
    theirs, handles = record_torch(torch_model, paths)
    try:
        with torch.no_grad():
            torch_model.encode(torch.from_numpy(x))
            torch_model.decode(torch.from_numpy(z))
    finally:
        for handle in handles:
            handle.remove()
    mine = record_npdiff(ours, paths)
    ours.encode(x)
    ours.decode(z)
    for path in paths:
        assert_rel_close(mine[path][1], theirs[path][1], KERNEL_TOL, f"vae {kind} {path}")


def test_vae_sample_matches_diffusers_generator(vae_pair, rng, seed):
    """posterior.sample(TorchGenerator(s)) == diffusers' latent_dist.sample(torch.Generator().manual_seed(s))."""
    from npdiff.rng import TorchGenerator

    kind, torch_model, ours = vae_pair
    f = ours.downscale
    x = random_image(rng, 2, 4 * f, 8 * f)
    with torch.no_grad():
        ref = torch_model.encode(torch.from_numpy(x)).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
    sample = ours.encode(x).sample(TorchGenerator(seed))
    assert sample.shape == (2, 4, 4, 8) and sample.dtype == np.float32
    assert_rel_close(sample, ref, FORWARD_TOL, f"vae {kind} posterior sample")


def test_vae_bad_inputs_raise(vae_pair, rng):
    _, _, ours = vae_pair
    f = ours.downscale
    with pytest.raises(NpdiffError, match=r"latents must have shape \[B,4,h,w\]"):
        ours.decode(random_latents(rng, 1, 4, 4)[:, :3])
    with pytest.raises(NpdiffError, match=r"image must have shape \[B,3,H,W\]"):
        ours.encode(random_image(rng, 1, 4 * f, 4 * f)[:, :2])
    with pytest.raises(NpdiffError, match=f"multiples of {f}; got {4 * f}x{4 * f + 1}"):
        ours.encode(np.zeros((1, 3, 4 * f, 4 * f + 1), np.float32))


def test_vae_config_errors_name_the_key():
    _, folder = tiny_vae("sd", seed=0)
    from npdiff.loading import load_component_weights

    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(NpdiffError, match="down_block_types"):
        AutoencoderKL({**config, "down_block_types": ["AttnDownEncoderBlock2D"] * 4}, load_component_weights(folder))
    with pytest.raises(NpdiffError, match=r"encoder\.conv_in\.weight.*\(16, 3, 3, 3\).*\(24, 3, 3, 3\)"):
        AutoencoderKL({**config, "block_out_channels": [24, 32, 32, 32]}, load_component_weights(folder))
    with pytest.raises(NpdiffError, match=r"unexpected.*mid_block\.attentions\.0"):
        AutoencoderKL({**config, "mid_block_add_attention": False}, load_component_weights(folder))


def test_from_pretrained_subfolder(rng):
    """from_pretrained(folder, subfolder=name) reads folder/name, as diffusers' does."""
    torch_model, folder = tiny_vae("sd", seed=0)
    ours = AutoencoderKL.from_pretrained(folder.parent, subfolder=folder.name)
    z = random_latents(rng, 1, 2, 2)
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(z)).sample
    assert_rel_close(ours.decode(z), ref, FORWARD_TOL, "vae via subfolder")
    with pytest.raises(NpdiffError, match="config.json"):
        AutoencoderKL.from_pretrained(folder.parent, subfolder="no-such-component")
