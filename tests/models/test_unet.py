"""npdiff's UNet2DConditionModel against diffusers' on tiny random models (tests/tiny_models.py).

Whole forward: relative error <= 1e-5 on these tiny models (the policy allows 1e-4 for a network;
measured ~1e-6 here). Intermediate activations of every block kind are compared through torch
forward hooks and npdiff recorders placed at the same module paths.
"""

import json

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, assert_rel_close, rel_err
from tiny_models import UNET_KINDS, record_npdiff, record_torch, tiny_unet

import npdiff.kernels.attention as attention_kernels
from npdiff.errors import NpdiffError
from npdiff.models import UNet2DConditionModel

FORWARD_TOL = KERNEL_TOL


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request):
    """(kind, torch model, npdiff model) loaded from the same diffusers folder."""
    torch_model, folder = tiny_unet(request.param, seed=0)
    return request.param, torch_model, UNet2DConditionModel.from_pretrained(folder)


@pytest.fixture
def fresh_unet(unet_pair):
    """The npdiff model built anew (a test may wrap its blocks)."""
    kind, torch_model, _ = unet_pair
    _, folder = tiny_unet(kind, seed=0)
    return kind, torch_model, UNet2DConditionModel.from_pretrained(folder)


def random_inputs(rng, config, batch, height, width, text_tokens=7):
    sample = rng.standard_normal((batch, config["in_channels"], height, width), dtype=np.float32)
    context = rng.standard_normal((batch, text_tokens, config["cross_attention_dim"]), dtype=np.float32)
    return sample, context


def torch_forward(model, sample, timestep, context):
    if isinstance(timestep, np.ndarray):
        timestep = torch.from_numpy(timestep)
    with torch.no_grad():
        return model(torch.from_numpy(sample), timestep, torch.from_numpy(context)).sample


# batch, latent height x width (multiples of 4 = 2**(3 blocks - 1)), timestep kind
CASES = [
    (2, 8, 16, "int"),            # CFG-like batch, non-square
    (1, 16, 24, "float"),         # non-square, fractional timestep (Karras-style schedulers)
    (3, 12, 8, "per-batch"),      # one timestep per sample
]


def make_timestep(rng, kind, batch):
    if kind == "int":
        return int(rng.integers(0, 1000))
    if kind == "float":
        return float(rng.uniform(0, 1000))
    if kind == "per-batch":
        return rng.integers(0, 1000, size=batch).astype(np.int64)
    return np.array([rng.uniform(0, 1000)], dtype=np.float32)   # "array-1": a [1] array broadcast to the batch


@pytest.mark.parametrize("batch,height,width,timestep_kind", CASES)
def test_unet_forward_matches_diffusers(unet_pair, rng, batch, height, width, timestep_kind):
    kind, torch_model, ours = unet_pair
    sample, context = random_inputs(rng, ours.config, batch, height, width)
    timestep = make_timestep(rng, timestep_kind, batch)
    out = ours(sample, timestep, context)
    assert out.shape == (batch, ours.config["out_channels"], height, width) and out.dtype == np.float32
    assert_rel_close(out, torch_forward(torch_model, sample, timestep, context), FORWARD_TOL,
                     f"unet {kind} {timestep_kind}")


def test_unet_rarer_config_values_match_diffusers(rng):
    """The "knobs" kind: per-block lists, transformer depth 2, mid_block_scale_factor, centred input,
    5x5 conv_in, 1x1 conv_out, time_embedding_dim, out_channels 3, odd latent sizes (multiples of 2)."""
    torch_model, folder = tiny_unet("knobs", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    assert "knobs" in UNET_KINDS
    sample, context = random_inputs(rng, {**ours.config, "cross_attention_dim": 12}, 2, 6, 10)
    timestep = rng.integers(0, 1000, size=2)
    out = ours(sample, timestep, context)
    assert out.shape == (2, 3, 6, 10)
    assert_rel_close(out, torch_forward(torch_model, sample, timestep, context), FORWARD_TOL, "unet knobs")


BLOCK_PATHS = [
    "time_embedding",                          # sinusoidal input (checked as its argument) and MLP
    "down_blocks.0.resnets.0",                 # ResnetBlock2D with time embedding
    "down_blocks.1.attentions.0",              # Transformer2DModel (conv or linear proj)
    "down_blocks.0",                           # CrossAttnDownBlock2D: output and skips
    "down_blocks.2",                           # DownBlock2D (no attention, no downsampler)
    "mid_block",                               # UNetMidBlock2DCrossAttn
    "up_blocks.0",                             # UpBlock2D
    "up_blocks.1.resnets.0",                   # ResnetBlock2D over a skip concatenation (conv_shortcut)
    "up_blocks.2",                             # CrossAttnUpBlock2D, last (no upsampler)
]


def test_unet_block_activations_match_diffusers(fresh_unet, rng):
    kind, torch_model, ours = fresh_unet
    sample, context = random_inputs(rng, ours.config, 2, 8, 12)
    timestep = rng.integers(0, 1000, size=2)
    theirs, handles = record_torch(torch_model, BLOCK_PATHS + ["time_proj"])
    try:
        torch_forward(torch_model, sample, timestep, context)
    finally:
        for handle in handles:
            handle.remove()
    mine = record_npdiff(ours, BLOCK_PATHS)
    ours(sample, timestep, context)

    # the sinusoidal embedding is the argument of time_embedding
    assert_rel_close(mine["time_embedding"][0][0], theirs["time_proj"][1], KERNEL_TOL, f"{kind} time_proj")
    for path in BLOCK_PATHS:
        out, ref = mine[path][1], theirs[path][1]
        if path.count(".") == 1 and path.startswith("down_blocks."):   # (output, skips)
            (out, skips), (ref, ref_skips) = out, ref
            assert len(skips) == len(ref_skips), f"{path}: {len(skips)} skips, diffusers {len(ref_skips)}"
            for i, (skip, ref_skip) in enumerate(zip(skips, ref_skips)):
                assert_rel_close(skip, ref_skip, KERNEL_TOL, f"{kind} {path} skip {i}")
        if hasattr(ref, "sample"):
            ref = ref.sample
        elif isinstance(ref, tuple):
            ref = ref[0]
        assert_rel_close(out, ref, KERNEL_TOL, f"{kind} {path}")


def test_unet_uses_memory_efficient_attention(unet_pair, rng, monkeypatch):
    """With the threshold at 0 every attention takes the chunked path; results stay equal to torch."""
    kind, torch_model, ours = unet_pair
    calls = []
    chunked = attention_kernels.attention_chunked

    def counting_chunked(*args, **kwargs):
        calls.append(args[0].shape)
        return chunked(*args, key_chunk=4, **kwargs)             # several chunks even for 9 text tokens

    monkeypatch.setattr(attention_kernels, "MEMORY_EFFICIENT_MIN_SCORES", 0)
    monkeypatch.setattr(attention_kernels, "attention_chunked", counting_chunked)
    sample, context = random_inputs(rng, ours.config, 2, 8, 8, text_tokens=9)
    timestep = make_timestep(rng, "array-1", 2)
    out = ours(sample, timestep, context)
    assert calls, "no attention took the chunked path"
    assert_rel_close(out, torch_forward(torch_model, sample, timestep, context), FORWARD_TOL, f"{kind} chunked")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_unet_bad_inputs_raise(unet_pair, rng):
    _, _, ours = unet_pair
    sample, context = random_inputs(rng, ours.config, 2, 8, 8)
    with pytest.raises(NpdiffError, match=r"sample must have shape \[B,4,h,w\]"):
        ours(sample[:, :3], 1, context)
    with pytest.raises(NpdiffError, match="multiples of 4; got 8x6"):
        ours(sample[..., :6], 1, context)
    with pytest.raises(NpdiffError, match=r"encoder_hidden_states must have shape \[2,L,D\]"):
        ours(sample, 1, context[:1])
    with pytest.raises(NpdiffError, match="cross_attention_dim"):
        ours(sample, 1, np.concatenate([context, context], axis=-1))
    with pytest.raises(NpdiffError, match=r"timestep must be a scalar or an array of shape \[2\]"):
        ours(sample, np.array([1, 2, 3]), context)


def test_unet_config_errors_name_the_key(tmp_path):
    _, folder = tiny_unet("sd1", seed=0)
    config = json.loads((folder / "config.json").read_text())
    from npdiff.loading import load_component_weights

    with pytest.raises(NpdiffError, match="class_embed_type"):
        UNet2DConditionModel({**config, "class_embed_type": "timestep"}, load_component_weights(folder))
    with pytest.raises(NpdiffError, match="down_block_types entry 'AttnDownBlock2D'"):
        bad = {**config, "down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}
        UNet2DConditionModel(bad, load_component_weights(folder))
    # a config that disagrees with the weights: the error names the key and both shapes
    with pytest.raises(NpdiffError, match=r"attn2\.to_k\.weight.*\(32, 24\).*\(32, 32\)"):
        UNet2DConditionModel({**config, "cross_attention_dim": 32}, load_component_weights(folder))


# ---------------------------------------------------------------------------------------------
# LCM-distilled UNets: time_cond_proj_dim, timestep_cond
# ---------------------------------------------------------------------------------------------
# torch's float32 exp (vectorised, not correctly rounded) differs by one ulp from ours for some of the
# frequencies (e.g. the 5th of 12 and of 128); the 1000 * w factor (up to 1.5e4 here) carries that ~1e-7 into
# the sin/cos arguments: measured worst 1.8e-5 (dim 24), 8.6e-5 (dim 256), 3e-8 (dim 33) over 300 draws.
GUIDANCE_EMBEDDING_TOL = 2e-4


def test_guidance_scale_embedding_matches_diffusers(rng):
    from diffusers import StableDiffusionPipeline

    from npdiff.models.blocks import guidance_scale_embedding

    w = rng.uniform(0.0, 15.0, size=3).astype(np.float32)
    for dim in (24, 256, 33):
        theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim)
        ours = guidance_scale_embedding(w, dim)
        assert ours.shape == (3, dim) and ours.dtype == np.float32
        assert_rel_close(ours, theirs, GUIDANCE_EMBEDDING_TOL, f"guidance embedding dim {dim}")
    # small guidance values leave the one-ulp frequency differences below the kernel tolerance
    w = rng.uniform(0.0, 0.5, size=3).astype(np.float32)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=256)
    assert_rel_close(guidance_scale_embedding(w, 256), theirs, KERNEL_TOL, "guidance embedding, w < 0.5")


@pytest.mark.parametrize("with_cond", [True, False])
def test_lcm_unet_with_timestep_cond_matches_diffusers(rng, with_cond):
    torch_model, folder = tiny_unet("lcm", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    assert ours.config["time_cond_proj_dim"] == 24 and ours.time_embedding.cond_proj is not None
    sample, context = random_inputs(rng, ours.config, 2, 8, 12)
    timestep = rng.integers(0, 1000, size=2)
    timestep_cond = rng.standard_normal((2, 24)).astype(np.float32) if with_cond else None
    out = ours(sample, timestep, context, timestep_cond=timestep_cond)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context),
                          timestep_cond=None if timestep_cond is None else torch.from_numpy(timestep_cond)).sample
    assert_rel_close(out, ref, FORWARD_TOL, f"lcm unet, timestep_cond given: {with_cond}")
    if with_cond:  # the condition must matter
        assert rel_err(out, ours(sample, timestep, context)) > 1e-3


def test_timestep_cond_errors(rng):
    _, folder = tiny_unet("lcm", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, context = random_inputs(rng, ours.config, 2, 8, 8)
    with pytest.raises(NpdiffError, match=r"timestep_cond must have shape \[2,24\]"):
        ours(sample, 1, context, timestep_cond=np.zeros((2, 16), np.float32))
    _, plain_folder = tiny_unet("sd1", seed=0)
    plain = UNet2DConditionModel.from_pretrained(plain_folder)
    with pytest.raises(NpdiffError, match="no time_cond_proj_dim"):
        plain(sample, 1, context, timestep_cond=np.zeros((2, 24), np.float32))
    # an LCM config over plain weights: the missing cond_proj is named
    config = json.loads((folder / "config.json").read_text())
    from npdiff.loading import load_component_weights

    with pytest.raises(NpdiffError, match="time_embedding.cond_proj.weight"):
        UNet2DConditionModel(config, load_component_weights(plain_folder))
