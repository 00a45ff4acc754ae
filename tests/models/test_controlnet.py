"""npdiff's ControlNetModel against diffusers' on tiny random ControlNets (tests/tiny_controlnet.py), made
from the tiny SD 1.x, SD 2.x and SDXL UNets with their zero convolutions randomised: every residual within
relative 1e-4 (the network tolerance), for plain, scaled and guess-mode calls; then the UNet with the
residuals added against diffusers' UNet with the same residuals."""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from tiny_controlnet import tiny_controlnet
from tiny_models import tiny_unet

from npdiff.errors import NpdiffError
from npdiff.models import ControlNetModel, UNet2DConditionModel


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def nets(request):
    """(kind, torch UNet, npdiff UNet, torch ControlNet, npdiff ControlNet)."""
    torch_unet, unet_folder = tiny_unet(request.param, seed=0)
    torch_net, net_folder = tiny_controlnet(unet_folder, seed=3)
    return (request.param, torch_unet, UNet2DConditionModel.from_pretrained(unet_folder), torch_net,
            ControlNetModel.from_pretrained(net_folder))


def random_call(rng, config, batch=2, height=4, width=8):
    """Random inputs for one call: latents, timestep, text, control picture (8x the latents), SDXL's extras."""
    sample = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
    context = rng.standard_normal((batch, 5, config["cross_attention_dim"]), dtype=np.float32)
    control = rng.random((batch, 3, 8 * height, 8 * width), dtype=np.float32)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((batch, pooled), dtype=np.float32),
                 "time_ids": rng.integers(0, 1024, (batch, 6)).astype(np.float32)}
    return sample, 437, context, control, added


def torch_added(added):
    return None if added is None else {key: torch.from_numpy(value) for key, value in added.items()}


@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.6, False), (0.8, True)])
def test_residuals_match_diffusers(nets, rng, scale, guess_mode):
    kind, _, _, torch_net, net = nets
    sample, t, context, control, added = random_call(rng, net.config)
    with torch.no_grad():
        theirs_down, theirs_mid = torch_net(torch.from_numpy(sample), t, torch.from_numpy(context),
                                            torch.from_numpy(control), conditioning_scale=scale,
                                            guess_mode=guess_mode, added_cond_kwargs=torch_added(added),
                                            return_dict=False)
    down, mid = net(sample, t, context, control, conditioning_scale=scale, guess_mode=guess_mode,
                    added_cond_kwargs=added)
    assert len(down) == len(theirs_down) == net.skip_count
    for k, (ours, theirs) in enumerate(zip(down, theirs_down)):
        assert_rel_close(ours, theirs.numpy(), NETWORK_TOL, f"{kind} down residual {k}")
    assert_rel_close(mid, theirs_mid.numpy(), NETWORK_TOL, f"{kind} mid residual")
    assert np.abs(mid).max() > 1e-3  # the zero convolutions are random: the control says something


def test_unet_with_residuals_matches_diffusers(nets, rng):
    kind, torch_unet, unet, _, net = nets
    sample, t, context, control, added = random_call(rng, unet.config)
    down, mid = net(sample, t, context, control, added_cond_kwargs=added)
    with torch.no_grad():
        theirs = torch_unet(torch.from_numpy(sample), t, torch.from_numpy(context),
                            added_cond_kwargs=torch_added(added),
                            down_block_additional_residuals=[torch.from_numpy(np.asarray(d)) for d in down],
                            mid_block_additional_residual=torch.from_numpy(np.asarray(mid))).sample.numpy()
    ours = unet(sample, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                mid_block_additional_residual=mid)
    assert_rel_close(ours, theirs, NETWORK_TOL, f"{kind} UNet + ControlNet residuals")
    plain = unet(sample, t, context, added_cond_kwargs=added)
    assert np.abs(ours - plain).max() > 1e-3 * np.abs(plain).max()  # the residuals change the prediction


def test_fp16_folder(rng, tmp_path):
    """A ControlNet saved in float16 (variant="fp16") loads widened to float32, equal to diffusers' fp16 weights."""
    _, unet_folder = tiny_unet("sd1", seed=0)
    torch_net, _ = tiny_controlnet(unet_folder, seed=3)
    half = type(torch_net).from_config(torch_net.config)
    half.load_state_dict(torch_net.state_dict())
    half = half.half()
    half.save_pretrained(str(tmp_path), safe_serialization=True, variant="fp16")
    net = ControlNetModel.from_pretrained(tmp_path, variant="fp16")
    sample, t, context, control, _ = random_call(rng, net.config)
    with torch.no_grad():
        _, theirs_mid = half.float()(torch.from_numpy(sample), t, torch.from_numpy(context),
                                     torch.from_numpy(control), return_dict=False)
    _, mid = net(sample, t, context, control)
    assert_rel_close(mid, theirs_mid.numpy(), NETWORK_TOL, "fp16 ControlNet mid residual")


def test_refusals(nets, rng):
    kind, _, unet, _, net = nets
    sample, t, context, control, added = random_call(rng, net.config)
    with pytest.raises(NpdiffError, match="controlnet_cond must have shape"):
        net(sample, t, context, control[:, :, :-8], added_cond_kwargs=added)
    down, mid = net(sample, t, context, control, added_cond_kwargs=added)
    with pytest.raises(NpdiffError, match="down_block_additional_residuals: .* arrays given"):
        unet(sample, t, context, added_cond_kwargs=added, down_block_additional_residuals=down[:-1],
             mid_block_additional_residual=mid)
    with pytest.raises(NpdiffError, match=r"mid_block_additional_residual\[0\] has shape"):
        unet(sample, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
             mid_block_additional_residual=mid[:, :1])
