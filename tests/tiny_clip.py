"""Tiny random CLIP text encoders (transformers' CLIPTextModel), saved as folders with safetensors.

    from tiny_clip import tiny_clip, save_clip, CLIP_KINDS, padded_ids

    torch_model = tiny_clip("sd1", seed=0)                  # eval mode, every parameter random
    folder = save_clip(torch_model, tmp_path / "te", prefix=True, dtype="fp16", variant="fp16")

Kinds (the structure of the real encoders, small widths):
  "sd1":  OpenAI CLIP ViT-L/14-like: quick_gelu, head width 64 (hidden 128, 2 heads), 3 layers.
  "sd2":  OpenCLIP ViT-H-like: gelu, head width 64 (hidden 192, 3 heads), 4 layers.
  "sd1_narrow": quick_gelu, head width 16 (hidden 64, 4 heads), 2 layers, 24 positions.
Vocabulary: 1000 ids, the last two are <|startoftext|> and <|endoftext|> as in CLIP's tokenizer;
max_position_embeddings 77 (SD's sequence length) unless the kind says otherwise.

Saving (save_clip): config.json as transformers writes it, and model[.<variant>].safetensors with the
keys with or without the "text_model." prefix (transformers 4.x files and SD checkpoints have it,
5.x saves drop it), optionally with the int64 "embeddings.position_ids" buffer older files carry, in
float32, float16 or bfloat16.
"""

import json
from pathlib import Path

import numpy as np

VOCAB = 1000
BOS, EOS = VOCAB - 2, VOCAB - 1

CLIP_KINDS = {
    "sd1": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                max_position_embeddings=77, hidden_act="gelu"),
    "sd1_narrow": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=24, hidden_act="quick_gelu"),
}

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tiny_clip(kind="sd1", seed=0):
    """A transformers CLIPTextModel with random weights (eval mode, float32)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in CLIP_KINDS:
        raise ValueError(f"unknown tiny CLIP kind {kind!r}; known: {', '.join(CLIP_KINDS)}")
    config = CLIPTextConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                            layer_norm_eps=1e-5, **CLIP_KINDS[kind])
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    with torch.no_grad():  # every parameter random: matrices as initialised, 1-d params (norms, biases) noised
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)  # std 1/sqrt(fan_in): O(1) activations
    return model.eval()


def clip_state_dict(model, prefix=True, position_ids=False):
    """The model's tensors under transformers' names, with or without "text_model." (and position_ids)."""
    import torch

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    state = {name.removeprefix("text_model."): tensor for name, tensor in state.items()}
    if position_ids:
        positions = model.config.max_position_embeddings
        state["embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]  # [1,P]
    if prefix:
        state = {"text_model." + name: tensor for name, tensor in state.items()}
    return state


def save_clip(model, folder, prefix=True, dtype="fp32", variant=None, position_ids=False):
    """Write config.json and model[.<variant>].safetensors into `folder` -> Path(folder)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    state = clip_state_dict(model, prefix=prefix, position_ids=position_ids)
    state = {name: (t.to(torch_dtype) if t.is_floating_point() else t) for name, t in state.items()}
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    save_file(state, str(folder / name))
    config = model.config.to_dict()
    config["architectures"] = ["CLIPTextModel"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return folder


def rounded_copy(model, dtype):
    """A float32 copy of `model` whose weights went through `dtype` ("fp16"/"bf16") and back."""
    import copy

    import torch

    rounded = copy.deepcopy(model)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch_dtype).float())
    return rounded.eval()


def random_ids(rng, batch, length):
    """Random token ids [B,L] over the whole vocabulary (int64)."""
    return rng.integers(0, VOCAB, size=(batch, length), dtype=np.int64)


def padded_ids(rng, batch, length):
    """Prompt-like ids [B,L]: <|startoftext|>, 1..L-2 random words, <|endoftext|>, then end-token padding
    (SD 1.x's tokenizer pads with <|endoftext|>)."""
    ids = np.full((batch, length), EOS, dtype=np.int64)
    for row in range(batch):
        words = int(rng.integers(1, length - 1))
        ids[row, 0] = BOS
        ids[row, 1:1 + words] = rng.integers(0, VOCAB - 2, size=words)
    return ids
