"""`npdiff verify` on an SDXL folder: npdiff's networks against diffusers'/transformers' on the same weights.

What is compared (random inputs from the seed, the same arrays fed to both sides):
  1. tokenizers       tokenizer and tokenizer_2 (which pads with "!"): npdiff's ids against transformers';
  2. text encoders    text_encoder (CLIP-L: CLIPTextModel; absent in a refiner) and text_encoder_2
                      (OpenCLIP bigG: CLIPTextModelWithProjection): every hidden state, last_hidden_state,
                      and text_encoder_2's pooled, projected text_embeds;
  3. UNet             time_embedding, add_embedding (pooled text + micro-conditioning ids), conv_in, each
                      down block, the middle, each up block, the output, at batch 2, timestep 500, on the
                      context SDXL builds (the encoders' penultimate hidden states side by side) and time
                      ids of the picture's size (base: 6 ids; refiner: 5, aesthetic score 6);
  4. VAE              as for SD (verify_blocks.compare_vae);
  5. sampling loop    for a text-to-image model (not a refiner): npdiff's StableDiffusionXLPipeline against
                      diffusers', a few steps from the same seed, final latents and 8-bit pictures.
The networks are loaded one by one from their subfolders (npdiff.models), so steps 2-4 need no pipeline.
"""

from types import SimpleNamespace

import numpy as np

from npdiff import backend
from npdiff.memory_estimate import check_call_memory
from npdiff.models import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UNet2DConditionModel,
)
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline
from npdiff.rng import TorchGenerator
from npdiff.tokenizer import CLIPTokenizer
from npdiff.verify_blocks import (
    PROMPTS,
    Table,
    compare_blocks,
    compare_sampling,
    compare_vae,
    picture_size,
    require_torch_stack,
    unet_block_names,
)

ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
AESTHETIC_SCORE = 6.0  # diffusers' default for the refiner


def load_sdxl_networks(folder, precision="fp32"):
    """npdiff's networks of an SDXL folder, in `precision` -> a namespace (text_encoder None for a refiner)."""

    has_first = (folder / "text_encoder").is_dir()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", precision=precision)
    return SimpleNamespace(
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", precision=precision)
        if has_first else None,
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer") if has_first else None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                   precision=precision),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", precision=precision),
        vae=vae, vae_scale_factor=2 ** (len(vae.config["block_out_channels"]) - 1))


def compare_text_encoders(table, ours, torch_pipe, torch):
    """-> (context [B,77,D1+D2]: the penultimate hidden states side by side, pooled text_embeds [B,P]), torch's."""
    penultimate, pooled = [], None
    for encoder_name, tokenizer_name in ENCODERS:
        encoder = getattr(ours, encoder_name)
        if encoder is None:
            continue
        tokenizer = getattr(torch_pipe, tokenizer_name)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids                  # [B,77]
        differing = int(np.sum(np.any(getattr(ours, tokenizer_name)(PROMPTS) != ids, axis=1)))
        table.note(tokenizer_name, f"{len(PROMPTS)} prompts", "identical ids" if differing == 0 else
                   f"{differing} prompts differ", ok=differing == 0)
        with torch.no_grad():
            theirs = getattr(torch_pipe, encoder_name)(torch.from_numpy(ids), output_hidden_states=True)
        mine = encoder(backend.to_device(ids, dtype=np.int64), output_hidden_states=True)
        if encoder_name == "text_encoder":
            last, hidden = mine
        else:
            last, hidden = mine.last_hidden_state, mine.hidden_states
            table.add(encoder_name, "text_embeds (pooled, projected)", backend.to_numpy(mine.text_embeds),
                      theirs.text_embeds.numpy())
            pooled = theirs.text_embeds.numpy()                         # [B,P]
        for i, (ours_h, theirs_h) in enumerate(zip(hidden, theirs.hidden_states)):
            table.add(encoder_name, "embeddings" if i == 0 else f"layer {i - 1}", backend.to_numpy(ours_h),
                      theirs_h.numpy())
        table.add(encoder_name, "last_hidden_state", backend.to_numpy(last), theirs.last_hidden_state.numpy())
        penultimate.append(theirs.hidden_states[-2].numpy())            # [B,77,Di]
    return np.concatenate(penultimate, axis=-1), pooled                 # [B,77,D1+D2], [B,P]


def time_ids_for(unet_config, pooled_width, height, width):
    """The micro-conditioning ids diffusers builds for a full picture: base (original size, crop (0, 0),
    target size) or refiner (original size, crop, aesthetic score) -> [n] float32."""
    count = (unet_config["projection_class_embeddings_input_dim"] - pooled_width) // unet_config[
        "addition_time_embed_dim"]
    if count == 5:
        return np.array([height, width, 0, 0, AESTHETIC_SCORE], dtype=np.float32)
    return np.array([height, width, 0, 0, height, width], dtype=np.float32)


def compare_sdxl_unet(table, ours, torch_unet, context, pooled, picture_hw, generator, torch):
    latent_hw = (picture_hw[0] // ours.vae_scale_factor, picture_hw[1] // ours.vae_scale_factor)
    latents = generator.randn((2, ours.unet.config["in_channels"], *latent_hw), dtype=np.float32)  # [2,C,h,w]
    text = np.repeat(context[:1], 2, axis=0)                            # [2,77,D]
    added = {"text_embeds": np.repeat(pooled[:1], 2, axis=0),           # [2,P]
             "time_ids": np.repeat(time_ids_for(ours.unet.config, pooled.shape[1], *picture_hw)[None], 2, axis=0)}
    torch_added = {key: torch.from_numpy(value) for key, value in added.items()}
    names = unet_block_names(torch_unet)
    names.insert(1, "add_embedding")
    timestep = 500
    with torch.no_grad():
        mine, theirs = compare_blocks(
            table, "unet", ours.unet, torch_unet, names,
            lambda: backend.to_numpy(ours.unet(backend.to_device(latents), timestep, backend.to_device(text),
                                               added_cond_kwargs={k: backend.to_device(v) for k, v in added.items()})),
            lambda: torch_unet(torch.from_numpy(latents), timestep, torch.from_numpy(text),
                               added_cond_kwargs=torch_added).sample.numpy())
    table.add("unet", "output (noise prediction)", mine, theirs)


def verify_sdxl_model(model, steps, height, width, seed, out, precision="fp32"):
    """verify.verify_model for an SDXL folder (checked there); -> 0 if every row is within tolerance, else 1."""
    require_torch_stack()
    import torch
    from diffusers import DiffusionPipeline

    ours = load_sdxl_networks(model, precision)
    height, width, latent_hw = picture_size(ours.unet.config, ours.vae_scale_factor, height, width)
    check_call_memory(ours, 1, height, width, guidance=True)  # a size that cannot fit: refused before torch loads
    torch_pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32, local_files_only=True)
    torch_pipe.set_progress_bar_config(disable=True)
    print(f"npdiff verify (SDXL): {model}, {height}x{width}, seed {seed}, precision {precision} against torch "
          f"float32, torch {torch.__version__}", file=out)

    table = Table(out, precision)
    generator = TorchGenerator(seed)
    context, pooled = compare_text_encoders(table, ours, torch_pipe, torch)
    compare_sdxl_unet(table, ours, torch_pipe.unet, context, pooled, (height, width), generator, torch)
    compare_vae(table, ours, torch_pipe, latent_hw, generator, torch)
    if ours.text_encoder is None:
        table.note("sampling", "refiner", "not compared (an img2img-only model)")
    else:
        del ours
        pipe = StableDiffusionXLPipeline.from_pretrained(model, precision=precision)
        pipe.show_progress = False
        compare_sampling(table, pipe, torch_pipe, steps, height, width, seed, torch)
    return table.finish()
