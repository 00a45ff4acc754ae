"""Output files: checked before any work, written atomically (npdiff/atomic_files.py), nothing partial left
behind on failure (a full disk simulated by a writer that raises ENOSPC midway), one-line CLI errors."""

import errno
import os
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli  # noqa: E402
from npdiff.atomic_files import atomic_write, check_destination  # noqa: E402
from npdiff.images import save_png  # noqa: E402


def disk_full_after(count):
    """A write function that writes `count` bytes, then fails as a full disk does."""
    def write(handle):
        handle.write(b"\x89PNG" + b"x" * (count - 4))
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_atomic_write_leaves_nothing_on_a_full_disk(tmp_path):
    target = tmp_path / "picture.png"
    with pytest.raises(NpdiffError, match=r"could not write .*picture\.png: the disk is full; nothing was written"):
        atomic_write(target, disk_full_after(1000))
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one

    target.write_bytes(b"the old picture")
    with pytest.raises(NpdiffError):
        atomic_write(target, disk_full_after(10))
    assert target.read_bytes() == b"the old picture"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]

    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_atomic_write_gives_the_permissions_a_plain_write_would(tmp_path):
    """The temporary file is owner-only (0600); the picture must not stay so: a new file gets 0666 less
    the umask, as open() gives, and an overwritten file keeps its own mode."""
    import os

    old_umask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.png", lambda handle: handle.write(b"new"))
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o640
        existing = tmp_path / "existing.png"
        existing.write_bytes(b"old")
        existing.chmod(0o604)
        atomic_write(existing, lambda handle: handle.write(b"new"))
        assert existing.stat().st_mode & 0o777 == 0o604 and existing.read_bytes() == b"new"
    finally:
        os.umask(old_umask)


def test_atomic_write_passes_other_errors_through_and_cleans_up(tmp_path):
    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        atomic_write(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_save_png_on_a_full_disk(tmp_path, monkeypatch):
    picture = Image.new("RGB", (16, 16), (200, 10, 10))

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(NpdiffError, match="the disk is full"):
        save_png(picture, tmp_path / "out.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


def test_check_destination(tmp_path):
    assert check_destination(tmp_path / "new.png") is False
    (tmp_path / "old.png").write_bytes(b"x")
    assert check_destination(tmp_path / "old.png") is True
    with pytest.raises(NpdiffError, match=r"is a folder; give a file name"):
        check_destination(tmp_path)
    with pytest.raises(NpdiffError, match=r"the folder .*missing does not exist; create it first"):
        check_destination(tmp_path / "missing" / "x.png")
    with pytest.raises(NpdiffError, match=r"old\.png is not a folder"):
        check_destination(tmp_path / "old.png" / "x.png")
    with pytest.raises(NpdiffError, match=r"cannot write in the folder /proc"):
        check_destination(Path("/proc/npdiff-test.png"))  # read-only for root too
    assert list(tmp_path.iterdir()) == [tmp_path / "old.png"]  # the probe file is gone


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def run_cli(capsys, args):
    code = cli.main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("out,message", [
    ("missing/x.png", "does not exist; create it first"),
    (".", "is a folder"),
    ("/proc/x.png", "cannot write in the folder /proc"),
])
def test_bad_out_fails_before_the_model_loads(folder, tmp_path, capsys, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--out", out])
    assert code == 2 and message in err
    assert "loaded model" not in err  # refused before loading, let alone sampling
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npdiff: error: ") and "Traceback" not in err


def test_steps_grid_path_is_checked_too(folder, tmp_path, capsys):
    (tmp_path / "pic-steps.png").mkdir()
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--save-steps", "1",
                                 "--out", str(tmp_path / "pic.png")])
    assert code == 2 and "--save-steps grid" in err and "is a folder" in err and "loaded model" not in err
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--save-steps", "0", "--out",
                                 str(tmp_path / "pic.png")])
    assert code == 2 and "--save-steps must be >= 1" in err


@pytest.mark.parametrize("fail_on", [1, 2])
def test_full_disk_while_saving_leaves_no_partial_file(folder, tmp_path, capsys, monkeypatch, fail_on):
    """The picture (write 1) or the steps grid (write 2) hits a full disk: exit 2, one line, no partial file."""
    import npdiff.atomic_files as atomic_files

    real_fsync = atomic_files.os.fsync
    calls = []

    def fsync(fd):  # the bytes are written; making them durable fails as a full disk does
        calls.append(fd)
        if len(calls) == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    out = tmp_path / "pic.png"
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "2", "--seed", "1",
                                 "--save-steps", "1", "--out", str(out)])
    assert code == 2 and "npdiff: error: could not write" in err and "the disk is full" in err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ([] if fail_on == 1 else ["pic.png"])  # never a 0-byte or partial file, never a temp file
    if fail_on == 2:
        with Image.open(out) as picture:
            picture.load()  # the picture written before the grid failed is whole


def test_overwriting_is_said_on_stderr(folder, tmp_path, capsys):
    out = tmp_path / "pic.png"
    out.write_bytes(b"old")
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--seed", "2",
                                 "--out", str(out)])
    assert code == 0 and f"{out} exists and will be overwritten" in err
    with Image.open(out) as picture:
        assert picture.size == (64, 64)


def test_out_that_is_not_a_regular_file_is_refused(folder, tmp_path, capsys):
    """A FIFO (as a device node would be) is never replaced by a PNG; refused before the model loads."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(NpdiffError, match=r"is a FIFO \(named pipe\): npdiff writes only regular files"):
        check_destination(fifo, "--out")
    with pytest.raises(NpdiffError, match=r"is a FIFO"):
        atomic_write(fifo, lambda handle: handle.write(b"x"))
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--out", str(fifo)])
    assert code == 2 and "is a FIFO" in err and "loaded model" not in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the FIFO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.png"]


def test_out_with_a_trailing_slash_is_a_folder_not_a_file(folder, tmp_path, capsys):
    target = str(tmp_path / "newdir") + "/"
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--out", target])
    assert code == 2 and "ends in a slash" in err and "loaded model" not in err
    assert list(tmp_path.iterdir()) == []  # no file named newdir


def test_a_long_legal_file_name_is_written(folder, tmp_path, capsys):
    """A 240-character name is legal (the limit is 255): the temporary name must not be longer."""
    out = tmp_path / ("p" * 236 + ".png")
    code, err = run_cli(capsys, ["generate", "x", "--model", str(folder), "--steps", "1", "--seed", "3",
                                 "--save-steps", "1", "--out", str(out)])
    assert code == 0, err
    grid = out.with_name(out.stem + "-steps.png")  # 246 characters
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, grid.name])
    with Image.open(out) as picture:
        picture.load()
