"""LoRA files against diffusers' load_lora_weights + fuse_lora(lora_scale) on the tiny model (tiny_sd.py).

Random LoRAs are made with peft on the diffusers UNet (attention, feed-forward, 1x1-conv proj_in/proj_out,
and LoCon 3x3 convs, shortcuts, resamplers, time_emb_proj) and text encoder (q/k/v/out_proj, fc1/fc2),
then written in the diffusers/PEFT layout (diffusers' save_lora_weights, with and without the adapter
metadata) and in the kohya layout (names converted here, alpha != rank). UNet and text-encoder outputs
within relative 1e-4 of diffusers', a short picture within 2 levels; stacking, exact unloading, and
every kind of bad input (nothing may be half-applied)."""

import hashlib

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close, rel_err

import torch
from safetensors.torch import save_file

from tiny_sd import CLIP_CONFIG, tiny_sd_folder, torch_pipeline  # noqa: E402
from lora_helpers import all_weights, assert_untouched, load_ours  # noqa: E402

from npdiff import NpdiffError, cli  # noqa: E402
from npdiff import lora as npdiff_lora  # noqa: E402
from npdiff.images import read_png_params  # noqa: E402
from npdiff.loading.resident import mapping_of  # noqa: E402
from npdiff.models.packed_linear import PackedLinear  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, KOHYA_ALPHA, METADATA_ALPHA = 4, 2.0, 8.0
SCALE = 0.7
PROMPT = "a red circle on a blue square"


# ---------------------------------------------------------------------------------------------
# Random LoRAs made with peft, written in each layout
# ---------------------------------------------------------------------------------------------
def random_loras(*seeds):
    """peft adapters on the tiny diffusers UNet and text encoder, filled with random numbers once per seed
    -> [{component: {module: (down, up)}}, ...]."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = torch_pipeline(tiny_sd_folder())
    models = {component: inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets),
                                                 getattr(pipe, component))
              for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS))}
    loras = []
    for seed in seeds:
        torch.manual_seed(seed)
        layers = {}
        for component, model in models.items():
            state = {name.replace(".default", ""): torch.randn_like(param) * (0.5 * param[0].numel() ** -0.5)
                     for name, param in model.named_parameters() if ".lora_" in name}  # [r,in(,k,k)], [out,r(,1,1)]
            modules = sorted({name.split(".lora_")[0] for name in state})
            layers[component] = {name: (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"])
                                 for name in modules}
        loras.append(layers)
    return loras


def save_peft(layers, path, metadata=False):
    """The diffusers/PEFT layout, written by diffusers' save_lora_weights (lora_A = down, lora_B = up)."""
    from diffusers import StableDiffusionPipeline as TorchPipeline

    def state(component):
        return {f"{name}.{part}.weight": tensor for name, pair in layers[component].items()
                for part, tensor in zip(("lora_A", "lora_B"), pair)}

    extra = {}
    if metadata:
        extra = {f"{component}_lora_adapter_metadata": {"r": RANK, "lora_alpha": METADATA_ALPHA,
                                                         "target_modules": targets}
                 for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS))}
    TorchPipeline.save_lora_weights(str(path.parent), unet_lora_layers=state("unet"),
                                    text_encoder_lora_layers=state("text_encoder"), weight_name=path.name,
                                    safe_serialization=True, **extra)
    return path


def kohya_name(component, name):
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    return "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")


def save_kohya(layers, path, alpha=KOHYA_ALPHA):
    tensors = {}
    for component, pairs in layers.items():
        for name, (down, up) in pairs.items():
            key = kohya_name(component, name)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    first, second = random_loras(11, 12)
    return {"peft": save_peft(first, root / "style_peft.safetensors"),
            "peft_metadata": save_peft(first, root / "style_meta.safetensors", metadata=True),
            "kohya": save_kohya(first, root / "style_kohya.safetensors"),
            "second": save_kohya(second, root / "detail.safetensors", alpha=1.0),
            "layers": first}


def model_inputs(pipe, rng):
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # [B,4,h,w]
    context = rng.standard_normal((2, 77, CLIP_CONFIG["hidden_size"])).astype(np.float32)  # [B,77,D]
    ids = np.asarray(pipe.tokenizer([PROMPT, "blurry"]))  # [2,77]
    return sample, int(rng.integers(1, 1000)), context, ids


def ours_outputs(pipe, inputs):
    sample, t, context, ids = inputs
    return pipe.unet(sample, t, context), pipe.text_encoder(ids)


def theirs_outputs(pipe, inputs):
    sample, t, context, ids = inputs
    with torch.no_grad():
        eps = pipe.unet(torch.from_numpy(sample), t, torch.from_numpy(context)).sample.numpy()
        text = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    return eps, text


# ---------------------------------------------------------------------------------------------
# Equal to diffusers
# ---------------------------------------------------------------------------------------------
def test_fused_weights_are_new_arrays_beside_the_mapped_originals(folder, files, rng):
    """The loaded float32 weights are read-only views of the files (npdiff/loading/safetensors_io.py): a
    LoRA puts new private arrays in place and never writes into a view; releasing the mapped pages
    (the unchanged weights and the originals kept for unloading) leaves the fused outputs bit for bit."""
    ours = load_ours(folder)
    inputs = model_inputs(ours, rng)
    before = all_weights(ours)
    layers = {**npdiff_lora.named_layers(ours.unet, "unet"), **npdiff_lora.named_layers(ours.text_encoder, "text_encoder")}
    packed = {name for name, layer in layers.items() if isinstance(layer, PackedLinear)}  # CLIP's packed copies
    assert packed and all(name.startswith("encoder.") for name in packed)  # text-encoder layers only
    # their `weight` is the mapped one too (the packed copy sits beside it)
    assert all(mapping_of(weight) is not None and not weight.flags.writeable for weight in before.values())
    ours.load_lora_weights(files["kohya"], scale=SCALE)
    after = all_weights(ours)
    fused = [name for name in after if after[name] is not before[name]]
    assert fused and all(mapping_of(after[name]) is None for name in fused)
    lora_eps, lora_text = ours_outputs(ours, inputs)
    assert ours.release_resident_pages() > 0
    eps, text = ours_outputs(ours, inputs)
    assert np.array_equal(eps, lora_eps) and np.array_equal(text, lora_text)
    ours.unload_lora_weights()
    assert_untouched(ours, before)


@pytest.mark.parametrize("layout", ["peft", "peft_metadata", "kohya"])
def test_unet_and_text_encoder_match_diffusers(folder, files, rng, layout):
    path = files[layout]
    ours = load_ours(folder)
    inputs = model_inputs(ours, rng)
    base_eps, base_text = ours_outputs(ours, inputs)
    layer_count = len(files["layers"]["unet"]) + len(files["layers"]["text_encoder"])
    assert ours.load_lora_weights(path, scale=SCALE).layer_count == layer_count
    eps, text = ours_outputs(ours, inputs)

    theirs = torch_pipeline(folder)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=SCALE)
    theirs_eps, theirs_text = theirs_outputs(theirs, inputs)
    assert_rel_close(eps, theirs_eps, tol=NETWORK_TOL, what=f"{layout} UNet output")
    assert_rel_close(text, theirs_text, tol=NETWORK_TOL, what=f"{layout} text encoder output")
    # the LoRA really changed both (no stale copy of a weight anywhere)
    assert rel_err(base_eps, theirs_eps) > 100 * NETWORK_TOL
    assert rel_err(base_text, theirs_text) > 100 * NETWORK_TOL


def test_picture_matches_diffusers(folder, files, seed):
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0)
    theirs = torch_pipeline(folder, "euler")
    theirs.load_lora_weights(str(files["kohya"]))
    theirs.fuse_lora(lora_scale=SCALE)
    expected = theirs(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    ours = load_ours(folder)
    ours.load_lora_weights(files["kohya"], scale=SCALE)
    out = ours(PROMPT, seed=seed, output_type="np", **kwargs)
    worst = int(np.max(np.abs(np.round(out.images * 255) - np.round(expected * 255))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    sha = hashlib.sha256(files["kohya"].read_bytes()).hexdigest()[:12]
    assert out.parameters["loras"] == [{"name": "style_kohya", "scale": SCALE, "sha256": sha}]


def test_two_loras_stack_like_diffusers(folder, files, rng):
    ours = load_ours(folder)
    inputs = model_inputs(ours, rng)
    ours.load_lora_weights(files["peft"], scale=SCALE)
    ours.load_lora_weights(files["second"], scale=-0.4, adapter_name="detail")
    eps, text = ours_outputs(ours, inputs)

    theirs = torch_pipeline(folder)  # fuse one, drop its LoRA layers (the fused weights stay), fuse the next
    for path, scale in ((files["peft"], SCALE), (files["second"], -0.4)):
        theirs.load_lora_weights(str(path))
        theirs.fuse_lora(lora_scale=scale)
        theirs.unload_lora_weights()
    theirs_eps, theirs_text = theirs_outputs(theirs, inputs)
    assert_rel_close(eps, theirs_eps, tol=NETWORK_TOL, what="stacked UNet output")
    assert_rel_close(text, theirs_text, tol=NETWORK_TOL, what="stacked text encoder output")
    assert [entry["name"] for entry in npdiff_lora.lora_parameters(ours)] == ["style_peft", "detail"]
    with pytest.raises(NpdiffError, match="adapter_name 'detail' is already loaded"):
        ours.load_lora_weights(files["kohya"], adapter_name="detail")


def test_unload_restores_the_original_outputs_exactly(folder, files, rng):
    ours = load_ours(folder)
    inputs = model_inputs(ours, rng)
    before = all_weights(ours)
    base_eps, base_text = ours_outputs(ours, inputs)
    ours.unload_lora_weights()  # nothing loaded: a no-op
    assert_untouched(ours, before)
    ours.load_lora_weights(files["kohya"], scale=SCALE)
    ours.load_lora_weights(files["second"], scale=1.5)
    assert not np.array_equal(ours_outputs(ours, inputs)[0], base_eps)
    ours.unload_lora_weights()
    assert_untouched(ours, before)
    eps, text = ours_outputs(ours, inputs)
    assert np.array_equal(eps, base_eps) and np.array_equal(text, base_text)
    assert npdiff_lora.lora_parameters(ours) == []


def test_other_layouts_give_the_same_weights(folder, files, tmp_path):
    """PEFT names with .alpha keys, and the older diffusers .lora.down/.lora.up names, read like kohya."""
    layers = files["layers"]
    with_alpha, old_names = {}, {}
    for component, pairs in layers.items():
        for name, (down, up) in pairs.items():
            with_alpha.update({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up,
                               f"{component}.{name}.alpha": torch.tensor(KOHYA_ALPHA)})
            old_names.update({f"{component}.{name}.lora.down.weight": down, f"{component}.{name}.lora.up.weight": up})
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))
    save_file(old_names, str(tmp_path / "old.safetensors"))

    def weights_after(path):
        pipe = load_ours(folder)
        pipe.load_lora_weights(path, scale=SCALE)
        return all_weights(pipe)

    kohya, peft = weights_after(files["kohya"]), weights_after(files["peft"])
    for path, reference in ((tmp_path / "alpha.safetensors", kohya), (tmp_path / "old.safetensors", peft)):
        got = weights_after(path)
        assert all(np.array_equal(got[name], reference[name]) for name in reference), path.name


def test_each_layer_uses_its_own_alpha(folder, files, tmp_path):
    """kohya files may give every layer its own alpha (LoCon: conv_alpha != network_alpha). Checked against
    W + scale * alpha/r * up @ down in float64 (diffusers 0.42 is no reference here: for SD it applies
    the most common alpha to layers whose alpha key it cannot match to its processor names)."""
    alphas, tensors = {}, {}
    for component, pairs in files["layers"].items():
        for i, (name, (down, up)) in enumerate(pairs.items()):
            key = kohya_name(component, name)
            alphas[component, name] = 1.0 + i % 3
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alphas[component, name])})
    save_file(tensors, str(tmp_path / "alphas.safetensors"))
    pipe = load_ours(folder)
    originals = all_weights(pipe)
    pipe.load_lora_weights(tmp_path / "alphas.safetensors", scale=SCALE)
    fused = all_weights(pipe)
    for component, name in alphas:
        down, up = (tensor.double().numpy() for tensor in files["layers"][component][name])
        delta = up.reshape(up.shape[0], RANK) @ down.reshape(RANK, -1)  # [out,r] @ [r,in*k*k]
        key = name.removeprefix("text_model.") if component == "text_encoder" else name
        expected = originals[key] + SCALE * alphas[component, name] / RANK * delta.reshape(originals[key].shape)
        assert_rel_close(fused[key], expected, what=f"{component} {name}")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear NpdiffError, nothing half-applied
# ---------------------------------------------------------------------------------------------
def good_tensors(files):
    down, up = files["layers"]["unet"]["down_blocks.0.attentions.0.proj_in"]  # [r,32,1,1], [32,r,1,1]
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}


@pytest.mark.parametrize("extra,message", [
    ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
      "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
     "'lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight' names no layer of this model's unet"),
    ({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
      "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4)},
     r"has shape \[4,768\] .* has shape \[64,4\]; they do not fit the unet layer "
     r"'mid_block.attentions.0.transformer_blocks.0.attn2.to_k', whose weight is \[64,32\]"),
    ({"lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
     "has no matching up weight for text_encoder layer 'encoder.layers.1.mlp.fc1'"),
    ({"text_encoder_2.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 32)},
     "is for a text_encoder_2, which this model does not have \\(a LoRA for SDXL\\?\\)"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
     "is for a text_encoder_2, which this model does not have"),
    ({"vae.decoder.conv_in.lora_A.weight": torch.zeros(4, 32)}, "is in no known layout"),
    ({"lora_unet_conv_in.alpha": torch.tensor(float("nan")), "lora_unet_conv_in.lora_down.weight":
      torch.zeros(4, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
     "the alpha of unet layer 'conv_in' is nan"),
])
def test_bad_lora_files_change_nothing(folder, files, tmp_path, extra, message):
    path = tmp_path / "bad.safetensors"
    save_file({**good_tensors(files), **extra}, str(path))  # a good layer first, then the bad keys
    ours = load_ours(folder)
    before = all_weights(ours)
    with pytest.raises(NpdiffError, match=message):
        ours.load_lora_weights(path)
    assert_untouched(ours, before)
    assert npdiff_lora.lora_parameters(ours) == []


def test_error_while_fusing_puts_back_what_it_changed(folder, files, monkeypatch):
    ours = load_ours(folder)
    ours.load_lora_weights(files["second"])
    before = all_weights(ours)
    calls = []
    real = npdiff_lora.fused_weight

    def failing(entry, *args):
        calls.append(entry.name)
        if len(calls) == 5:
            raise MemoryError("out of memory")
        return real(entry, *args)

    monkeypatch.setattr(npdiff_lora, "fused_weight", failing)
    with pytest.raises(MemoryError):
        ours.load_lora_weights(files["kohya"])
    assert_untouched(ours, before)
    assert [entry["name"] for entry in npdiff_lora.lora_parameters(ours)] == ["detail"]
    monkeypatch.undo()
    ours.unload_lora_weights()  # the first LoRA's originals are still there to put back
    fresh = all_weights(load_ours(folder))
    assert all(np.array_equal(weight, fresh[name]) for name, weight in all_weights(ours).items())


def test_pickles_and_bad_scales_are_refused(folder, files, tmp_path):
    ours = load_ours(folder)
    before = all_weights(ours)
    pickled = tmp_path / "lora.safetensors"
    torch.save(good_tensors(files), str(pickled))  # a pickle renamed .safetensors
    with pytest.raises(NpdiffError, match="pickle"):
        ours.load_lora_weights(pickled)
    for suffix in (".ckpt", ".pt", ".bin"):
        with pytest.raises(NpdiffError, match="refusing to read"):
            ours.load_lora_weights(tmp_path / f"lora{suffix}")
    for scale in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(NpdiffError, match="LoRA scale must be"):
            ours.load_lora_weights(files["kohya"], scale=scale)
    with pytest.raises(NpdiffError, match="no such file"):
        ours.load_lora_weights(tmp_path / "missing.safetensors")
    assert_untouched(ours, before)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def test_cli_lora_option_records_the_loras(folder, files, tmp_path, capsys):
    out = tmp_path / "picture.png"
    code = cli.main(["generate", PROMPT, "--model", str(folder), "--steps", "2", "--seed", "5", "--out", str(out),
                     "--lora", f"{files['kohya']}:{SCALE}", "--lora", str(files["second"])])
    assert code == 0, capsys.readouterr().err
    sha = {name: hashlib.sha256(files[name].read_bytes()).hexdigest()[:12] for name in ("kohya", "second")}
    assert read_png_params(out)["loras"] == [{"name": "style_kohya", "scale": SCALE, "sha256": sha["kohya"]},
                                            {"name": "detail", "scale": 1.0, "sha256": sha["second"]}]
    changed = tmp_path / "changed.png"
    assert cli.main(["img2img", PROMPT, "--image", str(out), "--strength", "0.5", "--steps", "2", "--model",
                     str(folder), "--out", str(changed), "--lora", f"{files['second']}:-0.5"]) == 0
    assert read_png_params(changed)["loras"] == [{"name": "detail", "scale": -0.5, "sha256": sha["second"]}]
    assert cli.main(["generate", PROMPT, "--model", str(folder), "--lora", f"{files['kohya']}:strong"]) == 2
    assert "is not a number" in capsys.readouterr().err


def test_the_random_loras_cover_every_kind_of_layer(files):
    """So that the comparisons above exercise 1x1-conv proj_in/out, LoCon 3x3 convs and the text encoder."""
    unet, text = files["layers"]["unet"], files["layers"]["text_encoder"]
    shapes = {name: tuple(down.shape) for name, (down, _) in unet.items()}
    assert shapes["down_blocks.0.attentions.0.proj_in"] == (RANK, 32, 1, 1)
    assert shapes["down_blocks.0.resnets.0.conv1"] == (RANK, 32, 3, 3)
    assert shapes["down_blocks.0.downsamplers.0.conv"] == (RANK, 32, 3, 3)
    for part in ("ff.net.0.proj", "ff.net.2", "attn2.to_out.0", "conv_shortcut", "time_emb_proj", "upsamplers.0.conv"):
        assert any(name.endswith(part) for name in unet), part
    assert {name.rsplit(".", 1)[-1] for name in text} == set(TEXT_TARGETS)
