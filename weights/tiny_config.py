"""The tiny-shapes model: Stable Diffusion's own architecture, scaled down, and how it is saved.

Same classes as SD 1.x (transformers' CLIPTextModel, diffusers' UNet2DConditionModel with cross-attention
and AutoencoderKL, the real 49,408-token CLIP tokenizer, a DDIM scheduler config like SD's); only the sizes
differ:

| part          | SD 1.5                              | tiny-shapes                              |
|---------------|-------------------------------------|------------------------------------------|
| image         | 512x512                             | 32x32                                    |
| VAE           | 4 blocks (128,256,512,512), 2 layers| 3 blocks (16,32,64), 1 layer: factor 4   |
| latent        | 4x64x64                             | 4x8x8                                    |
| text encoder  | 12 layers, width 768, 12 heads      | 3 layers, width 64, 2 heads              |
| UNet          | (320,640,1280,1280), 2 layers, 8 h. | (32,64,64), 1 layer, 4 heads             |
| cross-attn dim| 768                                 | 64                                       |

Saved as a diffusers folder, safetensors only; the text encoder in fp16 (its 49,408 x 64 token table is
most of the bytes), UNet and VAE in fp32.
"""

import json
from pathlib import Path

IMAGE_SIZE = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 4
TEXT_WIDTH = 64

# SD's noise schedule (training and sampling alike).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# The sampler shipped in scheduler/: DDIM with the settings of SD's own DDIM configs (SD 2.x ships DDIM;
# SD 1.5 ships PNDM). Measured on this model (weights/README.md): PNDM's multistep extrapolation at
# guidance 7 and 15 steps throws the tiny model's latents out of range (colours right 0.5%; DPM++ 2M
# 44.5%), while DDIM and Euler stay at 100%; `npdiff generate --sampler pndm` still runs PNDM.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    **SCHEDULE,
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def text_encoder_config():
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                          hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def build_text_encoder():
    from transformers import CLIPTextModel
    return CLIPTextModel(text_encoder_config())


def build_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=16)


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16)


def write_scheduler_and_index(folder):
    """scheduler/scheduler_config.json and model_index.json (rewritable without retraining)."""
    folder = Path(folder)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def save_pipeline_folder(folder, text_encoder, unet, vae, scaling_factor):
    """Write the diffusers layout: model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/."""
    import torch
    from npdiff.clip_vocab import write_clip_tokenizer_folder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    text_encoder_fp16 = build_text_encoder()
    text_encoder_fp16.load_state_dict(text_encoder.state_dict())
    text_encoder_fp16.to(torch.float16).save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    write_clip_tokenizer_folder(folder / "tokenizer")
    write_scheduler_and_index(folder)
