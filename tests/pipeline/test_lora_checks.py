"""LoRA values checked at load: NaN/Inf tensors, a scale or alpha beyond float32, an update that overflows
float32 when fused or is absurdly large for its layer. Each is an NpdiffError naming the file and the key
before any weight moves (before these checks such files loaded and failed at sampling step 1 with a
message that named no file). Files are made here in the kohya layout with torch; the weights a good
file fuses are compared with the rule written out in torch (W + scale * alpha/r * up @ down)."""

import numpy as np
import pytest

from helpers import assert_rel_close

import torch
from safetensors.torch import save_file

from tiny_sd import tiny_sd_folder  # noqa: E402
from lora_helpers import all_weights, assert_untouched, load_ours  # noqa: E402

from npdiff import NpdiffError, cli  # noqa: E402
from npdiff import lora as npdiff_lora  # noqa: E402

RANK = 4
UNET_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"      # 1x1 conv, weight [32,32(,1,1)]
TEXT_KEY = "lora_te_text_model_encoder_layers_0_mlp_fc1"      # linear, weight [64,32]


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def lora_tensors(seed, alpha=2.0):
    """A small kohya LoRA on one UNet conv and one text-encoder linear layer (random values ~0.1)."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    return {f"{UNET_KEY}.lora_down.weight": random(RANK, 32, 1, 1), f"{UNET_KEY}.lora_up.weight": random(32, RANK, 1, 1),
            f"{UNET_KEY}.alpha": torch.tensor(alpha),
            f"{TEXT_KEY}.lora_down.weight": random(RANK, 32), f"{TEXT_KEY}.lora_up.weight": random(64, RANK),
            f"{TEXT_KEY}.alpha": torch.tensor(alpha)}


def save(tensors, path):
    save_file(tensors, str(path))
    return path


def poisoned(seed, key, position, value):
    tensors = lora_tensors(seed)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[position] = value
    return tensors


@pytest.mark.parametrize("case,scale,message", [
    ("nan_up", 1.0, rf"key '{UNET_KEY}.lora_up.weight' holds 1 non-finite values \(e.g. nan\)"),
    ("inf_down", 1.0, rf"key '{TEXT_KEY}.lora_down.weight' holds 1 non-finite values \(e.g. -inf\)"),
    ("alpha_1e38", 1.0, r"the (unet|text_encoder) layer '[^']+' \(key '[^']+'\) at scale 1: (its update overflows "
                        r"float32|its update reaches .*, more than 1e\+06 times the layer's largest weight)"),
    ("alpha_inf", 1.0, "the alpha of (unet|text_encoder) layer '[^']+' is inf"),
    ("good", 1e308, r"scale 1e\+308 x alpha/rank 0.5 = 5e\+307 is beyond float32's range"),
    ("good", 1e30, r"its update reaches .*, more than 1e\+06 times the layer's largest weight"),
    ("huge_values", 1.0, r"the (unet|text_encoder) layer '[^']+' \(key '[^']+'\) at scale 1: its update overflows float32"),
])
def test_absurd_values_are_refused_at_load_naming_file_and_key(folder, tmp_path, seed, case, scale, message):
    tensors = {
        "good": lora_tensors(seed),
        "nan_up": poisoned(seed, f"{UNET_KEY}.lora_up.weight", 7, float("nan")),
        "inf_down": poisoned(seed, f"{TEXT_KEY}.lora_down.weight", 3, float("-inf")),
        "alpha_1e38": lora_tensors(seed, alpha=1e38),
        "alpha_inf": lora_tensors(seed, alpha=float("inf")),
        "huge_values": {key: value * 1e20 if key.endswith("weight") else value
                        for key, value in lora_tensors(seed).items()},  # up @ down ~ 1e39: beyond float32
    }[case]
    path = save(tensors, tmp_path / f"{case}.safetensors")
    ours = load_ours(folder)
    ours.load_lora_weights(save(lora_tensors(seed + 1), tmp_path / "first.safetensors"), scale=0.5)
    before = all_weights(ours)
    with pytest.raises(NpdiffError, match=message) as caught:
        ours.load_lora_weights(path, scale=scale)
    assert str(path) in str(caught.value)
    assert_untouched(ours, before)
    assert [lora["name"] for lora in npdiff_lora.lora_parameters(ours)] == ["first"]


def test_large_but_sane_scales_still_load_and_fuse_exactly(folder, tmp_path, seed):
    """The limits are far from real use: scale 200 (and -200) fuse to W + scale * alpha/r * up @ down (torch)."""
    tensors = lora_tensors(seed)
    path = save(tensors, tmp_path / "strong.safetensors")
    for scale in (200.0, -200.0):
        ours = load_ours(folder)
        originals = all_weights(ours)
        ours.load_lora_weights(path, scale=scale)
        fused = all_weights(ours)
        for key, name in ((UNET_KEY, "down_blocks.0.attentions.0.proj_in"), (TEXT_KEY, "encoder.layers.0.mlp.fc1")):
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            delta = up.reshape(up.shape[0], RANK) @ down.reshape(RANK, -1)  # [out,r] @ [r,in] -> [out,in]
            original = torch.from_numpy(np.array(originals[name]))
            expected = original + scale * (2.0 / RANK) * delta.reshape(original.shape)
            assert_rel_close(np.asarray(fused[name]), expected.numpy(), tol=1e-6, what=f"{name} at scale {scale}")


def test_cli_names_the_file_of_an_absurd_scale(folder, tmp_path, seed, capsys):
    path = save(lora_tensors(seed), tmp_path / "style.safetensors")
    out = tmp_path / "picture.png"
    code = cli.main(["generate", "a red circle", "--model", str(folder), "--steps", "1", "--out", str(out),
                     "--lora", f"{path}:1e308"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "beyond float32's range" in err and (UNET_KEY in err or TEXT_KEY in err)
    assert not out.exists()
    code = cli.main(["generate", "a red circle", "--model", str(folder), "--steps", "1", "--out", str(out),
                     "--lora", f"{path}:1e400"])  # inf after parsing
    err = capsys.readouterr().err
    assert code == 2 and "LoRA scale must be finite" in err and str(path) in err
    assert not out.exists()


def test_half_precision_weights_refuse_a_fuse_beyond_float16(folder, tmp_path, seed):
    """With float16 weights (the GPU backend's --fp16) a fused weight beyond 65504 would become inf: refused.
    The same file and scale fuse into float32 weights without complaint."""
    path = save(lora_tensors(seed), tmp_path / "strong.safetensors")
    scale = 3e6  # updates ~1e5: within the 1e6 x limit for these weights, beyond float16's 65504
    ours = load_ours(folder)
    ours.load_lora_weights(path, scale=scale)  # float32 weights: fine
    ours = load_ours(folder)
    layer = npdiff_lora.named_layers(ours.unet, "unet")["down_blocks.0.attentions.0.proj_in"]
    layer.weight = layer.weight.astype(np.float16)
    before = all_weights(ours)
    with pytest.raises(NpdiffError, match=r"proj_in' \(key '.*'\) at scale 3e\+06: the fused weight overflows "
                                          r"float16 \(beyond 6.55e\+04\)"):
        ours.load_lora_weights(path, scale=scale)
    assert_untouched(ours, before)
