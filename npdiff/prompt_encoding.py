"""Prompts -> the text embeddings the UNet sees, in plain (diffusers') or webui ("a1111") syntax, with clip skip.

    options = PromptOptions(clip_skip=1, prompt_syntax="a1111")
    text = encode_prompts(tokenizer, text_encoder, ["(red:1.2) circle"], options)
    text.embeddings   # [B,77*C,D]: C chunks of 77 tokens (always 1 with plain syntax)
    text.pooled       # [B,P] for a CLIPTextModelWithProjection (from the first chunk), else None

Which hidden state (`layer="last"`: SD 1.x/2.x, diffusers' StableDiffusionPipeline.encode_prompt):
    clip_skip None  last_hidden_state (after the final layer norm)
    clip_skip k     final_layer_norm(hidden_states[-(k + 1)]): the output k layers before the last, normed
and (`layer="penultimate"`: SDXL's two encoders, diffusers' StableDiffusionXLPipeline.encode_prompt):
    clip_skip None  hidden_states[-2], no final norm
    clip_skip k     hidden_states[-(k + 2)], no final norm
webui counts the same setting from 1 ("Clip skip: 2" is clip_skip=1 here). With plain syntax the negative
prompt keeps the default layer, as in diffusers; with "a1111" both are skipped, as in webui
(PromptOptions.for_negative).

Plain syntax: the prompt as diffusers reads it, one chunk of 77 ids, cut after 75 prompt ids with a
PromptTruncatedWarning. "a1111" syntax, as AUTOMATIC1111's webui encodes a prompt:
  1. the prompt is cut into 77-id chunks with a weight per id (npdiff/prompt_chunks.py); within a batch
     a prompt with fewer chunks gets the empty prompt's chunk for the missing ones;
  2. each chunk is encoded on its own, [B,77] -> z [B,77,D];
  3. the "Original" emphasis: mean0 = z.mean(); z *= weights[..., None]; z *= mean0 / z.mean(), the means
     taken over the whole chunk tensor of the batch, as webui takes them;
  4. the chunks are concatenated on the token axis: [B,77*C,D]; a projection model's pooled embedding is
     the first chunk's (not weighted).
The positive and negative embeddings may then differ in chunk count: the shorter is padded with copies of
the empty prompt's encoded chunk (match_chunk_counts; webui's "pad prompt/negative prompt to be the same
length" rule), so that both halves go through the UNet as one batch. Weights that make a chunk's embeddings
overflow float32 ((x:1e39), brackets nested hundreds deep) are an NpdiffError naming the prompt
(check_emphasis), where webui would sample from NaN.
"""

from collections import namedtuple

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError, shorten
from npdiff.prompt_chunks import CHUNK_LENGTH, prompt_chunks

PROMPT_SYNTAXES = ("plain", "a1111")
CHUNK_TOKENS = CHUNK_LENGTH + 2  # start + 75 + end

# One encoder's result: embeddings [B,77*C,D] and pooled [B,P] or None.
EncodedText = namedtuple("EncodedText", ["embeddings", "pooled"])


class PromptOptions:
    """How prompts are read: clip_skip (None or an int >= 0, diffusers' meaning) and prompt_syntax
    ("plain" or "a1111"), checked on arrival."""

    def __init__(self, clip_skip=None, prompt_syntax="plain"):
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer))
                                      or clip_skip < 0):
            raise NpdiffError(f"clip_skip must be None or an integer >= 0 (the number of text encoder layers "
                              f"skipped from the end; webui's 'Clip skip: 2' is clip_skip=1), got {clip_skip!r}")
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise NpdiffError(f"prompt_syntax must be one of {', '.join(map(repr, PROMPT_SYNTAXES))}, "
                              f"got {prompt_syntax!r}")
        self.clip_skip = None if clip_skip is None else int(clip_skip)
        self.prompt_syntax = prompt_syntax

    def check_layers(self, text_encoder, layer):
        """NpdiffError when clip_skip leaves no hidden state of `text_encoder` to read (before any work)."""
        if self.clip_skip is None or text_encoder is None:
            return
        layers = int(text_encoder.config["num_hidden_layers"])
        most = layers if layer == "last" else layers - 1  # hidden_states holds the embeddings + each layer
        if self.clip_skip > most:
            raise NpdiffError(f"clip_skip {self.clip_skip} skips more layers than the text encoder's "
                              f"{layers} allow (at most {most} here)")

    def for_negative(self):
        """The options the negative prompt is read with. diffusers' pipelines apply clip_skip to the prompt
        alone, the negative prompt keeping the default layer (both StableDiffusionPipeline and the SDXL ones;
        changes proposed in diffusers PRs 13796 and 13973 were closed): plain syntax does the same, so that
        pictures equal diffusers'. webui skips the layers for both: "a1111" reads both alike."""
        return PromptOptions(None, "plain") if self.prompt_syntax == "plain" else self

    def parameters(self):
        """What a picture's parameters record: the settings that differ from the defaults."""
        recorded = {}
        if self.prompt_syntax != "plain":
            recorded["prompt_syntax"] = self.prompt_syntax
        if self.clip_skip is not None:
            recorded["clip_skip"] = self.clip_skip
        return recorded


def encode_ids(text_encoder, ids, clip_skip, layer):
    """ids [B,77] -> EncodedText(hidden state [B,77,D] chosen by clip_skip and layer, pooled [B,P] or None)."""
    outputs = text_encoder(ids, output_hidden_states=True)
    if hasattr(outputs, "text_embeds"):  # CLIPTextModelWithProjection
        last, hidden_states, pooled = outputs.last_hidden_state, outputs.hidden_states, outputs.text_embeds
    else:
        (last, hidden_states), pooled = outputs, None
    if layer == "penultimate":
        return EncodedText(hidden_states[-((clip_skip or 0) + 2)], pooled)  # [B,77,D], no final norm
    if clip_skip is None:
        return EncodedText(last, pooled)  # [B,77,D], after the final norm
    return EncodedText(text_encoder.final_layer_norm(hidden_states[-(clip_skip + 1)]), pooled)  # [B,77,D]


def encode_prompts(tokenizer, text_encoder, prompts, options, layer="last"):
    """A list of prompts -> EncodedText(embeddings [B,77*C,D], pooled [B,P] or None) (module docstring)."""
    if options.prompt_syntax == "plain":
        ids = tokenizer(prompts)  # [B,77] int64, cut at 75 prompt ids with a warning
        return encode_ids(text_encoder, ids, options.clip_skip, layer)
    # 1. chunks per prompt, the shorter prompts filled with the empty prompt's chunk
    per_prompt = [prompt_chunks(tokenizer, prompt) for prompt in prompts]
    empty = prompt_chunks(tokenizer, "")[0]
    count = max(len(chunks) for chunks in per_prompt)
    per_prompt = [chunks + [empty] * (count - len(chunks)) for chunks in per_prompt]
    encoded, pooled = [], None
    for index in range(count):
        ids = np.asarray([chunks[index].ids for chunks in per_prompt], dtype=np.int64)  # [B,77]
        # 2. the chunk on its own
        z, chunk_pooled = encode_ids(text_encoder, ids, options.clip_skip, layer)  # [B,77,D]
        # 3. "Original" emphasis: weight each token, then restore the chunk's mean (an overflow is named below)
        with np.errstate(over="ignore", invalid="ignore"):
            weights = np.asarray([chunks[index].multipliers for chunks in per_prompt], dtype=np.float32)  # [B,77]
            original_mean = z.mean()
            z = z * backend.to_device(weights)[:, :, None]  # [B,77,D] * [B,77,1]
            z = z * (original_mean / z.mean())
        check_emphasis(z, weights, prompts)
        encoded.append(z)
        pooled = chunk_pooled if index == 0 else pooled
    # 4. the chunks side by side on the token axis
    xp = backend.array_module(encoded[0])
    return EncodedText(xp.concatenate(encoded, axis=1), pooled)  # [B,77*C,D]


def check_emphasis(z, weights, prompts):
    """NpdiffError naming the prompt when its weights made the chunk's embeddings overflow (a weight such
    as (x:1e39), or brackets nested hundreds deep: 1.1^1000 > 3.4e38); webui would condition on NaN (a black or
    noise picture). z [B,77,D], weights [B,77]."""
    xp = backend.array_module(z)
    finite = backend.to_numpy(xp.isfinite(z).all(axis=(1, 2)))  # [B]
    if finite.all():
        return
    row = int(np.argmin(finite))
    largest = float(np.max(np.abs(weights[row])))
    raise NpdiffError(f"prompt {shorten(prompts[row])}: its emphasis weights (up to {largest:.3g}) make the text embeddings "
                      f"overflow {np.dtype(z.dtype).name}; use weights of a sensible size (e.g. (word:1.5)) and fewer "
                      "nested brackets")


def match_chunk_counts(first, second, encode_empty, encode_empty_second=None):
    """Pad the shorter of first [B,77*C1,D] and second [B,77*C2,D'] (cond and uncond, or SDXL's two encoders)
    with the empty prompt's chunk -> both 77*max(C1,C2) tokens long. encode_empty() -> [1,77,D], called only
    when the counts differ; encode_empty_second: the second's, when it comes from another encoder."""
    if first.shape[1] == second.shape[1]:
        return first, second
    encode_empty_second = encode_empty if encode_empty_second is None else encode_empty_second
    tokens = max(first.shape[1], second.shape[1])
    xp = backend.array_module(first)

    def padded(embeddings, encode):
        repeats = (tokens - embeddings.shape[1]) // CHUNK_TOKENS
        if repeats == 0:
            return embeddings
        filler = xp.tile(encode(), (embeddings.shape[0], repeats, 1))  # [1,77,D] -> [B,77*r,D]
        return xp.concatenate([embeddings, filler], axis=1)  # -> [B,tokens,D]

    return padded(first, encode_empty), padded(second, encode_empty_second)
