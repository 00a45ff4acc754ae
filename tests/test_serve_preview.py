"""--preview-vae: the live picture decoded with a TAESD (AutoencoderTiny) folder, compared with diffusers'
AutoencoderTiny on the same latents (8-bit pictures within 2 levels), and served as current_image."""

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from serve_server import running_server

import torch
import diffusers
import requests

from npdiff.serve_models import ModelShelf  # noqa: E402


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    """A random AutoencoderTiny in the shipped model's latent space: 4 latent channels, 4x4 pixels a cell."""
    torch.manual_seed(0)
    taesd = diffusers.AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                                      num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)
    folder = tmp_path_factory.mktemp("taesd")
    taesd.eval().save_pretrained(folder, safe_serialization=True)
    return folder, taesd


def test_preview_png_is_diffusers_taesd_decode(taesd_folder, rng):
    folder, taesd = taesd_folder
    shelf = ModelShelf(preview_vae=folder)
    shelf.load()
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # [B,4,h,w]; the preview shows the first
    ours = np.asarray(Image.open(io.BytesIO(shelf.preview_png(latents))))  # [32,32,3] uint8
    with torch.no_grad():
        decoded = taesd.decode(torch.from_numpy(latents[:1]) / taesd.config.scaling_factor).sample  # [1,3,32,32]
    theirs = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert ours.shape == theirs.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2


def test_the_server_sends_taesd_previews_as_current_image(taesd_folder):
    folder, _ = taesd_folder
    with running_server(preview_vae=folder) as (url, app):
        assert app.state.jobs.shelf.preview_vae is not None
        results = []
        thread = threading.Thread(target=lambda: results.append(requests.post(
            f"{url}/sdapi/v1/txt2img", timeout=60, json={"prompt": "a circle", "steps": 300, "width": 32, "height": 32})))
        thread.start()
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < 3:
            assert time.monotonic() < deadline, "no live pictures"
            current = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["current_image"]
            if current:
                seen.add(current)
                assert Image.open(io.BytesIO(base64.b64decode(current))).size == (32, 32)
            time.sleep(0.05)
        requests.post(f"{url}/sdapi/v1/interrupt", timeout=10)
        thread.join(60)
        assert results[0].status_code == 200
