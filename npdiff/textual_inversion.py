"""Textual inversion: new words whose embeddings were learned, added to the tokenizer and to CLIP's table.

Two .safetensors layouts are read (pickled .bin/.pt files are refused: loading them runs arbitrary code):
  diffusers  learned_embeds.safetensors   one key, the token itself: {"<cat-toy>": [D] or [n,D]}
  A1111      <name>.safetensors           {"emb_params": [n,D]} (the flat form of
                                          {"string_to_param": {"*": [n,D]}}; "string_to_param.*" is
                                          accepted too); the token defaults to the file name
  SDXL       <name>.safetensors           {"clip_l": [n,768], "clip_g": [n,1280]}: one token in both of SDXL's
                                          text encoders (load_sdxl_textual_inversion; the token defaults
                                          to the file name)
An embedding with n > 1 vectors becomes n tokens: token, token_1, ..., token_{n-1}, and a prompt's
"token" is expanded to all of them before tokenizing, as diffusers' load_textual_inversion does.
"""

import os
from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError, shorten
from npdiff.loading.configs import open_weights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
A1111_KEYS = ("emb_params", "string_to_param.*")


def embedding_path(path):
    """`path` as a Path; NpdiffError for what is not a path (None, a number)."""
    if not isinstance(path, (str, os.PathLike)):
        raise NpdiffError(f"textual inversion: expected the path of a .safetensors file, got {shorten(path)}")
    return Path(path)


def read_embedding_file(path):
    """-> (token named by the file, float32 vectors [n,D]) from a diffusers or A1111 .safetensors file."""
    path = embedding_path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise NpdiffError(f"{path}: {path.suffix} files are Python pickles, and loading one can run arbitrary "
                          "code; convert it to .safetensors first (safetensors.torch.save_file)")
    if path.is_dir():
        raise NpdiffError(f"textual inversion file {path} is a folder; give the .safetensors file in it "
                          f"(e.g. {path / 'learned_embeds.safetensors'})")
    if not path.is_file():
        raise NpdiffError(f"textual inversion file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise NpdiffError(f"{path}: expected a .safetensors textual inversion file")
    # validated by npdiff.loading (a renamed pickle or a corrupt file -> NpdiffError naming the file)
    weights = open_weights(path)
    keys = weights.keys()
    shapes = {key: tuple(weights.shape(key)) for key in keys}
    a1111_keys = [key for key in keys if key in A1111_KEYS]
    if a1111_keys:
        key, token = a1111_keys[0], path.stem
    elif len(keys) == 1:
        key = token = keys[0]
    elif sorted(keys) == sorted(SDXL_KEYS):
        raise NpdiffError(f"{path}: an SDXL embedding (clip_l and clip_g); load it into an SDXL model "
                          "(npdiff.StableDiffusionXLPipeline.load_textual_inversion)")
    else:
        raise NpdiffError(f"{path}: not a textual inversion embedding: expected one key (diffusers: the token) "
                          f"or 'emb_params' (A1111), found keys {keys}")
    shape = shapes[key]
    if len(shape) not in (1, 2) or 0 in shape:
        raise NpdiffError(f"{path}: embedding {key!r} must be [D] or [n,D], got shape {shape}")
    vectors = backend.to_numpy(weights.take(key, shape))  # widened to float32, NaN/Inf refused
    return token, np.asarray(vectors, dtype=np.float32).reshape(-1, shape[-1])  # [D] or [n,D] -> [n,D]


def load_textual_inversion(pipe, path, token=None):
    """Add the embedding in `path` to pipe.tokenizer and pipe.text_encoder; -> the list of tokens added.

    token: the word to use in prompts (default: the diffusers key, or the A1111 file name).
    """
    file_token, vectors = read_embedding_file(path)  # [n,D]
    token = check_token(file_token if token is None else token)
    names = check_new_rows(pipe.tokenizer, pipe.text_encoder, token, vectors, path)
    return add_rows(pipe.tokenizer, pipe.text_encoder, token, names, vectors)


def check_token(token):
    if not isinstance(token, str) or not token.strip():
        raise NpdiffError(f"token must be a non-empty string, got {token!r}")
    return token


def check_new_rows(tokenizer, text_encoder, token, vectors, source):
    """-> the names token, token_1, ... of `vectors` [n,D]; NpdiffError (nothing changed) when they cannot go in."""
    table = text_encoder.token_embedding  # [V,D]
    if vectors.shape[1] != table.shape[1]:
        raise NpdiffError(f"{source}: embedding width {vectors.shape[1]} does not match the text encoder's "
                          f"token embedding width {table.shape[1]}")

    # 1. the names: token, token_1, ... for a multi-vector embedding
    names = new_token_names(tokenizer, token, vectors.shape[0])

    # 2. the tokenizer's next ids must be the embedding table's next rows
    if len(tokenizer) != table.shape[0]:
        raise NpdiffError(f"the tokenizer has {len(tokenizer)} ids but the text encoder's embedding table has "
                          f"{table.shape[0]} rows; new tokens would not line up")
    return names


def new_token_names(tokenizer, token, count):
    """-> the names token, token_1, ... of a word of `count` vectors; NpdiffError when one is already in the
    tokenizer's vocabulary. Needs the tokenizer alone, so a command can check it before the weights load."""
    names = [token] + [f"{token}_{i}" for i in range(1, count)]
    vocab = tokenizer.get_vocab()
    taken = [name for name in names if name in vocab]
    if taken:
        raise NpdiffError(f"token {taken[0]!r} is already in the tokenizer vocabulary; pass token= another name")
    return names


def add_rows(tokenizer, text_encoder, token, names, vectors):
    """Add `names` to the tokenizer and `vectors` [n,D] to the text encoder's table (checked by check_new_rows)."""
    token_ids = tokenizer.add_tokens(names)
    row_ids = text_encoder.add_token_embeddings(backend.to_device(vectors))  # appends [n,D] rows
    if list(token_ids) != list(row_ids):
        raise NpdiffError(f"internal: tokenizer ids {token_ids} differ from embedding rows {row_ids}")
    if len(names) > 1:
        tokenizer.register_multi_vector(token, names)
    return names


SDXL_KEYS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}


def read_sdxl_embedding_file(path):
    """-> {"clip_l": [n,768], "clip_g": [n,1280]} from an SDXL embedding file (the layout model sites share),
    or None when the file holds other keys."""
    path = embedding_path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    weights = open_weights(path)
    if sorted(weights.keys()) != sorted(SDXL_KEYS):
        return None
    vectors = {}
    for key in SDXL_KEYS:
        shape = tuple(weights.shape(key))
        if len(shape) not in (1, 2) or 0 in shape:
            raise NpdiffError(f"{path}: embedding {key!r} must be [D] or [n,D], got shape {shape}")
        taken = np.asarray(backend.to_numpy(weights.take(key, shape)), dtype=np.float32)
        vectors[key] = taken.reshape(-1, shape[-1])  # [D] or [n,D] -> [n,D]
    counts = {key: part.shape[0] for key, part in vectors.items()}
    if len(set(counts.values())) != 1:  # one word, one token per vector in each tokenizer: the prompts must line up
        raise NpdiffError(f"{path}: 'clip_l' holds {counts['clip_l']} vectors and 'clip_g' {counts['clip_g']}; "
                          "an SDXL embedding gives both text encoders the same number")
    return vectors


def load_sdxl_textual_inversion(pipe, path, token=None, text_encoder=None, tokenizer=None):
    """SDXL textual inversion -> the tokens added.

    text_encoder/tokenizer given (diffusers' way, e.g. text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2):
    `path` is an embedding file or vectors [n,D] / [D], added to that pair. Otherwise `path` is an SDXL file
    {"clip_l": [n,768], "clip_g": [n,1280]}: clip_l goes into text_encoder, clip_g into text_encoder_2, under one
    token (default: the file name; a refiner has no text_encoder, so clip_l is left out); any other file goes
    into text_encoder, as diffusers' load_textual_inversion does by default. Both pairs are checked before
    either changes."""
    if (text_encoder is None) != (tokenizer is None):
        raise NpdiffError("pass text_encoder= and tokenizer= together (e.g. pipe.text_encoder_2 and pipe.tokenizer_2)")
    if text_encoder is not None:
        for tokenizer_name, encoder_name in SDXL_KEYS.values():  # the pipe's own pairs must stay pairs
            own_tokenizer, own_encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
            if own_encoder is not None and (tokenizer is own_tokenizer) != (text_encoder is own_encoder):
                raise NpdiffError(f"text_encoder= and tokenizer= must belong together (pipe.{encoder_name} with "
                                  f"pipe.{tokenizer_name}): a word added to one tokenizer and another encoder's "
                                  "table would fail in every prompt that uses it")
        if isinstance(path, (str, Path)):
            file_token, vectors = read_embedding_file(path)  # [n,D]
        else:
            file_token, vectors = None, np.asarray(backend.to_numpy(path), dtype=np.float32)
            if vectors.ndim not in (1, 2) or 0 in vectors.shape or not np.isfinite(vectors).all():
                raise NpdiffError(f"embedding vectors must be finite, [D] or [n,D]; got shape {vectors.shape}")
            vectors = vectors.reshape(-1, vectors.shape[-1])  # [n,D]
            path = "the embedding vectors"
        token = check_token(file_token if token is None else token)
        names = check_new_rows(tokenizer, text_encoder, token, vectors, path)
        return add_rows(tokenizer, text_encoder, token, names, vectors)
    parts = read_sdxl_embedding_file(path)
    if parts is None:
        return load_textual_inversion(pipe, path, token=token)
    token = check_token(Path(path).stem if token is None else token)
    pairs = [(getattr(pipe, tokenizer_name), getattr(pipe, encoder_name), parts[key])
             for key, (tokenizer_name, encoder_name) in SDXL_KEYS.items() if getattr(pipe, encoder_name) is not None]
    checked = [check_new_rows(tok, encoder, token, vectors, path) for tok, encoder, vectors in pairs]
    for (tok, encoder, vectors), names in zip(pairs, checked):
        add_rows(tok, encoder, token, names, vectors)
    return checked[-1]
