"""LyCORIS LoHa and LoKr files (kohya naming) against their rule written out in torch, and pictures against
diffusers' pipeline whose weights were set to the torch-fused ones.

The reference here is webui's (extensions-builtin/Lora network_hada.py, network_lokr.py, lyco_helpers.py,
network.py) restated with torch ops, independently of npdiff/lycoris.py:
    LoHa  update = (w1a @ w1b) * (w2a @ w2b), or Tucker einsum("ijkl,jr,ip->prkl", t, wb, wa) per factor;
          dim = hada_w1_b.shape[0]
    LoKr  update = torch.kron(w1, w2) (w1 unsqueezed to 4 axes when w2 has 4), each half whole, a @ b, or
          Tucker; dim = lokr_w2_b.shape[0] if present, else lokr_w1_b.shape[0] if present, else none
    W' = W + scale * (alpha / dim if alpha and dim else 1) * update.reshape(W.shape)
Random files cover linear layers (attention, feed-forward, time embedding, text encoder), 1x1 convs
(proj_in/out), 3x3 convs and shortcuts, every LoKr form (whole halves, either half decomposed, both, Tucker)
and LoHa with and without Tucker and alpha. Bad files are refused before any weight moves."""

import numpy as np
import pytest

from helpers import IMAGE_LEVELS_TOL, assert_rel_close, rel_err

import torch
from safetensors.torch import save_file

from tiny_sd import tiny_sd_folder, torch_pipeline  # noqa: E402
from lora_helpers import all_weights, load_ours  # noqa: E402

from npdiff import NpdiffError  # noqa: E402
from npdiff import lora as npdiff_lora  # noqa: E402

SCALE = 0.8
PROMPT = "a red circle on a blue square"
UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
               "down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_out",
               "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "mid_block.resnets.0.conv1",
               "up_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.resnets.1.time_emb_proj",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "conv_in"]
TEXT_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1",
               "text_model.encoder.layers.1.mlp.fc2"]
# forms of each kind, given to the layers in turn (Tucker forms only to convolutions of kernel > 1)
LOHA_FORMS = ["plain", "tucker", "plain_4d_b", "no_alpha"]
LOKR_FORMS = ["w2_decomposed", "tucker", "w1_decomposed", "both_decomposed", "whole"]


# ---------------------------------------------------------------------------------------------
# Random LoHa / LoKr files and the torch rule
# ---------------------------------------------------------------------------------------------
def split(n):
    """n -> (a, b), a * b = n, a the largest divisor <= sqrt(n) (LoKr's two halves of a dimension)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def kohya_name(name):
    if name.startswith("text_model."):
        return "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")
    return "lora_unet_" + name.replace(".", "_")


def loha_parts(shape, form, random, rank=3):
    out, rest, kernel = shape[0], shape[1:], shape[2:]
    flat = int(np.prod(rest))
    if form == "tucker":
        return {"hada_w1_a": random(rank, out), "hada_w1_b": random(rank, rest[0]), "hada_t1": random(rank, rank, *kernel),
                "hada_w2_a": random(rank, out), "hada_w2_b": random(rank, rest[0]), "hada_t2": random(rank, rank, *kernel)}
    b_shape = (rank, *rest) if form == "plain_4d_b" else (rank, flat)
    return {"hada_w1_a": random(out, rank), "hada_w1_b": random(*b_shape),
            "hada_w2_a": random(out, rank), "hada_w2_b": random(*b_shape)}


def lokr_parts(shape, form, random, rank=2):
    (o1, o2), (i1, i2), kernel = split(shape[0]), split(shape[1]), tuple(shape[2:])
    parts = {}
    if form in ("w1_decomposed", "both_decomposed"):
        parts.update(lokr_w1_a=random(o1, rank), lokr_w1_b=random(rank, i1))
    else:
        parts.update(lokr_w1=random(o1, i1))
    if form in ("w2_decomposed", "both_decomposed"):
        rank2 = rank + 1  # dim is w2_b's rank when both halves are decomposed
        parts.update(lokr_w2_a=random(o2, rank2), lokr_w2_b=random(rank2, i2 * int(np.prod(kernel))))
    elif form == "tucker":
        parts.update(lokr_t2=random(rank, rank, *kernel), lokr_w2_a=random(rank, o2), lokr_w2_b=random(rank, i2))
    else:
        parts.update(lokr_w2=random(o2, i2, *kernel))
    return parts


def tucker(t, a, b):
    """webui's make_weight_cp: t [r1,r2,k,k], a [r1,out], b [r2,in] -> [out,in,k,k]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def torch_update(kind, parts, shape):
    """The rule with torch ops -> (update in the layer's shape, dim or None)."""
    if kind == "loha":
        factors = []
        for n in ("1", "2"):
            a, b = parts[f"hada_w{n}_a"], parts[f"hada_w{n}_b"]
            if f"hada_t{n}" in parts:
                factors.append(tucker(parts[f"hada_t{n}"], a, b))
            else:
                factors.append(a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1))
        return (factors[0].reshape(shape) * factors[1].reshape(shape)), parts["hada_w1_b"].shape[0]
    dim = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        w1, dim = parts["lokr_w1_a"] @ parts["lokr_w1_b"], parts["lokr_w1_b"].shape[0]
    w2 = parts.get("lokr_w2")
    if "lokr_t2" in parts:
        w2, dim = tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]), parts["lokr_w2_b"].shape[0]
    elif w2 is None:
        w2, dim = parts["lokr_w2_a"] @ parts["lokr_w2_b"], parts["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape), dim  # webui makes w2 contiguous too


def torch_state(pipe):
    """{module name: torch weight} of the diffusers UNet and text encoder (names as in the file)."""
    state = {name.removesuffix(".weight"): tensor for name, tensor in pipe.unet.state_dict().items()}
    for name, tensor in pipe.text_encoder.state_dict().items():  # "text_model." in transformers 4, not in 5
        state["text_model." + name.removeprefix("text_model.").removesuffix(".weight")] = tensor
    return state  # the tensors share the models' memory


def make_lycoris(kind, seed, path, alpha=1.5):
    """A LoHa or LoKr file over UNET_LAYERS and TEXT_LAYERS -> (path, {module name: torch-fused weight})."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.4

    pipe = torch_pipeline(tiny_sd_folder())
    state = torch_state(pipe)
    forms = LOHA_FORMS if kind == "loha" else LOKR_FORMS
    tensors, fused, turn = {}, {}, 0
    for name in UNET_LAYERS + TEXT_LAYERS:
        shape = tuple(state[name].shape)
        choices = [form for form in forms if form != "tucker" or (len(shape) == 4 and shape[2] > 1)]
        form = choices[turn % len(choices)]
        turn += 1
        parts = (loha_parts if kind == "loha" else lokr_parts)(shape, form, random)
        tensors.update({f"{kohya_name(name)}.{part}": value for part, value in parts.items()})
        if form != "no_alpha":
            tensors[f"{kohya_name(name)}.alpha"] = torch.tensor(alpha)
        update, dim = torch_update(kind, parts, shape)
        multiplier = alpha / dim if dim is not None and form != "no_alpha" else 1.0
        fused[name] = state[name] + SCALE * multiplier * update
    save_file(tensors, str(path))
    return path, fused


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    return {kind: make_lycoris(kind, seed, root / f"{kind}.safetensors") for kind, seed in (("loha", 21), ("lokr", 22))}


# ---------------------------------------------------------------------------------------------
# Equal to the rule, and the picture to diffusers with those weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_fused_weights_match_the_torch_rule(folder, files, kind):
    path, expected = files[kind]
    ours = load_ours(folder)
    originals = all_weights(ours)
    record = ours.load_lora_weights(path, scale=SCALE)
    assert record.layer_count == len(expected)
    fused = all_weights(ours)
    for name, weight in expected.items():
        key = name.removeprefix("text_model.")
        want = weight.numpy().reshape(fused[key].shape)
        assert_rel_close(np.asarray(fused[key]), want, tol=1e-6, what=f"{kind} {name}")
        change = want.astype(np.float64) - originals[key]
        assert rel_err(np.asarray(fused[key], np.float64) - originals[key], change) < 1e-5, name
        assert np.linalg.norm(change) > 0.05 * np.linalg.norm(originals[key]), f"{name}: the update is too small to test"
    assert sum(name.removeprefix("text_model.") in fused for name in expected) == len(expected)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_picture_matches_diffusers_with_the_torch_fused_weights(folder, files, seed, kind):
    path, expected = files[kind]
    theirs = torch_pipeline(folder, "euler")
    state = torch_state(theirs)
    with torch.no_grad():
        for name, weight in expected.items():
            state[name].copy_(weight)
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0)
    want = theirs(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    ours = load_ours(folder)
    plain = ours(PROMPT, seed=seed, output_type="np", **kwargs).images
    ours.load_lora_weights(path, scale=SCALE)
    got = ours(PROMPT, seed=seed, output_type="np", **kwargs).images
    worst = int(np.max(np.abs(np.round(got * 255) - np.round(want * 255))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    assert np.max(np.abs(np.round(plain * 255) - np.round(want * 255))) > 10, "the file barely changed the picture"


def test_lycoris_and_lora_layers_stack_and_unload(folder, files, tmp_path):
    """Two LyCORIS files loaded one after the other add their updates; unloading restores the originals."""
    ours = load_ours(folder)
    originals = all_weights(ours)
    ours.load_lora_weights(files["loha"][0], scale=SCALE)
    ours.load_lora_weights(files["lokr"][0], scale=SCALE)
    fused = all_weights(ours)
    for name in files["loha"][1]:
        key = name.removeprefix("text_model.")
        both = files["loha"][1][name].numpy() + files["lokr"][1][name].numpy() - originals[key].reshape(
            files["loha"][1][name].shape)
        assert_rel_close(np.asarray(fused[key]), both.reshape(fused[key].shape), tol=1e-6, what=name)
    ours.unload_lora_weights()
    assert all(weight is originals[name] for name, weight in all_weights(ours).items())


# ---------------------------------------------------------------------------------------------
# Bad files: refused before any weight moves
# ---------------------------------------------------------------------------------------------
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"   # weight [32,32]
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                                  # weight [32,32,3,3]


def zeros(*shape):
    return torch.full(shape, 0.01)


@pytest.mark.parametrize("tensors,message", [
    ({f"{LINEAR}.hada_w1_a": zeros(32, 4), f"{LINEAR}.hada_w1_b": zeros(4, 32), f"{LINEAR}.hada_w2_a": zeros(32, 4)},
     "has no hada_w2_b: a LoHa layer needs"),
    ({f"{LINEAR}.hada_w1_a": zeros(32, 4), f"{LINEAR}.hada_w1_b": zeros(4, 32), f"{LINEAR}.hada_w2_a": zeros(32, 4),
      f"{LINEAR}.hada_w2_b": zeros(4, 16)}, r"do not make an update of the unet layer .*attn1.to_q', whose weight is \[32,32\]"),
    ({f"{CONV}.hada_w1_a": zeros(32, 4), f"{CONV}.hada_w1_b": zeros(4, 32), f"{CONV}.hada_w2_a": zeros(32, 4),
      f"{CONV}.hada_w2_b": zeros(4, 32)}, r"whose weight is \[32,32,3,3\]"),
    ({f"{LINEAR}.lokr_w1": zeros(4, 4), f"{LINEAR}.lokr_w2_a": zeros(8, 2)}, "has no lokr_w2_b: a LoKr layer needs"),
    ({f"{LINEAR}.lokr_w1": zeros(4, 4), f"{LINEAR}.lokr_w2": zeros(8, 4)}, r"'.*lokr_w2' \[8,4\] do not make an update"),
    ({f"{LINEAR}.lokr_w1": zeros(4, 4), f"{LINEAR}.lokr_w1_a": zeros(4, 2), f"{LINEAR}.lokr_w1_b": zeros(2, 4),
      f"{LINEAR}.lokr_w2": zeros(8, 8)}, "has lokr_w1 and lokr_w1_a/_b"),
    ({f"{CONV}.lokr_w1": zeros(4, 4), f"{CONV}.lokr_w2": zeros(8, 8, 3, 3), f"{CONV}.lora_up.weight": zeros(32, 4)},
     "has keys of lokr, lora; expected the parts of one kind"),
    ({f"{CONV}.lokr_w1": zeros(4, 4), f"{CONV}.lokr_w2": torch.full((8, 8, 3, 3), float("nan"))},
     r"'lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2' holds 576 non-finite values"),
    ({f"{CONV}.diff": zeros(32, 32, 3, 3)}, "other LyCORIS kinds .* are not supported"),
    ({f"{LINEAR}.lokr_w1": torch.tensor(1.0), f"{LINEAR}.lokr_w2": zeros(8, 8)},
     r"'.*lokr_w1' has shape \[\]; expected a matrix"),
    ({f"{LINEAR}.hada_w1_a": zeros(32, 0), f"{LINEAR}.hada_w1_b": zeros(0, 32), f"{LINEAR}.hada_w2_a": zeros(32, 4),
      f"{LINEAR}.hada_w2_b": zeros(4, 32)}, r"'.*hada_w1_a' has shape \[32,0\]; expected a matrix"),
])
def test_bad_lycoris_files_change_nothing(folder, files, tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    good = {f"lora_unet_conv_in.lokr_w1": zeros(4, 2), "lora_unet_conv_in.lokr_w2": zeros(8, 2, 3, 3)}  # [32,4,3,3]
    save_file({**good, **tensors}, str(path))
    ours = load_ours(folder)
    ours.load_lora_weights(files["lokr"][0])
    before = all_weights(ours)
    with pytest.raises(NpdiffError, match=message) as caught:
        ours.load_lora_weights(path)
    assert str(path) in str(caught.value)
    assert all(weight is before[name] for name, weight in all_weights(ours).items())
    assert [lora["name"] for lora in npdiff_lora.lora_parameters(ours)] == ["lokr"]


def test_sdxl_original_names_and_second_text_encoder(tmp_path):
    """One file mixing LoKr and LoHa layers on the tiny SDXL: kohya's original (sgm) UNet names and lora_te2_
    (OpenCLIP bigG), against the torch rule on diffusers' weights. The original names are written here from
    the tiny SDXL UNet's layout (1 layer per block: input_blocks.3 is down_blocks.1's first entry)."""
    from tiny_sdxl import tiny_sdxl_folder, torch_sdxl_pipeline

    from npdiff.pipeline_sdxl import StableDiffusionXLPipeline

    theirs = torch_sdxl_pipeline(tiny_sdxl_folder("base"))
    state = {name.removesuffix(".weight"): tensor for name, tensor in theirs.unet.state_dict().items()}
    for name, tensor in theirs.text_encoder_2.state_dict().items():
        state["text_encoder_2:" + name.removeprefix("text_model.").removesuffix(".weight")] = tensor
    layers = {  # file key -> (component, module name, kind, form)
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k":
            ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "lokr", "w2_decomposed"),
        "lora_unet_output_blocks_1_0_in_layers_2": ("unet", "up_blocks.0.resnets.1.conv1", "loha", "tucker"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2":
            ("text_encoder_2", "text_encoder_2:encoder.layers.1.mlp.fc2", "loha", "plain"),
    }
    generator = torch.Generator().manual_seed(5)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.4

    tensors, expected = {}, {}
    for key, (component, name, kind, form) in layers.items():
        shape = tuple(state[name].shape)
        parts = (loha_parts if kind == "loha" else lokr_parts)(shape, form, random)
        tensors.update({f"{key}.{part}": value for part, value in parts.items()})
        tensors[f"{key}.alpha"] = torch.tensor(1.5)
        update, dim = torch_update(kind, parts, shape)
        expected[component, name.split(":")[-1]] = state[name] + SCALE * (1.5 / dim) * update
    path = tmp_path / "sdxl_lycoris.safetensors"
    save_file(tensors, str(path))
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"))
    assert ours.load_lora_weights(path, scale=SCALE).layer_count == 3
    for (component, name), weight in expected.items():
        fused = npdiff_lora.named_layers(getattr(ours, component), component)[name].weight
        assert_rel_close(np.asarray(fused), weight.numpy().reshape(fused.shape), tol=1e-6, what=name)


def test_locon_tucker_form_matches_the_torch_rule(folder, tmp_path):
    """LoCon with a middle part (LyCORIS's Tucker LoCon, webui's rebuild_cp_decomposition):
    update = einsum("nmkl,in,mj->ijkl", mid, up, down), dim = lora_down's rank; with and without alpha."""
    pipe = torch_pipeline(folder)
    state = torch_state(pipe)
    generator = torch.Generator().manual_seed(9)
    tensors, expected = {}, {}
    for i, name in enumerate(["down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv2", "conv_in"]):
        out, inputs, kernel = state[name].shape[0], state[name].shape[1], state[name].shape[2:]
        up = torch.randn(out, 3, 1, 1, generator=generator) * 0.4             # [out,r1,1,1]
        mid = torch.randn(3, 2, *kernel, generator=generator) * 0.4           # [r1,r2,k,k]
        down = torch.randn(2, inputs, 1, 1, generator=generator) * 0.4        # [r2,in,1,1]
        key = kohya_name(name)
        tensors.update({f"{key}.lora_up.weight": up, f"{key}.lora_mid.weight": mid, f"{key}.lora_down.weight": down})
        multiplier = 1.0
        if i != 2:
            tensors[f"{key}.alpha"] = torch.tensor(1.5)
            multiplier = 1.5 / 2  # alpha / lora_down's rank
        update = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
        expected[name] = state[name] + SCALE * multiplier * update
    path = tmp_path / "locon_tucker.safetensors"
    save_file(tensors, str(path))
    ours = load_ours(folder)
    assert ours.load_lora_weights(path, scale=SCALE).layer_count == 3
    fused = all_weights(ours)
    for name, weight in expected.items():
        assert_rel_close(np.asarray(fused[name]), weight.numpy(), tol=1e-6, what=name)
    del tensors[f"{kohya_name('conv_in')}.lora_up.weight"]
    save_file(tensors, str(path))
    with pytest.raises(NpdiffError, match="'conv_in' .* has no up: a LoCon layer in Tucker form needs"):
        load_ours(folder).load_lora_weights(path)
