"""A model named by its name and a short SHA-256 hash, never by where it lies on disk.

A picture's metadata says which model made it with these two values, so a reader can tell whether
the model at hand is the same one, and no local path (which may name a user or a folder) leaves
the machine.

  model_name(path)   a single file: its stem ("v1-5-pruned-emaonly"); a diffusers folder: its name
  model_hash(path)   10 hex digits:
                       a single .safetensors/.ckpt file: the first 10 hex of the SHA-256 of the file,
                       which is AUTOMATIC1111's "Model hash" (its `shorthash`);
                       a diffusers folder: the first 10 hex of the SHA-256 of the text made by joining
                       the SHA-256 hex digests of exactly the weight files the loader reads
                       (loading.components.pipeline_weight_files: unet/, vae/, text_encoder/ weights, the
                       variant asked for, the shards an index names), in sorted order of their names
                       relative to the folder. Nothing else below the folder is read: not other variants,
                       not other subfolders (a 20 GB file linked into one is never opened), not configs,
                       not files beside model_index.json (such as the shipped model's LCM-LoRA: an add-on,
                       not the model). Symlinked files and component folders hash like real ones: their
                       targets' bytes, so a folder whose unet/ links to another UNet changes hash when the
                       link does.
  file_sha256(path)  the full SHA-256 hex of one file, cached

Hashing reads the whole file (a 4 GB checkpoint takes ~10 s), so digests are kept in a small JSON
cache, hashes.json in npdiff's cache folder (npdiff.cache_folder: $XDG_CACHE_HOME/npdiff or
~/.cache/npdiff), keyed by the file's resolved path (symlinks followed) and checked against its size,
mtime, ctime, inode and device: a changed or replaced file is hashed again. The cache is replaced
atomically (written to a temporary file, then os.replace), forgets files that no longer exist, and is
rebuilt when it cannot be read. The cache stays on this machine; only the digests go into pictures.
"""

import hashlib
import os
from pathlib import Path

from npdiff.cache_folder import (
    cache_folder,
    file_identity,
    read_file_records,
    write_file_records,
)
from npdiff.errors import NpdiffError
from npdiff.loading.components import pipeline_weight_files
from npdiff.paths import path_kind

SHORT_HASH_DIGITS = 10  # AUTOMATIC1111's "Model hash" length
CACHE_VERSION = 1
_CHUNK = 1 << 20  # bytes read per update


def cache_path():
    """Where the digest cache lives: hashes.json in npdiff's cache folder (npdiff.cache_folder)."""
    return cache_folder() / "hashes.json"


def _read_cache(path):
    """The cache's entries {resolved path: {size, mtime_ns, sha256}}; {} when missing or damaged."""
    return {key: entry for key, entry in read_file_records(path, CACHE_VERSION).items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def _write_cache(path, entries):
    """Replace the cache file atomically; a cache that cannot be written is only a lost speed-up."""
    write_file_records(path, CACHE_VERSION, entries)


def sha256_of_file(path):
    """The plain reference: SHA-256 hex of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path):
    """SHA-256 hex of one regular file (symlinks resolved), from the cache while its identity (size, mtime,
    ctime, inode, device of the resolved file) is unchanged."""
    path = Path(path).expanduser()
    if path_kind(path, "file to hash") != "file":
        raise NpdiffError(f"model hash: no such file {path}")
    real = Path(os.path.realpath(path))
    identity = file_identity(os.stat(real))
    key = str(real)
    store = cache_path()
    entry = _read_cache(store).get(key)
    if entry and all(entry.get(name) == value for name, value in identity.items()):
        return entry["sha256"]
    digest = sha256_of_file(real)
    if file_identity(os.stat(real)) != identity:  # changed while it was read: do not cache a mixed digest
        return digest
    entries = _read_cache(store)  # re-read: another process may have added entries meanwhile
    entries = {name: value for name, value in entries.items() if os.path.isfile(name)}  # forget deleted files
    entries[key] = {**identity, "sha256": digest}
    _write_cache(store, entries)
    return digest


def model_hash(path, variant=None):
    """10 hex digits naming the weights at `path` (a single file or a diffusers folder, loaded with
    `variant`); see the module doc."""
    path = Path(path).expanduser()
    kind = path_kind(path, "model")
    if kind == "file":
        return file_sha256(path)[:SHORT_HASH_DIGITS]
    if kind == "folder":
        files = pipeline_weight_files(path, variant)
        joined = "".join(file_sha256(file) for _, file in files)
        return hashlib.sha256(joined.encode("ascii")).hexdigest()[:SHORT_HASH_DIGITS]
    raise NpdiffError(f"model hash: no such file or folder {path}")


def model_name(path):
    """The name a picture's metadata gives the model: a file's stem, a folder's own name."""
    path = Path(path).expanduser()
    return path.stem if path.is_file() else path.resolve().name
