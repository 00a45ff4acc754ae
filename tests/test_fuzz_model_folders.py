"""Bounded fuzzing of model folders built from the shipped tiny model (weights/tiny-shapes) with symlinked
files and folders, links out of the folder (as the Hugging Face cache makes them), chains of links,
symlink loops, dangling links, FIFOs, links to a device, folders where files belong and files where
folders belong, unrelated subfolders holding FIFOs and large files, and links swapped after a load.

Each folder either loads, and then its model hash is the hash of exactly the files the loader reads
(computed here from their bytes: SHA-256 of the joined SHA-256 digests in name order; no other file is
hashed), or it is refused with an NpdiffError; never another exception, never a hang.

Seeded from the `rng` fixture (conftest.py): a failure prints NPDIFF_TEST_SEED=<seed>, and
    NPDIFF_TEST_SEED=<seed> python -m pytest tests/test_fuzz_model_folders.py
replays it case for case; each assertion names the case's layout. NPDIFF_FUZZ_SCALE=20 runs 20 times
as many cases. The default ~60 cases run in about 10-20 s on a loaded 2-core machine.
"""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
from helpers import time_limit
from safetensors.numpy import load_file, save_file

from npdiff import model_identity
from npdiff.errors import NpdiffError
from npdiff.loading import load_pipeline_components
from npdiff.pipeline import StableDiffusionPipeline

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes"
CASE_SECONDS = 15  # a case that takes longer is a hang (a FIFO opened)
SCALE = int(os.environ.get("NPDIFF_FUZZ_SCALE", "1"))
CASES = 60 * SCALE
FULL_LOAD_EVERY = 6  # every 6th folder that loads is also built into a whole pipeline

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# what may happen to a component folder, and to a file in a real one: benign ways must load, hostile
# ways may be refused (some load: a missing tokenizer/ or model_index.json is allowed)
BENIGN_FOLDER = ["real", "real", "link", "relative link", "link to the other model", "link chain"]
HOSTILE_FOLDER = ["loop", "dangling", "fifo", "file", "missing", "device"]
BENIGN_FILE = ["real", "real", "link", "relative link", "blob link", "link chain", "hard link"]
HOSTILE_FILE = ["loop", "dangling", "fifo", "folder", "missing", "device", "link to another weight file"]
HOSTILITY = (0.0, 0.0, 0.03, 0.1, 0.3)  # the chance of a hostile choice, drawn per case


def choose(rng, benign, hostile, hostility, chosen):
    """A benign kind, or with probability `hostility` a hostile one (noted in `chosen`)."""
    if rng.random() < hostility:
        chosen.append(True)
        return hostile[int(rng.integers(len(hostile)))]
    return benign[int(rng.integers(len(benign)))]


def expected_hash(files):
    joined = "".join(hashlib.sha256(Path(file).read_bytes()).hexdigest() for file in files)
    return hashlib.sha256(joined.encode("ascii")).hexdigest()[:10]


def make_store(root):
    """Two models to link to: A (the shipped one) and B (A with another UNet), and a blobs/ folder."""
    model_a, model_b = root / "store" / "A", root / "store" / "B"
    shutil.copytree(SHIPPED, model_a, ignore=shutil.ignore_patterns("lcm-lora.safetensors"))
    shutil.copytree(model_a, model_b)
    unet_file = model_b / "unet" / WEIGHTS["unet"]
    tensors = load_file(str(unet_file))
    tensors["conv_in.weight"] = tensors["conv_in.weight"] + np.float32(0.25)
    save_file(tensors, str(unet_file))
    (root / "store" / "blobs").mkdir()
    return model_a, model_b


def place_special(path, kind):
    """Make `path` a loop, a dangling link, a FIFO or a link to a device; False when `kind` is none of them."""
    if kind == "loop":
        os.symlink(path.name, path)
    elif kind == "dangling":
        os.symlink(path.name + ".gone", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.symlink("/dev/null", path)
    else:
        return False
    return True


def place_link(source, target, kind, rng, store):
    """Make `target` a link to `source` (absolute, relative, or through a middle link); False for other kinds."""
    if kind == "link":
        os.symlink(source, target)
    elif kind == "relative link":
        os.symlink(os.path.relpath(source, target.parent), target)
    elif kind == "link chain":
        middle = store / "chains" / f"{rng.integers(1 << 30)}-{target.name}"
        middle.parent.mkdir(exist_ok=True)
        os.symlink(source, middle)
        os.symlink(middle, target)
    else:
        return False
    return True


def place_file(source, target, kind, rng, store):
    """Put the file `source` at `target` as `kind` says."""
    if place_special(target, kind) or place_link(source, target, kind, rng, store):
        return
    if kind == "real":
        shutil.copy2(source, target)
    elif kind == "blob link":  # the Hugging Face cache: the bytes in ../../blobs/<sha256>
        blob = store / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copy2(source, blob)
        os.symlink(os.path.relpath(blob, target.parent), target)
    elif kind == "hard link":
        os.link(source, target)
    elif kind == "folder":
        target.mkdir()
    elif kind == "link to another weight file":
        others = [source.parent.parent / name / file for name, file in WEIGHTS.items()]
        os.symlink(others[int(rng.integers(len(others)))], target)
    elif kind != "missing":
        raise AssertionError(kind)


def place_folder(source, target, kind, rng, store, other, hostility, chosen):
    """Put the component folder `source` at `target` as `kind` says; its files get kinds of their own.
    -> the layout description (for messages)."""
    if place_special(target, kind) or place_link(source, target, kind, rng, store):
        return kind
    if kind == "link to the other model":
        os.symlink(other / source.name, target)
    elif kind == "file":
        target.write_bytes(b"{}")
    elif kind == "real":
        target.mkdir()
        kinds = []
        for file in sorted(source.iterdir()):
            file_kind = choose(rng, BENIGN_FILE, HOSTILE_FILE, hostility, chosen)
            if file_kind == "link to another weight file" and file.name != WEIGHTS.get(source.name):
                file_kind = "dangling"
            place_file(file, target / file.name, file_kind, rng, store)
            if file_kind != "real":
                kinds.append(f"{file.name}: {file_kind}")
        return "real (" + ", ".join(kinds) + ")" if kinds else "real"
    elif kind != "missing":
        raise AssertionError(kind)
    return kind


def build_case(root, index, rng, store, model_a, model_b):
    """A random model folder -> (folder, layout description, whether anything hostile was chosen)."""
    folder = root / f"case-{index}" / "model"
    folder.mkdir(parents=True)
    source, other = (model_a, model_b) if rng.random() < 0.5 else (model_b, model_a)
    hostility = HOSTILITY[int(rng.integers(len(HOSTILITY)))]
    chosen = []  # one True per hostile choice
    layout = {}
    for name in COMPONENTS:
        kind = choose(rng, BENIGN_FOLDER, HOSTILE_FOLDER, hostility, chosen)
        layout[name] = place_folder(source / name, folder / name, kind, rng, store, other, hostility, chosen)
    index_kind = choose(rng, BENIGN_FILE, HOSTILE_FILE[:-1], hostility, chosen)
    place_file(source / "model_index.json", folder / "model_index.json", index_kind, rng, store)
    layout["model_index.json"] = index_kind
    if rng.random() < 0.5:  # an unrelated subfolder: never read (a FIFO there would hang a hash that looked)
        extras = folder / "extras"
        extras.mkdir()
        os.mkfifo(extras / "pipe.safetensors")
        (extras / "big.safetensors").write_bytes(os.urandom(1 << 16))
        os.symlink(extras, extras / "loop")
        layout["extras"] = "fifo, file, loop"
    return folder, layout, bool(chosen)


def check_loaded_folder(folder, what, hashed):
    """The hash of a folder that loaded: exactly the three weight files the loader reads, by their bytes."""
    files = [os.path.realpath(folder / name / WEIGHTS[name]) for name in sorted(WEIGHTS)]
    hashed.clear()
    got = model_identity.model_hash(folder)
    assert got == expected_hash(files), f"{what}: model hash {got} is not the hash of the loaded files"
    assert set(hashed) <= {Path(file) for file in files}, f"{what}: hashed other files: {hashed}"


def test_fuzz_model_folders(rng, tmp_path, monkeypatch, hash_cache):
    model_a, model_b = make_store(tmp_path)
    store = tmp_path / "store"
    hashed = []
    real_sha256 = model_identity.sha256_of_file
    monkeypatch.setattr(model_identity, "sha256_of_file", lambda path: hashed.append(Path(path)) or real_sha256(path))
    outcomes = {"loaded": 0, "refused": 0}
    for index in range(CASES):
        folder, layout, hostile = build_case(tmp_path, index, rng, store, model_a, model_b)
        what = f"case {index}: {layout}"
        with time_limit(what, CASE_SECONDS):
            try:
                load_pipeline_components(folder)
            except NpdiffError as exc:
                assert hostile, f"{what}: only links and copies, yet refused: {exc}"
                outcomes["refused"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
            outcomes["loaded"] += 1
            check_loaded_folder(folder, what, hashed)
            if outcomes["loaded"] % FULL_LOAD_EVERY == 1:
                try:
                    StableDiffusionPipeline.from_pretrained(folder)
                except NpdiffError:
                    pass  # e.g. vae weights linked where the UNet's belong: refused by key
                except Exception as exc:  # noqa: BLE001
                    raise AssertionError(f"{what}: from_pretrained: {type(exc).__name__}: {exc}") from exc
    assert outcomes["loaded"] >= CASES // 10 and outcomes["refused"] >= CASES // 10, outcomes


def test_swapping_linked_components_changes_the_hash(rng, tmp_path, hash_cache):
    """A folder whose unet/ (or vae/, text_encoder/) is a link swapped between two models: the hash follows
    the link each time, and equals the hash of a real copy of what it points at."""
    model_a, model_b = make_store(tmp_path)
    folder = tmp_path / "linked"
    shutil.copytree(model_a, folder, ignore=shutil.ignore_patterns("unet"))
    os.symlink(model_a / "unet", folder / "unet")
    hashes = {"A": model_identity.model_hash(model_a), "B": model_identity.model_hash(model_b)}
    assert hashes["A"] != hashes["B"]
    for turn in range(6):
        name = "AB"[int(rng.integers(2))]
        target = {"A": model_a, "B": model_b}[name] / "unet"
        os.symlink(target, tmp_path / "next")
        os.replace(tmp_path / "next", folder / "unet")  # the swap, in one step
        assert model_identity.model_hash(folder) == hashes[name], f"turn {turn}: unet -> {name}"
