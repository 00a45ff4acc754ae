"""The packed bf16 weight cache (npdiff/models/packed_cache.py) on the tiny SD 1.5 and SDXL pipelines: made once
and reused (the same packed bits as a fresh pack, and as torch's own bfloat16 rounding of the weights; the same
picture bit for bit), rebuilt when cut short, damaged or stale, never holding a LoRA, and its pages released after
each stage like a float32 file's (the kernel's own count, /proc/self/smaps)."""

import gc
import hashlib
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
from helpers import time_limit
from test_bf16_pipeline import kohya_lora
from test_resident_pages import mapped_rss_bytes
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

import npdiff
from npdiff import lora as npdiff_lora
from npdiff.loading.resident import mapping_of, reachable
from npdiff.models import packed_cache
from npdiff.models import unet as unet_module
from npdiff.models.precision import is_packed

CALL = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "np"}
COMPONENTS = {"sd": ("text_encoder", "unet", "vae"), "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae")}
FAULT_AROUND = 64 << 10  # the kernel maps up to 64 KiB around a faulted page: what a release may leave of a map


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """This test's own cache folder -> the folder the packed files go to."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NPDIFF_BF16_CACHE", raising=False)
    return tmp_path / "xdg" / "npdiff" / "bf16"


@pytest.fixture
def models(tmp_path):
    """{kind: this test's own copy of the tiny model} (a test here rewrites a weight file)."""
    return {"sd": shutil.copytree(tiny_sd_folder(), tmp_path / "sd"), "sdxl": tiny_sdxl_folder()}


def load(folder, cached=True, precision="bf16"):
    """The bf16 pipeline of `folder` (NPDIFF_BF16_CACHE=0 while loading when not `cached`)."""
    previous = os.environ.pop("NPDIFF_BF16_CACHE", None)
    if not cached:
        os.environ["NPDIFF_BF16_CACHE"] = "0"
    try:
        if "sdxl" in folder.name:
            pipe = npdiff.StableDiffusionXLPipeline.from_pretrained(folder, precision=precision)
        else:
            pipe = npdiff.StableDiffusionPipeline.from_pretrained(folder, scheduler="euler", precision=precision)
    finally:
        os.environ.pop("NPDIFF_BF16_CACHE", None)
        if previous is not None:
            os.environ["NPDIFF_BF16_CACHE"] = previous
    pipe.show_progress = False
    return pipe


def draw(pipe, seed):
    return pipe("a red circle", seed=seed, **CALL).images


def packed_weights(model):
    return [item for item in reachable(model) if is_packed(item)]


def layer_weights(pipe, kind):
    """{layer name: weight} of every Linear/Conv2d of every network."""
    found = {}
    for name in COMPONENTS[kind]:
        found.update({key: layer.weight for key, layer in npdiff_lora.named_layers(getattr(pipe, name), name).items()})
    return found


def cache_files(folder):
    return sorted(folder.glob("*.bf16pack"))


def file_state(path):
    """What changes when a file is rewritten: inode, mtime and the bytes' SHA-256."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def unet_cache(folder):
    return next(path for path in cache_files(folder) if path.name.startswith("unet-"))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cache_made_once_then_reused_with_the_same_bits(kind, models, cache_dir, seed):
    fresh = load(models[kind], cached=False)
    assert not cache_dir.exists()  # NPDIFF_BF16_CACHE=0 writes nothing
    first = load(models[kind])  # packs and writes one file per network
    files = cache_files(cache_dir)
    assert len(files) == len(COMPONENTS[kind]) and not list(cache_dir.glob(".*.tmp"))
    states = {path: file_state(path) for path in files}
    second = load(models[kind])  # maps the files: nothing written
    assert {path: file_state(path) for path in cache_files(cache_dir)} == states
    for name in COMPONENTS[kind]:
        assert all(mapping_of(w.data) is None for w in packed_weights(getattr(fresh, name)))
        assert all(mapping_of(w.data) is not None for w in packed_weights(getattr(first, name))), name
        read = packed_weights(getattr(second, name))
        assert read and all(mapping_of(w.data) is not None for w in read), name
        assert len({id(mapping_of(w.data)) for w in read}) == 1  # one map of the network's one file
    # every layer: the same packed bits fresh, written and read back, and torch's bfloat16 rounding of the file's
    # float32 weight
    float32 = layer_weights(load(models[kind], precision="fp32"), kind)
    ours = [layer_weights(pipe, kind) for pipe in (fresh, first, second)]
    assert ours[0].keys() == ours[1].keys() == ours[2].keys() == float32.keys()
    for name, weight in float32.items():
        rounded = torch.from_numpy(np.array(weight)).to(torch.bfloat16).float().numpy()
        for pipe_weights in ours:
            assert pipe_weights[name].layout == ours[0][name].layout
            assert np.array_equal(pipe_weights[name].data, ours[0][name].data), name
            np.testing.assert_array_equal(pipe_weights[name].to_float32(), rounded, err_msg=name)
    pictures = [draw(pipe, seed) for pipe in (fresh, first, second)]
    assert pictures[0].tobytes() == pictures[1].tobytes() == pictures[2].tobytes()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pages_are_released_after_each_stage(kind, models, cache_dir, seed):
    written = load(models[kind])
    read = load(models[kind])
    unet_file = unet_cache(cache_dir)
    data_bytes = sum(w.nbytes for w in packed_weights(read.unet))
    for pipe in (written, read):  # the first load's chunk maps and the second load's map of the whole file
        pipe.release_weights_between_stages = False
        kept = draw(pipe, seed)
        resident = mapped_rss_bytes(unet_file)
        assert resident >= 0.9 * data_bytes  # the UNet's packed weights were read, and stay
        pipe.release_weights_between_stages = True
        released = draw(pipe, seed)
        assert mapped_rss_bytes(unet_file) <= 2 * FAULT_AROUND  # dropped after the sampling
        assert kept.tobytes() == released.tobytes()


def test_lora_never_reaches_the_cache_and_unloads_to_the_mapped_weights(models, cache_dir, rng, tmp_path, seed):
    load(models["sd"])
    states = {path: file_state(path) for path in cache_files(cache_dir)}
    pipe = load(models["sd"])
    uncached = load(models["sd"], cached=False)
    parts = kohya_lora(pipe, tmp_path / "style.safetensors", rng)
    originals = {name: layer.weight for name, (layer, *_) in parts.items()}
    before = draw(pipe, seed)
    for target in (pipe, uncached):
        target.load_lora_weights(tmp_path / "style.safetensors", scale=0.7)
    for name, (layer, *_) in parts.items():
        assert mapping_of(originals[name].data) is not None and mapping_of(layer.weight.data) is None  # fused: private
    with_lora = draw(pipe, seed)
    assert with_lora.tobytes() == draw(uncached, seed).tobytes()  # the same as a LoRA on freshly packed weights
    assert with_lora.tobytes() != before.tobytes()
    pipe.unload_lora_weights()
    assert all(layer.weight is originals[name] for name, (layer, *_) in parts.items())
    assert draw(pipe, seed).tobytes() == before.tobytes()
    assert {path: file_state(path) for path in cache_files(cache_dir)} == states  # untouched by the LoRA
    load(models["sd"])  # a new load reads the same files, with no warning and nothing rewritten
    assert {path: file_state(path) for path in cache_files(cache_dir)} == states


def cut_short(path, folder):
    os.truncate(path, path.stat().st_size - 100)


def flip_a_data_byte(path, folder):
    with open(path, "r+b") as handle:
        handle.seek(100)
        value = handle.read(1)[0]
        handle.seek(100)
        handle.write(bytes([value ^ 0x10]))


def garble_the_index(path, folder):
    with open(path, "r+b") as handle:
        handle.seek(-40, os.SEEK_END)
        handle.write(b"\x00" * 40)


def touch_the_weights(path, folder):
    """The UNet's weight file replaced by a copy of itself (another inode, as a re-download gives)."""
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    copy = weights.with_suffix(".copy")
    copy.write_bytes(weights.read_bytes())
    os.replace(copy, weights)


@pytest.mark.parametrize("damage, reason", [(cut_short, "no index at its end"),
                                            (flip_a_data_byte, "CRC-32"),
                                            (garble_the_index, "no index at its end"),
                                            (touch_the_weights, "the weight file changed")])
def test_a_damaged_or_stale_cache_is_rebuilt(damage, reason, models, cache_dir, seed):
    expected = draw(load(models["sd"]), seed)
    unet_file = unet_cache(cache_dir)
    damage(unet_file, models["sd"])
    with pytest.warns(RuntimeWarning, match=f"cache .*{unet_file.name} is not usable .*{reason}.*rebuilt"):
        rebuilt = load(models["sd"])
    assert draw(rebuilt, seed).tobytes() == expected.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid again: read without a word
        again = load(models["sd"])
    assert all(mapping_of(w.data) is not None for w in packed_weights(again.unet))
    assert draw(again, seed).tobytes() == expected.tobytes()


def test_an_interrupted_build_leaves_no_file(models, cache_dir, monkeypatch):
    """A build stopped half-way (Ctrl-C while packing) leaves neither a cache file nor its temporary; a killed
    process's temporary is removed by the next build; the next load builds a whole, valid cache."""
    original_put = packed_cache.PackedCache.put

    def interrupted_put(self, key, kind, packed):
        if key.startswith("up_blocks."):  # half-way through the UNet (its down blocks are written)
            raise KeyboardInterrupt
        return original_put(self, key, kind, packed)

    monkeypatch.setattr(packed_cache.PackedCache, "put", interrupted_put)
    with pytest.raises(KeyboardInterrupt):
        load(models["sd"])
    gc.collect()  # the unfinished store is dropped with the half-built model
    assert [path.name.split("-")[0] for path in cache_files(cache_dir)] == ["text_encoder"]  # built before
    assert not list(cache_dir.glob(".*.tmp"))
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent.parent))
    finished = subprocess.Popen(["true"])
    finished.wait()  # a process id no process has now
    dead = cache_dir / f".unet-diffusion_pytorch_model-amx-0.bf16pack.{finished.pid}.tmp"
    dead.write_bytes(b"half a file")
    load(models["sd"])
    assert not dead.exists() and len(cache_files(cache_dir)) == 3


def test_cache_files_of_a_deleted_model_are_removed_by_the_next_build(models, cache_dir, tmp_path):
    """A model folder deleted (or moved) leaves cache files nothing can read again (an SDXL UNet's is 5 GB): the next
    cache written removes them; another living model's files and a file whose index cannot be read stay."""
    gone = shutil.copytree(models["sd"], tmp_path / "gone")
    load(gone)
    load(models["sd"])
    both = cache_files(cache_dir)
    assert len(both) == 6  # three networks of each folder
    unreadable = cache_dir / "unet-x-amx-0123456789abcdef.bf16pack"
    unreadable.write_bytes(b"not a cache file")
    shutil.rmtree(gone)
    moved = shutil.copytree(models["sd"], tmp_path / "moved")
    load(moved)  # writes its own three: the deleted folder's three go
    left = cache_files(cache_dir)
    assert len(left) == 7 and unreadable in left
    kept_paths = {path for path in both if path in left}
    assert len(kept_paths) == 3  # the living model's three
    assert all(str(models["sd"].resolve()) in str(packed_cache._index_sources(path)) for path in kept_paths)


def test_a_cache_that_cannot_be_written_keeps_the_weights_private(models, tmp_path, monkeypatch, seed):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "npdiff").mkdir(parents=True)
    (tmp_path / "xdg" / "npdiff" / "bf16").write_text("a file where the cache folder goes")
    with pytest.warns(RuntimeWarning, match="could not write the packed bf16 cache"):
        pipe = load(models["sd"])
    assert all(mapping_of(w.data) is None for w in packed_weights(pipe.unet))
    assert draw(pipe, seed).tobytes() == draw(load(models["sd"], cached=False), seed).tobytes()


def test_a_large_bf16_unet_drops_each_block_after_it_runs(models, cache_dir, monkeypatch):
    """The per-block release of models/unet.py (a UNet past PER_BLOCK_RELEASE_BYTES of mapped weights: SDXL's
    5.1 GB packed) covers the packed weights mapped from the cache: the same output, few pages left resident."""
    load(models["sd"])  # writes the cache
    keeping = load(models["sd"]).unet
    monkeypatch.setattr(unet_module, "PER_BLOCK_RELEASE_BYTES", 0)
    per_block = load(models["sd"]).unet
    assert per_block.release_weights_after_each_block and not keeping.release_weights_after_each_block
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    text = rng.standard_normal((2, 77, keeping.config["cross_attention_dim"]), dtype=np.float32)
    unet_file = unet_cache(cache_dir)
    data_bytes = sum(w.nbytes for w in packed_weights(keeping))
    kept = keeping(latents, 300, text)
    assert mapped_rss_bytes(unet_file) >= 0.9 * data_bytes
    keeping_pages = mapped_rss_bytes(unet_file)
    del keeping  # its map goes with it: what stays resident below is per_block's alone
    gc.collect()
    assert mapped_rss_bytes(unet_file) < keeping_pages
    released = per_block(latents, 300, text)
    assert mapped_rss_bytes(unet_file) < 0.5 * data_bytes
    assert kept.tobytes() == released.tobytes()


def test_a_fifo_in_the_cache_folder_is_rebuilt_over_not_read(models, cache_dir, seed):
    """A FIFO where a cache file goes (or beside it, with the suffix) blocked open() for ever, and with it every
    bf16 load: it is not a regular file, so it is rebuilt over (the one in its place) or left alone."""
    expected = draw(load(models["sd"]), seed)
    unet_file = unet_cache(cache_dir)
    unet_file.unlink()
    os.mkfifo(unet_file)
    os.mkfifo(cache_dir / "vae-other-amx-0123456789abcdef.bf16pack")
    with time_limit("a bf16 load beside FIFOs in its cache folder", 120):
        with pytest.warns(RuntimeWarning, match=f"cache .*{unet_file.name} is not usable .*not a regular file"):
            rebuilt = load(models["sd"])
    assert unet_file.is_file() and draw(rebuilt, seed).tobytes() == expected.tobytes()
