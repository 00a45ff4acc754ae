"""The SDXL VAE's config (scaling_factor 0.13025, force_upcast true, the keys a fresh diffusers save
writes) loads, and a tiny random VAE of SDXL's structure decodes and encodes as diffusers' does."""

import json

import numpy as np
import torch
from helpers import NETWORK_TOL, assert_rel_close
from tiny_models import randomize_

from npdiff.models import AutoencoderKL

# stabilityai/sdxl-vae's structure, channels / 8 (real: 128, 256, 512, 512)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64), scaling_factor=0.13025, force_upcast=True,
)


def test_sdxl_vae_loads_and_matches_diffusers(tmp_path, rng):
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(3)
    torch_model = randomize_(TorchVAE(**SDXL_VAE), 4)
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["force_upcast"] is True and config["scaling_factor"] == 0.13025
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.scaling_factor == 0.13025

    latents = rng.standard_normal((1, 4, 6, 10), dtype=np.float32) / np.float32(0.13025)
    image = ours.decode(latents)
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(latents)).sample
    assert image.shape == (1, 3, 48, 80)
    assert_rel_close(image, ref, NETWORK_TOL, "sdxl vae decode")

    picture = rng.uniform(-1, 1, size=(2, 3, 32, 16)).astype(np.float32)
    posterior = ours.encode(picture)
    with torch.no_grad():
        ref_dist = torch_model.encode(torch.from_numpy(picture)).latent_dist
    assert_rel_close(posterior.mean, ref_dist.mean, NETWORK_TOL, "sdxl vae encode mean")
    assert_rel_close(posterior.logvar, ref_dist.logvar, NETWORK_TOL, "sdxl vae encode logvar")
