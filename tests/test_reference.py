"""npdiff/reference.py (Stable Diffusion in one NumPy + stdlib file) against safetensors, transformers,
torch and diffusers: every part on fresh random inputs, and whole pictures on the shipped model."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import IMAGE_LEVELS_TOL, KERNEL_TOL, NETWORK_TOL, assert_rel_close
from npdiff import reference as ref
from npdiff.clip_vocab import write_clip_tokenizer_folder
from test_tokenizer import FIXED_PROMPTS, random_prompt
from tiny_clip import padded_ids, rounded_copy, save_clip, tiny_clip
from tiny_models import tiny_unet, tiny_vae

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "weights" / "tiny-shapes"
sys.path.insert(0, str(REPO / "weights"))
import shapes_data  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread_each():
    """Every matrix here is small: on a busy machine, 2 BLAS or torch threads mostly wait for each
    other (measured: 17 s instead of 1.3 s for one picture). One thread each, for this file's tests."""
    from npdiff import blas

    blas_threads, torch_threads = blas.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(1)
    if blas_threads:
        blas.set_num_threads(1)  # OpenBLAS's count is process-wide: put it back afterwards
    yield
    torch.set_num_threads(torch_threads)
    if blas_threads:
        blas.set_num_threads(blas_threads)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- 1. safetensors ------------------------------------------------------------------------------
def test_imports_only_numpy_and_the_standard_library():
    tree = ast.parse((REPO / "npdiff" / "reference.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    roots = {name.split(".")[0] for name in modules}
    assert "numpy" in roots
    outside = sorted(root for root in roots if root != "numpy" and root not in sys.stdlib_module_names)
    assert not outside, f"reference.py imports {outside}"


def test_safetensors_reader_matches_the_safetensors_package(rng, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {}
    for i in range(12):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=int(rng.integers(0, 4))))
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        tensors[f"block.{i}.weight"] = (t(rng.standard_normal(shape).astype(np.float32)) * 10).to(dtype)
    tensors["position_ids"] = torch.arange(7, dtype=torch.int64)[None]
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    ours = ref.read_safetensors(tmp_path / "w.safetensors")
    theirs = load_file(str(tmp_path / "w.safetensors"))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        assert np.array_equal(ours[name], expected), name
    tree = ref.nest(ours)
    assert tree["block"]["3"]["weight"] is ours["block.3.weight"]
    assert [node["weight"].shape for node in ref.numbered(tree["block"])] == [ours[f"block.{i}.weight"].shape
                                                                              for i in range(12)]


# ---- 2. tokenizer --------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(pad, rng, tmp_path):
    """SD 1.x: the shipped folder (vocab.json + merges.txt). SD 2.x pads with "!": a folder as
    transformers 5 saves it (tokenizer.json only)."""
    import transformers

    if pad == "<|endoftext|>":
        theirs = transformers.CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
        ours = ref.CLIPTokenizer(MODEL_DIR / "tokenizer")
    else:
        written = write_clip_tokenizer_folder(tmp_path / "t", pad_token=pad)
        theirs = transformers.CLIPTokenizer.from_pretrained(str(written))
        theirs.save_pretrained(str(tmp_path / "saved"))
        assert not (tmp_path / "saved" / "vocab.json").exists()
        ours = ref.CLIPTokenizer(tmp_path / "saved")
    assert ours.pad == theirs.pad_token_id
    captions, _ = shapes_data.random_prompts(20, int(rng.integers(2**31)))
    tricky = ["ΟΔΟΣ ΣΙΣΥΦΟΣ", "a\x1cb\x1fc\x85d\u00a0e\u2028f\u3000g\u200bh",
              "a<|STARTOFTEXT|>b<|endoftext|>c", "İstanbul ǅ ẞ Ⓐ", "''s 's's ''re X'LL don't!", "١٢٣ ½ ² Ⅻ 𝟙",
              "e\u0301 é \ufeff", "hi! wow!!"]
    prompts = FIXED_PROMPTS + tricky + captions + [random_prompt(rng) for _ in range(150)]
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    for prompt, row in zip(prompts, expected):
        assert np.array_equal(ours(prompt), row), f"prompt {prompt!r}"
    assert max(len(ours.encode(p)) for p in prompts) > 75  # long prompts were truncated too


# ---- 3. torch's randn ----------------------------------------------------------------------------
def test_randn_is_torch_randn_bit_for_bit(rng):
    seeds = [0, 2**32 + 5, 2**64 - 1] + [int(s) for s in rng.integers(0, 2**63, size=3)]
    shapes = [(1,), (5,), (15,), (3, 5), (16,), (17,), (2, 31), (1, 4, 8, 8), (1, 4, 64, 64),
              (int(rng.integers(16, 5000)),)]
    for seed in seeds:
        for shape in shapes:
            torch.manual_seed(seed)
            expected = torch.randn(shape).numpy()
            ours = ref.torch_randn(shape, seed)
            assert ours.dtype == np.float32 and ours.shape == expected.shape
            assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32)), f"seed {seed}, shape {shape}"


def test_fma32_rounds_once(rng):
    """c + a*b just above a float32 midpoint by less than float64 can hold: rounding the float64 sum
    to float32 goes wrong there (two roundings); fma32 must agree with a real FMA everywhere."""
    from npdiff.jit import SERIAL, njit
    from npdiff.intrinsics import fma32 as exact_fma32  # LLVM's fma: one rounding

    @njit(**SERIAL)
    def fused(a, b, c, out):
        for i in range(a.shape[0]):
            out[i] = exact_fma32(a[i], b[i], c[i])

    a = rng.uniform(1, 2, 200_000).astype(np.float32)
    b = (np.float32(2.0**-24) / a).astype(np.float32)  # a*b = 2^-24 (1 + e), |e| < 2^-24
    c = np.ones_like(a)  # 1 + a*b: about 1 + 2^-24, the midpoint between 1 and the next float32
    expected = np.empty_like(a)
    fused(a, b, c, expected)
    twice = (a.astype(np.float64) * b + c).astype(np.float32)
    assert (twice != expected).any()  # the hard cases are there
    assert np.array_equal(ref.fma32(a, b, c), expected)
    for _ in range(3):  # and ordinary operands
        a, b, c = (rng.standard_normal(10_000).astype(np.float32) for _ in range(3))
        fused(a, b, c, expected[:10_000])
        assert np.array_equal(ref.fma32(a, b, c), expected[:10_000])


# ---- 4. layers -----------------------------------------------------------------------------------
def test_conv2d_matches_torch(rng):
    for kernel, stride, padding in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 1, 2), (3, 1, 0)]:
        x = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)
        w = rng.standard_normal((6, 5, kernel, kernel)).astype(np.float32)
        b = rng.standard_normal(6).astype(np.float32)
        expected = F.conv2d(t(x), t(w), t(b), stride=stride, padding=padding)
        ours = ref.conv2d(x, w, b, stride=stride, padding=padding)
        assert_rel_close(ours, expected, KERNEL_TOL, f"conv {kernel}x{kernel}, stride {stride}, padding {padding}")


def test_norms_activations_attention_match_torch(rng):
    x = rng.standard_normal((2, 12, 5, 6)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    assert_rel_close(ref.group_norm(x, w, b, groups=4, eps=1e-6), F.group_norm(t(x), 4, t(w), t(b), 1e-6), KERNEL_TOL)
    tokens = x.reshape(2, 30, 12)
    assert_rel_close(ref.layer_norm(tokens, w, b, 1e-5), F.layer_norm(t(tokens), (12,), t(w), t(b), 1e-5), KERNEL_TOL)
    wide = (rng.standard_normal(100_000) * 4).astype(np.float32)
    quick_gelu = lambda v: v * torch.sigmoid(1.702 * v)  # noqa: E731  (transformers' QuickGELUActivation)
    for ours, theirs in [(ref.gelu, F.gelu), (ref.silu, F.silu), (ref.quick_gelu, quick_gelu)]:
        assert_rel_close(ours(wide), theirs(t(wide)), KERNEL_TOL, ours.__name__)
    q, k, v = (rng.standard_normal((2, n, 24)).astype(np.float32) for n in (10, 7, 7))
    for heads in (1, 3):
        split = lambda a: t(a).reshape(2, a.shape[1], heads, -1).transpose(1, 2)
        expected = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 10, 24)
        assert_rel_close(ref.multi_head_attention(q, k, v, heads), expected, KERNEL_TOL, f"attention, {heads} heads")
    expected = F.scaled_dot_product_attention(t(q)[:, None], t(q)[:, None], t(q)[:, None], is_causal=True)[:, 0]
    assert_rel_close(ref.multi_head_attention(q, q, q, 1, causal=True), expected, KERNEL_TOL, "causal attention")


# ---- 5-7. the networks ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, dtype, prefix", [("sd1", "fp16", True), ("sd2", "fp32", False)])
def test_clip_text_encoder_matches_transformers(kind, dtype, prefix, rng, tmp_path):
    model = tiny_clip(kind, seed=int(rng.integers(2**31)))
    folder = save_clip(model, tmp_path / "text_encoder", prefix=prefix, dtype=dtype, position_ids=prefix)
    if dtype != "fp32":
        model = rounded_copy(model, dtype)  # the weights the file holds
    config, weights = ref.load_part(tmp_path, "text_encoder")
    ids = padded_ids(rng, 2, 77)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state
    assert_rel_close(ref.clip_text_encoder(ids, weights, config), expected, NETWORK_TOL, f"CLIP {kind}")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_unet_matches_diffusers(kind, rng):
    model, folder = tiny_unet(kind, seed=int(rng.integers(1000)))
    config, weights = ref.load_part(folder.parent, folder.name)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    timestep = int(rng.integers(0, 1000))
    with torch.no_grad():
        expected = model(t(latents), timestep, encoder_hidden_states=t(context)).sample
    assert_rel_close(ref.unet(latents, timestep, context, weights, config), expected, NETWORK_TOL, f"UNet {kind}")


@pytest.mark.parametrize("kind, old_names", [("sd", False), ("deep", True)])
def test_vae_decoder_matches_diffusers(kind, old_names, rng, tmp_path):
    from safetensors.torch import load_file, save_file

    model, folder = tiny_vae(kind, seed=int(rng.integers(1000)))
    if old_names:  # as VAE files saved before diffusers 0.14 name the attention's projections
        renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        for new_name, old_name in renames.items():
            tensors = {name.replace(new_name, old_name): tensor for name, tensor in tensors.items()}
        assert any(".query." in name for name in tensors)
        (tmp_path / "vae").mkdir()
        save_file(tensors, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
        (tmp_path / "vae" / "config.json").write_text((folder / "config.json").read_text())
        folder = tmp_path / "vae"
    config, weights = ref.load_part(folder.parent, folder.name)
    latents = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
    with torch.no_grad():
        expected = model.decode(t(latents) / config["scaling_factor"]).sample
    assert_rel_close(ref.vae_decode(latents, weights, config), expected, NETWORK_TOL, f"VAE {kind}")


# ---- 8. DDIM -------------------------------------------------------------------------------------
SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")
DDIM_VARIANTS = [
    {},
    dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=True, timestep_spacing="linspace",
         prediction_type="sample", steps_offset=0),
]


@pytest.mark.parametrize("variant", range(len(DDIM_VARIANTS)))
def test_ddim_matches_diffusers(variant, rng):
    from diffusers import DDIMScheduler

    config = dict(SD15_DDIM, **DDIM_VARIANTS[variant])
    scheduler = DDIMScheduler.from_config(config)
    steps = int(rng.integers(3, 60))
    scheduler.set_timesteps(steps)
    timesteps = ref.ddim_timesteps(config, steps)
    assert np.array_equal(timesteps, scheduler.timesteps.numpy())
    alphas = ref.alphas_cumprod(config)
    assert_rel_close(alphas, scheduler.alphas_cumprod, KERNEL_TOL, "alphas_cumprod")
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for step in timesteps:
        output = rng.standard_normal(sample.shape).astype(np.float32)
        expected = scheduler.step(t(output), int(step), t(sample)).prev_sample
        ours = ref.ddim_step(output, int(step), sample, alphas, config, steps)
        assert_rel_close(ours, expected, KERNEL_TOL, f"DDIM step at t={step}")
        sample = expected.numpy()


# ---- 9-10. whole pictures ------------------------------------------------------------------------
def test_txt2img_draws_what_diffusers_draws(rng):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    prompts, specs = shapes_data.random_prompts(3, int(rng.integers(2**31)))
    cases = [(prompts[0], "", 20, 7.5), (prompts[1], specs[1]["color"], int(rng.integers(5, 16)), 5.0),
             (prompts[2], "", int(rng.integers(5, 16)), 1.0)]
    for prompt, negative, steps, guidance in cases:
        seed = int(rng.integers(2**32))
        ours = ref.txt2img(MODEL_DIR, prompt, negative, seed=seed, steps=steps, guidance_scale=guidance)
        theirs = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        theirs = (theirs * 255).round().astype(np.uint8)
        assert ours.shape == theirs.shape == (32, 32, 3) and ours.dtype == np.uint8
        worst = int(np.abs(ours.astype(np.int32) - theirs.astype(np.int32)).max())
        assert worst <= IMAGE_LEVELS_TOL, f"{prompt!r} / {negative!r}, seed {seed}: {worst} levels apart"


def test_bad_arguments_fail_before_any_work(tmp_path):
    for kwargs, words in [(dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(seed=2**64), "seed"),
                          (dict(guidance_scale=float("nan")), "guidance_scale"),
                          (dict(negative_prompt=None), "negative")]:
        with pytest.raises(ValueError, match=words):
            ref.txt2img(MODEL_DIR, "a red circle", **kwargs)
    with pytest.raises(ValueError, match="model_index.json"):
        ref.txt2img(tmp_path, "a red circle")


def test_command_line_writes_the_png(tmp_path, rng):
    from PIL import Image

    seed = int(rng.integers(2**31))
    output = tmp_path / "out.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "npdiff.reference", "a red circle on a blue background", str(output),
                           "--negative", "green", "--seed", str(seed), "--steps", "6", "--guidance", "6"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    picture = np.asarray(Image.open(output))
    assert picture.shape == (32, 32, 3)
    expected = ref.txt2img(MODEL_DIR, "a red circle on a blue background", "green", seed=seed, steps=6,
                           guidance_scale=6)
    assert np.array_equal(picture, expected)
    missing = subprocess.run([sys.executable, "-m", "npdiff.reference", "x", str(tmp_path / "no" / "x.png")],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
