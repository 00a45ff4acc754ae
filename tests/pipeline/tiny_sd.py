"""A tiny random Stable Diffusion saved by diffusers, with the real CLIP tokenizer, for pipeline tests.

    from tiny_sd import tiny_sd_folder, torch_pipeline

    folder = tiny_sd_folder()            # diffusers folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/
    pipe = torch_pipeline(folder, "euler_a")   # diffusers StableDiffusionPipeline (float32, CPU)

Parts: the "sd1" UNet of tests/tiny_models.py with sample_size 8 and cross_attention_dim 32, the "sd" VAE
(latent = picture / 8, so the default picture is 64x64), and a transformers CLIPTextModel of width 32 with
the full 49,408-id vocabulary (tests/tiny_clip.py's encoders have 1,000 ids, too few for the real
tokenizer, written by npdiff.clip_vocab). Every parameter is random; built once per process.

tiny_sd_folder(kind="sd_constants") keeps the constants SD 1.x single files do not store (32 groups in
every norm, 8 UNet heads, CLIP heads 64 wide), so the same weights written as one CompVis-layout file
(tests/single_file.py) are read back with the right configs. kind="sd2" does the same for SD 2.x (gelu
CLIP, linear UNet projections, heads channels/64, v-prediction DDIM, "!" padding).

tiny_sd_folder(kind="inpaint") has a UNet of 9 input channels (latents, mask, masked picture latents), as
sd-v1-5-inpainting; "inpaint_sd_constants" is "sd_constants" with that UNet. kind="lcm" has an
LCM-distilled UNet (time_cond_proj_dim 24).
"""

import functools
import tempfile
from pathlib import Path

from tiny_models import UNET_KINDS, VAE_KINDS, _process_root, randomize_

CLIP_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5)
UNET_CONFIG = dict(UNET_KINDS["sd1"], sample_size=8, cross_attention_dim=32)
VAE_CONFIG = dict(VAE_KINDS["sd"])

# SD 1.5's scheduler_config.json
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                        prediction_type="epsilon", timestep_spacing="leading")

# npdiff's scheduler names -> diffusers classes (and config changes)
DIFFUSERS_SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


def tiny_clip_text_model(seed, config=CLIP_CONFIG, model_class=None):
    """A transformers CLIPTextModel (or `model_class`, e.g. CLIPTextModelWithProjection), full CLIP vocabulary,
    width 32, every parameter random."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = (model_class or CLIPTextModel)(CLIPTextConfig(**config))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return model.eval()


KINDS = {
    "test": (CLIP_CONFIG, UNET_CONFIG, VAE_CONFIG),
    "sd_constants": (dict(CLIP_CONFIG, hidden_size=64, intermediate_size=128, num_attention_heads=1),
                     dict(UNET_CONFIG, norm_num_groups=32, cross_attention_dim=64),
                     dict(VAE_CONFIG, block_out_channels=(32, 32, 32, 32), norm_num_groups=32)),
    # SD 2.x's architecture, scaled down: gelu text encoder with 64-wide heads, UNet with linear proj_in/out
    # and SD 2.x's per-block head counts channels / 64, DDIM with v-prediction, tokenizer padding with "!"
    "sd2": (dict(CLIP_CONFIG, hidden_size=128, intermediate_size=256, num_attention_heads=2, hidden_act="gelu",
                 pad_token_id=0),
            dict(UNET_CONFIG, block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), layers_per_block=1,
                 use_linear_projection=True, norm_num_groups=32, cross_attention_dim=128),
            dict(VAE_CONFIG, block_out_channels=(32, 32, 32, 32), norm_num_groups=32)),
    "inpaint": (CLIP_CONFIG, dict(UNET_CONFIG, in_channels=9), VAE_CONFIG),  # sd-v1-5-inpainting's UNet layout
    # an LCM-distilled UNet: takes the embedded guidance scale (timestep_cond) instead of guiding
    "lcm": (CLIP_CONFIG, dict(UNET_CONFIG, time_cond_proj_dim=24), VAE_CONFIG),
}
KINDS["inpaint_sd_constants"] = (KINDS["sd_constants"][0], dict(KINDS["sd_constants"][1], in_channels=9),
                                 KINDS["sd_constants"][2])
KIND_SCHEDULERS = {"sd2": ("DDIMScheduler", dict(SCHEDULER_CONFIG, prediction_type="v_prediction"))}
KIND_PAD_TOKENS = {"sd2": "!"}


@functools.lru_cache(maxsize=None)
def tiny_sd_folder(seed=0, kind="test"):
    """Build and save the tiny pipeline with diffusers (once per process) -> Path of the folder."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from npdiff.clip_vocab import write_clip_tokenizer_folder

    root = Path(tempfile.mkdtemp(prefix="tiny-sd-", dir=_process_root()))
    clip_config, unet_config, vae_config = KINDS[kind]
    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**unet_config), seed + 1)
    vae = randomize_(AutoencoderKL(**vae_config), seed + 2)
    text_encoder = tiny_clip_text_model(seed + 3, clip_config)
    pad_token = {"pad_token": KIND_PAD_TOKENS[kind]} if kind in KIND_PAD_TOKENS else {}
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_folder(root / "vocab", **pad_token)))
    scheduler_class, scheduler_config = KIND_SCHEDULERS.get(kind, ("PNDMScheduler", SCHEDULER_CONFIG))
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = root / f"tiny-sd-{kind}"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; hub folders also carry vocab.json + merges.txt: add them.
    write_clip_tokenizer_folder(folder / "tokenizer", **pad_token)
    return folder


def write_as_single_file(folder, path):
    """The folder's UNet, VAE and text encoder as one original-layout (CompVis) .safetensors file; a gelu
    text encoder (SD 2.x) is written as OpenCLIP stores it."""
    import json

    from safetensors.torch import load_file
    from single_file import write_single_file

    def part(name, weights):
        config = json.loads((Path(folder) / name / "config.json").read_text())
        return config, load_file(str(Path(folder) / name / weights))

    text_config, text_state = part("text_encoder", "model.safetensors")
    layout = "openclip" if text_config["hidden_act"] == "gelu" else "openai"
    write_single_file(path, unet=part("unet", "diffusion_pytorch_model.safetensors"),
                      vae=part("vae", "diffusion_pytorch_model.safetensors"), text_encoder=text_state,
                      text_encoder_layout=layout)
    return Path(path)


def diffusers_scheduler(name, config):
    import diffusers

    class_name, changes = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(config, **changes))


def torch_pipeline(folder, sampler=None, img2img=False, inpaint=False):
    """The diffusers pipeline over the same folder (float32, CPU, no progress bar), with npdiff's sampler name."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    cls = StableDiffusionInpaintPipeline if inpaint else cls
    pipe = cls.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, torch_dtype=torch.float32, local_files_only=True)
    if sampler is not None:
        pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
