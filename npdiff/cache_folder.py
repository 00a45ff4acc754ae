"""The one folder where npdiff keeps what it can rebuild: model hashes, the CLIP tokenizer from openai-clip.

    cache_folder() -> Path, in this order:
      1. $XDG_CACHE_HOME/npdiff, when XDG_CACHE_HOME is an absolute path (the XDG rule: a relative
         one is ignored);
      2. $HOME/.cache/npdiff, when HOME is an absolute path other than "/" (HOME unset: the account's
         home from the password database, as Python's Path.home() does);
      3. otherwise (HOME= empty, "/", or relative) a private folder in the temporary directory,
         <tmp>/npdiff-cache-<uid>, made with mode 0700 and used only when this user owns it and no one
         else may write there (else a fresh folder for this process), with a warning once. Never
         /.cache/npdiff at the root: with HOME empty, Path.home() is "/".

Nothing here creates the folder except case 3: each user of the cache makes its own subfolder.

    file_identity(path) -> dict: what says a cached thing's source file is still the same one (size,
                           mtime, ctime, inode, device of the file, symlinks followed)
    read_file_records(path, version) -> dict: the {file: entry} records of a small JSON cache file
                           ({"version": N, "files": {...}}: hashes.json, finite-checks.json); {} when it is
                           missing, damaged or of another version
    write_file_records(path, version, files): replaces that file atomically (a temporary file in the same
                           folder, then os.replace: a reader sees the old or the new one, never half)
"""

import json
import os
import stat
import tempfile
import warnings
from pathlib import Path

_fallback = None  # the temporary folder chosen in case 3, once per process


def _usable_root(value):
    """`value` as a folder to cache under, or None when it is empty, relative or the root "/"."""
    if not value or not os.path.isabs(value):
        return None
    if value.rstrip("/\\") == "":
        return None
    return Path(value)


def _private_temporary_folder():
    """<tmp>/npdiff-cache-<uid> when it is this user's own folder (not a link, mode without group/other
    write), else a new folder from mkdtemp for this process."""
    global _fallback
    if _fallback is not None:
        return _fallback
    uid = os.getuid() if hasattr(os, "getuid") else None
    shared = Path(tempfile.gettempdir()) / f"npdiff-cache-{uid if uid is not None else 'user'}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(shared)
        owned = uid is None or info.st_uid == uid
        private = stat.S_ISDIR(info.st_mode) and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        chosen = shared if owned and private else Path(tempfile.mkdtemp(prefix="npdiff-cache-"))
    except OSError:
        chosen = Path(tempfile.mkdtemp(prefix="npdiff-cache-"))
    warnings.warn(f"neither XDG_CACHE_HOME nor HOME names a usable folder (HOME={os.environ.get('HOME')!r}); "
                  f"npdiff keeps its cache in {chosen}", stacklevel=3)
    _fallback = chosen
    return chosen


def cache_folder():
    """The folder npdiff caches in (see the module doc); not created here."""
    xdg = _usable_root(os.environ.get("XDG_CACHE_HOME", ""))
    if xdg is not None:
        return xdg / "npdiff"
    home = os.environ["HOME"] if "HOME" in os.environ else os.path.expanduser("~")
    home = _usable_root(home)
    if home is not None:
        return home / ".cache" / "npdiff"
    return _private_temporary_folder()


def file_identity(path_or_stat):
    """Size, mtime, ctime, inode and device of a file (a path, followed through symlinks, or an os.stat
    result): a file replaced by another (a rename over it, a copy keeping the mtime) has another inode or
    ctime, so a cache keyed by these is never used for a changed file."""
    info = path_or_stat if isinstance(path_or_stat, os.stat_result) else os.stat(path_or_stat)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino, "device": info.st_dev}


def read_file_records(path, version):
    """The "files" dict of the JSON cache file `path`; {} when missing, unreadable, damaged or not `version`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != version or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def write_file_records(path, version, files):
    """Replace the JSON cache file `path` atomically; one that cannot be written is only a lost speed-up."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump({"version": version, "files": files}, stream, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        pass
