"""The remembered NaN/Inf check of loading (npdiff/loading/finite_cache.py): a second load of an unchanged,
settled file skips the check; a changed, replaced or just-written file is checked again and a damaged one
refused; a damaged record is ignored and rewritten; two processes writing the record at once leave a valid one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import mapped_rss_bytes, unreleasable_bytes

from npdiff.errors import NpdiffError
from npdiff.loading import finite_cache, weights
from npdiff.loading.safetensors_io import SafetensorsFile
from npdiff.loading.weights import Weights

SHAPES = {"a.weight": (8, 5), "b.weight": (3, 4, 2), "c.bias": (7,)}


@pytest.fixture
def record(tmp_path, monkeypatch):
    """A cache folder of the test's own -> the record's path; the per-process memo emptied."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(finite_cache, "_known", {})
    return tmp_path / "cache" / "npdiff" / "finite-checks.json"


@pytest.fixture
def checks(monkeypatch):
    """Counts the NaN/Inf checks loading runs -> a list of checked sizes."""
    seen = []
    original = weights.first_non_finite

    def counted(values):
        seen.append(values.size)
        return original(values)

    monkeypatch.setattr(weights, "first_non_finite", counted)
    return seen


def write_tensors(path, rng, bad_key=None):
    tensors = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in SHAPES.items()}
    if bad_key is not None:
        tensors[bad_key].reshape(-1)[1] = np.nan
    save_file(tensors, str(path))
    return tensors


def load(path):
    """Every tensor of the file taken as a model does, then check_all_used -> {key: array}."""
    source = Weights.from_file(SafetensorsFile(path))
    taken = {key: np.array(source.take(key, shape)) for key, shape in SHAPES.items()}
    source.check_all_used()
    return taken


def test_second_load_of_a_settled_file_skips_the_check(tmp_path, rng, record, checks, monkeypatch):
    monkeypatch.setattr(finite_cache, "SETTLED_NS", 0)  # no waiting for the file's times to lie a second back
    path = tmp_path / "w.safetensors"
    tensors = write_tensors(path, rng)
    first = load(path)
    assert len(checks) == len(SHAPES)
    entry = json.loads(record.read_text())["files"][os.path.realpath(path)]
    assert sorted(entry["keys"]) == sorted(SHAPES)
    monkeypatch.setattr(finite_cache, "_known", {})  # as a fresh process
    second = load(path)
    assert len(checks) == len(SHAPES)  # no check ran the second time
    for key in SHAPES:
        np.testing.assert_array_equal(first[key], tensors[key])
        np.testing.assert_array_equal(second[key], tensors[key])


def test_a_remembered_file_is_released_after_load_like_a_checked_one(tmp_path, rng, record, monkeypatch):
    """check_all_used() drops the pages of every mapped tensor, checked here or remembered: a model's own
    preparation (CLIP's transposed copies) reads them at load (a float32 CLIP-L stayed 0.33 GB more resident)."""
    monkeypatch.setattr(finite_cache, "SETTLED_NS", 0)
    path = tmp_path / "big.safetensors"
    save_file({"w.weight": rng.standard_normal((512, 512)).astype(np.float32)}, str(path))  # 1 MiB
    for _ in range(2):  # the first load checks and records, the second skips the check
        monkeypatch.setattr(finite_cache, "_known", {})
        source = Weights.from_file(SafetensorsFile(path))
        taken = source.take("w.weight", (512, 512))
        assert float(np.abs(taken).sum()) > 0  # read every page, as a model's preparation does
        source.check_all_used()
        assert mapped_rss_bytes(path) <= unreleasable_bytes(path), "the weights stayed resident after load"
    assert json.loads(record.read_text())["files"][os.path.realpath(path)]["keys"] == ["w.weight"]


def test_a_just_written_file_is_not_remembered_and_damage_in_place_is_found(tmp_path, rng, record, checks):
    path = tmp_path / "w.safetensors"
    write_tensors(path, rng)
    load(path)
    assert not record.exists()  # its ctime is not a second old: a rewrite within the clock's tick could hide
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_length])
    begin = 8 + header_length + header["b.weight"]["data_offsets"][0]
    with open(path, "r+b") as handle:  # same size, same inode: only the times change
        handle.seek(begin + 4 * 3)
        handle.write(np.array([np.inf], np.float32).tobytes())
    with pytest.raises(NpdiffError, match=r"key 'b.weight' .* holds inf at index \(0, 1, 1\)"):
        load(path)


def test_a_replaced_file_is_checked_again(tmp_path, rng, record, checks, monkeypatch):
    monkeypatch.setattr(finite_cache, "SETTLED_NS", 0)
    path = tmp_path / "w.safetensors"
    write_tensors(path, rng)
    load(path)
    damaged = tmp_path / "damaged.safetensors"
    write_tensors(damaged, rng, bad_key="a.weight")
    os.replace(damaged, path)  # a new download renamed over the old file: another inode
    with pytest.raises(NpdiffError, match=r"key 'a.weight' .* holds nan at index \(0, 1\)"):
        load(path)


def test_a_touched_file_is_checked_again(tmp_path, rng, record, checks, monkeypatch):
    monkeypatch.setattr(finite_cache, "SETTLED_NS", 0)
    path = tmp_path / "w.safetensors"
    write_tensors(path, rng)
    load(path)
    info = os.stat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - 10**9))  # mtime (and ctime) change
    monkeypatch.setattr(finite_cache, "_known", {})
    load(path)
    assert len(checks) == 2 * len(SHAPES)


def test_a_damaged_record_is_ignored_and_rewritten(tmp_path, rng, record, checks, monkeypatch):
    monkeypatch.setattr(finite_cache, "SETTLED_NS", 0)
    path = tmp_path / "w.safetensors"
    tensors = write_tensors(path, rng)
    record.parent.mkdir(parents=True)
    record.write_bytes(b'{"version": 1, "files": {"' + os.path.realpath(path).encode() + b'": {"keys": [')  # cut off
    taken = load(path)
    assert len(checks) == len(SHAPES)
    np.testing.assert_array_equal(taken["a.weight"], tensors["a.weight"])
    data = json.loads(record.read_text())
    assert data["version"] == finite_cache.CACHE_VERSION
    assert sorted(data["files"][os.path.realpath(path)]["keys"]) == sorted(SHAPES)
    other_version = {"version": finite_cache.CACHE_VERSION + 1, "files": data["files"]}
    record.write_text(json.dumps(other_version))
    monkeypatch.setattr(finite_cache, "_known", {})
    load(path)
    assert len(checks) == 2 * len(SHAPES)  # a record of another version is not trusted


WRITER = """
import sys
from npdiff.loading import finite_cache
finite_cache.SETTLED_NS = 0
path, identity, name = sys.argv[1], finite_cache.file_identity(sys.argv[1]), sys.argv[2]
for round in range(40):
    finite_cache.remember_finite(path, identity, [f"{name}.{round}"])
"""


def test_two_processes_writing_the_record_leave_a_valid_one(tmp_path, rng, record):
    path = tmp_path / "w.safetensors"
    write_tensors(path, rng)
    real = os.path.realpath(path)
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, real, name], env=environment)
               for name in ("first", "second")]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    data = json.loads(record.read_text())  # whole: every write replaced the file at once
    keys = data["files"][real]["keys"]
    possible = {f"{name}.{round}" for name in ("first", "second") for round in range(40)}
    assert keys and set(keys) <= possible
    assert {"first.39", "second.39"} & set(keys)  # the last writer's last key survives
    assert not list(record.parent.glob(".finite-checks-*"))  # no temporary file left behind
