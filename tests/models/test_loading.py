"""npdiff.loading: safetensors reading, dtype widening, variants, shards, pipeline folders, and the
errors for every kind of bad file (each must name the file and the key)."""

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from tiny_clip import save_clip, tiny_clip
from tiny_models import tiny_unet, tiny_vae

from npdiff import model_identity
from npdiff.errors import NpdiffError
from npdiff.loading import (load_component_weights, load_pipeline_components, open_weights, read_config,
                            read_json)
from npdiff.loading.components import pipeline_weight_files
from npdiff.loading.resident import mapping_of
from npdiff.model_identity import model_hash


def random_tensors(rng, count=4):
    """name -> random float32 torch tensor of a random small shape (1 to 4 dims)."""
    tensors = {}
    for index in range(count):
        shape = tuple(int(n) for n in rng.integers(1, 7, size=int(rng.integers(1, 5))))
        tensors[f"block.{index}.weight"] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 3)
    return tensors


def special_values():
    """Values where a widening could go wrong: signed zeros, infinities, NaN, subnormals, extremes."""
    values = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6e-8, -6e-8, 1e-40, 3e38,
              1 / 3, 2 ** -14, 2 ** -24, 1e-45]
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Widening: fp16 / bf16 / fp32 read exactly as torch's .float()
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_widening_is_exact(dtype, rng, tmp_path):
    tensors = random_tensors(rng)
    tensors["special"] = special_values()
    stored = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    path = tmp_path / "w.safetensors"
    save_file(stored, str(path))

    weights = open_weights(path)
    assert sorted(weights.keys()) == sorted(stored)
    for name, tensor in stored.items():
        ours = weights.take(name, tuple(tensor.shape), finite=name != "special")  # "special" holds NaN/Inf
        expected = tensor.float().numpy()  # torch's own widening
        assert ours.dtype == np.float32 and ours.shape == expected.shape
        assert ours.flags.c_contiguous and not isinstance(ours, np.memmap)
        # float32: a read-only view of the file's map (no copy); float16/bfloat16: a read-only view of the
        # map of the widened copy (an unlinked file: its pages are released like the float32 file's)
        assert not ours.flags.writeable and mapping_of(ours) is not None
        np.testing.assert_array_equal(ours, expected)  # bit-exact, NaN == NaN
        assert np.array_equal(np.signbit(ours), np.signbit(expected))  # -0.0 stays -0.0
    weights.check_all_used()


def test_taken_float32_arrays_are_read_only_views_of_the_file(rng, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "h": torch.ones(5, dtype=torch.float16)}, str(path))
    raw = path.read_bytes()
    weights = open_weights(path)
    first = weights.take("a", (3, 4))
    with pytest.raises(ValueError, match="read-only"):
        first[:] = 7.0  # a write into a mapped weight raises instead of changing the file's pages
    with pytest.raises(ValueError, match="read-only"):
        first += 1.0
    widened = weights.take("h", (5,))
    with pytest.raises(ValueError, match="read-only"):
        widened[:] = 7.0  # a widened float16 weight is a view of the widened copy's map: read-only too
    np.testing.assert_array_equal(weights.take("a", (3, 4)), np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(weights.take("h", (5,)), np.ones(5, np.float32))
    assert path.read_bytes() == raw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widened_copy_is_file_backed_and_released(dtype, rng, tmp_path, monkeypatch):
    """F16/BF16 weights are widened once into an unlinked file under NPDIFF_WIDEN_DIR; its pages are released
    like a float32 file's and come back with the same values; without a usable folder, private memory."""
    from npdiff.loading.resident import release_array_pages

    tensors = random_tensors(rng, 3)
    path = tmp_path / "w.safetensors"
    save_file({name: tensor.to(dtype) for name, tensor in tensors.items()}, str(path))
    monkeypatch.setenv("NPDIFF_WIDEN_DIR", str(tmp_path / "widened"))
    weights = open_weights(path)
    taken = {name: weights.take(name, tuple(t.shape)) for name, t in tensors.items()}
    assert len({id(mapping_of(array)) for array in taken.values()}) == 1  # one widened copy per file
    assert (tmp_path / "widened").is_dir() and not list((tmp_path / "widened").iterdir())  # unlinked at once
    assert release_array_pages(list(taken.values())) >= 0
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(taken[name], tensor.to(dtype).float().numpy())
        np.testing.assert_array_equal(weights.take(name, tuple(tensor.shape)), taken[name])  # widened once

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("NPDIFF_WIDEN_DIR", str(blocker))
    weights = open_weights(path)
    name, tensor = next(iter(tensors.items()))
    with pytest.warns(RuntimeWarning, match="not-a-folder.*private memory"):
        private = weights.take(name, tuple(tensor.shape))
    assert mapping_of(private) is None
    np.testing.assert_array_equal(private, tensor.to(dtype).float().numpy())


def test_float32_views_share_the_map_and_keep_it_alive(rng, tmp_path):
    """No copy: the taken array's bytes are the file's bytes at the tensor's offset in one map per file,
    and the array alone keeps the map (and its file) usable after every loader object is gone."""
    tensors = random_tensors(rng, 3)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    weights = open_weights(path)
    taken = {name: weights.take(name, tuple(t.shape)) for name, t in tensors.items()}
    maps = {id(mapping_of(array)) for array in taken.values()}
    assert len(maps) == 1  # one map of the file, shared by every tensor
    raw = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:data_start])
    mapping = mapping_of(taken["block.0.weight"])
    origin = np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    for name, array in taken.items():
        assert array.ctypes.data - origin == data_start + header[name]["data_offsets"][0]
    del weights, mapping
    import gc

    gc.collect()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(taken[name], tensor.numpy())


def test_misaligned_float32_is_copied(tmp_path):
    """A float32 tensor at an offset that is not a multiple of 4 (a hand-made file) is read into a new
    aligned array rather than viewed."""
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = b"\x01\x02\x03" + np.array([1.5, -2.0], "<f4").tobytes()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    weights = open_weights(path)
    weights.ignore("a")
    values = weights.take("b", (2,))
    assert mapping_of(values) is None and values.flags.writeable and values.ctypes.data % 4 == 0
    np.testing.assert_array_equal(values, [1.5, -2.0])


# --------------------------------------------------------------------------------------------------
# Finding files: variants, shards, config.json
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["diffusion_pytorch_model", "model"])
def test_variant_picks_the_fp16_file(stem, rng, tmp_path):
    full = random_tensors(rng, 2)
    half = {name: torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32)).half() for name, t in full.items()}
    save_file(full, str(tmp_path / f"{stem}.safetensors"))
    save_file(half, str(tmp_path / f"{stem}.fp16.safetensors"))

    plain = load_component_weights(tmp_path)
    variant = load_component_weights(tmp_path, variant="fp16")
    assert plain.source.endswith(f"{stem}.safetensors") and variant.source.endswith(f"{stem}.fp16.safetensors")
    for name, tensor in full.items():
        assert plain.dtype(name) == "F32" and variant.dtype(name) == "F16"
        np.testing.assert_array_equal(plain.take(name, tensor.shape), tensor.numpy())
        np.testing.assert_array_equal(variant.take(name, tensor.shape), half[name].float().numpy())


def test_missing_weights_say_what_was_expected(rng, tmp_path):
    save_file(random_tensors(rng, 1), str(tmp_path / "model.fp16.safetensors"))
    with pytest.raises(NpdiffError, match=r"no weights in .*: expected diffusion_pytorch_model\.safetensors or "
                                          r"model\.safetensors; it has model\.fp16\.safetensors \(pass variant='fp16'"):
        load_component_weights(tmp_path)
    with pytest.raises(NpdiffError, match=r"expected diffusion_pytorch_model\.bf16\.safetensors or model\.bf16"):
        load_component_weights(tmp_path, variant="bf16")
    with pytest.raises(NpdiffError, match="no such folder"):
        load_component_weights(tmp_path / "nowhere")


def test_sharded_weights(rng, tmp_path):
    tensors = random_tensors(rng, 5)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(tmp_path / shard))
        weight_map.update({name: shard for name in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    weights = load_component_weights(tmp_path)
    assert weights.keys() == names
    for name in names:
        np.testing.assert_array_equal(weights.take(name, tensors[name].shape), tensors[name].numpy())
    weights.check_all_used()


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(NpdiffError, match=re.escape(str(tmp_path / "config.json"))):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1,')
    with pytest.raises(NpdiffError, match=r"config\.json is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(NpdiffError, match=r"config\.json should hold a JSON object, found a list"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    assert read_config(tmp_path) == {"hidden_size": 8} == read_json(tmp_path / "config.json")


# --------------------------------------------------------------------------------------------------
# Bad files: each a clear NpdiffError naming the file (and the key where there is one)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def good_file(rng, tmp_path):
    """A valid file with two tensors; -> (path, its bytes)."""
    path = tmp_path / "good.safetensors"
    save_file({"encoder.weight": torch.ones(4, 8), "encoder.bias": torch.zeros(4)}, str(path))
    return path, path.read_bytes()


def header_of(raw):
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def with_header(header, data):
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def corrupt_variants(raw):
    """name -> bytes of a broken file built from a good one."""
    header, data = header_of(raw)
    bad_offsets = json.loads(json.dumps(header))
    bad_offsets["encoder.weight"]["data_offsets"] = [0, 10 ** 6]
    bad_shape = json.loads(json.dumps(header))
    bad_shape["encoder.bias"]["shape"] = [5]  # 5 floats do not fit the 16 bytes stored
    return {
        "truncated data": raw[:-7],
        "truncated header": raw[:30],
        "empty": b"",
        "header length too large": struct.pack("<Q", 10 ** 12) + raw[8:],
        "header not JSON": raw[:8] + b"\x00not json" + raw[17:],
        "offsets past the end": with_header(bad_offsets, data),
        "shape contradicts the bytes": with_header(bad_shape, data),
    }


@pytest.mark.parametrize("case", ["truncated data", "truncated header", "empty", "header length too large",
                                  "header not JSON", "offsets past the end", "shape contradicts the bytes"])
def test_truncated_or_corrupt_file(case, good_file, tmp_path):
    _, raw = good_file
    path = tmp_path / "broken.safetensors"
    path.write_bytes(corrupt_variants(raw)[case])
    with pytest.raises(NpdiffError, match=re.escape(str(path)) + " is not a readable safetensors file"):
        open_weights(path)


def test_missing_extra_and_misshapen_keys_are_named(good_file):
    path, _ = good_file
    weights = open_weights(path)
    with pytest.raises(NpdiffError, match=re.escape(f"missing key 'encoder.weights' in {path}")
                       + r" \(did you mean 'encoder.weight'\?\)"):
        weights.take("encoder.weights", (4, 8))
    with pytest.raises(NpdiffError, match=re.escape(f"key 'encoder.weight' in {path} has shape (4, 8); "
                                                    "the config expects (8, 4)")):
        weights.take("encoder.weight", (8, 4))
    weights.take("encoder.weight", (4, 8))
    with pytest.raises(NpdiffError, match=re.escape(f"unexpected key in {path}, not used by the model: "
                                                    "'encoder.bias'")):
        weights.check_all_used()
    weights.ignore("encoder.bias")
    weights.check_all_used()


@pytest.mark.parametrize("dtype,name", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3"), (torch.int64, "I64")])
def test_unsupported_dtype_names_key_and_dtype(dtype, name, tmp_path):
    path = tmp_path / "quantized.safetensors"
    save_file({"proj.weight": torch.zeros(3, 2).to(dtype), "proj.bias": torch.zeros(3)}, str(path))
    weights = open_weights(path)  # opening is fine: only taking it is not
    np.testing.assert_array_equal(weights.take("proj.bias", (3,)), np.zeros(3, np.float32))
    with pytest.raises(NpdiffError, match=re.escape(f"key 'proj.weight' in {path} has dtype {name}; ")
                       + "npdiff reads float weights stored as F32, F16, BF16 only"):
        weights.take("proj.weight", (3, 2))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_files_are_refused_with_a_way_out(suffix, tmp_path):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.ones(2)}}, str(path))
    with pytest.raises(NpdiffError) as info:
        open_weights(path)
    message = str(info.value)
    assert str(path) in message and "arbitrary code" in message and "pickle" in message
    assert "torch.load(" in message and "weights_only=True" in message and "save_file(" in message


def test_pickle_beside_no_safetensors_and_pickle_renamed(tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, str(folder / "pytorch_model.bin"))
    with pytest.raises(NpdiffError, match=r"pytorch_model\.bin: refusing to read a '\.bin' checkpoint"):
        load_component_weights(folder)
    renamed = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(2)}, str(renamed))
    with pytest.raises(NpdiffError, match=r"renamed\.safetensors is not a readable safetensors file.*zip "
                                          r"checkpoint"):
        open_weights(renamed)
    with pytest.raises(NpdiffError, match="no such file"):
        open_weights(tmp_path / "absent.safetensors")
    with pytest.raises(NpdiffError, match="is a folder"):
        open_weights(folder)


# --------------------------------------------------------------------------------------------------
# Pipeline folders
# --------------------------------------------------------------------------------------------------
def snapshot(folder):
    """(relative path, size, mtime) of every file: loading must leave it unchanged."""
    entries = []
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            entries.append((os.path.relpath(os.path.join(root, name), folder), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A diffusers pipeline folder from the tiny UNet, VAE and CLIP (+ tokenizer files, scheduler)."""
    root = tmp_path_factory.mktemp("pipeline")
    _, unet_folder = tiny_unet("sd1", seed=0)
    _, vae_folder = tiny_vae("sd", seed=0)
    shutil.copytree(unet_folder, root / "unet")
    shutil.copytree(vae_folder, root / "vae")
    save_clip(tiny_clip("sd1", seed=3), root / "text_encoder", prefix=True, position_ids=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def test_pipeline_components_from_a_folder(pipeline_folder):
    before = snapshot(pipeline_folder)
    parts = load_pipeline_components(pipeline_folder)
    for name in ("unet", "vae", "text_encoder"):
        config, weights = parts[name]
        assert config == read_config(pipeline_folder / name)
        assert weights.keys() == load_component_weights(pipeline_folder / name).keys() and len(weights) > 0
    assert "text_model.embeddings.position_ids" in parts["text_encoder"][1]
    assert parts["tokenizer"] == str(pipeline_folder / "tokenizer")
    assert parts["scheduler"] == {"_class_name": "PNDMScheduler"}
    assert parts["model_index"] == {"_class_name": "StableDiffusionPipeline"}
    assert snapshot(pipeline_folder) == before  # loading never writes


def test_pipeline_components_apply_prediction_type_to_the_scheduler(pipeline_folder, tmp_path):
    parts = load_pipeline_components(pipeline_folder, prediction_type="v_prediction")
    assert parts["scheduler"] == {"_class_name": "PNDMScheduler", "prediction_type": "v_prediction"}
    assert read_json(pipeline_folder / "scheduler" / "scheduler_config.json") == {"_class_name": "PNDMScheduler"}
    assert load_pipeline_components(pipeline_folder)["scheduler"] == {"_class_name": "PNDMScheduler"}
    # a folder without scheduler/ gets SD 1.5's, with the prediction type asked for
    root = tmp_path / "no-scheduler"
    shutil.copytree(pipeline_folder, root, ignore=shutil.ignore_patterns("scheduler"))
    parts = load_pipeline_components(root, prediction_type="v_prediction")
    assert parts["scheduler"]["_class_name"] == "PNDMScheduler" and parts["scheduler"]["beta_end"] == 0.012
    assert parts["scheduler"]["prediction_type"] == "v_prediction"
    assert load_pipeline_components(root)["scheduler"]["prediction_type"] == "epsilon"
    with pytest.raises(NpdiffError, match="prediction_type must be one of epsilon, v_prediction, got 'sample'"):
        load_pipeline_components(root, prediction_type="sample")


def test_pipeline_components_errors(pipeline_folder, tmp_path):
    with pytest.raises(NpdiffError, match=r"holds none of unet/, vae/, text_encoder/; expected a diffusers "
                                          r"folder \(model_index\.json"):
        load_pipeline_components(tmp_path)
    with pytest.raises(NpdiffError, match=r"is one model.s folder .*<Model>\.from_pretrained"):
        load_pipeline_components(pipeline_folder / "unet")
    with pytest.raises(NpdiffError, match="no such file or folder"):
        load_pipeline_components(tmp_path / "absent")
    partial = tmp_path / "partial"
    shutil.copytree(pipeline_folder / "unet", partial / "unet")
    with pytest.raises(NpdiffError, match=r"has no vae/config\.json; expected a diffusers folder"):
        load_pipeline_components(partial)
    torch.save({"w": torch.ones(1)}, str(tmp_path / "model.ckpt"))
    with pytest.raises(NpdiffError, match="refusing to read a '.ckpt' checkpoint"):
        load_pipeline_components(tmp_path / "model.ckpt")


def test_tokenizer_folder_with_only_tokenizer_json(pipeline_folder, tmp_path):
    """transformers 5 saves tokenizer/tokenizer.json alone; a folder with no tokenizer file is an error."""
    root = tmp_path / "model"
    shutil.copytree(pipeline_folder, root)
    for name in ("vocab.json", "merges.txt"):
        (root / "tokenizer" / name).unlink()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    assert load_pipeline_components(root)["tokenizer"] == str(root / "tokenizer")
    (root / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(NpdiffError,
                       match=r"tokenizer holds no tokenizer: .*vocab\.json and merges\.txt, or tokenizer\.json"):
        load_pipeline_components(root)


# --------------------------------------------------------------------------------------------------
# Symlinks and the model hash: links load and hash like real files; the hash covers exactly the loaded
# files (README: "What npdiff refuses"; npdiff/paths.py)
# --------------------------------------------------------------------------------------------------
def expected_hash(files):
    """The folder hash computed here from the bytes: SHA-256 of the joined SHA-256 hex digests of `files`,
    given in the order of their names relative to the model folder."""
    joined = "".join(hashlib.sha256(Path(file).read_bytes()).hexdigest() for file in files)
    return hashlib.sha256(joined.encode("ascii")).hexdigest()[:10]


def loaded_files(folder):
    """The weight files of unet, vae, text_encoder in name order (text_encoder < unet < vae), as written."""
    return [folder / "text_encoder" / "model.safetensors", folder / "unet" / "diffusion_pytorch_model.safetensors",
            folder / "vae" / "diffusion_pytorch_model.safetensors"]


def shard_text_encoder(folder):
    """Split text_encoder/model.safetensors into two shards + model.safetensors.index.json, as the hub does."""
    tensors = load_file(str(folder / "text_encoder" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_numpy({name: tensors[name] for name in shard_names}, str(folder / "text_encoder" / shard))
        weight_map.update({name: shard for name in shard_names})
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [folder / "text_encoder" / shard for shard in sorted(shards)]


def hugging_face_cache(source, root):
    """The folder `source` as huggingface_hub caches it: models--<org>--<name>/blobs/<sha256> holding the
    bytes, snapshots/<rev>/<path> relative links to ../../(..)/blobs/<sha256>. -> the snapshot folder."""
    repo = root / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot_folder = repo / "snapshots" / "0123456789abcdef"
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot_folder / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot_folder


def test_hugging_face_cache_layout_loads_and_hashes(pipeline_folder, tmp_path, hash_cache):
    """Every file of a hub snapshot links into ../../blobs, outside the snapshot folder, shards included."""
    plain = tmp_path / "plain"
    shutil.copytree(pipeline_folder, plain)
    shards = shard_text_encoder(plain)
    snapshot_folder = hugging_face_cache(plain, tmp_path / "hub")
    parts = load_pipeline_components(snapshot_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert parts[name][1].keys() == load_component_weights(plain / name).keys()
    files = shards + loaded_files(plain)[1:]
    assert model_hash(snapshot_folder) == model_hash(plain) == expected_hash(files)
    assert [name for name, _ in pipeline_weight_files(snapshot_folder)] == [
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]


def test_symlinked_component_folders_and_files_load_and_hash_like_real_ones(pipeline_folder, tmp_path, hash_cache):
    """Sharing one UNet or VAE between models: component folders (and single files) that are links."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("unet", "vae", "tokenizer", "scheduler"):
        os.symlink(pipeline_folder / name, linked / name)
    (linked / "text_encoder").mkdir()
    for file in (pipeline_folder / "text_encoder").iterdir():
        os.symlink(file, linked / "text_encoder" / file.name)
    os.symlink(pipeline_folder / "model_index.json", linked / "model_index.json")
    parts = load_pipeline_components(linked)
    assert parts["unet"][0] == read_config(pipeline_folder / "unet") and len(parts["text_encoder"][1]) > 0
    assert parts["scheduler"] == {"_class_name": "PNDMScheduler"}
    assert model_hash(linked) == model_hash(pipeline_folder) == expected_hash(loaded_files(pipeline_folder))


def test_swapping_a_linked_unet_changes_the_hash(pipeline_folder, tmp_path, hash_cache):
    """`npdiff batch` must not keep pictures of the old UNet under the same hash."""
    other_unet = tmp_path / "other-unet"
    shutil.copytree(tiny_unet("sd1", seed=1)[1], other_unet)
    model = tmp_path / "model"
    shutil.copytree(pipeline_folder, model, ignore=shutil.ignore_patterns("unet"))
    os.symlink(pipeline_folder / "unet", model / "unet")
    first = model_hash(model)
    assert first == expected_hash(loaded_files(pipeline_folder))
    os.symlink(other_unet, tmp_path / "new-link")
    os.replace(tmp_path / "new-link", model / "unet")  # swap the link in one step
    files = loaded_files(model)
    files[1] = other_unet / "diffusion_pytorch_model.safetensors"
    assert model_hash(model) == expected_hash(files) != first
    weights = load_pipeline_components(model)["unet"][1]
    assert np.array_equal(weights.take("conv_in.weight", weights.shape("conv_in.weight")),
                          load_file(str(files[1]))["conv_in.weight"])


def test_a_replaced_file_of_the_same_size_and_mtime_is_hashed_again(tmp_path, hash_cache):
    """The cache is keyed on the file's identity (inode, ctime, ...), not size and mtime alone."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 16))
    first = model_hash(weights)
    replacement = tmp_path / "replacement.safetensors"
    replacement.write_bytes(os.urandom(1 << 16))
    old = os.stat(weights)
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))  # as `cp -p` or `rsync -t` keep it
    os.replace(replacement, weights)
    assert model_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10] != first


def test_the_hash_reads_exactly_the_loaded_files(pipeline_folder, tmp_path, monkeypatch, hash_cache):
    """Not every *.safetensors below the folder: not an unrelated subfolder, an unused component, another
    variant. With variant="fp16" it is the fp16 files the loader reads."""
    model = tmp_path / "model"
    shutil.copytree(pipeline_folder, model)
    (model / "extras").mkdir()
    (model / "extras" / "huge.safetensors").write_bytes(os.urandom(1 << 12))
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "model.safetensors").write_bytes(os.urandom(1 << 12))
    fp16 = []
    for file in loaded_files(model):
        half = {key: value.astype(np.float16) if value.dtype == np.float32 else value
                for key, value in load_file(str(file)).items()}
        fp16.append(file.with_name(file.name.replace(".safetensors", ".fp16.safetensors")))
        save_numpy(half, str(fp16[-1]))
    hashed = []
    real = model_identity.sha256_of_file
    monkeypatch.setattr(model_identity, "sha256_of_file", lambda path: hashed.append(Path(path)) or real(path))
    assert model_hash(model) == expected_hash(loaded_files(model))
    assert sorted(hashed) == sorted(file.resolve() for file in loaded_files(model))
    hashed.clear()
    assert model_hash(model, variant="fp16") == expected_hash(fp16)
    assert sorted(hashed) == sorted(file.resolve() for file in fp16)
    parts = load_pipeline_components(model, variant="fp16")
    assert parts["unet"][1].dtype("conv_in.weight") == "F16"
