"""The LoRA loader's limit on time spent matching a header's alpha_pattern regexes (lora.PATTERN_SECONDS) counts
that matching only: reading a kohya file's own ".alpha" keys (a disk read per layer, slow on a network or cold
disk) is not pattern time, and a file without any alpha_pattern is never refused by it. Before, every layer's
alpha read counted, so a kohya LoRA could be refused with a message about regexes its header does not have."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from lora_helpers import load_ours  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import lora as npdiff_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)

LAYER = "down_blocks.0.attentions.0.proj_in"  # the tiny UNet's 1x1 conv, weight [32,32,1,1]


def test_reading_alpha_keys_is_not_pattern_time(tmp_path, rng, monkeypatch):
    """No time at all allowed for patterns: a kohya LoRA (an .alpha key, no header metadata) still loads, with
    its alpha, where before its one alpha read went over the limit."""
    monkeypatch.setattr(npdiff_lora, "PATTERN_SECONDS", 0.0)
    rank, alpha = 4, float(rng.integers(1, 9))
    down = rng.standard_normal((rank, 32, 1, 1)).astype(np.float32) * 0.1
    up = rng.standard_normal((32, rank, 1, 1)).astype(np.float32) * 0.1
    prefix = "lora_unet_" + LAYER.replace(".", "_")
    path = tmp_path / "kohya.safetensors"
    save_file({f"{prefix}.lora_down.weight": torch.from_numpy(down), f"{prefix}.lora_up.weight": torch.from_numpy(up),
               f"{prefix}.alpha": torch.tensor(alpha)}, str(path))
    pipe = load_ours(tiny_sd_folder())
    layer = npdiff_lora.named_layers(pipe.unet, "unet")[LAYER]
    original = np.array(layer.weight)
    pipe.load_lora_weights(path)
    expected = original + (alpha / rank) * (up[:, :, 0, 0] @ down[:, :, 0, 0]).reshape(original.shape)
    np.testing.assert_allclose(np.asarray(layer.weight), expected, rtol=1e-5, atol=1e-6)
