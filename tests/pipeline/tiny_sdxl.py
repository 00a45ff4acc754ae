"""A tiny random SDXL saved by diffusers, with the real CLIP tokenizers, for the SDXL pipeline tests.

    from tiny_sdxl import tiny_sdxl_folder, torch_sdxl_pipeline

    folder = tiny_sdxl_folder("base")      # unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
                                           # scheduler/, model_index.json (StableDiffusionXLPipeline)
    pipe = torch_sdxl_pipeline(folder, "img2img")   # diffusers' SDXL pipeline (float32, CPU, no watermark)

SDXL's structure, scaled down:
  text_encoder    transformers CLIPTextModel (CLIP-L's kind: quick_gelu), width 16
  text_encoder_2  transformers CLIPTextModelWithProjection (OpenCLIP bigG's kind: gelu), width 32,
                  projection_dim 16; the pooled token found as SDXL's is (eos_token_id 2: the largest id)
  unet            addition_embed_type "text_time": the pooled embedding [B,16] and 6 size/crop ids
                  (addition_time_embed_dim 8 each) through add_time_proj + add_embedding, per-block head
                  counts, transformer_layers_per_block (1, 2), linear projections, cross_attention_dim
                  16 + 32 = 48 (the two encoders' penultimate hidden states side by side)
  vae             4 blocks (picture / 8: the default picture is 64x64), SDXL's scaling_factor 0.13025
  tokenizer_2     pads with "!" as SDXL's does; both tokenizers have the full 49,408-id vocabulary
  scheduler       SDXL's: Euler discrete, scaled_linear betas, timestep_spacing "leading"

Kinds: "base"; "refiner" (StableDiffusionXLImg2ImgPipeline: no text_encoder/tokenizer, a UNet of 5 ids with
the aesthetic score, requires_aesthetics_score, force_zeros_for_empty_prompt False); "inpaint" (a 9-channel
UNet: latents, mask, masked picture latents); "lcm" (time_cond_proj_dim 16); "single_file" (heads 64 wide and
32 norm groups, what a single file's loader assumes; write_sdxl_single_file writes it in the sgm layout). Every parameter is random;
each kind is built once per process.
"""

import functools
import shutil
import tempfile
from pathlib import Path

from tiny_models import _process_root, randomize_

from tiny_sd import tiny_clip_text_model

CLIP_L = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
              layer_norm_eps=1e-5)
CLIP_G = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="gelu", projection_dim=16)
TIME_IDS_BASE, TIME_IDS_REFINER = 6, 5  # (original size, crop, target size) or (original size, crop, score)
TIME_DIM = 8

UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            norm_num_groups=8, cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
            addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=TIME_IDS_BASE * TIME_DIM + CLIP_G["projection_dim"])
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025,
           force_upcast=True)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
                 sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                 timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)

# What an SDXL single file does not store, as npdiff's and diffusers' loaders assume it: heads 64 channels wide,
# 32 groups in every norm (the text encoders' widths are the heads' multiples)
CLIP_L_64, CLIP_G_64 = dict(CLIP_L, hidden_size=64, num_attention_heads=1), dict(CLIP_G, hidden_size=64,
                                                                                  num_attention_heads=1)
UNET_64 = dict(UNET, block_out_channels=(64, 64), attention_head_dim=(1, 1), norm_num_groups=32,
               cross_attention_dim=128)

KINDS = {
    "base": dict(unet=UNET),
    "single_file": dict(unet=UNET_64, clip_l=CLIP_L_64, clip_g=CLIP_G_64,
                        vae=dict(VAE, norm_num_groups=32, block_out_channels=(32, 32, 32, 32))),
    "refiner": dict(unet=dict(UNET, cross_attention_dim=CLIP_G["hidden_size"],
                              projection_class_embeddings_input_dim=TIME_IDS_REFINER * TIME_DIM
                              + CLIP_G["projection_dim"])),
    "inpaint": dict(unet=dict(UNET, in_channels=9)),
    "lcm": dict(unet=dict(UNET, time_cond_proj_dim=16)),
}


@functools.lru_cache(maxsize=None)
def clip_tokenizer_files(pad_token=None):
    """The CLIP tokenizer's files (vocab.json, merges.txt, configs; padded with `pad_token`, None: the end token),
    written once per process (each writing rebuilds the 49,408-token vocabulary: ~0.5 s) -> their folder."""
    from npdiff.clip_vocab import write_clip_tokenizer_folder

    folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-", dir=_process_root()))
    return write_clip_tokenizer_folder(folder, **({} if pad_token is None else {"pad_token": pad_token}))


def copy_clip_tokenizer(destination, pad_token=None):
    """clip_tokenizer_files copied into `destination` (made if missing; files of the same name replaced)."""
    shutil.copytree(clip_tokenizer_files(pad_token), destination, dirs_exist_ok=True)
    return Path(destination)


@functools.lru_cache(maxsize=None)
def building_tokenizer(pad_token=None):
    """transformers' CLIPTokenizer over clip_tokenizer_files, loaded once per process: only to build pipelines that
    are saved (never mutated; a test that adds tokens loads its own from a saved folder)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_files(pad_token)))


@functools.lru_cache(maxsize=None)
def tiny_sdxl_folder(kind="base", seed=0):
    """Build and save the tiny SDXL pipeline of `kind` with diffusers (once per process) -> its folder."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModelWithProjection

    root = Path(tempfile.mkdtemp(prefix="tiny-sdxl-", dir=_process_root()))
    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**KINDS[kind]["unet"]), seed + 1)
    vae = randomize_(AutoencoderKL(**KINDS[kind].get("vae", VAE)), seed + 2)
    text_encoder_2 = tiny_clip_text_model(seed + 4, KINDS[kind].get("clip_g", CLIP_G), CLIPTextModelWithProjection)
    tokenizer_2 = building_tokenizer("!")
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    folder = root / f"tiny-sdxl-{kind}"
    if kind == "refiner":
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
                                                tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
                                                scheduler=scheduler, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False, add_watermarker=False)
    else:
        text_encoder = tiny_clip_text_model(seed + 3, KINDS[kind].get("clip_l", CLIP_L))
        tokenizer = building_tokenizer()
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; hub folders also carry vocab.json + merges.txt: add them.
    if kind != "refiner":
        copy_clip_tokenizer(folder / "tokenizer")
    copy_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    return folder


def torch_sdxl_pipeline(folder, mode="txt2img", scheduler=None):
    """diffusers' SDXL pipeline of `mode` ("txt2img", "img2img", "inpaint") over the same folder (float32, CPU,
    no watermark, no progress bar); scheduler: a diffusers scheduler instance to use instead of the folder's."""
    import diffusers
    import torch

    cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[mode]
    pipe = cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True, add_watermarker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sdxl_single_file(folder, path):
    """The folder's UNet, VAE and both text encoders as one SDXL single file (Stability's sgm layout, written by
    tests/single_file.py's own map) -> path."""
    import json

    from safetensors.torch import load_file
    from single_file import write_single_file

    def part(name, weights):
        config = json.loads((Path(folder) / name / "config.json").read_text())
        return config, load_file(str(Path(folder) / name / weights))

    text_encoder = (Path(folder) / "text_encoder").is_dir() and part("text_encoder", "model.safetensors")[1]
    write_single_file(path, unet=part("unet", "diffusion_pytorch_model.safetensors"),
                      vae=part("vae", "diffusion_pytorch_model.safetensors"), text_encoder=text_encoder or None,
                      text_encoder_2=part("text_encoder_2", "model.safetensors")[1])
    return Path(path)
