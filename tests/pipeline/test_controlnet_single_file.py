"""An original-layout ControlNet file (control_model.* keys, as control_v11p_sd15_canny.safetensors) loads equal
to diffusers' conversion: the file is written from a tiny random diffusers ControlNet (SD 1.x constants: 32
groups, 8 heads, what a single file's loader assumes), diffusers' own convert_controlnet_checkpoint turns it
back into exactly the diffusers weights (so the file is a faithful original-layout file), and npdiff's net
loaded from the file gives diffusers' residuals within 1e-4."""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from safetensors.torch import save_file
from tiny_controlnet import tiny_controlnet
from tiny_sd import tiny_sd_folder

from npdiff.errors import NpdiffError
from npdiff.loading import keymap
from npdiff.loading.single_file_controlnet import controlnet_table
from npdiff.models import ControlNetModel


def original_key(diffusers_key, table):
    """The original-layout name of a diffusers key (the table's rows read backwards)."""
    best = None
    for original_prefix, diffusers_prefix, parts in table:
        if diffusers_key.startswith(diffusers_prefix) and (best is None or len(diffusers_prefix) > len(best[1])):
            best = (original_prefix, diffusers_prefix, parts)
    original_prefix, diffusers_prefix, parts = best
    rest = diffusers_key[len(diffusers_prefix):]
    if parts is keymap.KEEP:
        return original_prefix + rest
    for original_part, diffusers_part, _ in parts:
        if rest.startswith(diffusers_part):
            return original_prefix + original_part + rest[len(diffusers_part):]
    raise AssertionError(diffusers_key)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch_net, _ = tiny_controlnet(tiny_sd_folder(kind="sd_constants") / "unet", seed=5)
    config = dict(torch_net.config)
    state = {key: value.contiguous() for key, value in torch_net.state_dict().items()}
    table = controlnet_table(config, [0, 2, 4, 6, 8, 10, 12, 14], len(torch_net.controlnet_down_blocks))
    original = {"control_model." + original_key(key, table): value for key, value in state.items()}
    path = tmp_path_factory.mktemp("cn") / "control_tiny_canny.safetensors"
    save_file(original, str(path))
    return torch_net, config, state, original, path


def test_file_is_what_diffusers_converts(written):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    _, config, state, original, _ = written
    converted = convert_controlnet_checkpoint(dict(original), config)
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_loads_equal_to_diffusers(written, rng):
    torch_net, _, _, _, path = written
    net = ControlNetModel.from_pretrained(path)
    assert net.name == "control_tiny_canny"
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    context = rng.standard_normal((2, 5, net.config["cross_attention_dim"]), dtype=np.float32)
    control, t = rng.random((2, 3, 64, 64), dtype=np.float32), 611
    with torch.no_grad():
        theirs_down, theirs_mid = torch_net(torch.from_numpy(sample), t, torch.from_numpy(context),
                                            torch.from_numpy(control), return_dict=False)
    down, mid = net(sample, t, context, control)
    for k, (ours, theirs) in enumerate(zip(down, theirs_down)):
        assert_rel_close(ours, theirs.numpy(), NETWORK_TOL, f"single-file down residual {k}")
    assert_rel_close(mid, theirs_mid.numpy(), NETWORK_TOL, "single-file mid residual")


def test_not_a_controlnet_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(NpdiffError, match="not a ControlNet file"):
        ControlNetModel.from_pretrained(path)
