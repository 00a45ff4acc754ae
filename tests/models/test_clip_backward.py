"""CLIP's backward (npdiff/models/clip_backward.py) against torch.autograd through transformers'
CLIPTextModel on tiny random encoders: d(loss)/d(token embeddings) within 1e-4, SD 1.x (quick_gelu)
and SD 2.x (gelu), the last hidden state, clip_skip (the final norm over an earlier layer) and the
un-normed penultimate layer. The loss is sum(hidden * R) for a fresh random R, so d loss/d hidden = R;
the token embeddings are made a leaf by a forward hook on embeddings.token_embedding."""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from tiny_clip import padded_ids, save_clip, tiny_clip

from npdiff.errors import NpdiffError
from npdiff.models import clip_backward as clip_backward_module
from npdiff.models.clip import CLIPTextModel
from npdiff.models.clip_backward import (
    clip_backward,
    clip_forward_for_backward,
    clip_token_embeds,
)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def clip_pair(request, tmp_path_factory):
    torch_model = tiny_clip(request.param, seed=5)
    folder = save_clip(torch_model, tmp_path_factory.mktemp(f"clip-{request.param}"))
    return request.param, torch_model, CLIPTextModel.from_pretrained(folder)


def torch_token_embeds_grad(model, ids, grad_hidden, clip_skip=None, final_norm=True, token_embeds=None):
    """d(sum(hidden * grad_hidden))/d(token embeddings) by autograd -> (hidden, grad [B,L,D]). token_embeds:
    what the token embedding hands on instead of its rows for ids (default: those rows)."""
    text_model = model.text_model if hasattr(model, "text_model") else model
    if token_embeds is None:
        token_embeds = text_model.embeddings.token_embedding(torch.from_numpy(ids)).detach().numpy()
    leaf = torch.from_numpy(token_embeds).requires_grad_(True)
    handle = text_model.embeddings.token_embedding.register_forward_hook(lambda module, args, out: leaf)
    try:
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    finally:
        handle.remove()
    skip = 0 if clip_skip is None else clip_skip
    if final_norm:
        hidden = out.last_hidden_state if clip_skip is None else text_model.final_layer_norm(out.hidden_states[-(skip + 1)])
    else:
        hidden = out.hidden_states[-(skip + 1)]
    hidden.backward(torch.from_numpy(grad_hidden))
    return hidden.detach(), leaf.grad


@pytest.mark.parametrize("keep_states", [True, False])  # layer internals kept, or recomputed (packed bf16 weights)
@pytest.mark.parametrize("clip_skip,final_norm", [(None, True), (1, True), (1, False), ("all", True)])
def test_clip_backward_matches_autograd(clip_pair, rng, clip_skip, final_norm, keep_states, monkeypatch):
    kind, torch_model, ours = clip_pair
    if not keep_states:
        monkeypatch.setattr(clip_backward_module, "keeps_states", lambda layer: False)
    clip_skip = len(ours.layers) if clip_skip == "all" else clip_skip  # the embeddings through the final norm
    batch = int(rng.integers(1, 3))
    ids = padded_ids(rng, batch, 77)                                    # [B,77]
    grad_hidden = rng.standard_normal((batch, 77, ours.config["hidden_size"]), dtype=np.float32)
    expected_hidden, expected_grad = torch_token_embeds_grad(torch_model, ids, grad_hidden, clip_skip, final_norm)

    token_embeds = clip_token_embeds(ours, ids)                         # [B,77,D]
    hidden, tape = clip_forward_for_backward(ours, token_embeds, clip_skip, final_norm)
    assert_rel_close(hidden, expected_hidden, NETWORK_TOL, f"{kind} forward")
    grad = tape.backward(grad_hidden)
    assert grad.shape == token_embeds.shape
    assert_rel_close(grad, expected_grad, NETWORK_TOL, f"{kind} d token embeddings")
    with pytest.raises(NpdiffError, match="used already"):
        tape.backward(grad_hidden)


def test_clip_backward_short_sequence_and_random_embeddings(clip_pair, rng):
    """Any token embeddings (not only table rows), any length up to 77: the same as autograd."""
    kind, torch_model, ours = clip_pair
    length = int(rng.integers(3, 20))
    dim = ours.config["hidden_size"]
    token_embeds = rng.standard_normal((2, length, dim), dtype=np.float32)
    grad_hidden = rng.standard_normal((2, length, dim), dtype=np.float32)
    ids = padded_ids(rng, 2, length)                                    # only the pooling reads them
    _, expected_grad = torch_token_embeds_grad(torch_model, ids, grad_hidden, token_embeds=token_embeds)
    grad = clip_backward(ours, token_embeds, grad_hidden)
    assert_rel_close(grad, expected_grad, NETWORK_TOL, f"{kind} d token embeddings, length {length}")


def test_clip_backward_refuses_bad_input(clip_pair):
    _, _, ours = clip_pair
    dim = ours.config["hidden_size"]
    with pytest.raises(NpdiffError, match="clip_skip"):
        clip_forward_for_backward(ours, np.zeros((1, 77, dim), np.float32), clip_skip=len(ours.layers) + 1)
    with pytest.raises(NpdiffError, match="token embeddings must have shape"):
        clip_forward_for_backward(ours, np.zeros((1, 77, dim + 1), np.float32))
    _, tape = clip_forward_for_backward(ours, np.zeros((1, 77, dim), np.float32))
    with pytest.raises(NpdiffError, match="gradient must have shape"):
        tape.backward(np.zeros((1, 76, dim), np.float32))
