"""Writing files so that a failure never leaves half a file behind.

    atomic_write(path, write_fn)          write_fn(handle) fills a temporary file in the same folder;
                                          only when it returns is the file renamed onto `path`
    atomic_folder(path, fill_fn)          the same for a folder of files (a cache): fill_fn(tmp_folder)
    same_place(first, second)             whether two paths name one file (an output over an input)
    check_destination(path, what)         before any long work: the folder exists, is writable, and
                                          `path` is a regular file or no file at all (not a folder, a
                                          device, a FIFO or a socket, and no name ending in a slash);
                                          -> True when a file is already there

Why a temporary file and os.replace: writing a PNG straight to its name leaves a 0-byte or truncated
file when the disk fills, the process is killed, or the encoder raises. os.replace within one folder
is atomic on POSIX and Windows: readers see the old file or the whole new one, never a part. The
temporary file is removed on any failure, so nothing is left behind. Its name is short
(".npdiff-XXXXXXXX.tmp"), so any legal file name can be written, however long.

Only a regular file is ever replaced: os.replace onto a device node or a FIFO would swap the node itself
for a PNG (as root, --out /dev/null would replace the system's), so those are refused by name.
"""

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from npdiff.errors import NpdiffError

TEMPORARY_PREFIX = ".npdiff-"  # + 8 random characters + ".tmp": never longer than a legal target name
NODE_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
              stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket"}


def non_regular_kind(path):
    """What is at `path` (followed through symlinks) when it is not a regular file ("a folder", "a FIFO
    (named pipe)", ...); None when it is a regular file or nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder is checked apart)
        return None
    except OSError as exc:
        return f"not examinable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in NODE_KINDS.items() if test(mode)), "not a regular file")


def refuse_non_regular(path, what="output"):
    """NpdiffError when `path` exists and is not a regular file, its kind named."""
    kind = non_regular_kind(path)
    if kind == "a folder":
        raise NpdiffError(f"{what} {path} is a folder; give a file name such as {Path(path) / 'picture.png'}")
    if kind is not None:
        raise NpdiffError(f"{what} {path} is {kind}: npdiff writes only regular files")


def _new_file_mode(path):
    """The mode of the file at `path` when there is one, else 0666 less the process's umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(handle) on a temporary file beside `path`, then rename it onto `path`.

    On any exception the temporary file is deleted and the exception propagates (an OSError such as
    a full disk becomes an NpdiffError naming the file); an existing file at `path` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    refuse_non_regular(path, "output")
    # 1. a temporary file in the same folder (same file system, so the rename is atomic)
    try:
        handle = tempfile.NamedTemporaryFile(mode=mode, dir=folder, prefix=TEMPORARY_PREFIX, suffix=".tmp",
                                             delete=False)
    except OSError as exc:
        raise NpdiffError(f"could not write {path}: {exc.strerror or exc} (in the folder {folder}); nothing "
                          "was written") from exc
    tmp_name = handle.name
    try:
        # 2. fill it, and make sure the bytes are on disk before the rename
        with handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # 3. the permissions a plain open() would give (temporary files are made owner-only, 0600)
        os.chmod(tmp_name, _new_file_mode(path))
        # 4. the rename: readers see the old file or the complete new one
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, NpdiffError):
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise NpdiffError(f"could not write {path}: {reason}; nothing was written") from exc
        raise
    return path


def atomic_folder(path, fill_fn):
    """Build a folder of files in a temporary folder beside `path` with fill_fn(tmp_folder), then move it
    to `path` (replacing what was there: a cache folder that is damaged or half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TEMPORARY_PREFIX, suffix=".tmp"))
    try:
        fill_fn(tmp)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process put a whole one there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def same_place(first, second):
    """Whether two paths name one file or folder (links followed); False when either is not there."""
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # not there, or not a usable path (a NUL byte)
        return False


def check_destination(path, what="output"):
    """NpdiffError unless a file can be written at `path`; -> True if a file is already there.

    Checked before sampling, so a bad --out fails in a second, not after minutes of work: the folder
    must exist and accept a new file (tried for real: permission bits do not tell the whole story on
    read-only mounts), `path` must be a regular file or absent, and a name ending in a slash (a folder
    meant, "newdir/") is refused rather than written as a file named "newdir".
    """
    if str(path).endswith(("/", os.sep)):
        raise NpdiffError(f"{what} {path} ends in a slash, so it names a folder; give a file name such as "
                          f"{Path(path) / 'picture.png'}")
    path = Path(path)
    refuse_non_regular(path, what)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise NpdiffError(f"{what} {path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NpdiffError(f"{what} {path}: {folder} is not a folder")
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=TEMPORARY_PREFIX, suffix=".probe")
        probe.close()  # deletes it
    except OSError as exc:
        raise NpdiffError(f"{what} {path}: cannot write in the folder {folder} "
                          f"({exc.strerror or exc})") from exc
    return path.exists()
