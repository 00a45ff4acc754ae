"""Bounded fuzzing of what npdiff reads: randomly mutated safetensors files and config values must give
either a working model or an NpdiffError, never another exception, a crash or a hang; so must random
`npdiff batch` job lines (odd types, duplicated keys, deep nesting, byte order marks, names too long to
look up) and random PNG metadata read by --reproduce (npdiff's JSON and AUTOMATIC1111's text).

Seeded from the `rng` fixture (conftest.py): a failure prints NPDIFF_TEST_SEED=<seed>, and
    NPDIFF_TEST_SEED=<seed> python -m pytest tests/test_fuzz_inputs.py
replays it case for case (NPDIFF_FUZZ_SCALE=20 runs 20 times as many cases). Each case also names
its mutation in the assertion message. The base models are the tests' tiny ones (tiny_models.py,
tiny_clip.py); the default few hundred cases run in about 20 s on a loaded 2-core machine.
"""

import json
import os
import pickle
import struct

import numpy as np
import pytest
from helpers import time_limit
from safetensors.numpy import save_file
from tiny_clip import save_clip, tiny_clip
from tiny_models import tiny_unet, tiny_vae

from npdiff.errors import NpdiffError
from npdiff.loading import open_weights, read_config
from npdiff.loading.config_checks import RULES
from npdiff.loading.configs import load_component_weights
from npdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from npdiff.schedulers import make_scheduler

CASE_SECONDS = 10  # a case that takes longer is a hang
SCALE = int(os.environ.get("NPDIFF_FUZZ_SCALE", "1"))  # more cases for a deeper run: NPDIFF_FUZZ_SCALE=20


def must_work_or_refuse(what, action):
    """Run action(); an NpdiffError is a refusal (fine), any other exception fails the test naming the case."""
    with time_limit(what, CASE_SECONDS):
        try:
            action()
        except NpdiffError:
            return "refused"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    return "worked"


# --------------------------------------------------------------------------------------------------
# Safetensors files: the header length, the JSON header, the bytes
# --------------------------------------------------------------------------------------------------
def split_file(raw):
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_file(header, data):
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


ODD_VALUES = [0, -1, 1, 3, 2**31, 2**63, -2**40, 1.5, float("nan"), None, True, "", "F32", "x", [], [0], [-1, 4],
              [2**40, 2**40], {}, {"a": 1}, [1, "2"], [[1]], "BF16", "I64", "F64", "U8"]


def mutate_header(rng, header):
    """One random change to the JSON header: a dtype, shape or offsets value, a key, or the metadata."""
    header = json.loads(json.dumps(header))
    keys = [k for k in header if k != "__metadata__"]
    key = keys[int(rng.integers(len(keys)))]
    choice = int(rng.integers(7))
    odd = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    if choice == 0:
        header[key]["dtype"] = odd
    elif choice == 1:
        header[key]["shape"] = odd
    elif choice == 2:
        header[key]["data_offsets"] = odd
    elif choice == 3:
        begin, end = header[key]["data_offsets"]
        shift = int(rng.integers(-64, 65))
        header[key]["data_offsets"] = [begin + shift, end + int(rng.integers(-64, 65))]
    elif choice == 4:
        header[key] = odd
    elif choice == 5:
        header["__metadata__"] = odd
    else:
        header[key + "_copy"] = header[key]
    return header, f"header[{key!r}] change {choice} with {odd!r}"


def mutate_bytes(rng, raw):
    """Flip, truncate or extend the raw file, or rewrite the 8-byte header length."""
    raw = bytearray(raw)
    choice = int(rng.integers(4))
    if choice == 0:
        for _ in range(int(rng.integers(1, 9))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        return bytes(raw), "random bytes changed"
    if choice == 1:
        cut = int(rng.integers(len(raw)))
        return bytes(raw[:cut]), f"truncated to {cut} bytes"
    if choice == 2:
        return bytes(raw) + bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)), "bytes appended"
    lengths = [0, 1, 7, len(raw), len(raw) - 8, 2**32, 2**63, 2**64 - 1]
    length = lengths[int(rng.integers(len(lengths)))]
    return struct.pack("<Q", length) + bytes(raw[8:]), f"header length set to {length}"


def read_everything(path):
    """Open the file and read every float tensor (an int64 buffer such as "ids" is never read by a model)."""
    weights = open_weights(path)
    for key in weights.keys():
        if key != "ids":
            weights.take(key, weights.shape(key))


def test_fuzz_safetensors_files(rng, tmp_path):
    base = tmp_path / "base.safetensors"
    tensors = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "conv.bias": rng.standard_normal(4).astype(np.float16),
               "norm.weight": np.ones(8, np.float32), "ids": np.arange(5, dtype=np.int64)}
    save_file(tensors, str(base), metadata={"format": "pt"})
    raw = base.read_bytes()
    header, data = split_file(raw)
    assert must_work_or_refuse("the file unchanged", lambda: read_everything(base)) == "worked"
    outcomes = {"worked": 0, "refused": 0}
    for case in range(150 * SCALE):
        if case % 2:
            new_header, what = mutate_header(rng, header)
            try:
                mutated = join_file(new_header, data)
            except (TypeError, ValueError):  # a NaN shape cannot be JSON: nothing to write
                continue
        else:
            mutated, what = mutate_bytes(rng, raw)
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(mutated)
        outcome = must_work_or_refuse(f"case {case} ({what})", lambda: read_everything(path))
        outcomes[outcome] += 1
        path.unlink()
    # most mutations are refused; a few still load (a changed value that stays finite, an unused header
    # field): 0-13 of 150 over 60 seeds, so "some worked" is not asserted (seed 1011214292: none did)
    assert outcomes["refused"] > 30, outcomes


def test_fuzz_model_file_bytes(rng, tmp_path):
    """Byte changes in a real model's weights: a NaN/Inf a flip makes is refused by name; the rest loads."""
    _, folder = tiny_vae("sd", seed=0)
    raw = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    config = read_config(folder)
    case_folder = tmp_path / "vae"
    case_folder.mkdir()
    (case_folder / "config.json").write_text(json.dumps(config))
    for case in range(25 * SCALE):
        mutated, what = mutate_bytes(rng, raw)
        (case_folder / "diffusion_pytorch_model.safetensors").write_bytes(mutated)
        must_work_or_refuse(f"VAE file case {case} ({what})",
                            lambda: AutoencoderKL(config, load_component_weights(case_folder)))


# --------------------------------------------------------------------------------------------------
# Config values
# --------------------------------------------------------------------------------------------------
CONFIG_VALUES = [0, -1, 1, 2, 3, 7, 64, 10**9, 0.5, 1e-30, -0.5, float("nan"), float("inf"), -float("inf"), None,
                 True, False, "", "64", "silu", "gelu", "linear", "epsilon", "trailing", [], [0], [1], [2, 2],
                 [1, 2, 3], [16, 32, 32], [0.1] * 3, ["DownBlock2D"] * 3, {}, {"a": 1}]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """component -> (config, a function giving fresh Weights or None, a small forward pass)."""
    _, unet_folder = tiny_unet("sd1", seed=0)
    _, vae_folder = tiny_vae("sd", seed=0)
    clip_folder = save_clip(tiny_clip("sd1", seed=0), tmp_path_factory.mktemp("clip"))
    unet_weights = open_weights(unet_folder / "diffusion_pytorch_model.safetensors")
    vae_weights = open_weights(vae_folder / "diffusion_pytorch_model.safetensors")
    clip_weights = load_component_weights(clip_folder)
    rng = np.random.default_rng(0)

    def fresh(weights):
        return lambda: type(weights)(weights.source, weights._refs)

    def run_unet(model):
        sample = rng.standard_normal((1, model.config["in_channels"], 8, 8)).astype(np.float32)
        context = rng.standard_normal((1, 5, 24)).astype(np.float32)
        model(sample, 10, context)

    def run_vae(model):
        model.decode(rng.standard_normal((1, model.config["latent_channels"], 2, 2)).astype(np.float32))

    def run_clip(model):
        model(np.array([[998, 5, 999]]))

    def run_scheduler(scheduler):
        scheduler.set_timesteps(4)
        latents = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
        for t in scheduler.timesteps[:2]:
            latents = scheduler.step(0.1 * latents, t, latents).prev_sample

    return {
        "unet": (read_config(unet_folder), fresh(unet_weights), UNet2DConditionModel, run_unet),
        "vae": (read_config(vae_folder), fresh(vae_weights), AutoencoderKL, run_vae),
        "text_encoder": (read_config(clip_folder), fresh(clip_weights), CLIPTextModel, run_clip),
        "scheduler": (dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="leading"),
                      None, None, run_scheduler),
    }


def build_and_run(component, config, weights, model_class, run, sampler):
    if component == "scheduler":
        run(make_scheduler(sampler, config))
    else:
        run(model_class(config, weights()))


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "scheduler"])
def test_fuzz_config_values(bases, rng, component):
    config, weights, model_class, run = bases[component]
    keys = sorted(set(config) | set(RULES[component]))
    samplers = ["pndm", "ddim", "ddpm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]
    outcomes = {"worked": 0, "refused": 0}
    for case in range(60 * SCALE):
        changed = dict(config)
        picks = []
        for _ in range(int(rng.integers(1, 3))):  # one or two keys at a time
            key = keys[int(rng.integers(len(keys)))]
            value = CONFIG_VALUES[int(rng.integers(len(CONFIG_VALUES)))]
            changed[key] = value
            picks.append(f"{key}={value!r}")
        sampler = samplers[case % len(samplers)]
        what = f"{component} case {case}: {', '.join(picks)}" + (f" ({sampler})" if component == "scheduler" else "")
        outcome = must_work_or_refuse(what, lambda: build_and_run(component, changed, weights, model_class, run,
                                                                  sampler))
        outcomes[outcome] += 1
    assert outcomes["refused"] > 10, outcomes


def test_unchanged_configs_work(bases):
    """The fuzzing base itself loads and runs (so a refusal above is the mutation's doing)."""
    for component, (config, weights, model_class, run) in bases.items():
        assert must_work_or_refuse(component, lambda: build_and_run(component, config, weights, model_class, run,
                                                                     "euler")) == "worked"


# --------------------------------------------------------------------------------------------------
# Batch job lines and PNG metadata (what `npdiff batch` and `--reproduce` read)
# --------------------------------------------------------------------------------------------------
LINE_VALUES = [*ODD_VALUES, "a red circle", "ddim", "tcd", "epsilon", "v_prediction", "x\x00y", "z" * 5000,
               "start.png", "missing.png", ".", "lora.safetensors:0.5", ["lora.safetensors"], 0.3, 64, 30, 2**64,
               "abc:def", {"name": "x"}, [{"name": 1}], "9" * 5000, "\ufeffx"]
LINE_KEYS_TRIED = ["prompt", "negative", "negative_prompt", "seed", "steps", "guidance", "sampler", "height",
                   "width", "strength", "eta", "prediction_type", "image", "mask", "vae", "lora", "model", "colour"]


def random_line(rng):
    """One job-file line: a random object of keys and odd values, sometimes with a duplicated key, raw bytes or
    deep nesting; -> (text, what it is)."""
    choice = int(rng.integers(10))
    if choice == 0:
        return "[" * int(rng.integers(1, 50_000)), "deep nesting"
    if choice == 1:
        return bytes(rng.integers(32, 127, int(rng.integers(1, 80)), dtype=np.uint8)).decode(), "random text"
    options = {"prompt": "a red circle"} if rng.random() < 0.7 else {}
    for _ in range(int(rng.integers(1, 5))):
        key = LINE_KEYS_TRIED[int(rng.integers(len(LINE_KEYS_TRIED)))]
        options[key] = LINE_VALUES[int(rng.integers(len(LINE_VALUES)))]
    text = json.dumps(options)
    if choice == 2 and options:
        key = next(iter(options))
        text = text[:-1] + f', "{key}": 1}}'  # the first key again
    return text, f"line {text[:200]!r}"


def test_fuzz_batch_lines(rng, tmp_path):
    """Random job lines: each is a job or a per-line failure naming why; never another exception."""
    from PIL import Image

    from npdiff.batch import job_payload
    from npdiff.batch_jobs import read_jobs

    Image.new("RGB", (16, 16)).save(tmp_path / "start.png")
    (tmp_path / "lora.safetensors").write_bytes(b"not really a LoRA")
    identity = {"model": "m", "model_hash": "0123456789"}
    for case in range(40 * SCALE):
        lines = [random_line(rng) for _ in range(8)]
        jobs_file = tmp_path / ("jobs.jsonl" if case % 4 else "jobs.txt")
        bom = "\ufeff" if rng.random() < 0.2 else ""
        jobs_file.write_text(bom + "\n".join(text for text, _ in lines) + "\n", encoding="utf-8")
        what = f"case {case}: " + "; ".join(description for _, description in lines)

        def read_all():
            jobs, failures = read_jobs(jobs_file, {"steps": 2})
            counted = [text for text, _ in lines if text.strip() and not text.strip().startswith("#")]
            assert len(jobs) + len(failures) == len(counted), what  # every line but comments, once
            for job in jobs:
                pickle.dumps(job_payload(job, identity))  # what travels to a worker pickles
                job.expected_params(identity)

        must_work_or_refuse(what, read_all)


def random_stored_parameters(rng):
    """npdiff's JSON chunk or AUTOMATIC1111's text, with random odd values -> ({chunk: text}, what)."""
    if rng.random() < 0.4:
        fields = ["Steps: 2", "Seed: 1", "Sampler: Euler a", "CFG scale: 7", "Size: 16x16", "Eta: 0.3",
                  "Model hash: abc", "Denoising strength: 0.5", "Hires upscale: 2", "Schedule type: Karras",
                  "Lora hashes: \"x: 1\""]
        picked = [fields[int(rng.integers(len(fields)))] for _ in range(int(rng.integers(0, 6)))]
        odd = LINE_VALUES[int(rng.integers(len(LINE_VALUES)))]
        picked.append(f"{fields[int(rng.integers(len(fields)))].split(':')[0]}: {str(odd)[:6000]}")
        text = "a red circle <lora:x:0.5>\nNegative prompt: blue\n" + ", ".join(picked)
        return {"parameters": text}, f"text {text[:300]!r}"
    stored = {"prompt": "a red circle", "steps": 2, "seed": 1}
    keys = [*LINE_KEYS_TRIED, "negative_prompt", "guidance_scale", "loras", "model_hash", "model", "vae",
            "unmapped", "command"]
    for _ in range(int(rng.integers(1, 4))):
        stored[keys[int(rng.integers(len(keys)))]] = LINE_VALUES[int(rng.integers(len(LINE_VALUES)))]
    text = json.dumps(stored)
    if rng.random() < 0.1:
        text = text[: int(rng.integers(len(text)))]  # cut short
    return {"npdiff": text}, f"npdiff {text[:300]!r}"


def test_fuzz_png_metadata(rng, tmp_path):
    """Random stored parameters read by --reproduce (up to the model load): options or an NpdiffError."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from npdiff import cli
    from npdiff.recipe import pipeline_arguments

    for case in range(60 * SCALE):
        chunks, what = random_stored_parameters(rng)
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        path = tmp_path / f"case{case % 4}.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        command = ("generate", "img2img", "inpaint")[case % 3]

        def reproduce():
            args = cli.build_parser().parse_args([command, "--reproduce", str(path)])
            args = cli.resolve_options(args, command)
            options = {name: getattr(args, name, None) for name in ("prompt", "negative", "steps", "seed", "eta")}
            pipeline_arguments(command, options)

        must_work_or_refuse(f"case {case} ({command}): {what}", reproduce)
