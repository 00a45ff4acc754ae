"""Single-file checkpoints (original CompVis layout, SD 1.x and SD 2.x with its OpenCLIP text encoder): tiny
random diffusers/transformers models are written as one file by tests/single_file.py, and

  1. diffusers' own converters map that file back to the original state dicts (the test helper is
     right, independently of npdiff);
  2. npdiff.loading.load_single_file infers the configs (every key the tensors determine) and maps
     every tensor back to its diffusers name, bit-exact (fp32) or as torch rounds it (fp16);
  3. the models built from it give the torch models' outputs;
  4. files that are not SD 1.x/2.x single files fail with the file and key named.
(The SD 2.x networks and picture against the diffusers folder: tests/pipeline/test_pipeline_single_file.py.)
"""

import re

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close
from safetensors.torch import load_file, save_file
from single_file import to_original_layout, write_single_file
from tiny_clip import CLIP_KINDS, clip_state_dict, padded_ids, tiny_clip
from tiny_models import tiny_unet, tiny_vae

from npdiff.errors import NpdiffError
from npdiff.loading import load_single_file, read_config

COMBOS = {"sd1": ("sd1", "sd"), "sd2unet-deepvae": ("sd2", "deep")}  # (tiny UNet kind, tiny VAE kind)
UNET_INFERRED = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                 "layers_per_block", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block")
VAE_INFERRED = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "latent_channels")
CLIP_INFERRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act")
SCHEDULE_EXTRAS = {"betas": torch.linspace(0.1, 0.2, 10), "alphas_cumprod": torch.ones(10),
                   "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def state_of(model):
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def originals():
    """combo -> dict(unet=(config, state, model), vae=..., text_encoder=(config, state, model))."""
    result = {}
    clip_model = tiny_clip("sd1", seed=21)
    clip_config = clip_model.config.to_dict()
    clip_state = clip_state_dict(clip_model, prefix=True, position_ids=True)  # as SD 1.x files hold it
    for combo, (unet_kind, vae_kind) in COMBOS.items():
        unet_model, unet_folder = tiny_unet(unet_kind, seed=0)
        vae_model, vae_folder = tiny_vae(vae_kind, seed=0)
        result[combo] = {
            "unet": (read_config(unet_folder), state_of(unet_model), unet_model),
            "vae": (read_config(vae_folder), state_of(vae_model), vae_model),
            "text_encoder": (clip_config, clip_state, clip_model),
        }
    return result


def write(parts, path, **kwargs):
    return write_single_file(path, unet=parts["unet"][:2], vae=parts["vae"][:2],
                             text_encoder=parts["text_encoder"][1], **kwargs)


def assert_same_tensors(ours, expected, what):
    assert sorted(ours) == sorted(expected), f"{what}: keys differ: {sorted(set(ours) ^ set(expected))[:5]}"
    for key in expected:
        assert torch.equal(ours[key], expected[key]), f"{what}: tensor {key} differs"


@pytest.mark.parametrize("combo", list(COMBOS))
def test_helper_round_trips_through_diffusers_converters(combo, originals, tmp_path):
    parts = originals[combo]
    path = tmp_path / "model.safetensors"
    write(parts, path)
    checkpoint = load_file(str(path))
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for key in checkpoint)
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, parts["unet"][0]), parts["unet"][1], "unet")
    assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, parts["vae"][0]), parts["vae"][1], "vae")
    assert_same_tensors(convert_ldm_clip_checkpoint(checkpoint), parts["text_encoder"][1], "text_encoder")


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_configs_inferred_and_every_tensor_mapped(combo, dtype, originals, tmp_path):
    parts = originals[combo]
    path = tmp_path / "model.safetensors"
    write(parts, path, dtype=dtype, extra=SCHEDULE_EXTRAS)  # schedule buffers and EMA scalars are skipped
    loaded = load_single_file(path)
    assert sorted(loaded) == ["text_encoder", "unet", "vae"]

    inferred = {"unet": UNET_INFERRED, "vae": VAE_INFERRED, "text_encoder": CLIP_INFERRED}
    for component, inferred_keys in inferred.items():
        original_config, original_state, _ = parts[component]
        config, weights = loaded[component]
        for key in inferred_keys:
            assert config[key] == original_config[key], f"{component} config {key}: {config[key]} != original"
        assert weights.keys() == sorted(original_state), f"{component}: mapped keys differ"
        for key, tensor in original_state.items():
            if not tensor.is_floating_point():  # CLIP's position_ids: present, never taken
                assert weights.dtype(key) == "I64"
                continue
            expected = tensor if dtype is None else tensor.to(dtype).float()
            np.testing.assert_array_equal(weights.take(key, tuple(tensor.shape)), expected.numpy(),
                                          err_msg=f"{component} {key}")
    assert loaded["unet"][0]["attention_head_dim"] == 8 or parts["unet"][0]["use_linear_projection"]


def test_models_from_a_single_file_match_torch(originals, rng, tmp_path):
    from npdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    parts = originals["sd1"]
    path = tmp_path / "model.safetensors"
    write(parts, path)
    loaded = load_single_file(path)
    # what the tensors cannot say comes from the tiny models' configs (SD 1.x itself uses the defaults)
    unet_config = {**loaded["unet"][0], "norm_num_groups": parts["unet"][0]["norm_num_groups"]}
    vae_config = {**loaded["vae"][0], "norm_num_groups": parts["vae"][0]["norm_num_groups"]}

    text_encoder = CLIPTextModel(*loaded["text_encoder"])
    ids = padded_ids(rng, 2, CLIP_KINDS["sd1"]["max_position_embeddings"])
    with torch.no_grad():
        ref_text = parts["text_encoder"][2](torch.from_numpy(ids)).last_hidden_state
    assert_rel_close(text_encoder(ids), ref_text, KERNEL_TOL, what="text encoder")

    unet = UNet2DConditionModel(unet_config, loaded["unet"][1])
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 5, unet_config["cross_attention_dim"])).astype(np.float32)
    timestep = int(rng.integers(0, 1000))
    with torch.no_grad():
        ref_noise = parts["unet"][2](torch.from_numpy(sample), timestep, torch.from_numpy(context)).sample
    assert_rel_close(unet(sample, timestep, context), ref_noise, NETWORK_TOL, what="unet")

    vae = AutoencoderKL(vae_config, loaded["vae"][1])
    latents = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref_image = parts["vae"][2].decode(torch.from_numpy(latents)).sample
    assert_rel_close(vae.decode(latents), ref_image, NETWORK_TOL, what="vae decode")


# --------------------------------------------------------------------------------------------------
# Files that are not SD 1.x single files
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_checkpoint(originals):
    parts = originals["sd1"]
    return to_original_layout(parts["unet"][:2], parts["vae"][:2], parts["text_encoder"][1])


def save_changed(checkpoint, path, add=None, drop_prefix=None):
    changed = {k: v for k, v in checkpoint.items() if not (drop_prefix and k.startswith(drop_prefix))}
    changed.update(add or {})
    save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
    return path


def test_bad_single_files_name_file_and_key(sd1_checkpoint, tmp_path):
    path = tmp_path / "model.safetensors"
    cases = [
        (dict(add={"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}),
         r"holds two text encoders, OpenCLIP's \(cond_stage_model\.model\.\*, SD 2\.x\) and OpenAI CLIP's"),
        (dict(add={"conditioner.embedders.0.transformer.text_model.x": torch.zeros(2)}),
         r"unexpected key 'cond_stage_model\.transformer\.[^']+' in .*model\.safetensors: it belongs to none of "
         r"the sdxl file's parts"),  # a conditioner key makes it an SDXL file (single_file_sdxl.py)
        (dict(add={"something_else.weight": torch.zeros(2)}),
         r"unexpected key 'something_else\.weight' in .*model\.safetensors: it belongs to none of"),
        (dict(add={"model.diffusion_model.input_blocks.1.0.extra_layers.0.weight": torch.zeros(2)}),
         r"unexpected key 'model\.diffusion_model\.input_blocks\.1\.0\.extra_layers\.0\.weight' in "
         r".*model\.safetensors: no diffusers name for it in the unet key map"),
        (dict(drop_prefix="first_stage_model."),
         r"model\.safetensors has no vae weights \(no keys starting with 'first_stage_model\.'\)"),
        (dict(drop_prefix="model.diffusion_model.out.2."),
         r"missing key 'out\.2\.weight' of the unet in .*model\.safetensors"),
        (dict(add={"first_stage_model.encoder.mid.attn_1.q.weight": torch.zeros(32, 32, 3, 3)}),
         r"key 'first_stage_model\.encoder\.mid\.attn_1\.q\.weight' in .*model\.safetensors has shape "
         r"\(32, 32, 3, 3\); expected a 1x1 convolution"),
    ]
    for change, message in cases:
        save_changed(sd1_checkpoint, path, **change)
        with pytest.raises(NpdiffError, match=message):
            load_single_file(path)


def test_mapped_names_in_messages(sd1_checkpoint, tmp_path):
    """A shape error on a mapped key names both the diffusers and the stored name."""
    path = save_changed(sd1_checkpoint, tmp_path / "model.safetensors")
    _, weights = load_single_file(path)["vae"]
    channels = weights.shape("encoder.mid_block.attentions.0.to_q.weight")[0]
    assert weights.shape("encoder.mid_block.attentions.0.to_q.weight") == (channels, channels)  # from [C,C,1,1]
    expected = re.escape(f"key 'encoder.mid_block.attentions.0.to_q.weight' in {path} (vae part), stored as "
                         f"'first_stage_model.encoder.mid.attn_1.q.weight' has shape ({channels}, {channels}); "
                         f"the config expects ({channels + 1}, {channels})")
    with pytest.raises(NpdiffError, match=expected):
        weights.take("encoder.mid_block.attentions.0.to_q.weight", (channels + 1, channels))
    with pytest.raises(NpdiffError, match=re.escape(f"missing key 'decoder.absent' in {path} (vae part)")):
        weights.take("decoder.absent", (1,))


# --------------------------------------------------------------------------------------------------
# The full-size SD 1.5 structure, names and shapes only (models built on the meta device: no memory)
# --------------------------------------------------------------------------------------------------
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
                 use_linear_projection=False, transformer_layers_per_block=1)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def test_full_size_sd15_structure_maps_by_name_and_shape():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from npdiff.loading.single_file import map_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        clip = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    originals = {"unet": (SD15_UNET, unet.state_dict()), "vae": (SD15_VAE, vae.state_dict()),
                 "text_encoder": (SD15_CLIP, clip_state_dict(clip, prefix=True, position_ids=True))}
    checkpoint = to_original_layout(originals["unet"], originals["vae"], originals["text_encoder"][1])
    assert len(checkpoint) == sum(len(state) for _, state in originals.values())
    assert sorted(convert_ldm_unet_checkpoint(checkpoint, SD15_UNET)) == sorted(originals["unet"][1])  # the helper
    assert sorted(convert_ldm_vae_checkpoint(checkpoint, SD15_VAE)) == sorted(originals["vae"][1])
    shapes = {key: tuple(tensor.shape) for key, tensor in checkpoint.items()}

    mapped = map_checkpoint(shapes, "sd15-structure")
    for component, (original_config, original_state) in originals.items():
        config, names = mapped[component]
        for key, value in original_config.items():  # SD 1.5: even the conventions match
            assert config[key] == value, f"{component} config {key}: {config[key]} != {value}"
        assert sorted(names) == sorted(original_state)
        for key, (_, shape, _rows) in names.items():
            assert shape == tuple(original_state[key].shape), f"{component} {key}"


# --------------------------------------------------------------------------------------------------
# SD 2.x: the OpenCLIP text encoder (cond_stage_model.model.*)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_parts(originals):
    """The sd2-style UNet and deep VAE with tiny_clip("sd2") (gelu, heads 64 wide) as the text encoder."""
    clip_model = tiny_clip("sd2", seed=22)
    state = clip_state_dict(clip_model, prefix=True, position_ids=True)
    return dict(originals["sd2unet-deepvae"], text_encoder=(clip_model.config.to_dict(), state, clip_model))


def write_sd2(parts, path, **kwargs):
    """Write the SD 2.x-style file -> its path."""
    write(parts, path, text_encoder_layout="openclip", **kwargs)
    return path


def test_openclip_helper_round_trips_through_diffusers_converter(sd2_parts, tmp_path):
    checkpoint = load_file(str(write_sd2(sd2_parts, tmp_path / "sd2.safetensors")))
    layers = sd2_parts["text_encoder"][0]["num_hidden_layers"]
    assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in checkpoint  # one more
    assert not any(key.startswith("cond_stage_model.transformer.") for key in checkpoint)
    # diffusers drops the last of ViT-H's 24 blocks by name (resblocks.23); here the last is resblocks.<layers>
    converted = {key: tensor for key, tensor in convert_open_clip_checkpoint(None, checkpoint).items()
                 if not key.startswith(f"text_model.encoder.layers.{layers}.")}
    expected = {k: v for k, v in sd2_parts["text_encoder"][1].items() if not k.endswith("position_ids")}
    assert_same_tensors(converted, expected, "openclip text_encoder")


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_sd2_config_inferred_and_every_openclip_tensor_mapped(sd2_parts, tmp_path, dtype):
    path = write_sd2(sd2_parts, tmp_path / "sd2.safetensors", dtype=dtype, extra=SCHEDULE_EXTRAS)
    loaded = load_single_file(path)
    original_config, original_state, _ = sd2_parts["text_encoder"]
    config, weights = loaded["text_encoder"]
    for key in CLIP_INFERRED:
        assert config[key] == original_config[key], f"text_encoder config {key}: {config[key]} != original"
    expected = {k: v for k, v in original_state.items() if not k.endswith("position_ids")}
    assert weights.keys() == sorted(expected)  # the last resblock, text_projection, logit_scale: not mapped
    for key, tensor in expected.items():  # q/k/v: thirds of in_proj, bit-exact
        want = tensor if dtype is None else tensor.to(dtype).float()
        np.testing.assert_array_equal(weights.take(key, tuple(tensor.shape)), want.numpy(), err_msg=key)
    weights.check_all_used()
    assert loaded["unet"][0]["use_linear_projection"] is True
    assert "rows 0:192" in repr(pytest.raises(NpdiffError, weights.take,
                                              "text_model.encoder.layers.0.self_attn.q_proj.weight", (1, 1)).value)


def test_sd2_text_encoder_from_a_single_file_matches_transformers(sd2_parts, rng, tmp_path):
    from npdiff.models import CLIPTextModel

    loaded = load_single_file(write_sd2(sd2_parts, tmp_path / "sd2.safetensors"))
    text_encoder = CLIPTextModel(*loaded["text_encoder"])
    ids = padded_ids(rng, 2, CLIP_KINDS["sd2"]["max_position_embeddings"])
    with torch.no_grad():
        ref = sd2_parts["text_encoder"][2](torch.from_numpy(ids)).last_hidden_state
    assert_rel_close(text_encoder(ids), ref, NETWORK_TOL, what="OpenCLIP text encoder")


def test_bad_sd2_files_name_file_and_key(sd2_parts, tmp_path):
    checkpoint = to_original_layout(sd2_parts["unet"][:2], sd2_parts["vae"][:2], sd2_parts["text_encoder"][1],
                                    text_encoder_layout="openclip")
    path = tmp_path / "sd2.safetensors"
    in_proj = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    cases = [
        (dict(add={"cond_stage_model.model.visual.conv1.weight": torch.zeros(2)}),
         r"unexpected key 'cond_stage_model\.model\.visual\.conv1\.weight' in .*: no diffusers name for it in "
         r"the OpenCLIP text encoder key map"),
        (dict(add={in_proj: torch.zeros(2 * 192, 192)}),
         r"key '" + re.escape(in_proj) + r"' in .* has shape \(384, 192\); expected q, k and v stacked: \(576"),
        (dict(drop_prefix="cond_stage_model.model.positional_embedding"),
         r"missing key 'cond_stage_model\.model\.positional_embedding' of the OpenCLIP text encoder"),
    ]
    for change, message in cases:
        save_changed(checkpoint, path, **change)
        with pytest.raises(NpdiffError, match=message):
            load_single_file(path)


# The full-size SD 2.1 structure (diffusers' stabilityai/stable-diffusion-2-1 configs), names and shapes only
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SD21_CLIP = dict(SD15_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu")


def test_full_size_sd21_structure_maps_by_name_and_shape():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from npdiff.loading.single_file import map_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        clip = CLIPTextModel(CLIPTextConfig(**SD21_CLIP))
        clip_state = clip_state_dict(clip, prefix=True)
        vae_state = AutoencoderKL(**SD15_VAE).state_dict()
        checkpoint = to_original_layout((SD21_UNET, unet.state_dict()), (SD15_VAE, vae_state), clip_state,
                                        text_encoder_layout="openclip")
    assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight" in checkpoint  # ViT-H's 24 blocks
    in_proj = checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert tuple(in_proj.shape) == (3072, 1024)
    mapped = map_checkpoint({key: tuple(t.shape) for key, t in checkpoint.items()}, "sd21-structure")
    for component, original_config, state in (("unet", SD21_UNET, unet.state_dict()),
                                              ("text_encoder", SD21_CLIP, clip_state)):
        config, names = mapped[component]
        for key, value in original_config.items():
            assert config[key] == value, f"{component} config {key}: {config[key]} != {value}"
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        assert sorted(names) == sorted(state)
        for key, (_, shape, _rows) in names.items():
            assert shape == tuple(state[key].shape), f"{component} {key}"
