"""Textual inversion: new words whose embeddings were learned, added to the tokenizer and to CLIP's table.

Two .safetensors layouts are read (pickled .bin/.pt files are refused: loading them runs arbitrary code):
  diffusers  learned_embeds.safetensors   one key, the token itself: {"<cat-toy>": [D] or [n,D]}
  A1111      <name>.safetensors           {"emb_params": [n,D]} (the flat form of
                                          {"string_to_param": {"*": [n,D]}}; "string_to_param.*" is
                                          accepted too); the token defaults to the file name
An embedding with n > 1 vectors becomes n tokens: token, token_1, ..., token_{n-1}, and a prompt's
"token" is expanded to all of them before tokenizing, as diffusers' load_textual_inversion does.
"""

from pathlib import Path

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.configs import open_weights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
A1111_KEYS = ("emb_params", "string_to_param.*")


def read_embedding_file(path):
    """-> (token named by the file, float32 vectors [n,D]) from a diffusers or A1111 .safetensors file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise NpdiffError(f"{path}: {path.suffix} files are Python pickles, and loading one can run arbitrary "
                          "code; convert it to .safetensors first (safetensors.torch.save_file)")
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
    token = file_token if token is None else token
    if not isinstance(token, str) or not token.strip():
        raise NpdiffError(f"token must be a non-empty string, got {token!r}")
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    table = text_encoder.token_embedding  # [V,D]
    if vectors.shape[1] != table.shape[1]:
        raise NpdiffError(f"{path}: embedding width {vectors.shape[1]} does not match the text encoder's "
                          f"token embedding width {table.shape[1]}")

    # 1. the names: token, token_1, ... for a multi-vector embedding
    names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    vocab = tokenizer.get_vocab()
    taken = [name for name in names if name in vocab]
    if taken:
        raise NpdiffError(f"token {taken[0]!r} is already in the tokenizer vocabulary; pass token= another name")

    # 2. the tokenizer's next ids must be the embedding table's next rows
    if len(tokenizer) != table.shape[0]:
        raise NpdiffError(f"the tokenizer has {len(tokenizer)} ids but the text encoder's embedding table has "
                          f"{table.shape[0]} rows; new tokens would not line up")
    token_ids = tokenizer.add_tokens(names)
    row_ids = text_encoder.add_token_embeddings(backend.to_device(vectors))  # appends [n,D] rows
    if list(token_ids) != list(row_ids):
        raise NpdiffError(f"internal: tokenizer ids {token_ids} differ from embedding rows {row_ids}")
    if len(names) > 1:
        tokenizer.register_multi_vector(token, names)
    return names
