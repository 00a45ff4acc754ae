"""What SDXL's UNet is conditioned on besides the latents, as diffusers' SDXL pipelines build it.

  encode_prompt_pair(pipe, prompts, prompts_2, options)  both text encoders -> (embeddings [B,77,D1+D2],
                      pooled [B,P]): text_encoder (CLIP ViT-L) reads `prompts`, text_encoder_2 (OpenCLIP
                      bigG) reads `prompts_2`; each gives its penultimate hidden states (hidden_states[-2],
                      before the final layer norm; hidden_states[-(clip_skip + 2)] with a clip skip), put
                      side by side; text_encoder_2's projected pooled token is the pooled embedding. With
                      prompt_syntax "a1111" each encoder reads webui's chunks (npdiff/prompt_encoding.py):
                      [B,77*C,D1+D2], each encoder's chunks weighted on their own, pooled from the first. A refiner has text_encoder_2 alone and it reads `prompts`
                      (diffusers zips [prompt, prompt_2] with the encoders there are).
  add_time_ids(...)   the "micro-conditioning" numbers, one row per picture: (original height, width, crop
                      top, left, target height, width), or for a refiner (requires_aesthetics_score) (original
                      height, width, crop top, left, aesthetic score); each goes through the UNet's
                      add_time_proj (sinusoidal, addition_time_embed_dim wide) and, with the pooled
                      embedding, through add_embedding into the time features.
  check_add_embedding_width(...)  the UNet's add_embedding takes addition_time_embed_dim * ids + P inputs:
                      NpdiffError naming what does not fit (a refiner's 5 ids on a base, ...), before any work.
"""

from collections import namedtuple

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.prompt_encoding import PromptOptions, encode_prompts, match_chunk_counts
from npdiff.tokenizer import check_prompt_text

# Text conditioning of one SDXL call: embeddings [B,77,D1+D2] and pooled [B,P] ([uncond; cond] when guiding).
SDXLText = namedtuple("SDXLText", ["embeddings", "pooled"])


def encode_prompt_pair(pipe, prompts, prompts_2, options=None):
    """-> SDXLText(embeddings [B,77*C,D1+D2], pooled [B,P]) for one list of prompts (diffusers' encode_prompt),
    read as `options` (PromptOptions: clip skip, prompt syntax) says; pooled from the first chunk."""
    options = PromptOptions() if options is None else options
    encoders = [(pipe.tokenizer, pipe.text_encoder, prompts), (pipe.tokenizer_2, pipe.text_encoder_2, prompts_2)]
    if pipe.text_encoder is None:  # a refiner: text_encoder_2 reads the first prompts
        encoders = [(pipe.tokenizer_2, pipe.text_encoder_2, prompts)]
    hidden, pooled = [], None
    for tokenizer, text_encoder, texts in encoders:
        encoded = encode_prompts(tokenizer, text_encoder, texts, options, layer="penultimate")  # [B,77*C,D]
        hidden.append(encoded.embeddings)
        pooled = encoded.pooled if encoded.pooled is not None else pooled
    if len(hidden) == 2:  # a1111: prompt_2 may need another chunk count than prompt
        empty = [lambda pair=pair: encode_prompts(pair[0], pair[1], [""], options, layer="penultimate").embeddings
                 for pair in encoders]
        hidden[0], hidden[1] = match_chunk_counts(hidden[0], hidden[1], empty[0], empty[1])
    xp = backend.array_module(hidden[0])
    return SDXLText(xp.concatenate(hidden, axis=-1), pooled)  # [B,77*C,D1+D2], [B,P]


def second_prompts(value, fallback, what):
    """prompt_2 / negative_prompt_2 -> a list as long as `fallback`; None or "" -> `fallback` (diffusers'
    `prompt_2 or prompt`)."""
    if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
        return list(fallback)
    if isinstance(value, str):
        check_prompt_text(value, what)
        return [value] * len(fallback)
    if isinstance(value, (list, tuple)) and all(isinstance(text, str) for text in value):
        for index, text in enumerate(value):
            check_prompt_text(text, f"{what} {index}")
        if len(value) != len(fallback):
            raise NpdiffError(f"{what} has batch size {len(value)} but prompt has batch size {len(fallback)}; "
                              f"pass one {what}, or one per prompt")
        return list(value)
    raise NpdiffError(f"{what} must be a string or a list of strings, got {value!r}")


def check_pair(value, what, allow_none=True):
    """A (height, width) or (top, left) pair of non-negative ints (None allowed: the default) -> tuple."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok:
        raise NpdiffError(f"{what} must be a pair of non-negative integers (height, width) or (top, left), "
                          f"got {value!r}")
    return (int(value[0]), int(value[1]))


def check_score(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value):
        raise NpdiffError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def time_ids_row(original_size, crops_coords_top_left, last):
    """One row of micro-conditioning numbers: original size, crop corner, then target size or (score,)."""
    return list(original_size) + list(crops_coords_top_left) + list(last)  # 6 (base) or 5 (refiner) numbers


def check_add_embedding_width(unet_config, ids_per_row, projection_dim, requires_aesthetics_score):
    """NpdiffError unless addition_time_embed_dim * ids_per_row + projection_dim is what add_embedding takes."""
    time_dim = unet_config.get("addition_time_embed_dim")
    expected = unet_config.get("projection_class_embeddings_input_dim")
    if unet_config.get("addition_embed_type") != "text_time" or time_dim is None or expected is None:
        raise NpdiffError("this UNet has no SDXL size conditioning (unet config addition_embed_type "
                          f"{unet_config.get('addition_embed_type')!r}, expected 'text_time'); it is not an SDXL UNet")
    passed = time_dim * ids_per_row + projection_dim
    if passed == expected:
        return
    hint = "the UNet config or text_encoder_2's projection_dim is wrong"
    if expected - passed == time_dim:
        hint = ("the UNet takes one number more: a base model's target size, not a refiner's aesthetic score; "
                "pass requires_aesthetics_score=False")
    elif passed - expected == time_dim:
        hint = ("the UNet takes one number less: an SDXL refiner's aesthetic-score conditioning; pass "
                "requires_aesthetics_score=True (or use its model_index.json)")
    raise NpdiffError(f"the UNet's add_embedding takes {expected} inputs but {ids_per_row} micro-conditioning "
                      f"numbers x addition_time_embed_dim {time_dim} + pooled width {projection_dim} = {passed} "
                      f"(requires_aesthetics_score={requires_aesthetics_score}); {hint}")


def stack_time_ids(positive, negative, batch, do_guidance, interleaved):
    """Rows [6] or [5] -> time ids [B,k], or [2B,k] when guiding, lined up with the [uncond; cond] batch.

    interleaved: diffusers' text-to-image pipeline repeats the pair [negative, positive] B times
    ([n,p,n,p,...]), its image-to-image and inpainting pipelines stack B negatives then B positives. The
    two agree whenever the negative row equals the positive one (the default); npdiff follows each so
    that a batch with negative_original_size/negative_target_size draws diffusers' picture."""
    positive = np.asarray([positive], dtype=np.float32)  # [1,k]
    if not do_guidance:
        return np.repeat(positive, batch, axis=0)  # [B,k]
    negative = np.asarray([negative], dtype=np.float32)  # [1,k]
    if interleaved:
        return np.tile(np.concatenate([negative, positive], axis=0), (batch, 1))  # [2,k] -> [2B,k]
    return np.concatenate([np.repeat(negative, batch, axis=0), np.repeat(positive, batch, axis=0)])  # [2B,k]
