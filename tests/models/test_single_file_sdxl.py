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
  5. bad files fail with the file and key named, before anything is read.
"""

import copy
import os
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import load_file, save_file
from single_file import to_sdxl_original_layout, write_single_file
from tiny_models import randomize_
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from npdiff.errors import NpdiffError
from npdiff.loading import load_single_file
from npdiff.loading.resident import mapping_of
from npdiff.loading.single_file_sdxl import SDXL_SCHEDULER_CONFIG, map_sdxl_checkpoint

# Tiny parts with SDXL's structure. Heads are 64 channels wide and norm groups 32, as the loader assumes
# (the tensors do not say); the text encoders carry SDXL's token ids (bos 0, eos 2, pad 1).
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64, **TOKEN_IDS)
BIGG = dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=10, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32, **TOKEN_IDS)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
UNET_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 64, 128), attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3),
    cross_attention_dim=64 + 128, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=32 + 6 * TIME_EMBED,
)
UNET_KINDS = {
    "base": UNET_BASE,
    "inpaint": dict(UNET_BASE, in_channels=9),
    "refiner": dict(  # 4 blocks, attention in the middle two, depth 4 -> here 2 everywhere; 5 time ids
        UNET_BASE, block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, cross_attention_dim=128, projection_class_embeddings_input_dim=32 + 5 * 8),
    # depths that differ per layer and between down and up blocks (diffusers' nested lists)
    "asymmetric": dict(UNET_BASE, transformer_layers_per_block=(1, (1, 2), 3),
                       reverse_transformer_layers_per_block=((3, 1, 2), (2, 2, 1), (1, 1, 1))),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
           norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# skipped by the loader: the noise schedule (sgm's denoiser keeps its sigmas), EMA scalars
EXTRAS = {"alphas_cumprod": torch.ones(10), "denoiser.sigmas": torch.ones(10), "model_ema.decay": torch.tensor(0.9999)}
# transformers' config bookkeeping, not the model: left out of the comparison
CLIP_BOOKKEEPING = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label",
                    "label2id", "_commit_hash", "_attn_implementation_autoset", "output_hidden_states")


def random_clip(cls, config, seed):
    torch.manual_seed(seed)
    return randomize_(cls(CLIPTextConfig(**config)), seed + 1)  # 1-d parameters (norms, biases) noised too


def text_state(model, position_ids=False):
    """transformers' names with the "text_model." prefix (5.x's CLIPTextModel saves without it); position_ids:
    with the int64 buffer SDXL files carry for CLIP-L."""
    state = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    state = {(key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key): tensor
             for key, tensor in state.items()}
    if position_ids:
        state["text_model.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]  # [1,P]
    return state


def state_of(model):
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def parts():
    """kind -> {"unet"|"vae"|"text_encoder"|"text_encoder_2": (config, state, model)}; no CLIP-L in a refiner."""
    clip_l = random_clip(CLIPTextModel, CLIP_L, seed=31)
    bigg = random_clip(CLIPTextModelWithProjection, BIGG, seed=32)
    torch.manual_seed(33)
    vae = randomize_(AutoencoderKL(**VAE), 34)
    result = {}
    for seed, (kind, unet_config) in enumerate(UNET_KINDS.items()):
        torch.manual_seed(40 + seed)
        unet = randomize_(UNet2DConditionModel(**unet_config), 50 + seed)
        result[kind] = {
            "unet": (dict(unet.config), state_of(unet), unet),
            "vae": (dict(vae.config), state_of(vae), vae),
            "text_encoder_2": (bigg.config.to_dict(), text_state(bigg), bigg),
        }
        if kind != "refiner":
            result[kind]["text_encoder"] = (clip_l.config.to_dict(), text_state(clip_l, position_ids=True), clip_l)
    return result


def write(kind_parts, path, **kwargs):
    """Write the SDXL file -> its path."""
    text_encoder = kind_parts.get("text_encoder")
    write_single_file(path, unet=kind_parts["unet"][:2], vae=kind_parts["vae"][:2],
                      text_encoder=text_encoder[1] if text_encoder else None,
                      text_encoder_2=kind_parts["text_encoder_2"][1], **kwargs)
    return path


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
    checkpoint = load_file(str(write(kind_parts, tmp_path / "sdxl.safetensors")))
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
    path = write(kind_parts, tmp_path / "sdxl.safetensors", dtype=DTYPES[dtype], extra=EXTRAS)
    loaded = load_single_file(path)
    components = sorted(name for name in kind_parts)
    assert sorted(loaded) == sorted(components + ["model_type", "scheduler"])
    assert loaded["model_type"] == ("sdxl-refiner" if kind == "refiner" else "sdxl")
    assert loaded["scheduler"] == SDXL_SCHEDULER_CONFIG
    for component in components:
        original_config, original_state, _ = kind_parts[component]
        config, weights = loaded[component]
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
    loaded = load_single_file(write(parts["base"], tmp_path / "sdxl.safetensors"))
    _, bigg = loaded["text_encoder_2"]
    width = BIGG["hidden_size"]
    query = bigg.take("text_model.encoder.layers.0.self_attn.q_proj.weight", (width, width))
    assert mapping_of(query) is not None and query.flags.c_contiguous
    conv_in = loaded["unet"][1].take("conv_in.weight", (64, 4, 3, 3))
    assert mapping_of(conv_in) is not None
    projection = bigg.take("text_projection.weight", (BIGG["projection_dim"], width))
    assert mapping_of(projection) is None and projection.flags.c_contiguous


def test_projection_stored_as_a_linear_weight(parts, base_checkpoint, tmp_path):
    """text_projection.weight [P,D] (files re-saved from a Linear) is taken as it is, a view of the file."""
    projection = parts["base"]["text_encoder_2"][1]["text_projection.weight"]  # [P,D]
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors", drop=re.escape(BIGG_KEY + "text_projection"),
                        add={BIGG_KEY + "text_projection.weight": projection})
    config, bigg = load_single_file(path)["text_encoder_2"]
    assert config["projection_dim"] == BIGG["projection_dim"]
    taken = bigg.take("text_projection.weight", tuple(projection.shape))
    np.testing.assert_array_equal(taken, projection.numpy())
    assert mapping_of(taken) is not None


# --------------------------------------------------------------------------------------------------
# 3. diffusers' from_single_file reads the same file the same way (configs from local folders, offline)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_diffusers_from_single_file_reads_the_same_tensors(kind, parts, tmp_path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    kind_parts = parts[kind]
    path = write(kind_parts, tmp_path / "sdxl.safetensors")
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
    stored, shape, rows, transpose = mapped["text_encoder_2"][1]["text_projection.weight"]
    assert (stored, shape, rows, transpose) == ("conditioner.embedders.1.model.text_projection" if kind == "base" else
                                                "conditioner.embedders.0.model.text_projection", (1280, 1280), None, True)


# --------------------------------------------------------------------------------------------------
# 5. Refusals: NpdiffError naming the file and key, before anything is read
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_checkpoint(parts):
    kind_parts = parts["base"]
    return to_sdxl_original_layout(kind_parts["unet"][:2], kind_parts["vae"][:2], kind_parts["text_encoder"][1],
                                   kind_parts["text_encoder_2"][1])


def save_changed(checkpoint, path, add=None, drop=None):
    changed = {k: v for k, v in checkpoint.items() if not (drop and re.fullmatch(drop, k))}
    changed.update(add or {})
    save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
    return path


BIGG_KEY = "conditioner.embedders.1.model."
REFUSALS = {
    "missing unet key": (dict(drop=r"model\.diffusion_model\.out\.2\.weight"),
                         r"missing key 'model\.diffusion_model\.out\.2\.weight' of the unet in .*sdxl\.safetensors"),
    "missing label_emb": (dict(drop=r"model\.diffusion_model\.label_emb\..*"),
                          r"missing key 'model\.diffusion_model\.label_emb\.0\.0\.weight' of the unet in "),
    "missing bigG key": (dict(drop=re.escape(BIGG_KEY + "positional_embedding")),
                         r"missing key 'conditioner\.embedders\.1\.model\.positional_embedding' of the text_encoder_2"),
    "missing projection": (dict(drop=re.escape(BIGG_KEY + "text_projection")),
                           r"neither 'conditioner\.embedders\.1\.model\.text_projection' nor "
                           r"'conditioner\.embedders\.1\.model\.text_projection\.weight' \(bigG's projection"),
    "two projections": (dict(add={BIGG_KEY + "text_projection.weight": torch.zeros(32, 128)}),
                        r"both 'conditioner\.embedders\.1\.model\.text_projection' and "),
    "no vae": (dict(drop=r"first_stage_model\..*"),
               r"sdxl\.safetensors has no vae weights \(no keys starting with 'first_stage_model\.'\)"),
    "no CLIP-L": (dict(drop=r"conditioner\.embedders\.0\..*"),
                  r"has no text_encoder weights \(no keys starting with 'conditioner\.embedders\.0\.transformer\.'\)"),
    "unexpected embedder": (dict(add={"conditioner.embedders.2.model.weight": torch.zeros(2)}),
                            r"unexpected key 'conditioner\.embedders\.2\.model\.weight' in .*sdxl\.safetensors: it "
                            r"belongs to none of the sdxl file's parts"),
    "unexpected unet key": (dict(add={"model.diffusion_model.label_emb.0.1.weight": torch.zeros(2)}),
                            r"unexpected key 'model\.diffusion_model\.label_emb\.0\.1\.weight' in .*: no diffusers "
                            r"name for it in the unet key map"),
    "unexpected bigG key": (dict(add={BIGG_KEY + "visual.proj": torch.zeros(2)}),
                            r"unexpected key 'conditioner\.embedders\.1\.model\.visual\.proj' in .*: no diffusers name "
                            r"for it in the OpenCLIP text encoder key map"),
    "SD 1.x encoder too": (dict(add={"cond_stage_model.transformer.text_model.x": torch.zeros(2)}),
                           r"unexpected key 'cond_stage_model\.transformer\.text_model\.x' in .*sdxl\.safetensors"),
    "refiner and base mixed": (dict(add={"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2)}),
                               r"sdxl\.safetensors mixes an SDXL refiner's text encoder"),
    "label_emb width": (dict(add={"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4 * 64, 32 + 6 * 8 + 1)}),
                        r"key 'model\.diffusion_model\.label_emb\.0\.0\.weight' in .* has shape \(256, 81\); an sdxl "
                        r"UNet takes the pooled text embedding \(32\) and 6 time ids of equal width"),
    "projection shape": (dict(add={BIGG_KEY + "text_projection": torch.zeros(64, 32)}),
                         r"key 'conditioner\.embedders\.1\.model\.text_projection' in .* has shape \(64, 32\); "
                         r"expected \(128, P\)"),
    "in_proj rows": (dict(add={BIGG_KEY + "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(256, 128)}),
                     r"key 'conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.attn\.in_proj_weight' in .* "
                     r"has shape \(256, 128\); expected q, k and v stacked: \(384, \.\.\.\)"),
    "context width": (dict(drop=r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.1\..*",
                           add={"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                                torch.zeros(1000, 128)}),
                      r"the UNet's cross-attention takes 192 text channels \(attn2\.to_k\), but the file's text "
                      r"encoders give 128 \+ 128"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_sdxl_files_name_file_and_key(case, base_checkpoint, tmp_path, monkeypatch):
    change, message = REFUSALS[case]
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors", **change)
    read = []  # nothing may be read before the refusal
    from npdiff.loading.safetensors_io import SafetensorsFile
    monkeypatch.setattr(SafetensorsFile, "read_float32", lambda self, key: read.append(key))
    with pytest.raises(NpdiffError, match=message):
        load_single_file(path)
    assert read == []


def test_wrong_shape_at_take_names_the_stored_key(base_checkpoint, tmp_path):
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors")
    _, bigg = load_single_file(path)["text_encoder_2"]
    expected = re.escape(f"key 'text_projection.weight' in {path} (text_encoder_2 part), stored as "
                         f"'{BIGG_KEY}text_projection' transposed has shape (32, 128); the config expects (128, 32)")
    with pytest.raises(NpdiffError, match=expected):
        bigg.take("text_projection.weight", (128, 32))


def test_truncated_and_pickle_files_are_refused(base_checkpoint, tmp_path):
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(NpdiffError, match=re.escape(str(path)) + " is not a readable safetensors file"):
        load_single_file(path)
    pickle = tmp_path / "sd_xl_base_1.0.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(NpdiffError, match=r"refusing to read a '\.ckpt' checkpoint"):
        load_single_file(pickle)


def test_nan_weight_refused_naming_the_stored_key(parts, tmp_path):
    kind_parts = copy.copy(parts["refiner"])
    config, state, model = kind_parts["text_encoder_2"]
    state = dict(state, **{"text_projection.weight": state["text_projection.weight"].clone()})
    state["text_projection.weight"][3, 5] = float("nan")
    kind_parts["text_encoder_2"] = (config, state, model)
    path = write(kind_parts, tmp_path / "refiner.safetensors", dtype=torch.bfloat16)
    _, bigg = load_single_file(path)["text_encoder_2"]
    with pytest.raises(NpdiffError, match=r"key 'text_projection\.weight' in .*stored as 'conditioner\.embedders\.0\."
                                          r"model\.text_projection' transposed holds nan at index \(3, 5\)"):
        bigg.take("text_projection.weight", (32, 128))
    assert os.path.getsize(path) > 0
