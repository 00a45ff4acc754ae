"""ControlNet single files in diffusers' layout (a net's state_dict saved as one .safetensors, as SDXL ControlNets
are shared): the config read from the shapes, the net equal to the same net loaded from its diffusers folder
(bit for bit) and within 1e-4 of diffusers' net, float32 and float16; an SDXL file on an SD 1.x/2.x pipeline and
an SD file on an SDXL pipeline are refused naming both families; a file of something else is refused.

The tiny UNets the nets are made from follow what a file cannot store and the loader assumes (32 groups per
norm, 64-wide heads with linear projections, 8 heads without, SDXL's 256 channels per time id)."""

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from test_controlnet import random_call, torch_added
from tiny_controlnet import tiny_controlnet
from tiny_models import UNET_KINDS, _process_root, tiny_unet

from npdiff.errors import NpdiffError
from npdiff.models import ControlNetModel

FILE_CONVENTIONS = {
    "sd1": dict(UNET_KINDS["sd1"], norm_num_groups=32, attention_head_dim=8),
    "sdxl": dict(UNET_KINDS["sdxl"], block_out_channels=(64, 64, 128), attention_head_dim=(1, 1, 2),
                 norm_num_groups=32, addition_time_embed_dim=256, projection_class_embeddings_input_dim=16 + 6 * 256),
}
SETTINGS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
            "transformer_layers_per_block", "attention_head_dim", "use_linear_projection", "norm_num_groups",
            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "conditioning_embedding_out_channels", "conditioning_channels")


@functools.cache
def net_folder(kind):
    """-> (torch ControlNetModel, its diffusers folder), made from a tiny UNet of `kind` (built once)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    unet = UNet2DConditionModel(**FILE_CONVENTIONS[kind])
    unet_folder = Path(tempfile.mkdtemp(prefix=f"unet-file-{kind}-", dir=_process_root()))
    unet.save_pretrained(str(unet_folder), safe_serialization=True)
    return tiny_controlnet(unet_folder, seed=5)


def save_as_one_file(torch_net, path, dtype=torch.float32):
    from safetensors.torch import save_file

    save_file({name: tensor.detach().to(dtype).contiguous() for name, tensor in torch_net.state_dict().items()},
              str(path))
    return path


def settings(config):
    return {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in config.items()
            if key in SETTINGS}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_file_equals_folder_and_diffusers(kind, rng, tmp_path):
    torch_net, folder = net_folder(kind)
    from_folder = ControlNetModel.from_pretrained(folder)
    from_file = ControlNetModel.from_pretrained(save_as_one_file(torch_net, tmp_path / "net.safetensors"))
    assert from_file.name == "net"
    ours_settings, folder_settings = settings(from_file.controlnet_config), settings(from_folder.controlnet_config)
    for key in SETTINGS:  # the folder's config.json may leave some out: then diffusers' default is what counts
        if key in folder_settings:
            wanted = folder_settings[key]
            if key == "transformer_layers_per_block" and isinstance(wanted, int):
                wanted = [wanted] * len(folder_settings["block_out_channels"])
            assert ours_settings.get(key) == wanted, f"{key}: read {ours_settings.get(key)}, config.json {wanted}"
    sample, t, context, control, added = random_call(rng, from_folder.config)
    down_file, mid_file = from_file(sample, t, context, control, conditioning_scale=0.7, added_cond_kwargs=added)
    down_folder, mid_folder = from_folder(sample, t, context, control, conditioning_scale=0.7, added_cond_kwargs=added)
    for ours, folders in zip(down_file + [mid_file], down_folder + [mid_folder]):
        np.testing.assert_array_equal(ours, folders)
    with torch.no_grad():
        _, theirs_mid = torch_net(torch.from_numpy(sample), t, torch.from_numpy(context), torch.from_numpy(control),
                                  conditioning_scale=0.7, added_cond_kwargs=torch_added(added), return_dict=False)
    assert_rel_close(mid_file, theirs_mid.numpy(), NETWORK_TOL, f"{kind} ControlNet file, mid residual")


def test_float16_file(rng, tmp_path):
    torch_net, _ = net_folder("sdxl")
    net = ControlNetModel.from_pretrained(save_as_one_file(torch_net, tmp_path / "half.safetensors", torch.float16))
    half = type(torch_net).from_config(torch_net.config)
    half.load_state_dict({name: tensor.half().float() for name, tensor in torch_net.state_dict().items()})
    sample, t, context, control, added = random_call(rng, net.config)
    with torch.no_grad():
        theirs_down, theirs_mid = half.eval()(torch.from_numpy(sample), t, torch.from_numpy(context),
                                              torch.from_numpy(control), added_cond_kwargs=torch_added(added),
                                              return_dict=False)
    down, mid = net(sample, t, context, control, added_cond_kwargs=added)
    assert_rel_close(mid, theirs_mid.numpy(), NETWORK_TOL, "float16 SDXL ControlNet file, mid residual")
    assert_rel_close(down[0], theirs_down[0].numpy(), NETWORK_TOL, "float16 SDXL ControlNet file, first residual")


@pytest.mark.parametrize("net_kind, unet_kind, message", [
    ("sdxl", "sd1", r"addition_embed_type is 'text_time', the UNet's is None \(a SDXL ControlNet on a SD 1.x/2.x"),
    ("sd1", "sdxl", r"addition_embed_type is None, the UNet's is 'text_time' \(a SD 1.x/2.x ControlNet on a SDXL")])
def test_other_family_refused(net_kind, unet_kind, message, tmp_path):
    """What every ControlNet pipeline checks its nets with (set_controlnet) names both families."""
    from npdiff.models import UNet2DConditionModel
    from npdiff.pipeline_controlnet_call import check_nets_fit

    net = ControlNetModel.from_pretrained(save_as_one_file(net_folder(net_kind)[0], tmp_path / "net.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(tiny_unet(unet_kind)[1])
    with pytest.raises(NpdiffError, match=message):
        check_nets_fit([net], unet.config)


def test_not_a_controlnet_file(tmp_path):
    torch_net, _ = net_folder("sd1")
    others = {name: tensor for name, tensor in torch_net.state_dict().items()
              if not name.startswith("controlnet_cond_embedding.")}
    with pytest.raises(NpdiffError, match="not a ControlNet file"):
        from safetensors.torch import save_file

        save_file(others, str(tmp_path / "unet-part.safetensors"))
        ControlNetModel.from_pretrained(tmp_path / "unet-part.safetensors")
