"""precision="bf16x3" networks against the float32 diffusers/transformers modules, at the network tolerance.

At bf16x3 every Linear weight (and every 1x1 convolution read as a Linear) is split into bf16 hi + lo and
multiplied as three bf16 products on AMX tiles (npdiff/kernels/matmul_bf16x3.py); Conv2d weights stay
float32 and everything else is float32's code. So the whole forward is compared with torch float32 at the
float32 network tolerance (1e-4), as the float32 networks are (tests/models/test_unet.py, test_clip.py).
Where the CPU has no usable AMX tiles the Linear weights stay float32 too: the same comparison holds.
"""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from test_bf16_models import layer_weights, torch_unet_forward, unet_inputs
from tiny_clip import CLIP_KINDS, random_ids, save_clip, tiny_clip
from tiny_models import tiny_unet

from npdiff.kernels.bf16_rounding import bf16_kernel
from npdiff.kernels.matmul_bf16x3 import PackedBf16x3Weight
from npdiff.models import CLIPTextModel, UNet2DConditionModel, precision


def expected_layout():
    return "split pairs" if bf16_kernel() == "amx" else "float32"


def check_layer_kinds(model):
    """Linear weights packed for bf16x3 (in this CPU's layout); Conv2d weights plain float32 arrays."""
    weights = layer_weights(model)
    linear = [weight for weight in weights if isinstance(weight, PackedBf16x3Weight)]
    convs = [weight for weight in weights if not isinstance(weight, PackedBf16x3Weight)]
    assert linear and all(weight.layout == expected_layout() for weight in linear)
    assert all(isinstance(weight, np.ndarray) and weight.dtype == np.float32 and weight.ndim == 4 for weight in convs)
    return linear, convs


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_bf16x3_matches_torch_float32(kind, rng):
    torch_model, folder = tiny_unet(kind, seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder, precision="bf16x3")
    assert ours.precision == "bf16x3"
    linear, convs = check_layer_kinds(ours)
    assert convs  # the 3x3 convolutions stay float32
    sample, timestep, context, added = unet_inputs(rng, ours.config)
    out = ours(sample, timestep, context, added_cond_kwargs=added)  # [B,4,h,w]
    plain = torch_unet_forward(torch_model, sample, timestep, context, added)
    error = assert_rel_close(out, plain, NETWORK_TOL, f"unet {kind} at bf16x3")
    print(f"unet {kind} bf16x3 ({expected_layout()}): rel err {error:.2e} vs torch float32")


@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_clip_bf16x3_matches_torch_float32(kind, rng, tmp_path):
    model = tiny_clip(kind, seed=5)
    save_clip(model, tmp_path / "text_encoder")
    ours = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder", precision="bf16x3")
    linear, convs = check_layer_kinds(ours)
    assert not convs
    ids = random_ids(rng, 2, CLIP_KINDS[kind]["max_position_embeddings"])
    last = ours(ids)  # [B,L,D]
    with torch.no_grad():
        plain = model(torch.from_numpy(ids)).last_hidden_state
    error = assert_rel_close(last, plain, NETWORK_TOL, f"clip {kind} at bf16x3")
    print(f"clip {kind} bf16x3 ({expected_layout()}): rel err {error:.2e} vs torch float32")


def test_lora_fused_weight_is_packed_as_bf16x3_again(rng):
    """pack_like (what a LoRA fused into a layer calls) packs a bf16x3 layer's new weight as bf16x3 again,
    and float32_values gives back what that layer multiplies (hi + lo)."""
    _, folder = tiny_unet("sd1", seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder, precision="bf16x3")
    weight = next(w for w in layer_weights(ours) if isinstance(w, PackedBf16x3Weight))
    values = precision.float32_values(weight) + rng.standard_normal(weight.shape, dtype=np.float32) * 0.01
    fused = precision.pack_like(weight, values)
    assert isinstance(fused, PackedBf16x3Weight) and fused.shape == weight.shape
    assert_rel_close(precision.float32_values(fused), values, 1e-5, "repacked weight")


def test_unet_bf16x3_without_amx_is_float32_after_a_note(rng, monkeypatch):
    """NPDIFF_NO_AMX=1 (what a CPU without AMX tiles runs): one RuntimeWarning, the Linear weights kept
    float32 (multiplied by NumPy's float32 GEMM: the float32 model's numbers but for the order of sums)."""
    monkeypatch.setenv("NPDIFF_NO_AMX", "1")
    monkeypatch.setattr(precision, "_noted_no_amx", [])
    torch_model, folder = tiny_unet("sd1", seed=0)
    with pytest.warns(RuntimeWarning, match="AMX"):
        ours = UNet2DConditionModel.from_pretrained(folder, precision="bf16x3")
    linear, _ = check_layer_kinds(ours)
    assert all(weight.layout == "float32" for weight in linear)
    sample, timestep, context, added = unet_inputs(rng, ours.config)
    out = ours(sample, timestep, context, added_cond_kwargs=added)  # [B,4,h,w]
    plain = UNet2DConditionModel.from_pretrained(folder)(sample, timestep, context, added_cond_kwargs=added)
    assert_rel_close(out, plain, 1e-6, "against the float32 model")
    assert_rel_close(out, torch_unet_forward(torch_model, sample, timestep, context, added), NETWORK_TOL,
                     "unet sd1 at bf16x3 without AMX")
