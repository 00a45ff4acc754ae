"""npdiff's UNet2DConditionModel on SDXL configurations against diffusers' (tests/tiny_models.py kinds).

Kinds: "sdxl" (base-like: DownBlock2D first, per-block heads and transformer depths, linear
projections, text_time with 6 time ids), "sdxl-refiner" (4 blocks, depth 2, 5 time ids with the
aesthetic score), "sdxl-nested" (nested transformer_layers_per_block + reverse_...), "sdxl-lcm"
(time_cond_proj_dim). Whole forward within NETWORK_TOL (measured ~1e-6 on these tiny models), the added
embedding alone within KERNEL_TOL, and the transformer depths of the real SDXL configs read as diffusers
reads them (diffusers builds them on torch's meta device: no memory, no weights).
"""

import json

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close
from tiny_models import UNET_KINDS, record_npdiff, record_torch, tiny_unet

from npdiff.errors import NpdiffError
from npdiff.loading import load_component_weights
from npdiff.models import UNet2DConditionModel
from npdiff.models.unet import check_config, transformer_depths

SDXL_KINDS = ["sdxl", "sdxl-refiner", "sdxl-nested", "sdxl-lcm"]
POOLED = 16   # the tiny kinds' pooled text width (SDXL: 1280)


@pytest.fixture(scope="module", params=SDXL_KINDS)
def sdxl_pair(request):
    """(kind, torch model, npdiff model) loaded from the same diffusers folder."""
    torch_model, folder = tiny_unet(request.param, seed=0)
    return request.param, torch_model, UNet2DConditionModel.from_pretrained(folder)


def time_id_count(config):
    return (config["projection_class_embeddings_input_dim"] - POOLED) // config["addition_time_embed_dim"]


def random_sdxl_inputs(rng, config, batch, height, width, text_tokens=7):
    """sample, timesteps [B], context, added_cond_kwargs, timestep_cond (LCM only), as numpy arrays."""
    sample = rng.standard_normal((batch, config["in_channels"], height, width), dtype=np.float32)
    context = rng.standard_normal((batch, text_tokens, config["cross_attention_dim"]), dtype=np.float32)
    text_embeds = rng.standard_normal((batch, POOLED), dtype=np.float32)
    if time_id_count(config) == 6:   # original size, crop top-left, target size (pixels)
        time_ids = np.stack([rng.integers(256, 2048, size=2), rng.integers(0, 256, size=2),
                             rng.integers(256, 2048, size=2)], axis=0).reshape(1, 6)
    else:                            # original size, crop top-left, aesthetic score
        time_ids = np.concatenate([rng.integers(256, 2048, size=2), rng.integers(0, 256, size=2),
                                   rng.uniform(1, 10, size=1)]).reshape(1, 5)
    time_ids = np.repeat(time_ids, batch, axis=0).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=batch)
    timestep_cond = None
    if config["time_cond_proj_dim"] is not None:
        timestep_cond = rng.uniform(0, 0.1, size=(batch, config["time_cond_proj_dim"])).astype(np.float32)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return sample, timesteps, context, added, timestep_cond


def torch_forward(model, sample, timesteps, context, added, timestep_cond):
    with torch.no_grad():
        return model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                     timestep_cond=None if timestep_cond is None else torch.from_numpy(timestep_cond),
                     added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample


@pytest.mark.parametrize("batch,height,width", [(2, 8, 16), (1, 24, 8)])
def test_sdxl_unet_forward_matches_diffusers(sdxl_pair, rng, batch, height, width):
    kind, torch_model, ours = sdxl_pair
    sample, timesteps, context, added, timestep_cond = random_sdxl_inputs(rng, ours.config, batch, height, width)
    out = ours(sample, timesteps, context, timestep_cond=timestep_cond, added_cond_kwargs=added)
    assert out.shape == (batch, 4, height, width) and out.dtype == np.float32
    ref = torch_forward(torch_model, sample, timesteps, context, added, timestep_cond)
    assert_rel_close(out, ref, NETWORK_TOL, f"unet {kind}")


def test_sdxl_time_ids_differ_per_row(rng):
    """Each row's own ids (the CFG batch carries negative_original_size etc. in its first half)."""
    torch_model, folder = tiny_unet("sdxl", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, timesteps, context, added, _ = random_sdxl_inputs(rng, ours.config, 2, 8, 8)
    added["time_ids"][0] = rng.integers(0, 2048, size=6)
    out = ours(sample, timesteps, context, added_cond_kwargs=added)
    assert_rel_close(out, torch_forward(torch_model, sample, timesteps, context, added, None), NETWORK_TOL)


BLOCK_PATHS = ["time_embedding", "add_embedding", "down_blocks.0", "down_blocks.1.attentions.1", "mid_block",
               "up_blocks.0.attentions.2", "up_blocks.2"]


def test_sdxl_block_activations_match_diffusers(rng):
    """add_embedding's input (the concatenated pooled text and add_time_proj features) and output, and the
    blocks around the nested transformer depths."""
    torch_model, folder = tiny_unet("sdxl-nested", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, timesteps, context, added, _ = random_sdxl_inputs(rng, ours.config, 2, 8, 8)
    theirs, handles = record_torch(torch_model, BLOCK_PATHS)
    try:
        torch_forward(torch_model, sample, timesteps, context, added, None)
    finally:
        for handle in handles:
            handle.remove()
    mine = record_npdiff(ours, BLOCK_PATHS)
    ours(sample, timesteps, context, added_cond_kwargs=added)
    assert_rel_close(mine["add_embedding"][0][0], theirs["add_embedding"][0][0], KERNEL_TOL, "add_embedding input")
    for path in BLOCK_PATHS:
        out, ref = mine[path][1], theirs[path][1]
        if path == "down_blocks.0":
            out, ref = out[0], ref[0]
        ref = ref.sample if hasattr(ref, "sample") else ref[0] if isinstance(ref, tuple) else ref
        assert_rel_close(out, ref, KERNEL_TOL, path)


def transformer_depth_tree(model):
    """Every Transformer2DModel's depth by path: {'down_blocks.1.attentions.0': 2, ...} (torch or npdiff)."""
    depths = {}
    for name, blocks in (("down_blocks", model.down_blocks), ("up_blocks", model.up_blocks)):
        for i, block in enumerate(blocks):
            for j, attention in enumerate(getattr(block, "attentions", None) or []):
                depths[f"{name}.{i}.attentions.{j}"] = len(attention.transformer_blocks)
    for j, attention in enumerate(model.mid_block.attentions):
        depths[f"mid_block.attentions.{j}"] = len(attention.transformer_blocks)
    return depths


def test_nested_depths_built_as_diffusers(sdxl_pair):
    kind, torch_model, ours = sdxl_pair
    assert transformer_depth_tree(ours) == transformer_depth_tree(torch_model)


# the real SDXL configs' structural keys (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json)
REAL_CONFIGS = {
    "base": dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                 projection_class_embeddings_input_dim=2816),
    "refiner": dict(block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    transformer_layers_per_block=4, cross_attention_dim=1280,
                    projection_class_embeddings_input_dim=2560),
}


@pytest.mark.parametrize("which", sorted(REAL_CONFIGS))
def test_real_sdxl_configs_read_as_diffusers(which):
    from diffusers import UNet2DConditionModel as TorchUNet

    config = dict(REAL_CONFIGS[which], addition_embed_type="text_time", addition_time_embed_dim=256,
                  use_linear_projection=True, upcast_attention=None, layers_per_block=2,
                  mid_block_only_cross_attention=None, num_attention_heads=None, sample_size=128)
    with torch.device("meta"):
        torch_model = TorchUNet(**config)
    full = check_config(json.loads(json.dumps(config)))   # JSON round trip: lists, null
    down, mid, up = transformer_depths(full, [2] * len(config["block_out_channels"]))
    mine = {"mid_block.attentions.0": mid}
    for name, depths, types in (("down_blocks", down, full["down_block_types"]),
                                ("up_blocks", up, full["up_block_types"])):
        for i, block_type in enumerate(types):
            if block_type.startswith("CrossAttn"):
                mine.update({f"{name}.{i}.attentions.{j}": depth for j, depth in enumerate(depths[i])})
    assert mine == transformer_depth_tree(torch_model)
    heads = {name: module.heads for name, module in torch_model.named_modules() if name.endswith("attn1")}
    assert heads["down_blocks.2.attentions.0.transformer_blocks.0.attn1"] == full["attention_head_dim"][2]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_sdxl_bad_added_conditions_raise(rng):
    _, folder = tiny_unet("sdxl", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, timesteps, context, added, _ = random_sdxl_inputs(rng, ours.config, 2, 8, 8)
    with pytest.raises(NpdiffError, match="added_cond_kwargs"):
        ours(sample, timesteps, context)
    with pytest.raises(NpdiffError, match="added_cond_kwargs"):
        ours(sample, timesteps, context, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(NpdiffError, match=r"time_ids'\] must have shape \[2,n\]"):
        ours(sample, timesteps, context, added_cond_kwargs={**added, "time_ids": added["time_ids"][:1]})
    with pytest.raises(NpdiffError, match=r"text_embeds'\] must have shape \[2,P\]"):
        ours(sample, timesteps, context, added_cond_kwargs={**added, "text_embeds": added["text_embeds"][0]})
    # a refiner's 5 ids given to a base: the widths do not add up
    with pytest.raises(NpdiffError, match="projection_class_embeddings_input_dim 64"):
        ours(sample, timesteps, context, added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :5]})


def test_sdxl_config_errors_name_the_key():
    _, folder = tiny_unet("sdxl-nested", seed=0)
    config = json.loads((folder / "config.json").read_text())
    weights = load_component_weights(folder)
    with pytest.raises(NpdiffError, match="reverse_transformer_layers_per_block"):
        UNet2DConditionModel({**config, "reverse_transformer_layers_per_block": None}, weights)
    with pytest.raises(NpdiffError, match=r"transformer_layers_per_block entry 1 is \[2\]"):
        UNet2DConditionModel({**config, "transformer_layers_per_block": [[1, 2], [2], [1, 3]]}, weights)
    with pytest.raises(NpdiffError, match="reverse_transformer_layers_per_block entry 0"):
        UNet2DConditionModel({**config, "reverse_transformer_layers_per_block": [[3, 1], [1, 2, 1], [2, 1, 1]]},
                             weights)
    with pytest.raises(NpdiffError, match="addition_embed_type='text'"):
        UNet2DConditionModel({**config, "addition_embed_type": "text"}, weights)
    with pytest.raises(NpdiffError, match="needs addition_time_embed_dim"):
        UNet2DConditionModel({**config, "addition_time_embed_dim": None}, weights)
    with pytest.raises(NpdiffError, match="num_attention_heads"):
        UNet2DConditionModel({**config, "num_attention_heads": [1, 2, 4]}, weights)
    with pytest.raises(NpdiffError, match="mid_block_only_cross_attention"):
        UNet2DConditionModel({**config, "mid_block_only_cross_attention": True}, weights)
    with pytest.raises(NpdiffError, match="transformer_layers_per_block must be"):
        UNet2DConditionModel({**config, "transformer_layers_per_block": [[0, 1], [1, 1], [1, 1]]}, weights)
    # an SD UNet's config over SDXL weights: add_embedding is left over, named
    plain = {key: value for key, value in config.items() if key not in ("addition_embed_type",)}
    with pytest.raises(NpdiffError, match="add_embedding.linear_1"):
        UNet2DConditionModel(plain, weights)


def test_sd_unet_ignores_added_cond_kwargs(rng):
    """diffusers ignores added_cond_kwargs for a UNet without addition_embed_type; so does npdiff."""
    torch_model, folder = tiny_unet("sd1", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    assert "sdxl" in UNET_KINDS and ours.add_embedding is None
    sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    context = rng.standard_normal((1, 5, 24), dtype=np.float32)
    added = {"text_embeds": np.zeros((1, 3), np.float32), "time_ids": np.zeros((1, 6), np.float32)}
    out = ours(sample, 10, context, added_cond_kwargs=added)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(sample), 10, torch.from_numpy(context)).sample
    assert_rel_close(out, ref, NETWORK_TOL)
