"""RowsLinear (npdiff/models/packed_linear.py): the UNet's transformer projections on panels packed at load
(kernels.linear_rows), the plain path for another weight (a fused LoRA) until the packed one comes back, for
strided inputs, and for models that do not pack (precision bf16x3, above the size limit)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close

from npdiff import kernels
from npdiff.loading import open_weights
from npdiff.models import packed_linear
from npdiff.models.packed_linear import RowsLinear

PREFIX = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"


@pytest.fixture(autouse=True)
def packs_rows(monkeypatch):
    """RowsLinear packs only with packed_linear.UNET_PACKS_ROWS on (off by default: measured no faster)."""
    monkeypatch.setattr(packed_linear, "UNET_PACKS_ROWS", True)


def test_off_by_default_then_the_tiny_unet_matches_diffusers(rng, monkeypatch):
    """Off (the default) no layer holds panels; on, every projection of the tiny SD 1.x UNet does and the whole
    network still matches diffusers at the network tolerance."""
    from tiny_models import tiny_unet

    from npdiff.loading.resident import reachable
    from npdiff.models import UNet2DConditionModel

    torch_model, folder = tiny_unet("sd1", seed=0)
    monkeypatch.undo()
    assert packed_linear.UNET_PACKS_ROWS is False
    plain = UNet2DConditionModel.from_pretrained(folder)
    assert all(layer.panels is None for layer in reachable(plain) if isinstance(layer, RowsLinear))
    monkeypatch.setattr(packed_linear, "UNET_PACKS_ROWS", True)
    packed = UNet2DConditionModel.from_pretrained(folder)
    layers = [layer for layer in reachable(packed) if isinstance(layer, RowsLinear)]
    assert layers and all(layer.panels is not None for layer in layers)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    context = rng.standard_normal((2, 7, torch_model.config.cross_attention_dim), dtype=np.float32)
    with torch.inference_mode():
        expected = torch_model(torch.from_numpy(sample), 500, torch.from_numpy(context)).sample
    assert_rel_close(packed(sample, 500, context), expected, NETWORK_TOL, "packed UNet")
    assert_rel_close(plain(sample, 500, context), expected, NETWORK_TOL, "plain UNet")


def layer_file(rng, tmp_path, n_in, n_out):
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5)
    bias = rng.standard_normal(n_out, dtype=np.float32)
    path = tmp_path / "layer.safetensors"
    save_file({f"{PREFIX}.weight": weight, f"{PREFIX}.bias": bias}, str(path))
    return path, weight, bias


def torch_linear(x, weight, bias):
    return F.linear(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(weight), torch.from_numpy(bias))


def test_packed_layer_matches_torch_and_keeps_its_weight(rng, tmp_path):
    n_in, n_out = int(rng.integers(1, 400)), int(rng.integers(1, 400))
    path, weight, bias = layer_file(rng, tmp_path, n_in, n_out)
    layer = RowsLinear(open_weights(path), PREFIX, n_in, n_out)
    assert layer.panels is not None and layer.weight is layer.packed_weight
    x = rng.standard_normal((2, int(rng.integers(1, 700)), n_in), dtype=np.float32)  # [B,N,in]
    ours = layer(x)
    assert ours.shape == (x.shape[0], x.shape[1], n_out)
    assert_rel_close(ours, torch_linear(x, weight, bias), KERNEL_TOL, "RowsLinear")
    # a strided input (the tokens of an NCHW tensor) takes the plain path
    strided = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)  # [B,N,in], C-contiguous per [in,N]
    assert_rel_close(layer(strided), torch_linear(strided, weight, bias), KERNEL_TOL, "RowsLinear, strided input")


def test_another_weight_runs_plain_until_the_packed_one_is_back(rng, tmp_path):
    """A fused LoRA assigns a new array: the layer computes with it (the panels are not repacked, never stale);
    the unload assigns the original object back and the packed path runs again, the same bytes as before."""
    n_in, n_out = int(rng.integers(1, 300)), int(rng.integers(1, 300))
    path, weight, bias = layer_file(rng, tmp_path, n_in, n_out)
    layer = RowsLinear(open_weights(path), PREFIX, n_in, n_out)
    x = rng.standard_normal((int(rng.integers(1, 500)), n_in), dtype=np.float32)  # [M,in]
    before = layer(x)
    original = layer.weight
    fused = original + rng.standard_normal(original.shape, dtype=np.float32) * np.float32(0.1)  # [out,in]
    layer.weight = fused
    assert np.array_equal(layer(x), kernels.linear(x, fused, bias))
    assert_rel_close(layer(x), torch_linear(x, fused, bias), KERNEL_TOL, "fused weight")
    layer.weight = original
    assert layer(x).tobytes() == before.tobytes()


def test_models_that_do_not_pack(rng, tmp_path, monkeypatch):
    """Above the size limit, or at precision bf16x3, the layer is a plain Linear (no panels) and still right."""
    n_in, n_out = int(rng.integers(1, 200)), int(rng.integers(1, 200))
    path, weight, bias = layer_file(rng, tmp_path, n_in, n_out)
    x = rng.standard_normal((int(rng.integers(1, 300)), n_in), dtype=np.float32)
    monkeypatch.setattr(packed_linear, "ROWS_PACK_LIMIT_BYTES", 4 * n_in * n_out - 1)
    layer = RowsLinear(open_weights(path), PREFIX, n_in, n_out)
    assert layer.panels is None
    assert_rel_close(layer(x), torch_linear(x, weight, bias), KERNEL_TOL, "above the limit")
    monkeypatch.setattr(packed_linear, "ROWS_PACK_LIMIT_BYTES", 4 * n_in * n_out)
    assert RowsLinear(open_weights(path), PREFIX, n_in, n_out).panels is not None  # at the limit: packed
    layer = RowsLinear(open_weights(path).set_precision("bf16x3"), PREFIX, n_in, n_out)
    assert layer.panels is None


@pytest.mark.parametrize("precision", ["fp32", "bf16", "mixed", "bf16x3"])
def test_packed_only_where_the_linear_family_keeps_float32(rng, tmp_path, precision):
    n_in, n_out = 64, 64
    path, _, _ = layer_file(rng, tmp_path, n_in, n_out)
    weights = open_weights(path).set_precision(precision)
    layer = RowsLinear(weights, PREFIX, n_in, n_out)
    assert (layer.panels is not None) == packed_linear.precision.keeps_float32(weights, "linear")
    assert (layer.panels is not None) == (precision == "fp32")  # "mixed" runs the UNet's linear family in bf16


def test_a_controlnet_is_not_packed(rng, tmp_path):
    """A ControlNet's file (its "controlnet_" keys) builds plain layers: its weights stay file-backed only."""
    weight = rng.standard_normal((32, 32), dtype=np.float32)
    path = tmp_path / "net.safetensors"
    save_file({f"{PREFIX}.weight": weight, f"{PREFIX}.bias": weight[0].copy(),
               "controlnet_mid_block.weight": weight[:, :, None, None].copy()}, str(path))
    assert RowsLinear(open_weights(path), PREFIX, 32, 32).panels is None
