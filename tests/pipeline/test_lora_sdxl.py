"""SDXL LoRAs against diffusers' StableDiffusionXLPipeline.load_lora_weights + fuse_lora(lora_scale) on the
tiny SDXL (tiny_sdxl.py).

Random LoRAs are made with peft on diffusers' UNet (attention, feed-forward, linear proj_in/proj_out, LoCon
convs, shortcuts, resamplers, time_emb_proj) and both text encoders (CLIP-L and OpenCLIP bigG's q/k/v/out,
fc1/fc2), then written in the three layouts SDXL LoRAs come in:
  kohya, original names   lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q, lora_te1_*, lora_te2_*
                          (what kohya's SDXL trainer writes; the names are made here by hand from the tiny
                          UNet's block layout, and diffusers reads them with its own converter)
  kohya, diffusers names  lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q, ...
  diffusers/PEFT          unet.*, text_encoder.*, text_encoder_2.* (diffusers' save_lora_weights)
UNet output and both text encoders' outputs within relative 1e-4 of diffusers', a short picture within 2
levels; a refiner (no CLIP-L) refuses lora_te1_ keys, naming the file."""

import re

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close, rel_err

import torch
from safetensors.torch import save_file

from tiny_sdxl import CLIP_G, CLIP_L, TIME_IDS_BASE, UNET, tiny_sdxl_folder, torch_sdxl_pipeline  # noqa: E402

from npdiff import NpdiffError  # noqa: E402
from npdiff import lora as npdiff_lora  # noqa: E402
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
RANK, ALPHA, SCALE = 4, 2.0, 0.7
PROMPT = "a red circle on a blue square"


# ---------------------------------------------------------------------------------------------
# Random LoRAs and the three layouts
# ---------------------------------------------------------------------------------------------
def random_lora(seed):
    """peft adapters on the tiny diffusers SDXL, filled with random numbers -> {component: {module: (down, up)}}."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = torch_sdxl_pipeline(tiny_sdxl_folder("base"))
    torch.manual_seed(seed)
    layers = {}
    for component in ("unet", *TEXT_ENCODERS):
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets),
                                        getattr(pipe, component))
        state = {name.replace(".default", ""): torch.randn_like(param) * (0.5 * param[0].numel() ** -0.5)
                 for name, param in model.named_parameters() if ".lora_" in name}  # [r,in(,k,k)], [out,r(,1,1)]
        modules = sorted({name.split(".lora_")[0] for name in state})
        layers[component] = {name: (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"])
                             for name in modules}
    return layers


RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}


def original_unet_name(name):
    """The tiny SDXL UNet's diffusers module name -> the original (sgm) one, by its block layout
    (layers_per_block entries per block, then a resampler), written out here from the SDXL UNet's
    definition, not from npdiff's key map."""
    per_block = UNET["layers_per_block"] + 1
    attention_up = ["CrossAttn" in kind for kind in UNET["up_block_types"]]
    patterns = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$",
         lambda i, j, part: f"input_blocks.{1 + int(i) * per_block + int(j)}.0.{RESNET_PARTS[part]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$",
         lambda i, j, rest: f"input_blocks.{1 + int(i) * per_block + int(j)}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", lambda i: f"input_blocks.{(int(i) + 1) * per_block}.0.op"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)$", lambda j, part: f"middle_block.{2 * int(j)}.{RESNET_PARTS[part]}"),
        (r"mid_block\.attentions\.0\.(.+)$", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$",
         lambda i, j, part: f"output_blocks.{int(i) * per_block + int(j)}.0.{RESNET_PARTS[part]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$",
         lambda i, j, rest: f"output_blocks.{int(i) * per_block + int(j)}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv$",
         lambda i: f"output_blocks.{int(i) * per_block + per_block - 1}.{2 if attention_up[int(i)] else 1}.conv"),
    ]
    for pattern, rename in patterns:
        match = re.match(pattern, name)
        if match:
            return rename(*match.groups())
    raise AssertionError(f"no original name for {name}")


def kohya_key(component, name, original_names):
    if component == "unet":
        return "lora_unet_" + (original_unet_name(name) if original_names else name).replace(".", "_")
    prefix = "lora_te1_" if component == "text_encoder" else "lora_te2_"
    return prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_")


def save_kohya(layers, path, original_names):
    tensors = {}
    for component, pairs in layers.items():
        for name, (down, up) in pairs.items():
            key = kohya_key(component, name, original_names)
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(ALPHA)})
    save_file(tensors, str(path))
    return path


def save_peft(layers, path):
    from diffusers import StableDiffusionXLPipeline as TorchPipeline

    def state(component):
        return {f"{name}.{part}.weight": tensor for name, pair in layers[component].items()
                for part, tensor in zip(("lora_A", "lora_B"), pair)}

    TorchPipeline.save_lora_weights(str(path.parent), unet_lora_layers=state("unet"),
                                    text_encoder_lora_layers=state("text_encoder"),
                                    text_encoder_2_lora_layers=state("text_encoder_2"), weight_name=path.name,
                                    safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-loras")
    layers = random_lora(31)
    return {"kohya_original": save_kohya(layers, root / "style_sgm.safetensors", original_names=True),
            "kohya_diffusers": save_kohya(layers, root / "style_kohya.safetensors", original_names=False),
            "peft": save_peft(layers, root / "style_peft.safetensors"),
            "layers": layers}


def load_ours(kind="base"):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder(kind))
    pipe.show_progress = False
    return pipe


def model_inputs(pipe, rng):
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # [B,4,h,w]
    context = rng.standard_normal((2, 77, UNET["cross_attention_dim"])).astype(np.float32)  # [B,77,D1+D2]
    text_embeds = rng.standard_normal((2, CLIP_G["projection_dim"])).astype(np.float32)  # [B,P]
    time_ids = rng.integers(0, 1024, (2, TIME_IDS_BASE)).astype(np.float32)  # [B,6]
    ids = np.asarray(pipe.tokenizer([PROMPT, "blurry"]))  # [2,77]
    ids_2 = np.asarray(pipe.tokenizer_2([PROMPT, "blurry"]))
    return sample, int(rng.integers(1, 1000)), context, {"text_embeds": text_embeds, "time_ids": time_ids}, ids, ids_2


def ours_outputs(pipe, inputs):
    sample, t, context, added, ids, ids_2 = inputs
    second = pipe.text_encoder_2(ids_2)
    return (pipe.unet(sample, t, context, added_cond_kwargs=added), pipe.text_encoder(ids),
            second.last_hidden_state, second.text_embeds)


def theirs_outputs(pipe, inputs):
    sample, t, context, added, ids, ids_2 = inputs
    with torch.no_grad():
        added = {key: torch.from_numpy(value) for key, value in added.items()}
        eps = pipe.unet(torch.from_numpy(sample), t, torch.from_numpy(context), added_cond_kwargs=added).sample
        first = pipe.text_encoder(torch.from_numpy(ids))[0]
        second = pipe.text_encoder_2(torch.from_numpy(ids_2))
    return eps.numpy(), first.numpy(), second.last_hidden_state.numpy(), second.text_embeds.numpy()


def all_weights(pipe):
    layers = {}
    for component in ("unet", *TEXT_ENCODERS):
        found = npdiff_lora.named_layers(getattr(pipe, component), component)
        layers.update({f"{component}:{name}": layer for name, layer in found.items()})
    return {name: layer.weight for name, layer in layers.items()}


# ---------------------------------------------------------------------------------------------
# Equal to diffusers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kohya_original", "kohya_diffusers", "peft"])
def test_unet_and_both_text_encoders_match_diffusers(files, rng, layout):
    ours = load_ours()
    inputs = model_inputs(ours, rng)
    base = ours_outputs(ours, inputs)
    layer_count = sum(len(pairs) for pairs in files["layers"].values())
    assert ours.load_lora_weights(files[layout], scale=SCALE).layer_count == layer_count
    got = ours_outputs(ours, inputs)

    theirs = torch_sdxl_pipeline(tiny_sdxl_folder("base"))
    theirs.load_lora_weights(str(files[layout]))
    theirs.fuse_lora(lora_scale=SCALE)
    want = theirs_outputs(theirs, inputs)
    for what, ours_out, theirs_out, before in zip(("UNet", "text_encoder", "text_encoder_2", "text_embeds"),
                                                  got, want, base):
        assert_rel_close(ours_out, theirs_out, tol=NETWORK_TOL, what=f"{layout} {what}")
        assert rel_err(before, theirs_out) > 100 * NETWORK_TOL, f"{what}: the LoRA changed nothing"


def test_picture_matches_diffusers(files, seed):
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    theirs = torch_sdxl_pipeline(tiny_sdxl_folder("base"))
    theirs.load_lora_weights(str(files["kohya_original"]))
    theirs.fuse_lora(lora_scale=SCALE)
    want = theirs(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    ours = load_ours()
    ours.load_lora_weights(files["kohya_original"], scale=SCALE)
    got = ours(PROMPT, seed=seed, output_type="np", **kwargs)
    worst = int(np.max(np.abs(np.round(got.images * 255) - np.round(want * 255))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    assert [lora["name"] for lora in got.parameters["loras"]] == ["style_sgm"]
    ours.unload_lora_weights()
    plain = ours(PROMPT, seed=seed, output_type="np", **kwargs).images
    assert np.max(np.abs(np.round(plain * 255) - np.round(want * 255))) > 10, "the LoRA barely changed the picture"


def test_original_and_diffusers_names_give_the_same_weights(files):
    fused = []
    for layout in ("kohya_original", "kohya_diffusers"):
        pipe = load_ours()
        pipe.load_lora_weights(files[layout], scale=SCALE)
        fused.append(all_weights(pipe))
    assert all(np.array_equal(fused[0][name], fused[1][name]) for name in fused[0])


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def test_refiner_refuses_a_clip_l_lora_and_changes_nothing(files, tmp_path):
    ours = load_ours("refiner")
    before = all_weights(ours)
    pairs = files["layers"]["text_encoder"]
    name = sorted(pairs)[0]
    path = tmp_path / "te1.safetensors"
    key = kohya_key("text_encoder", name, True)
    save_file({f"{key}.lora_down.weight": pairs[name][0], f"{key}.lora_up.weight": pairs[name][1]}, str(path))
    with pytest.raises(NpdiffError, match=f"{re.escape(str(path))}: LoRA key '{key}.lora_.*' is for a text_encoder, "
                                          "which this model does not have"):
        ours.load_lora_weights(path)
    assert all(weight is before[name] for name, weight in all_weights(ours).items())


def test_sdxl_lora_on_the_other_text_encoder_width_is_refused(files, tmp_path):
    """A CLIP-L LoRA written as lora_te2_ (bigG is wider) is a shape error naming both keys, not a silent fuse."""
    ours = load_ours()
    pairs = files["layers"]["text_encoder"]
    name = next(name for name in sorted(pairs) if name.endswith("q_proj"))
    key = kohya_key("text_encoder_2", name, True)
    path = tmp_path / "wrong.safetensors"
    save_file({f"{key}.lora_down.weight": pairs[name][0], f"{key}.lora_up.weight": pairs[name][1]}, str(path))
    assert CLIP_L["hidden_size"] != CLIP_G["hidden_size"]
    with pytest.raises(NpdiffError, match=r"do not fit the text_encoder_2 layer .*q_proj', whose weight is \[32,32\]"):
        ours.load_lora_weights(path)
