"""CLIP's packed float32 path gives the same bits in a process that compiled its kernels, in one that loaded them
from Numba's disk cache, with one Numba thread, and in this (long-lived) test process.

Why this can fail: Numba links a copy of every jitted callee (and of every prange body) into each caller's
machine code and optimises it again there; in a process that compiled the caller a call reaches the callee's own
compiled library, in one that loaded the caller from the cache it reaches the caller's copy. Code compiled with
fastmath 'reassoc' may round differently in each copy: the causal softmax's sum did (CI saw one level in one pixel
between a picture made in its test process and one made in a fresh process; the branch was reverted). The kernels
now fix their order of operations in the source (npdiff/kernels/matmul_numba.py's header).

"Cold" is a fresh NUMBA_CACHE_DIR (the first process compiles and writes it; Numba has no switch that turns its
cache off), "warm" the same folder again.
"""

import os
import subprocess
import sys

import numpy as np

from tiny_clip import save_clip, tiny_clip

from npdiff.kernels.linear_packed import KC_PANEL

TIMEOUT_S = 240

# Runs in a child: the tiny CLIP's hidden states (every layer on PackedLinear) and the packed kernels on inputs
# drawn from the seed, at shapes that take every branch: 2 x 77 tokens (query rows past 48 keys, where the old
# softmax's copies differed), a depth of two KC_PANEL blocks, each activation, a residual, edge tiles (25 rows, 200 columns).
CHILD = r"""
import sys
import numpy as np
from npdiff.kernels.attention.causal_rows import causal_attention_rows
from npdiff.kernels.linear_packed import layer_norm_rows, linear_packed, pack_panels
from npdiff.models import CLIPTextModel
from npdiff.models.packed_linear import PackedLinear

folder, seed, depth, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(seed)
model = CLIPTextModel.from_pretrained(folder)
assert model.linear is PackedLinear, model.linear
ids = rng.integers(0, 998, size=(2, 77))
last, states = model(ids, output_hidden_states=True)
results = {"last": last, **{f"state{i}": s for i, s in enumerate(states)}}
rows = 154
x = rng.standard_normal((rows, depth), dtype=np.float32)
gamma, beta = (rng.standard_normal(depth, dtype=np.float32) for _ in range(2))
panels = pack_panels(rng.standard_normal((200, depth), dtype=np.float32) * np.float32(depth ** -0.5))
bias = rng.standard_normal(200, dtype=np.float32)
residual = rng.standard_normal((rows, 200), dtype=np.float32)
normed = layer_norm_rows(x, gamma, beta, 1e-5)
results["layer_norm_rows"] = normed
for activation in (None, "quick_gelu", "gelu", "gelu_tanh"):
    results[f"linear_{activation}"] = linear_packed(normed, panels, 200, bias, activation, residual)
    results[f"linear_{activation}_rows_25"] = linear_packed(normed[:25], panels, 200, bias, activation)
q, k, v = (rng.standard_normal((rows, 192), dtype=np.float32) for _ in range(3))
results["attention"] = causal_attention_rows(q, k, v, 2, 3, 0.125)
np.savez(out_path, **results)
"""


def run_child(tmp_path, name, folder, seed, cache_dir, threads=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    out = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(seed), str(2 * KC_PANEL + 32), str(out)], env=env,
                   check=True, timeout=TIMEOUT_S, capture_output=True)
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


def in_this_process(folder, seed):
    """The child's script run here, where other tests may have compiled or loaded these kernels before."""
    out = str(folder.parent / "here.npz")
    argv = sys.argv
    sys.argv = ["child", str(folder), str(seed), str(2 * KC_PANEL + 32), out]
    try:
        exec(compile(CHILD, "clip_cache_bits_child", "exec"), {})
    finally:
        sys.argv = argv
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


def assert_same_bytes(ours, reference, what):
    assert ours.keys() == reference.keys()
    for key in reference:
        same = ours[key].tobytes() == reference[key].tobytes()
        differing = 0 if same else int(np.sum(ours[key] != reference[key]))
        assert same, f"{what}: {key} differs in {differing} of {reference[key].size} values"


def test_clip_packed_path_same_bits_compiled_cached_one_thread_and_here(tmp_path, seed):
    folder = save_clip(tiny_clip("sd1", seed=seed % 1000), tmp_path / "text_encoder")  # head width 64, 77 tokens
    cache_dir = tmp_path / "numba-cache"
    compiled = run_child(tmp_path, "compiled", folder, seed, cache_dir)  # compiles, writes the cache
    assert any(cache_dir.rglob("*causal_attention_rows*.nbi")), "the first child wrote no cache"
    cached = run_child(tmp_path, "cached", folder, seed, cache_dir)
    assert_same_bytes(cached, compiled, "loaded from the cache vs compiled")
    one_thread = run_child(tmp_path, "one_thread", folder, seed, cache_dir, threads=1)
    assert_same_bytes(one_thread, compiled, "one Numba thread vs two")
    assert_same_bytes(in_this_process(folder, seed), compiled, "this test process vs a fresh one")
