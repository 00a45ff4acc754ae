"""`npdiff verify`: run npdiff and diffusers/transformers side by side on the same weights and print the
relative error ||npdiff - torch|| / ||torch|| per component and per block.

What is compared (all inputs random from a seed, the same arrays fed to both sides):
  1. tokenizer      ids of a few prompts, npdiff's CLIPTokenizer against the folder's transformers tokenizer;
  2. text encoder   every hidden state (embeddings, each layer) and the final output
                    (transformers' output_hidden_states; npdiff returns the same tuple);
  3. UNet           time embedding, conv_in, each down block, the middle block, each up block, the output,
                    at batch 2 (as with guidance), timestep 500, the torch text encoder's embeddings;
  4. VAE            encoder blocks and posterior mean of a random picture; decoder blocks and the decoded
                    picture of random latents;
  5. sampling loop  the whole pipeline for a few steps from the same seed: final latents (relative error)
                    and 8-bit pictures (largest difference in levels, the policy allows 2).
Per-block outputs are caught with forward hooks on the torch side and by wrapping the npdiff block objects
(which carry the same names, e.g. unet.down_blocks[1]) in a recorder; a block npdiff does not expose is
listed as such. Needs torch, diffusers and transformers (pip install -e '.[test]'); npdiff itself never
imports torch outside this tool.
"""

import importlib.util  # noqa: F401  (tests patch verify.importlib.util.find_spec)
import sys
from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.weights import check_precision
from npdiff.memory_estimate import check_call_memory
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_utils import check_positive_int, default_model_path
from npdiff.rng import TorchGenerator
from npdiff.verify_blocks import (
    PROMPTS,
    Table,
    compare_blocks,
    compare_sampling,
    compare_vae,
    is_sdxl_folder,
    picture_size,
    require_torch_stack,
    unet_block_names,
)
from npdiff.verify_sdxl import verify_sdxl_model


# ---------------------------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------------------------
def compare_tokenizer(table, pipe, torch_pipe):
    theirs = torch_pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="np").input_ids
    ours = pipe.tokenizer(PROMPTS)
    differing = int(np.sum(np.any(ours != theirs, axis=1)))
    table.note("tokenizer", f"{len(PROMPTS)} prompts", "identical ids" if differing == 0 else
               f"{differing} prompts differ", ok=differing == 0)
    return ours


def compare_text_encoder(table, pipe, torch_pipe, ids, torch):
    with torch.no_grad():
        theirs = torch_pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
    last, hidden = pipe.text_encoder(backend.to_device(ids, dtype=np.int64), output_hidden_states=True)
    for i, (ours_h, theirs_h) in enumerate(zip(hidden, theirs.hidden_states)):
        table.add("text_encoder", "embeddings" if i == 0 else f"layer {i - 1}", backend.to_numpy(ours_h),
                  theirs_h.numpy())
    table.add("text_encoder", "last_hidden_state", backend.to_numpy(last), theirs.last_hidden_state.numpy())
    return theirs.last_hidden_state.numpy()


def compare_unet(table, pipe, torch_pipe, embeddings, latent_hw, generator, torch):
    latents = generator.randn((2, pipe.unet.config["in_channels"], *latent_hw), dtype=np.float32)  # [2,4,h,w]
    text = np.repeat(embeddings[:1], 2, axis=0)  # [2,77,D]
    timestep = 500
    with torch.no_grad():
        ours, theirs = compare_blocks(
            table, "unet", pipe.unet, torch_pipe.unet, unet_block_names(torch_pipe.unet),
            lambda: backend.to_numpy(pipe.unet(backend.to_device(latents), timestep, backend.to_device(text))),
            lambda: torch_pipe.unet(torch.from_numpy(latents), timestep, torch.from_numpy(text)).sample.numpy())
    table.add("unet", "output (noise prediction)", ours, theirs)


def verify_model(model=None, steps=4, height=None, width=None, seed=0, out=None, precision="fp32"):
    """Run every comparison on `model` (a diffusers folder) and print the table to `out` (default stdout);
    -> 0 if every row is within tolerance, else 1. An SDXL folder (text_encoder_2/) goes to verify_sdxl.py.
    precision "bf16": npdiff's networks at bf16 against torch float32, with bf16's tolerances (verify_blocks)."""
    out = sys.stdout if out is None else out
    require_torch_stack()
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    steps = check_positive_int(steps, "--steps")
    check_precision(precision)
    model = Path(model) if model is not None else default_model_path()
    if not model.is_dir():
        raise NpdiffError(f"npdiff verify needs a diffusers model folder (diffusers cannot read {model} "
                          "offline without its original config)")
    if is_sdxl_folder(model):
        return verify_sdxl_model(model, steps, height, width, seed, out, precision)
    pipe = StableDiffusionPipeline.from_pretrained(model, precision=precision)
    pipe.show_progress = False
    height, width, latent_hw = picture_size(pipe.unet.config, pipe.vae_scale_factor, height, width)
    check_call_memory(pipe, 1, height, width, guidance=True)  # a size that cannot fit: refused before torch loads
    torch_pipe = TorchPipeline.from_pretrained(str(model), safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False, torch_dtype=torch.float32,
                                               local_files_only=True)
    torch_pipe.set_progress_bar_config(disable=True)
    print(f"npdiff verify: {model}, {height}x{width}, seed {seed}, precision {precision} against torch float32, "
          f"torch {torch.__version__}", file=out)

    table = Table(out, precision)
    generator = TorchGenerator(seed)
    ids = compare_tokenizer(table, pipe, torch_pipe)
    embeddings = compare_text_encoder(table, pipe, torch_pipe, ids, torch)
    compare_unet(table, pipe, torch_pipe, embeddings, latent_hw, generator, torch)
    compare_vae(table, pipe, torch_pipe, latent_hw, generator, torch)
    compare_sampling(table, pipe, torch_pipe, steps, height, width, seed, torch)
    return table.finish()
