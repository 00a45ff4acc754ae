"""What LoRA training writes: the LoRA in kohya's layout (what kohya's sd-scripts write, and what webui, npdiff's
load_lora_weights and diffusers' load_lora_weights read), beside the checkpoint and loss files of files.py.

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [r,in]  float32
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out,r] float32
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              []      float32
The name is the diffusers module name with "." written as "_" (kohya's SD 1.x/2.x UNet names; to_out.0 is
"to_out_0"). The header's metadata is kohya's "ss_" entries (strings, as kohya writes them) for what this
training knows: ss_network_module "networks.lora", ss_network_dim (r), ss_network_alpha, the steps, learning
rate, seed, resolution, picture count, base model version and the model's NAME (never a local path).
"""

import json
import time
from pathlib import Path

import numpy as np

from npdiff.training.files import output_paths, write_safetensors

KOHYA_UNET_PREFIX = "lora_unet_"


def lora_output_paths(out):
    """-> {"lora", "checkpoint", "loss_csv", "loss_png"} for the --out file `out`."""
    paths = output_paths(out)
    return {"lora": paths["embedding"], "checkpoint": paths["checkpoint"], "loss_csv": paths["loss_csv"],
            "loss_png": paths["loss_png"]}


def kohya_name(module_name):
    """"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" -> "lora_unet_down_blocks_0_..._to_out_0"."""
    return KOHYA_UNET_PREFIX + module_name.replace(".", "_")


def kohya_tensors(lora):
    """{kohya key: array} for every pair of a UNetLora (lora_grad.py)."""
    tensors = {}
    for name in lora.layers:
        key = kohya_name(name)
        tensors[f"{key}.lora_down.weight"] = np.array(lora.down[name], np.float32)  # [r,in]
        tensors[f"{key}.lora_up.weight"] = np.array(lora.up[name], np.float32)      # [out,r]
        tensors[f"{key}.alpha"] = np.array(lora.alpha, np.float32)                  # []
    return tensors


def base_model_version(pipe):
    """kohya's ss_base_model_version and ss_v2: SD 2.x has a 1024-wide text encoder (OpenCLIP ViT-H)."""
    is_v2 = pipe.text_encoder.config["hidden_size"] == 1024
    return ("sd_v2" if is_v2 else "sd_v1"), is_v2


def kohya_metadata(pipe, settings, picture_count, captions, started_at):
    """kohya's "ss_" metadata (every value a string) for a LoRA trained with `settings` (train_lora's)."""
    version, is_v2 = base_model_version(pipe)
    size = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    frequency = {}
    for caption in captions:
        for tag in (part.strip() for part in caption.split(",")):
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    model_name = Path(str(getattr(pipe, "model_name", None) or "model")).name  # a name, never the path
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings["rank"]),
        "ss_network_alpha": str(settings["alpha"]),
        "ss_network_args": json.dumps({"target_modules": "to_q,to_k,to_v,to_out.0"}),
        "ss_training_comment": "npdiff train-lora: the UNet's attention projections",
        "ss_base_model_version": version,
        "ss_v2": str(is_v2),
        "ss_sd_model_name": model_name,
        "ss_resolution": f"({size}, {size})",
        "ss_num_train_images": str(picture_count),
        "ss_max_train_steps": str(settings["steps"]),
        "ss_steps": str(settings["steps"]),
        "ss_learning_rate": str(settings["lr"]),
        "ss_unet_lr": str(settings["lr"]),
        "ss_text_encoder_lr": "None",
        "ss_lr_scheduler": "constant",
        "ss_optimizer": f"AdamW(weight_decay={settings['weight_decay']})",
        "ss_batch_size_per_device": str(settings["batch_size"]),
        "ss_seed": str(settings["seed"]),
        "ss_clip_skip": str(settings["clip_skip"]),
        "ss_mixed_precision": "no",
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_tag_frequency": json.dumps({"pictures": frequency}),
    }
    return metadata


def save_kohya_lora(path, lora, metadata):
    """The LoRA's factors in kohya's layout with `metadata` -> path (written atomically)."""
    return write_safetensors(path, kohya_tensors(lora), metadata)
