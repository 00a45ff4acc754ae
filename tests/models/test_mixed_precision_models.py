"""precision="mixed" networks against torch: some of a UNet's op families in bf16, the rest float32.

At "mixed" a UNet (or ControlNet) packs the Linear/Conv2d layers of the families in
precision.BF16_FAMILIES["mixed"] in bfloat16 (and runs its attention in bf16 when "attention" is one of them);
every other layer, and every layer of the text encoders and the VAE, stays float32. Checked here:
- each layer holds the kind its family says (packed bf16, or a plain float32 array), and layer_family names
  the families of a tiny SDXL UNet's layers as its structure says;
- every layer call of a whole forward against torch's module on the same input (rounded to bf16 where the
  layer is packed, float32 where not) at the kernel tolerance, and the whole forward against torch float32
  within bf16's bound (tests/models/test_bf16_models.py says why a whole bf16 forward is compared so);
- the float32 parts really are float32's code: "mixed" with no family in bf16 gives float32's output
  bit for bit (and torch's within the network tolerance); the text encoders and the VAE at "mixed" likewise.
"""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close, rel_err
from test_bf16_models import (
    LayerCalls,
    check_controlnet_layer_by_layer,
    layer_weights,
    report,
    torch_unet_forward,
    unet_inputs,
)
from tiny_clip import CLIP_KINDS, random_ids, save_clip, tiny_clip
from tiny_models import tiny_unet, tiny_vae

from npdiff.loading.resident import reachable
from npdiff.lora import named_layers
from npdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, precision
from npdiff.models.blocks import Conv2d
from npdiff.models.precision import BF16_FAMILIES, is_packed, layer_family
from npdiff.models.transformer import Attention, AttentionBlock

MIXED = BF16_FAMILIES["mixed"]


def families(model):
    """{layer key: (its family, whether its weight is packed bf16)} of an npdiff model."""
    found = {}
    for layer in named_layers(model, "unet").values():
        kind = "conv" if isinstance(layer, Conv2d) else "linear"
        found[layer.key] = (layer_family(layer.key + ".weight", kind), is_packed(layer.weight))
    return found


def attention_flags(model):
    """The bf16 flag of every attention module reachable from an npdiff model."""
    return [item.bf16 for item in reachable(model) if isinstance(item, (Attention, AttentionBlock))]


def check_layer_kinds(model):
    """Packed exactly where the family is one of "mixed"'s bf16 families; float32 arrays elsewhere."""
    for key, (family, packed) in families(model).items():
        assert packed == (family in MIXED), f"{key}: family {family}, packed {packed}"
        if not packed:
            layer_weight = next(layer.weight for layer in named_layers(model, "unet").values() if layer.key == key)
            assert isinstance(layer_weight, np.ndarray) and layer_weight.dtype == np.float32, key


def test_layer_families_of_a_tiny_sdxl_unet():
    """Every family of FAMILIES but "other" is found in a UNet, by its structure: one geglu and one ff.net.2 per
    transformer block, 4 projections per attention, two 3x3 convolutions per resnet plus the resamplers'."""
    _, folder = tiny_unet("sdxl", seed=0)
    model = UNet2DConditionModel.from_pretrained(folder)
    found = families(model)
    count = {family: sum(1 for f, _ in found.values() if f == family) for family in precision.FAMILIES}
    blocks = sum(1 for key in found if key.endswith(".ff.net.0.proj"))
    resnets = sum(1 for key in found if key.endswith(".conv1") and ".resnets." in key)
    resamplers = sum(1 for key in found if key.endswith(("downsamplers.0.conv", "upsamplers.0.conv")))
    assert blocks > 0 and resnets > 0 and resamplers > 0
    assert count["geglu"] == blocks
    assert count["linear"] == blocks * (1 + 2 * 4)  # ff.net.2 and attn1/attn2's to_q, to_k, to_v, to_out.0
    assert count["conv"] == 2 * resnets + resamplers
    assert count["other"] == 0 and count["small"] == len(found) - count["geglu"] - count["linear"] - count["conv"]
    for key in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2",
                "down_blocks.1.attentions.0.proj_in", "up_blocks.0.resnets.0.conv_shortcut",
                "down_blocks.0.resnets.0.time_emb_proj"):
        assert found[key][0] == "small", key
    assert layer_family("decoder.up_blocks.0.resnets.0.conv1.weight", "conv") == "other"  # a VAE's
    assert layer_family("text_model.encoder.layers.0.mlp.fc1.weight", "linear") == "other"  # a text encoder's
    assert layer_family("encoder.layers.0.self_attn.q_proj.weight", "linear") == "other"  # transformers 5.x names


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_mixed_matches_torch_layer_by_layer(kind, rng, monkeypatch):
    torch_model, folder = tiny_unet(kind, seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder, precision="mixed")
    assert ours.precision == "mixed"
    check_layer_kinds(ours)
    assert set(attention_flags(ours)) == {"attention" in MIXED}
    sample, timestep, context, added = unet_inputs(rng, ours.config)
    calls = LayerCalls(monkeypatch, ours)
    out = ours(sample, timestep, context, added_cond_kwargs=added)     # [B,4,h,w]
    assert len({call[1] for call in calls.calls}) == len(layer_weights(ours))  # every layer ran
    plain = torch_unet_forward(torch_model, sample, timestep, context, added)
    report(f"unet {kind} mixed", calls.check_against(torch_model), rel_err(out, plain))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_unet_mixed_without_bf16_families_is_float32(kind, rng, monkeypatch):
    """The float32 parts of "mixed" are float32's own code: with no family in bf16 the output is float32's
    bit for bit, and torch float32's within the network tolerance."""
    monkeypatch.setitem(BF16_FAMILIES, "mixed", frozenset())
    torch_model, folder = tiny_unet(kind, seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder, precision="mixed")
    full = UNet2DConditionModel.from_pretrained(folder)
    assert not any(is_packed(weight) for weight in layer_weights(ours))
    assert not any(attention_flags(ours))
    sample, timestep, context, added = unet_inputs(rng, ours.config)
    out = ours(sample, timestep, context, added_cond_kwargs=added)     # [B,4,h,w]
    np.testing.assert_array_equal(out, full(sample, timestep, context, added_cond_kwargs=added))
    plain = torch_unet_forward(torch_model, sample, timestep, context, added)
    assert_rel_close(out, plain, NETWORK_TOL, f"unet {kind} mixed with no bf16 family")


def test_controlnet_mixed_matches_torch_layer_by_layer(rng, monkeypatch):
    check_layer_kinds(check_controlnet_layer_by_layer("mixed", rng, monkeypatch))


def test_vae_at_mixed_is_float32(rng):
    torch_model, folder = tiny_vae("sd", seed=0)
    ours = AutoencoderKL.from_pretrained(folder, precision="mixed")
    full = AutoencoderKL.from_pretrained(folder)
    assert not any(is_packed(weight) for weight in layer_weights(ours)) and not any(attention_flags(ours))
    latents = rng.standard_normal((1, 4, 4, 6), dtype=np.float32)
    decoded = ours.decode(latents)                                      # [1,3,32,48]
    np.testing.assert_array_equal(decoded, full.decode(latents))
    with torch.no_grad():
        plain = torch_model.decode(torch.from_numpy(latents)).sample
    assert_rel_close(decoded, plain, NETWORK_TOL, "vae decode at mixed")


@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_clip_at_mixed_is_float32(kind, rng, tmp_path):
    model = tiny_clip(kind, seed=5)
    save_clip(model, tmp_path / "text_encoder")
    ours = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder", precision="mixed")
    full = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    assert not any(is_packed(weight) for weight in layer_weights(ours))
    assert ours.linear is full.linear  # the same layer class as float32's (the transposed copy where small)
    ids = random_ids(rng, 2, CLIP_KINDS[kind]["max_position_embeddings"])
    last = ours(ids)                                                    # [B,L,D]
    np.testing.assert_array_equal(last, full(ids))
    with torch.no_grad():
        plain = model(torch.from_numpy(ids)).last_hidden_state
    assert_rel_close(last, plain, NETWORK_TOL, f"clip {kind} at mixed")
