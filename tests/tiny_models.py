"""Tiny random diffusers models, saved as diffusers folders with safetensors, for tests.

    from tiny_models import tiny_unet, tiny_vae, tiny_taesd, UNET_KINDS, VAE_KINDS

    torch_unet, folder = tiny_unet("sd1", seed=0)     # folder/config.json, folder/diffusion_pytorch_model.safetensors
    torch_vae, folder = tiny_vae("sd", seed=0)
    torch_taesd, folder = tiny_taesd("sd", seed=0)    # diffusers AutoencoderTiny

Kinds (small channels, the same structure as the real models):
  UNet "sd1": SD 1.x-like: 3 blocks (CrossAttn, CrossAttn, Down), int attention_head_dim (heads),
              1x1-conv proj_in/proj_out, cross_attention_dim 24, layers_per_block 2, flip_sin_to_cos.
  UNet "sd2": SD 2.x-like: use_linear_projection, per-block head counts, upcast_attention,
              cross_attention_dim 40, layers_per_block 1, norm_eps 1e-6, freq_shift 1, no flip.
  UNet "knobs": 2 blocks and the rarer config values (see its entry below).
  UNet "lcm": "sd1" with time_cond_proj_dim 24 (an LCM-distilled UNet's guidance-embedding input).
  UNet "sdxl": SDXL base-like: DownBlock2D first, per-block heads (1, 2, 4) and transformer depths
              (1, 2, 3), linear projections, text_time conditioning (pooled text 16 + 6 time ids x 8).
  UNet "sdxl-refiner": 4 blocks like the refiner, transformer depth 2, 5 time ids (aesthetic score).
  UNet "sdxl-nested": nested transformer_layers_per_block with reverse_transformer_layers_per_block.
  UNet "sdxl-lcm": "sdxl" with time_cond_proj_dim 16 (LCM-SDXL).
  VAE  "sd":  SD-like: 4 blocks (latent = image / 8), layers_per_block 1, scaling_factor 0.18215.
  VAE  "deep": 3 blocks (latent = image / 4), layers_per_block 2, scaling_factor 0.13025.
  TAESD "sd": AutoencoderTiny with 4 blocks (latent = image / 8) like the real TAESD, 16 channels.
  TAESD "knobs": 3 blocks (latent = image / 4), SiLU, 3 latent channels, scaling_factor 0.7.

Every parameter is random (torch.manual_seed(seed)): conv/linear weights keep diffusers' default
init; every 1-d parameter (norm weights, biases) gets N(0, 0.1^2) added, so that norm affines and
biases are exercised too. Folders are built once per (kind, seed) per process under a temporary
directory of this process (or in `folder` when given) and reused; the torch model is in eval mode.
"""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

UNET_KINDS = {
    "sd1": dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=24, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        use_linear_projection=False, upcast_attention=False,
    ),
    "sd2": dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4),
        cross_attention_dim=40, norm_num_groups=16, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
        use_linear_projection=True, upcast_attention=True,
    ),
    # rarer config values SD-style UNets may carry: 2 blocks (latent multiple of 2), transformer depth 2,
    # mid_block_scale_factor, centred input, 5x5 conv_in / 1x1 conv_out, explicit time_embedding_dim,
    # per-block lists, and resnet_out_scale_factor (which diffusers ignores for these block types)
    "knobs": dict(
        sample_size=8, in_channels=4, out_channels=3,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=(1, 2), attention_head_dim=(2, 4),
        cross_attention_dim=(12, 12), transformer_layers_per_block=2, only_cross_attention=[False, False],
        norm_num_groups=4, mid_block_scale_factor=1.5, center_input_sample=True, conv_in_kernel=5,
        conv_out_kernel=1, time_embedding_dim=48, resnet_out_scale_factor=2.0, downsample_padding=1,
    ),
}
# LCM-distilled (time_embedding.cond_proj takes the guidance embedding; real ones use 256 for 320 channels)
UNET_KINDS["lcm"] = dict(UNET_KINDS["sd1"], time_cond_proj_dim=24)
# SDXL (real base: channels 320/640/1280, heads 5/10/20, depths 1/2/10, time ids 6 x 256 after 1280 pooled)
UNET_KINDS["sdxl"] = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(1, 2, 4),
    transformer_layers_per_block=(1, 2, 3), cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=None, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
)
UNET_KINDS["sdxl-refiner"] = dict(
    UNET_KINDS["sdxl"], block_out_channels=(16, 32, 32, 32), attention_head_dim=(2, 2, 4, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, cross_attention_dim=24, projection_class_embeddings_input_dim=16 + 5 * 8,
)
UNET_KINDS["sdxl-nested"] = dict(
    UNET_KINDS["sdxl"], transformer_layers_per_block=[[1, 2], [2, 1], [1, 3]],
    reverse_transformer_layers_per_block=[[3, 1, 2], [1, 2, 1], [2, 1, 1]],
)
UNET_KINDS["sdxl-lcm"] = dict(UNET_KINDS["sdxl"], time_cond_proj_dim=16)

VAE_KINDS = {
    "sd": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
    ),
    "deep": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 48), layers_per_block=2, norm_num_groups=8, scaling_factor=0.13025,
    ),
}


TAESD_KINDS = {
    "sd": dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
               num_encoder_blocks=(1, 2, 2, 1), num_decoder_blocks=(2, 1, 2, 1)),
    "knobs": dict(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(12,) * 3,
                  num_encoder_blocks=(1, 0, 2), num_decoder_blocks=(1, 2, 1), act_fn="silu", latent_channels=3,
                  scaling_factor=0.7, latent_magnitude=2, latent_shift=0.25),
}


def randomize_(model, seed):
    """Make every parameter random and reproducible: keep diffusers' init of the weight matrices,
    add N(0, 0.1^2) to every 1-d parameter (norm scales stay near 1, biases near 0)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _process_root():
    """One temporary directory per process (removed at exit), so parallel test runs never share files."""
    root = tempfile.mkdtemp(prefix="npdiff-tiny-models-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return Path(root)


def _default_folder(what, kind, seed):
    return _process_root() / f"{what}-{kind}-seed{seed}"


@functools.lru_cache(maxsize=None)
def _build(what, kind, seed, folder):
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    table, cls = {"unet": (UNET_KINDS, UNet2DConditionModel), "vae": (VAE_KINDS, AutoencoderKL),
                  "taesd": (TAESD_KINDS, AutoencoderTiny)}[what]
    if kind not in table:
        raise ValueError(f"unknown tiny {what} kind {kind!r}; known: {', '.join(table)}")
    torch.manual_seed(seed)
    model = randomize_(cls(**table[kind]), seed + 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    json.loads((folder / "config.json").read_text())  # written by diffusers; fail here if it is not
    return model, folder


def tiny_unet(kind="sd1", seed=0, folder=None):
    """-> (torch UNet2DConditionModel in eval mode, Path of its diffusers folder)."""
    folder = str(folder or _default_folder("unet", kind, seed))
    return _build("unet", kind, int(seed), folder)


def tiny_vae(kind="sd", seed=0, folder=None):
    """-> (torch AutoencoderKL in eval mode, Path of its diffusers folder)."""
    folder = str(folder or _default_folder("vae", kind, seed))
    return _build("vae", kind, int(seed), folder)


def tiny_taesd(kind="sd", seed=0, folder=None):
    """-> (torch AutoencoderTiny in eval mode, Path of its diffusers folder)."""
    folder = str(folder or _default_folder("taesd", kind, seed))
    return _build("taesd", kind, int(seed), folder)


# ---------------------------------------------------------------------------------------------
# Helpers for block-level tests
# ---------------------------------------------------------------------------------------------
def module_weights(module, path):
    """Save a torch module's state_dict to `path` (.safetensors) and open it as npdiff Weights."""
    from safetensors.torch import save_file

    from npdiff.loading import open_weights

    tensors = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
    save_file(tensors, str(path))
    return open_weights(path)


def _resolve(root, path):
    """'down_blocks.0.resnets.1' -> the object at that path (attributes and list indices)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _replace(root, path, value):
    parent_path, _, last = path.rpartition(".")
    parent = _resolve(root, parent_path) if parent_path else root
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


class _Recorder:
    """Wraps one npdiff block: calls it and stores (inputs, output) under its path."""

    def __init__(self, block, path, store):
        self.block, self.path, self.store = block, path, store

    def __getattr__(self, name):
        return getattr(self.block, name)

    def __call__(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.store[self.path] = (args, out)
        return out


def record_npdiff(model, paths):
    """Wrap the npdiff blocks at `paths` (diffusers module names: the same tree) -> {path: (args, output)}."""
    store = {}
    for path in paths:
        _replace(model, path, _Recorder(_resolve(model, path), path, store))
    return store


def record_torch(model, paths):
    """Forward hooks on the torch submodules at `paths` -> ({path: (args, output)}, hook handles)."""
    store, handles = {}, []
    for path in paths:
        def hook(module, args, output, path=path):
            store[path] = (args, output)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return store, handles
