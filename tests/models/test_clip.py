"""npdiff's CLIPTextModel against transformers' CLIPTextModel on tiny random encoders.

Each case builds a random transformers model (SD 1.x-like quick_gelu or SD 2.x-like gelu), saves it
with safetensors the way a checkpoint would hold it (with or without the "text_model." prefix, with
or without the position_ids buffer, fp32/fp16/bf16), loads it with npdiff and compares
last_hidden_state and every hidden state on fresh random token ids.
"""

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, assert_rel_close
from tiny_clip import CLIP_KINDS, VOCAB, padded_ids, random_ids, rounded_copy, save_clip, tiny_clip

from npdiff.errors import NpdiffError
from npdiff.kernels.linear_packed import unpack_panels
from npdiff.loading import load_component_weights, read_config
from npdiff.models.clip import CLIPTextModel
from npdiff.models.packed_linear import PackedLinear

# Our float32 CLIP differs from torch's by ~5e-7 relative. The policy's bound for a whole network is
# NETWORK_TOL (1e-4); the tighter KERNEL_TOL (1e-5) holds for these small models, so it is asserted.
CLIP_TOL = KERNEL_TOL


@pytest.fixture(scope="module")
def torch_models():
    return {kind: tiny_clip(kind, seed=index + 11) for index, kind in enumerate(CLIP_KINDS)}


def torch_forward(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def torch_text_transformer(model):
    """The module holding embeddings/encoder/final_layer_norm (transformers 4.x: model.text_model; 5.x: model)."""
    return model.text_model if hasattr(model, "text_model") else model


def sample_ids(rng, kind, padded):
    positions = CLIP_KINDS[kind]["max_position_embeddings"]
    batch = int(rng.integers(2, 4))
    if padded:
        return padded_ids(rng, batch, positions)  # a prompt padded to the full length, as SD feeds it
    return random_ids(rng, batch, int(rng.integers(1, positions + 1)))  # any ids, any length


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "random"])
@pytest.mark.parametrize("prefix", [True, False], ids=["text_model.", "no-prefix"])
@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_hidden_states_match_transformers(kind, prefix, padded, torch_models, rng, tmp_path):
    model = torch_models[kind]
    folder = save_clip(model, tmp_path / "text_encoder", prefix=prefix, position_ids=prefix)
    ours = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    ids = sample_ids(rng, kind, padded)

    last, hidden_states = ours(ids, output_hidden_states=True)  # [B,L,D], num_layers+1 x [B,L,D]
    ref_last, ref_hidden_states = torch_forward(model, ids)

    assert len(hidden_states) == CLIP_KINDS[kind]["num_hidden_layers"] + 1 == len(ref_hidden_states)
    assert_rel_close(last, ref_last, CLIP_TOL, what="last_hidden_state")
    for index, (h, ref) in enumerate(zip(hidden_states, ref_hidden_states)):
        assert_rel_close(h, ref, CLIP_TOL, what=f"hidden_states[{index}]")
    plain = ours(ids)  # the plain call (its layers share one scratch state): the same bytes, kept when called again
    assert np.array_equal(plain, last)
    ours(sample_ids(rng, kind, padded))
    assert np.array_equal(plain, last) and all(np.array_equal(h, ours(ids, output_hidden_states=True)[1][i])
                                                for i, h in enumerate(hidden_states))
    assert ours.config["vocab_size"] == VOCAB and folder.is_dir()


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_layers_by_prompt_and_by_columns_give_the_same_bytes(kind, batch, torch_models, rng, tmp_path, monkeypatch):
    """Every layer in one parallel call with one prompt per thread (kernels/clip_layer_rows.py, what a batch that
    divides among the threads takes), each layer in a parallel call of its own, and the layer's steps one by one,
    each split by columns, make every element with the same serial functions in the same order: the same bytes,
    and they match transformers."""
    import npdiff.models.clip as clip_module

    model = torch_models[kind]
    ours = CLIPTextModel.from_pretrained(save_clip(model, tmp_path / "te"))
    ids = padded_ids(rng, batch, CLIP_KINDS[kind]["max_position_embeddings"])
    results = {}
    for by_prompt in (True, False):
        monkeypatch.setattr(clip_module, "runs_by_prompt", lambda batch, by_prompt=by_prompt: by_prompt)
        assert ours.runs_all_layers_by_prompt(batch) == by_prompt
        results[by_prompt] = ours(ids, output_hidden_states=True)
        results[by_prompt, "plain"] = ours(ids)  # into this thread's scratch states
    # by prompt, a parallel call a layer (CLIPEncoderLayer's own call, as it runs alone)
    monkeypatch.setattr(clip_module, "runs_by_prompt", lambda batch: True)
    states_by_layer = [ours.embed(ids)]
    for layer in ours.layers:
        states_by_layer.append(layer(states_by_layer[-1]))
    (last, states), (last_by_columns, states_by_columns) = results[True], results[False]
    assert np.array_equal(last, last_by_columns)
    assert np.array_equal(results[True, "plain"], last) and np.array_equal(results[False, "plain"], last)
    assert all(np.array_equal(a, b) for a, b in zip(states, states_by_columns))
    assert all(np.array_equal(a, b) for a, b in zip(states, states_by_layer))
    ref_last, _ = torch_forward(model, ids)
    assert_rel_close(last, ref_last, CLIP_TOL, what="last_hidden_state, by prompt")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_penultimate_layer_with_final_norm(kind, torch_models, rng, tmp_path):
    """SD 2.x and "clip skip" take final_layer_norm(hidden_states[-2])."""
    model = torch_models[kind]
    ours = CLIPTextModel.from_pretrained(save_clip(model, tmp_path / "te", prefix=False))
    ids = sample_ids(rng, kind, padded=True)
    _, hidden_states = ours(ids, output_hidden_states=True)
    _, ref_hidden_states = torch_forward(model, ids)
    with torch.no_grad():
        ref = torch_text_transformer(model).final_layer_norm(ref_hidden_states[-2])
    assert_rel_close(ours.final_layer_norm(hidden_states[-2]), ref, CLIP_TOL, what="penultimate + final norm")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_one_layer_intermediate_activations(kind, torch_models, rng, tmp_path):
    """Inside encoder layer 1: the attention output and the MLP's activation, from the same input."""
    model = torch_models[kind]
    ours = CLIPTextModel.from_pretrained(save_clip(model, tmp_path / "te"))
    ids = sample_ids(rng, kind, padded=False)
    torch_layer = torch_text_transformer(model).encoder.layers[1]
    captured = {}
    hooks = [
        torch_layer.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out[0])),
        torch_layer.mlp.activation_fn.register_forward_hook(lambda m, a, out: captured.__setitem__("act", out)),
    ]
    try:
        _, ref_hidden_states = torch_forward(model, ids)
    finally:
        for hook in hooks:
            hook.remove()

    layer = ours.layers[1]
    h = ref_hidden_states[1].numpy()                                   # layer 1's input [B,L,D]
    attention = layer.self_attn(layer.layer_norm1(h))                   # [B,L,D]
    assert_rel_close(attention, captured["attn"], CLIP_TOL, what="layer 1 self-attention output")
    after_attention = h + attention                                     # [B,L,D]
    activation = layer.mlp.activation(layer.mlp.fc1(layer.layer_norm2(after_attention)))  # [B,L,I]
    assert_rel_close(activation, captured["act"], CLIP_TOL, what=f"layer 1 MLP {CLIP_KINDS[kind]['hidden_act']}")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_files_match_rounded_transformers(dtype, torch_models, rng, tmp_path):
    """An fp16/bf16 file is widened to float32 and matches the torch model with the same rounded weights."""
    model = torch_models["sd1"]
    folder = save_clip(model, tmp_path / "te", dtype=dtype, variant="fp16" if dtype == "fp16" else None)
    ours = CLIPTextModel.from_pretrained(folder, variant="fp16" if dtype == "fp16" else None)
    ids = sample_ids(rng, "sd1", padded=True)
    ref_last, _ = torch_forward(rounded_copy(model, dtype), ids)
    assert_rel_close(ours(ids), ref_last, CLIP_TOL, what=f"{dtype} weights")


def test_added_token_embeddings_match_resized_transformers(torch_models, rng, tmp_path):
    """Textual inversion: rows appended to the table behave as transformers' resized embedding."""
    model = tiny_clip("sd1_narrow", seed=5)
    ours = CLIPTextModel.from_pretrained(save_clip(model, tmp_path / "te"))
    width = CLIP_KINDS["sd1_narrow"]["hidden_size"]
    vectors = rng.standard_normal((3, width)).astype(np.float32)  # [n,D]
    new_ids = ours.add_token_embeddings(vectors)
    assert new_ids == [VOCAB, VOCAB + 1, VOCAB + 2] and ours.config["vocab_size"] == VOCAB + 3

    model.resize_token_embeddings(VOCAB + 3)
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB:] = torch.from_numpy(vectors)
    ids = padded_ids(rng, 2, CLIP_KINDS["sd1_narrow"]["max_position_embeddings"])
    ids[:, 1:4] = new_ids  # the new tokens inside a prompt
    ref_last, _ = torch_forward(model, ids)
    assert_rel_close(ours(ids), ref_last, CLIP_TOL, what="with added tokens")


def test_bad_input_ids(torch_models, tmp_path):
    ours = CLIPTextModel.from_pretrained(save_clip(torch_models["sd1_narrow"], tmp_path / "te"))
    positions = CLIP_KINDS["sd1_narrow"]["max_position_embeddings"]
    cases = [
        (np.zeros(5, dtype=np.int64), "shape [B,L]"),
        (np.zeros((2, 5), dtype=np.float32), "must be integers"),
        (np.zeros((1, positions + 1), dtype=np.int64), f"max_position_embeddings {positions}"),
        (np.full((1, 4), VOCAB, dtype=np.int64), f"[0, {VOCAB})"),
        (np.full((1, 4), -1, dtype=np.int64), f"[0, {VOCAB})"),
    ]
    for ids, message in cases:
        with pytest.raises(NpdiffError, match="input_ids") as info:
            ours(ids)
        assert message in str(info.value)
    with pytest.raises(NpdiffError, match=r"vectors must have shape \[n,64\]"):
        ours.add_token_embeddings(np.zeros((2, 63), dtype=np.float32))


def test_config_and_weights_that_do_not_fit(torch_models, tmp_path):
    folder = save_clip(torch_models["sd1_narrow"], tmp_path / "te")
    config = read_config(folder)

    wrong_width = {**config, "hidden_size": 32, "num_attention_heads": 2}
    with pytest.raises(NpdiffError, match=r"key 'text_model.embeddings.token_embedding.weight' in .*model"
                                          r"\.safetensors has shape \(1000, 64\); the config expects \(1000, 32\)"):
        CLIPTextModel(wrong_width, load_component_weights(folder))

    fewer_layers = {**config, "num_hidden_layers": 1}
    with pytest.raises(NpdiffError,
                       match=r"unexpected keys in .*model\.safetensors.*'text_model\.encoder\.layers\.1\."):
        CLIPTextModel(fewer_layers, load_component_weights(folder))

    with pytest.raises(NpdiffError, match="hidden_act 'relu6' is not supported"):
        CLIPTextModel({**config, "hidden_act": "relu6"}, load_component_weights(folder))


def test_projection_weights_are_packed_and_assignable(torch_models, rng, tmp_path):
    """CLIP's Linears keep their weight packed in column panels (PackedLinear: linear_packed's operand);
    `weight` still reads as the torch-layout [out,in] array, and assigning one (as LoRA fusing does) packs
    it again and changes the output as the torch model with the same weight, while assigning back the
    original keeps that very object."""
    model = torch_models["sd1"]
    ours = CLIPTextModel.from_pretrained(save_clip(model, tmp_path / "te"))
    torch_layer = torch_text_transformer(model).encoder.layers[0]
    fc1 = ours.layers[0].mlp.fc1
    assert isinstance(fc1, PackedLinear) and fc1.weight.shape == tuple(torch_layer.mlp.fc1.weight.shape)
    assert np.array_equal(fc1.weight, torch_layer.mlp.fc1.weight.detach().numpy())
    assert np.array_equal(unpack_panels(fc1.panels, fc1.weight.shape[0]), fc1.weight)

    original, panels = fc1.weight, fc1.panels
    changed = rng.standard_normal(original.shape, dtype=np.float32) * np.float32(0.05)  # C-ordered [out,in]
    fc1.weight = changed
    assert fc1.weight is changed and np.array_equal(unpack_panels(fc1.panels, changed.shape[0]), changed)
    assert fc1.panels is panels  # repacked in place: the model's one block of panels stays whole
    ids = sample_ids(rng, "sd1", padded=True)
    with torch.no_grad():
        saved = torch_layer.mlp.fc1.weight.detach().clone()
        torch_layer.mlp.fc1.weight.copy_(torch.from_numpy(changed))
        try:
            ref_last, _ = torch_forward(model, ids)
        finally:
            torch_layer.mlp.fc1.weight.copy_(saved)
    assert_rel_close(ours(ids), ref_last, CLIP_TOL, what="last_hidden_state with a replaced fc1 weight")
    fc1.weight = original
    assert fc1.weight is original
