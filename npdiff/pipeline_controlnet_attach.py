"""ControlNets for a pipeline loaded as a plain one: how the command line and `npdiff batch` add --control nets.

    nets = load_controlnets(["control_v11p_sd15_canny.safetensors"], model_path)  # before the model loads
    pipe = attach_controlnets(load_any_pipeline(model_path), nets)                 # SD or SDXL, as loaded

load_controlnets reads each net (its header and config; the weights are memory-mapped, read when used) and
refuses a net of the other family (an SDXL net for an SD 1.x/2.x model, or the reverse) from the model's
layout alone, before the model loads. attach_controlnets makes the ControlNet pipeline of the loaded one's
family over the same components (no copy), keeping what was set on it (LoRAs, progress, page release), and
checks each net against the UNet (check_nets_fit: channels, blocks, text width).
"""

import sys
from pathlib import Path

from npdiff.errors import NpdiffError
from npdiff.models.controlnet import ControlNetModel
from npdiff.pipeline_controlnet import StableDiffusionControlNetPipeline
from npdiff.pipeline_controlnet_sdxl import StableDiffusionXLControlNetPipeline
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline
from npdiff.pipeline_utils import model_family

# what a loaded pipeline carries besides its components, kept on the ControlNet pipeline made of it
CARRIED_SETTINGS = ("_lora_stack", "show_progress", "release_weights_between_stages", "model_vae_scale_factor")
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}


def net_family(net):
    """"sdxl" for a net with SDXL's added conditioning (addition_embed_type "text_time"), else "sd"."""
    return "sdxl" if net.config.get("addition_embed_type") == "text_time" else "sd"


def load_controlnets(paths, model_path=None, what="--control", precision="fp32", net_precisions=None):
    """Each ControlNet (a diffusers folder or a single .safetensors file) loaded; with model_path (when it exists:
    else loading the model says what is wrong), one made for the other family of model is an NpdiffError naming
    both, before the model loads. precision: the model's ("fp32" or "bf16"), which the nets take too, but for
    those that net_precisions ({net name: precision}, from a --reproduce PNG) names by their name."""
    nets = []
    for path in paths:
        named = net_precisions or {}
        net_precision = named.get(Path(path).resolve().name, named.get(Path(path).stem, precision))
        net = ControlNetModel.from_pretrained(path, precision=net_precision)
        if model_path is not None and Path(model_path).exists() and net_family(net) != model_family(model_path):
            raise NpdiffError(f"{what} {path}: an {FAMILY_NAMES[net_family(net)]} ControlNet (its UNet "
                              f"{'has' if net_family(net) == 'sdxl' else 'lacks'} SDXL's added conditioning), but "
                              f"the model {model_path} is {FAMILY_NAMES[model_family(model_path)]}; use a "
                              f"ControlNet made for {FAMILY_NAMES[model_family(model_path)]}")
        print(f"loaded ControlNet {path}" + (f" (precision {net_precision})" if net_precision != precision else ""),
              file=sys.stderr)
        nets.append(net)
    return nets


def attach_controlnets(pipe, nets):
    """-> the ControlNet pipeline (SD or SDXL, as `pipe`) over pipe's components with `nets`; each net checked
    against the UNet (NpdiffError naming the setting that differs)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        controlled = StableDiffusionXLControlNetPipeline(
            pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, pipe.unet,
            pipe.scheduler, nets, force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt,
            requires_aesthetics_score=pipe.requires_aesthetics_score, scheduler_config=pipe.scheduler_config,
            scheduler_name=pipe.scheduler_name, model_name=pipe.model_name)
    else:
        controlled = StableDiffusionControlNetPipeline(
            pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.vae, pipe.scheduler, nets,
            scheduler_config=pipe.scheduler_config, scheduler_name=pipe.scheduler_name, model_name=pipe.model_name)
    for name in CARRIED_SETTINGS:
        if hasattr(pipe, name):
            setattr(controlled, name, getattr(pipe, name))
    return controlled
