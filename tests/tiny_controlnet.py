"""Tiny random ControlNets made by diffusers from tiny UNets, saved as diffusers folders.

    torch_net, folder = tiny_controlnet(unet_folder, seed=0)    # ControlNetModel.from_unet(unet), randomised

diffusers' from_unet copies the UNet's down path and starts the conditioning embedding's conv_out and the
zero convolutions at zero, so that a fresh net changes nothing; here every parameter is made random
afterwards (the 1x1 zero convolutions and conv_out with std 0.1/sqrt(fan_in)-scaled normal weights), so
that the control does change the picture, and a test can see it. conditioning_embedding_out_channels is
small (8, 8, 16, 16): four sizes, three halvings, a latent = 8 pixels as in SD.
"""

import functools
import tempfile
from pathlib import Path

from tiny_models import _process_root, randomize_

EMBEDDING_CHANNELS = (8, 8, 16, 16)


@functools.lru_cache(maxsize=None)
def tiny_controlnet(unet_folder, seed=0, zero_conv_std=0.5):
    """-> (torch ControlNetModel in eval mode, Path of its diffusers folder); built once per process."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_folder))
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    randomize_(net, seed + 1)
    with torch.no_grad():
        zero_started = [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
        for conv in zero_started:  # from_unet starts these at zero: make them random
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            conv.weight.normal_(0.0, zero_conv_std / fan_in ** 0.5)
            conv.bias.normal_(0.0, 0.1 * zero_conv_std)
    folder = Path(tempfile.mkdtemp(prefix=f"controlnet-{seed}-", dir=_process_root()))
    net.save_pretrained(str(folder), safe_serialization=True)
    return net.eval(), folder
