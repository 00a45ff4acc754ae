"""npdiff's CLIPTextModelWithProjection against transformers' on tiny random encoders.

SDXL's text_encoder_2 is OpenCLIP ViT-bigG as transformers' CLIPTextModelWithProjection: gelu, a
bias-free text_projection, eos_token_id 2 in its config (the legacy value: pool at the argmax of the
ids). Compared here: text_embeds (the pooled, projected output), last_hidden_state and every hidden
state (hidden_states[-2] is what SDXL conditions on), for the legacy eos_token_id and for a real one
(first end token; a row without one pools position 0), with the ids SDXL's tokenizers give (padded
with "!" = id 0 for tokenizer_2, with the end token for tokenizer) and with any ids.
"""

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close
from tiny_clip import BOS, EOS, VOCAB, random_ids

from npdiff.errors import NpdiffError
from npdiff.models import CLIPTextModelWithProjection

# bigG-like: gelu, head width 64 (bigG: 1280 wide, 20 heads, 32 layers, projection 1280)
KINDS = {
    "legacy-eos": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                       projection_dim=96, hidden_act="gelu", eos_token_id=2),
    "eos-id": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                   projection_dim=64, hidden_act="gelu", eos_token_id=EOS),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def clip_pair(request, tmp_path_factory):
    """(kind, transformers model, npdiff model) from the same saved folder."""
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection as TorchModel

    config = CLIPTextConfig(vocab_size=VOCAB, bos_token_id=BOS, pad_token_id=1, layer_norm_eps=1e-5,
                            max_position_embeddings=77, **KINDS[request.param])
    torch.manual_seed(len(request.param))
    model = TorchModel(config)
    with torch.no_grad():  # every parameter random, O(1) activations
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.eval()
    folder = tmp_path_factory.mktemp(request.param) / "text_encoder_2"
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, CLIPTextModelWithProjection.from_pretrained(folder)


def sdxl_padded_ids(rng, batch, length, pad):
    """<|startoftext|> words <|endoftext|> then `pad` (tokenizer_2 pads with "!", id 0)."""
    ids = np.full((batch, length), pad, dtype=np.int64)
    for row in range(batch):
        words = int(rng.integers(1, length - 1))
        ids[row, 0] = BOS
        ids[row, 1:1 + words] = rng.integers(1, VOCAB - 2, size=words)
        ids[row, 1 + words] = EOS
    return ids


def ids_with_scattered_end_tokens(rng, batch, length):
    """Any ids; rows 1.. hold the end token at 1-3 random places, row 0 holds none."""
    ids = rng.integers(0, VOCAB - 1, size=(batch, length), dtype=np.int64)
    for row in range(1, batch):
        ids[row, rng.choice(length, size=min(length, int(rng.integers(1, 4))), replace=False)] = EOS
    return ids


@pytest.mark.parametrize("ids_kind", ["pad-0", "pad-eos", "random", "scattered-eos"])
def test_projection_encoder_matches_transformers(clip_pair, rng, ids_kind):
    kind, model, ours = clip_pair
    batch = int(rng.integers(2, 4))
    if ids_kind == "pad-0":
        ids = sdxl_padded_ids(rng, batch, 77, pad=0)
    elif ids_kind == "pad-eos":
        ids = sdxl_padded_ids(rng, batch, 77, pad=EOS)
    elif ids_kind == "random":
        ids = random_ids(rng, batch, int(rng.integers(1, 78)))
    else:
        ids = ids_with_scattered_end_tokens(rng, batch, int(rng.integers(3, 78)))

    out = ours(ids, output_hidden_states=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    assert out.text_embeds.shape == (batch, KINDS[kind]["projection_dim"]) and out.text_embeds.dtype == np.float32
    assert_rel_close(out.text_embeds, ref.text_embeds, NETWORK_TOL, f"{kind} text_embeds")
    assert_rel_close(out.last_hidden_state, ref.last_hidden_state, KERNEL_TOL, f"{kind} last_hidden_state")
    assert len(out.hidden_states) == len(ref.hidden_states) == KINDS[kind]["num_hidden_layers"] + 1
    for i, (mine, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_rel_close(mine, theirs, KERNEL_TOL, f"{kind} hidden_states[{i}]")
    # the pooled row is taken where transformers takes it (a wrong row would differ by O(1))
    rows = np.arange(batch)
    pooled_ref = ref.last_hidden_state[rows, torch.from_numpy(ours.end_positions(ids))]
    assert_rel_close(model.text_projection(pooled_ref).detach(), ref.text_embeds, 1e-6, f"{kind} end positions")


def test_hidden_states_only_when_asked(clip_pair, rng):
    _, _, ours = clip_pair
    out = ours(sdxl_padded_ids(rng, 2, 77, pad=0))
    assert out.hidden_states is None and out.last_hidden_state.shape[:2] == (2, 77)


def test_projection_config_errors(clip_pair, tmp_path):
    import json

    from npdiff.loading import load_component_weights

    kind, model, _ = clip_pair
    folder = tmp_path / "te2"
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(NpdiffError, match=r"text_projection\.weight.*\(\d+, \d+\).*\(7, \d+\)"):
        CLIPTextModelWithProjection({**config, "projection_dim": 7}, load_component_weights(folder))
    with pytest.raises(NpdiffError, match="eos_token_id"):
        CLIPTextModelWithProjection({**config, "eos_token_id": [2, 3]}, load_component_weights(folder))
    # a plain CLIPTextModel refuses the projection it does not use, naming it
    from npdiff.models import CLIPTextModel

    with pytest.raises(NpdiffError, match="text_projection.weight"):
        CLIPTextModel(config, load_component_weights(folder))


def test_large_encoders_keep_the_mapped_weights(clip_pair, rng, tmp_path, monkeypatch):
    """Above TRANSPOSED_COPY_LIMIT (bigG: 2.5 GB of packed copies) the layers are plain Linear over the mapped
    weights, no private copies; the outputs are the same as transformers'."""
    import npdiff.models.clip as clip
    from npdiff.models.blocks import Linear
    from npdiff.models.packed_linear import PackedLinear

    kind, model, small = clip_pair
    assert small.linear is PackedLinear  # the tiny encoders are far below the limit
    monkeypatch.setattr(clip, "TRANSPOSED_COPY_LIMIT", 0)
    folder = tmp_path / "te2"
    model.save_pretrained(folder, safe_serialization=True)
    ours = CLIPTextModelWithProjection.from_pretrained(folder)
    assert ours.linear is Linear and type(ours.layers[0].mlp.fc1) is Linear and type(ours.text_projection) is Linear
    ids = sdxl_padded_ids(rng, 2, 77, pad=0)
    out = ours(ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))
    assert_rel_close(out.text_embeds, ref.text_embeds, NETWORK_TOL, f"{kind} text_embeds, plain Linear")
    assert_rel_close(out.last_hidden_state, ref.last_hidden_state, KERNEL_TOL, f"{kind} last_hidden_state")
