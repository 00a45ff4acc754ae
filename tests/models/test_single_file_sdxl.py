"""SDXL single files (Stability's sgm layout: base, refiner, inpainting) in float32, float16 and bfloat16.

Tiny random diffusers/transformers SDXL parts (a text_time UNet, an AutoencoderKL, CLIPTextModel and
CLIPTextModelWithProjection) are written as one file by tests/single_file.py (its own diffusers -> original
map, independent of npdiff's tables), and
  1. diffusers' own converters read that file back to the original state dicts (the helper is right);
  2. npdiff.loading.load_single_file infers every config value (the diffusers/transformers models built
     from npdiff's configs have the originals' whole configs) and maps every tensor to its diffusers name,
     bit-exact (fp32) or exactly as torch rounds it (fp16, bf16);
  3. diffusers' from_single_file (config= a local folder, offline) reads the same file to the same tensors;
  4. the full-size SDXL base and refiner structures (meta tensors) give diffusers' hub configs;
  5. the networks built from the file give diffusers'/transformers' outputs.
Bad files and file variants: test_single_file_sdxl_errors.py.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                 create_diffusers_clip_model_from_ldm)
from helpers import NETWORK_TOL, assert_rel_close
from safetensors.torch import load_file
from single_file import (BIGG, TOKEN_IDS, UNET_KINDS, state_of, text_state, tiny_sdxl_parts, to_sdxl_original_layout,
                         write_sdxl)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from npdiff import models
from npdiff.loading import load_single_file
from npdiff.loading.config_checks import check_component_config
from npdiff.loading.resident import mapping_of
from npdiff.loading.single_file_sdxl import SDXL_SCHEDULER_CONFIG, map_sdxl_checkpoint

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# skipped by the loader: the noise schedule (sgm's denoiser keeps its sigmas), EMA scalars
EXTRAS = {"alphas_cumprod": torch.ones(10), "denoiser.sigmas": torch.ones(10), "model_ema.decay": torch.tensor(0.9999)}
# transformers' config bookkeeping, not the model: left out of the comparison
CLIP_BOOKKEEPING = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label",
                    "label2id", "_commit_hash", "_attn_implementation_autoset", "output_hidden_states")


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_parts()


def assert_same_tensors(ours, expected, what):
    assert sorted(ours) == sorted(expected), f"{what}: keys differ: {sorted(set(ours) ^ set(expected))[:5]}"
    for key in expected:
        assert torch.equal(ours[key], expected[key]), f"{what}: tensor {key} differs"


# --------------------------------------------------------------------------------------------------
# 1. The test helper against diffusers' converters
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_helper_round_trips_through_diffusers_converters(kind, parts, tmp_path):
    kind_parts = parts[kind]
    checkpoint = load_file(str(write_sdxl(kind_parts, tmp_path / "sdxl.safetensors")))
    unet_config, unet_state, _ = kind_parts["unet"]
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, unet_config), unet_state, "unet")
    assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, kind_parts["vae"][0]), kind_parts["vae"][1], "vae")
    bigg_prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
    converted = convert_open_clip_checkpoint(None, checkpoint, prefix=bigg_prefix)  # text_projection transposed back
    assert_same_tensors(converted, kind_parts["text_encoder_2"][1], "text_encoder_2")
    if kind == "base":
        assert_same_tensors(convert_ldm_clip_checkpoint(checkpoint), kind_parts["text_encoder"][1], "text_encoder")
    else:
        assert not any(key.startswith("conditioner.embedders.0.transformer.") for key in checkpoint)


# --------------------------------------------------------------------------------------------------
# 2. npdiff's loader: every config value and every tensor
# --------------------------------------------------------------------------------------------------
def unet_config_as_diffusers(config):
    """The whole config of a diffusers UNet built from `config` (meta tensors: nothing allocated)."""
    with torch.device("meta"):
        return dict(UNet2DConditionModel.from_config({k: v for k, v in config.items() if k != "_class_name"}).config)


def vae_config_as_diffusers(config):
    with torch.device("meta"):
        return dict(AutoencoderKL.from_config({k: v for k, v in config.items() if k != "_class_name"}).config)


def clip_config_as_transformers(config):
    whole = CLIPTextConfig(**config).to_dict()
    return {key: value for key, value in whole.items() if key not in CLIP_BOOKKEEPING}


AS_LIBRARY = {"unet": unet_config_as_diffusers, "vae": vae_config_as_diffusers,
              "text_encoder": clip_config_as_transformers, "text_encoder_2": clip_config_as_transformers}


def jsonable(config):
    """Tuples as lists (a saved config's form), private keys dropped."""
    return {key: (list(map(jsonable_value, value)) if isinstance(value, (list, tuple)) else value)
            for key, value in config.items() if not key.startswith("_")}


def jsonable_value(value):
    return list(map(jsonable_value, value)) if isinstance(value, (list, tuple)) else value


# every kind in every dtype, but the asymmetric depths (a config question) in float32 only
LOAD_CASES = [(kind, dtype) for kind in UNET_KINDS for dtype in DTYPES if kind != "asymmetric" or dtype == "fp32"]


@pytest.mark.parametrize("kind, dtype", LOAD_CASES)
def test_every_config_value_and_tensor_as_diffusers(kind, dtype, parts, tmp_path):
    kind_parts = parts[kind]
    path = write_sdxl(kind_parts, tmp_path / "sdxl.safetensors", dtype=DTYPES[dtype], extra=EXTRAS)
    loaded = load_single_file(path)
    components = sorted(name for name in kind_parts)
    assert sorted(loaded) == sorted(components + ["model_type", "scheduler"])
    assert loaded["model_type"] == ("sdxl-refiner" if kind == "refiner" else "sdxl")
    assert loaded["scheduler"] == SDXL_SCHEDULER_CONFIG
    for component in components:
        original_config, original_state, _ = kind_parts[component]
        config, weights = loaded[component]
        check_component_config("text_encoder" if component.startswith("text") else component, config)  # npdiff's rules
        ours = jsonable(AS_LIBRARY[component](config))
        theirs = jsonable(AS_LIBRARY[component](original_config))
        differing = {key: (ours.get(key), theirs.get(key)) for key in set(ours) | set(theirs)
                     if ours.get(key) != theirs.get(key)}
        assert not differing, f"{component} config (ours, original): {differing}"
        assert weights.keys() == sorted(original_state), f"{component}: mapped keys differ"
        for key, tensor in original_state.items():
            if not tensor.is_floating_point():  # CLIP-L's position_ids: present, ignored as CLIPTextModel does
                assert weights.dtype(key) == "I64"
                weights.ignore(key)
                continue
            expected = tensor if DTYPES[dtype] is None else tensor.to(DTYPES[dtype]).float()
            np.testing.assert_array_equal(weights.take(key, tuple(tensor.shape)), expected.numpy(),
                                          err_msg=f"{component} {key}")
        weights.check_all_used()
    if kind == "inpaint":
        assert loaded["unet"][0]["in_channels"] == 9


def test_float32_tensors_stay_views_of_the_file(parts, tmp_path):
    """No copies of float32 weights: the q/k/v thirds of in_proj are row views of the file's map; only the
    transposed projection becomes one private contiguous copy (documented in single_file_sdxl.py)."""
    loaded = load_single_file(write_sdxl(parts["base"], tmp_path / "sdxl.safetensors"))
    _, bigg = loaded["text_encoder_2"]
    width = BIGG["hidden_size"]
    query = bigg.take("text_model.encoder.layers.0.self_attn.q_proj.weight", (width, width))
    assert mapping_of(query) is not None and query.flags.c_contiguous
    conv_in = loaded["unet"][1].take("conv_in.weight", (64, 4, 3, 3))
    assert mapping_of(conv_in) is not None
    projection = bigg.take("text_projection.weight", (BIGG["projection_dim"], width))
    assert mapping_of(projection) is None and projection.flags.c_contiguous


# --------------------------------------------------------------------------------------------------
# 3. diffusers' from_single_file reads the same file the same way (configs from local folders, offline)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_diffusers_from_single_file_reads_the_same_tensors(kind, parts, tmp_path):
    kind_parts = parts[kind]
    path = write_sdxl(kind_parts, tmp_path / "sdxl.safetensors")
    loaded = load_single_file(path)
    checkpoint = load_file(str(path))
    for component in kind_parts:
        folder = tmp_path / "config" / component
        model = kind_parts[component][2]
        model.save_pretrained(folder) if component in ("unet", "vae") else model.config.save_pretrained(folder)
        if component in ("unet", "vae"):
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
        else:
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            theirs = create_diffusers_clip_model_from_ldm(cls, checkpoint, config=str(folder), local_files_only=True)
        their_state = text_state(theirs) if component.startswith("text") else state_of(theirs)
        their_state = {key: value for key, value in their_state.items() if not key.endswith("position_ids")}
        _, weights = loaded[component]
        ours = [key for key in weights.keys() if not key.endswith("position_ids")]
        assert ours == sorted(their_state), f"{component}: names differ from diffusers'"
        for key, tensor in their_state.items():
            np.testing.assert_array_equal(weights.take(key, tuple(tensor.shape)), tensor.numpy(),
                                          err_msg=f"{component} {key}")


# --------------------------------------------------------------------------------------------------
# 4. The full-size SDXL structures (diffusers' hub configs), names and shapes only: meta tensors
# --------------------------------------------------------------------------------------------------
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)
SDXL_REFINER_UNET = dict(  # stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json
    SDXL_UNET, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4, cross_attention_dim=1280, projection_class_embeddings_input_dim=2560)
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   **TOKEN_IDS)
SDXL_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                 **TOKEN_IDS)
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.13025,
                       force_upcast=True)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_sdxl_structure_gives_the_hub_configs(kind):
    unet_config = SDXL_UNET if kind == "base" else SDXL_REFINER_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        clip_l = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L)) if kind == "base" else None
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BIGG))
        originals = {"unet": (unet_config, unet.state_dict()), "vae": (SDXL_VAE_CONFIG, vae.state_dict()),
                     "text_encoder_2": (SDXL_BIGG, text_state(bigg))}
        if clip_l is not None:
            originals["text_encoder"] = (SDXL_CLIP_L, text_state(clip_l))
        checkpoint = to_sdxl_original_layout(originals["unet"], originals["vae"],
                                             originals.get("text_encoder", (None, None))[1], text_state(bigg))
    fused = 4 * SDXL_BIGG["num_hidden_layers"]  # q, k, v weights and biases -> in_proj_weight, in_proj_bias
    assert len(checkpoint) == sum(len(state) for _, state in originals.values()) - fused + 1  # + logit_scale
    mapped = map_sdxl_checkpoint({key: tuple(tensor.shape) for key, tensor in checkpoint.items()}, "sdxl-structure")
    assert mapped["model_type"] == ("sdxl" if kind == "base" else "sdxl-refiner")
    for component, (original_config, state) in originals.items():
        config, names = mapped[component]
        for key, value in original_config.items():
            assert jsonable_value(config[key]) == jsonable_value(value), f"{component} config {key}: {config[key]}"
        assert sorted(names) == sorted(state)
        for key, (_, shape, _rows, _transpose) in names.items():
            assert shape == tuple(state[key].shape), f"{component} {key}"
    bigg_prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
    projection = mapped["text_encoder_2"][1]["text_projection.weight"]  # (stored key, shape, rows, transpose)
    assert projection == (bigg_prefix + "text_projection", (1280, 1280), None, True)


# --------------------------------------------------------------------------------------------------
# 6. The networks built from a single file give diffusers'/transformers' outputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_networks_from_a_single_file_match_diffusers(kind, parts, rng, tmp_path):
    kind_parts = parts[kind]
    loaded = load_single_file(write_sdxl(kind_parts, tmp_path / "sdxl.safetensors"))
    # 1. the text encoders: bigG's pooled, projected text_embeds and the penultimate hidden states SDXL takes
    ids = rng.integers(3, BIGG["vocab_size"] - 1, size=(2, 77), dtype=np.int64)
    ids[:, 0], ids[0, 9:], ids[1, 30:] = BIGG["bos_token_id"], BIGG["vocab_size"] - 1, BIGG["vocab_size"] - 1
    bigg = models.CLIPTextModelWithProjection(*loaded["text_encoder_2"])
    ours = bigg(ids, output_hidden_states=True)
    with torch.no_grad():
        theirs = kind_parts["text_encoder_2"][2](torch.from_numpy(ids), output_hidden_states=True)
    assert_rel_close(ours.text_embeds, theirs.text_embeds, NETWORK_TOL, what="bigG text_embeds")
    assert_rel_close(ours.hidden_states[-2], theirs.hidden_states[-2], NETWORK_TOL, what="bigG hidden_states[-2]")
    if kind == "base":
        clip_l = models.CLIPTextModel(*loaded["text_encoder"])
        with torch.no_grad():
            their_l = kind_parts["text_encoder"][2](torch.from_numpy(ids)).last_hidden_state
        assert_rel_close(clip_l(ids), their_l, NETWORK_TOL, what="CLIP-L")
    # 2. the UNet with SDXL's conditioning: context [B,L,D_L+D_G], pooled [B,P], time ids [B,6] (refiner: 5)
    config = loaded["unet"][0]
    unet = models.UNet2DConditionModel(*loaded["unet"])
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, BIGG["projection_dim"])).astype(np.float32)
    time_ids = np.tile(np.array([1024, 1024, 0, 0, 1024, 1024] if kind == "base" else [1024, 1024, 0, 0, 6],
                                dtype=np.float32), (2, 1))
    timestep = int(rng.integers(0, 1000))
    ours = unet(sample, timestep, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        theirs = kind_parts["unet"][2](torch.from_numpy(sample), timestep, torch.from_numpy(context),
                                       added_cond_kwargs=added).sample
    assert_rel_close(ours, theirs, NETWORK_TOL, what=f"{kind} UNet")
