"""What a path in a model folder may be: the one rule for symlinks and special files.

Every file npdiff reads from a model (weights, shard indexes, config.json, tokenizer files, the
scheduler config, model_index.json) and every component folder goes through path_kind first:

  - symlinks are followed, wherever they point: the folder's maker put them there. The Hugging Face
    cache links each file of snapshots/<rev>/ to ../../blobs/<sha256>; sharing one VAE or UNet between
    models links a whole component folder. Messages name the path as it is written in the model folder,
    not the link's target.
  - what a path leads to must be a regular file (a folder, for a model or component folder); a symlink
    loop, a FIFO, a character or block device, a socket, a dangling link or a path that cannot be
    looked up is an NpdiffError naming the path and what it is. (A FIFO would block the read forever,
    /dev/zero would never end.)
  - names written INSIDE a file, such as the shard names of a .safetensors.index.json, are not paths:
    they must be plain file names of the same folder (configs.shard_path), so a file's content can only
    reach what the folder itself holds (a link there included, like any other entry).

  path_kind(path, what)      "missing", "file" or "folder"; NpdiffError for anything else
  regular_file(path, what)   the path when it is a regular file (through links), else NpdiffError
"""

import errno
import os
import stat

from npdiff.errors import NpdiffError

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _special_kind(mode):
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return "not a regular file or folder"


def path_kind(path, what="model file"):
    """"missing", "file" or "folder" for `path`, following symlinks; NpdiffError naming the path (and
    `what` npdiff wanted it for) when it is a loop, a dangling link, a special file or unreadable."""
    path = os.fspath(path)
    try:
        info = os.stat(path)  # follows links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NpdiffError(f"{path} ({what}) is a symlink loop; it leads back to itself") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                raise NpdiffError(f"{path} ({what}) is a symlink to {os.readlink(path)!r}, which does not "
                                  "exist") from None
            return "missing"
        raise NpdiffError(f"{path} ({what}) cannot be looked up: {exc.strerror}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise NpdiffError(f"{path!r} ({what}) is not a usable path: {exc}") from None
    if stat.S_ISREG(info.st_mode):
        return "file"
    if stat.S_ISDIR(info.st_mode):
        return "folder"
    raise NpdiffError(f"{path} ({what}) is {_special_kind(info.st_mode)}; npdiff reads only regular files")


def regular_file(path, what="model file"):
    """`path` when it leads to a regular file; NpdiffError when it is missing, a folder or special."""
    kind = path_kind(path, what)
    if kind == "missing":
        raise NpdiffError(f"missing file: {os.fspath(path)} ({what})")
    if kind == "folder":
        raise NpdiffError(f"{os.fspath(path)} ({what}) is a folder; expected a file")
    return path
