"""A model named by its name and a short SHA-256 hash, never by where it lies on disk.

A picture's metadata says which model made it with these two values, so a reader can tell whether
the model at hand is the same one, and no local path (which may name a user or a folder) leaves
the machine.

  model_name(path)   a single file: its stem ("v1-5-pruned-emaonly"); a diffusers folder: its name
  model_hash(path)   10 hex digits:
                       a single .safetensors/.ckpt file: the first 10 hex of the SHA-256 of the file,
                       which is AUTOMATIC1111's "Model hash" (its `shorthash`);
                       a diffusers folder: the first 10 hex of the SHA-256 of the text made by joining
                       the SHA-256 hex digests of every *.safetensors file in the folder's component
                       subfolders (unet/, vae/, ...), taken in sorted order of their paths relative to
                       the folder (configs are not hashed, nor files beside model_index.json, such as
                       the shipped model's LCM-LoRA: an add-on, not the model)
  file_sha256(path)  the full SHA-256 hex of one file, cached

Hashing reads the whole file (a 4 GB checkpoint takes ~10 s), so digests are kept in a small JSON
cache, $XDG_CACHE_HOME/npdiff/hashes.json (~/.cache/npdiff/hashes.json), keyed by the file's
resolved path and checked against its size and modification time in nanoseconds: a changed file is
hashed again. The cache is replaced atomically (written to a temporary file, then os.replace) and
rebuilt when it cannot be read. The cache stays on this machine; only the digests go into pictures.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from npdiff.errors import NpdiffError

SHORT_HASH_DIGITS = 10  # AUTOMATIC1111's "Model hash" length
CACHE_VERSION = 1
_CHUNK = 1 << 20  # bytes read per update


def cache_path():
    """Where the digest cache lives: $XDG_CACHE_HOME/npdiff/hashes.json, else ~/.cache/npdiff/."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "npdiff" / "hashes.json"


def _read_cache(path):
    """The cache's entries {resolved path: {size, mtime_ns, sha256}}; {} when missing or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {key: entry for key, entry in data["files"].items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def _write_cache(path, entries):
    """Replace the cache file atomically; a cache that cannot be written is only a lost speed-up."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump({"version": CACHE_VERSION, "files": entries}, stream, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def sha256_of_file(path):
    """The plain reference: SHA-256 hex of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path):
    """SHA-256 hex of one file, from the cache when its size and mtime_ns are unchanged."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise NpdiffError(f"model hash: no such file {path}")
    stat = path.stat()
    key = str(path)
    store = cache_path()
    entries = _read_cache(store)
    entry = entries.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_of_file(path)
    entries = _read_cache(store)  # re-read: another process may have added entries meanwhile
    entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_cache(store, entries)
    return digest


def model_weight_files(folder):
    """The *.safetensors files in the component subfolders of a diffusers folder, sorted by their path
    relative to it (a file at the top, beside model_index.json, is no part of the model)."""
    folder = Path(folder)
    files = sorted((p for p in folder.rglob("*.safetensors") if p.parent != folder),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise NpdiffError(f"model hash: {folder} holds no .safetensors files")
    return files


def model_hash(path):
    """10 hex digits naming the weights at `path` (a single file or a diffusers folder); see the module doc."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_sha256(path)[:SHORT_HASH_DIGITS]
    if path.is_dir():
        joined = "".join(file_sha256(p) for p in model_weight_files(path))
        return hashlib.sha256(joined.encode("ascii")).hexdigest()[:SHORT_HASH_DIGITS]
    raise NpdiffError(f"model hash: no such file or folder {path}")


def model_name(path):
    """The name a picture's metadata gives the model: a file's stem, a folder's own name."""
    path = Path(path).expanduser()
    return path.stem if path.is_file() else path.resolve().name
