"""The UNet's backward (npdiff/models/unet_backward.py) against torch.autograd through diffusers'
UNet2DConditionModel on tiny random models: d(loss)/d(encoder_hidden_states), d(loss)/d(sample) and
the attention projections' weight gradients (LoRA) within 1e-4, SD 1.x (1x1-conv projections),
SD 2.x (linear projections, other heads, freq_shift), SDXL (text_time) and an LCM UNet; and the
timestep embedding's backward. The loss is sum(output * R) for a fresh random R, so d loss/d output = R."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close
from tiny_models import tiny_unet

from npdiff.errors import NpdiffError
from npdiff.models import UNet2DConditionModel
from npdiff.models.blocks import TimestepEmbedding as OurTimestepEmbedding
from npdiff.models.blocks_backward import (
    timestep_embedding_backward,
    timestep_mlp_backward,
)
from npdiff.models.unet_backward import unet_backward, unet_forward_for_backward

LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request):
    torch_model, folder = tiny_unet(request.param, seed=0)
    return request.param, torch_model, UNet2DConditionModel.from_pretrained(folder)


def torch_grads(model, sample, timestep, context, grad_output, **extra):
    sample_t = torch.from_numpy(sample).requires_grad_(True)
    context_t = torch.from_numpy(context).requires_grad_(True)
    model.zero_grad()
    out = model(sample_t, timestep, context_t, **extra).sample
    out.backward(torch.from_numpy(grad_output))
    return out.detach(), sample_t.grad, context_t.grad


def random_case(rng, config, batch, height, width, tokens):
    sample = rng.standard_normal((batch, config["in_channels"], height, width), dtype=np.float32)
    context = rng.standard_normal((batch, tokens, config["cross_attention_dim"]), dtype=np.float32)
    grad_output = rng.standard_normal((batch, config["out_channels"], height, width), dtype=np.float32)
    return sample, context, grad_output


@pytest.mark.parametrize("keep_states", [True, False])  # block internals kept, or recomputed in the backward
@pytest.mark.parametrize("batch,height,width,tokens", [(1, 8, 8, 7), (2, 16, 8, 5)])
def test_unet_backward_matches_autograd(unet_pair, rng, batch, height, width, tokens, keep_states):
    kind, torch_model, ours = unet_pair
    sample, context, grad_output = random_case(rng, ours.config, batch, height, width, tokens)
    timestep = int(rng.integers(0, 1000))
    expected_out, expected_sample, expected_context = torch_grads(torch_model, sample, timestep, context, grad_output)
    out, tape = unet_forward_for_backward(ours, sample, timestep, context, keep_states=keep_states)
    assert_rel_close(out, expected_out, NETWORK_TOL, f"{kind} forward")
    grad_sample, grad_context = tape.backward(grad_output)
    assert grad_sample.shape == sample.shape and grad_context.shape == context.shape
    assert_rel_close(grad_context, expected_context, NETWORK_TOL, f"{kind} d encoder_hidden_states")
    assert_rel_close(grad_sample, expected_sample, NETWORK_TOL, f"{kind} d sample")
    with pytest.raises(NpdiffError, match="used already"):
        tape.backward(grad_output)


@pytest.mark.parametrize("keep_states", [True, False])
def test_unet_backward_without_sample_grad_matches_autograd(unet_pair, rng, monkeypatch, keep_states):
    """tape.backward(..., sample_grad=False), textual inversion's call: d encoder_hidden_states is autograd's
    for a sample without requires_grad, d sample is None, and what lies before the first transformer is
    skipped (conv_in, the resnets before it; its first block's self-attention), as autograd skips it."""
    from npdiff.models import transformer_backward, unet_backward as unet_backward_module
    kind, torch_model, ours = unet_pair
    sample, context, grad_output = random_case(rng, ours.config, 2, 8, 8, 5)
    timestep = int(rng.integers(0, 1000))
    context_t = torch.from_numpy(context).requires_grad_(True)
    torch_model(torch.from_numpy(sample), timestep, context_t).sample.backward(torch.from_numpy(grad_output))
    calls = {"resnet": 0, "self_attention": 0, "resnet_input_channels": []}
    resnet_backward, attention_pass = unet_backward_module.resnet_backward, transformer_backward.attention_backward_pass

    def counted_resnet(block, x, *args, **kwargs):
        calls["resnet"] += 1
        grad_x = resnet_backward(block, x, *args, **kwargs)
        if grad_x.shape[1] != x.shape[1]:
            calls["resnet_input_channels"].append((grad_x.shape[1], x.shape[1]))
        return grad_x

    def counted_attention(attn, x, context, *args, **kwargs):
        calls["self_attention"] += context is x
        return attention_pass(attn, x, context, *args, **kwargs)

    monkeypatch.setattr(unet_backward_module, "resnet_backward", counted_resnet)
    monkeypatch.setattr(transformer_backward, "attention_backward_pass", counted_attention)
    _, tape = unet_forward_for_backward(ours, sample, timestep, context, keep_states=keep_states)
    grad_sample, grad_context = tape.backward(grad_output, sample_grad=False)
    assert grad_sample is None
    assert_rel_close(grad_context, context_t.grad, NETWORK_TOL, f"{kind} d encoder_hidden_states")
    first_resnets = len(ours.down_blocks[0].resnets) if ours.down_blocks[0].attentions else None
    assert first_resnets is not None  # the tiny models' first down block has attentions
    total_resnets = sum(len(block.resnets) for block in (*ours.down_blocks, ours.mid_block, *ours.up_blocks))
    total_blocks = sum(len(model.transformer_blocks) for block in (*ours.down_blocks, ours.mid_block, *ours.up_blocks)
                       for model in (block.attentions or []))
    assert calls["resnet"] == total_resnets - 1  # the first resnet (before the first transformer) skipped
    assert calls["self_attention"] == total_blocks - 1  # the first block's self-attention skipped
    # the last resnet reads [h, conv_in's output]: the gradient of h's channels only
    last_resnet = ours.up_blocks[-1].resnets[-1]
    conv_in_channels = ours.conv_in.weight.shape[0]
    in_channels = last_resnet.conv1.weight.shape[1]
    assert calls["resnet_input_channels"] == [(in_channels - conv_in_channels, in_channels)]


def test_unet_tape_forward_in_parallel_blocks_matches_autograd(unet_pair, rng, monkeypatch):
    """Every pool GEMM cut into parallel blocks (the tiny model's are below MATMUL_PARALLEL_MIN): the tape
    forward's GEMMs whose blocks add a bias and a residual (to_out and ff.net.2 plus the residual stream,
    proj_out straight into NCHW plus the block's input, the resnets' 1x1 shortcuts plus conv2's output)
    and the backward stay autograd's."""
    from npdiff.kernels import block_pool
    kind, torch_model, ours = unet_pair
    monkeypatch.setattr(block_pool, "MATMUL_PARALLEL_MIN", 0)
    sample, context, grad_output = random_case(rng, ours.config, 1, 16, 16, 6)
    timestep = int(rng.integers(0, 1000))
    expected_out, expected_sample, expected_context = torch_grads(torch_model, sample, timestep, context, grad_output)
    out, tape = unet_forward_for_backward(ours, sample, timestep, context)
    assert_rel_close(out, expected_out, NETWORK_TOL, f"{kind} forward")
    grad_sample, grad_context = tape.backward(grad_output)
    assert_rel_close(grad_context, expected_context, NETWORK_TOL, f"{kind} d encoder_hidden_states")
    assert_rel_close(grad_sample, expected_sample, NETWORK_TOL, f"{kind} d sample")


def test_unet_attention_weight_grads_match_autograd(unet_pair, rng):
    """LoRA's gradients: every attention projection's weight (and to_out.0's bias)."""
    kind, torch_model, ours = unet_pair
    sample, context, grad_output = random_case(rng, ours.config, 1, 8, 8, 6)
    timestep = float(rng.uniform(0, 1000))
    torch_grads(torch_model, sample, timestep, context, grad_output)
    weight_grads = {}
    _, tape = unet_forward_for_backward(ours, sample, timestep, context, weight_grads=weight_grads)
    tape.backward(grad_output)
    params = dict(torch_model.named_parameters())
    expected_keys = {name.rsplit(".", 1)[0] for name in params if name.rsplit(".", 1)[0].endswith(LORA_SUFFIXES)}
    assert set(weight_grads) == expected_keys
    for key, grads in weight_grads.items():
        for name, grad in grads.items():
            assert_rel_close(grad, params[f"{key}.{name}"].grad, NETWORK_TOL, f"{kind} {key}.{name}")


def test_unet_backward_with_attention_statistics_matches_autograd(unet_pair, rng, monkeypatch):
    """The tape keeps each attention's output and log-sum-exp where the backward takes version 4 with
    them (from V4_MIN_KEYS keys: SD 1.5's 64x64 self-attentions; lowered here so that every attention
    of the tiny model takes it): the gradients, LoRA's weight gradients included, stay autograd's."""
    from npdiff.kernels.attention import backward as attention_backward_versions
    kind, torch_model, ours = unet_pair
    monkeypatch.setattr(attention_backward_versions, "V4_MIN_KEYS", 1)
    with_stats = attention_backward_versions.attention_backward_with_stats
    calls = []
    monkeypatch.setattr(attention_backward_versions, "attention_backward_with_stats",
                        lambda *args, **kwargs: calls.append(args[4].shape) or with_stats(*args, **kwargs))
    sample, context, grad_output = random_case(rng, ours.config, 1, 8, 8, 6)
    timestep = int(rng.integers(0, 1000))
    _, expected_sample, expected_context = torch_grads(torch_model, sample, timestep, context, grad_output)
    weight_grads = {}
    _, tape = unet_forward_for_backward(ours, sample, timestep, context, weight_grads=weight_grads)
    grad_sample, grad_context = tape.backward(grad_output)
    assert len(calls) == 2 * sum(1 for name in weight_grads if name.endswith("attn1.to_q"))  # attn1, attn2
    assert_rel_close(grad_context, expected_context, NETWORK_TOL, f"{kind} d encoder_hidden_states")
    assert_rel_close(grad_sample, expected_sample, NETWORK_TOL, f"{kind} d sample")
    params = dict(torch_model.named_parameters())
    for key, grads in weight_grads.items():
        for name, grad in grads.items():
            assert_rel_close(grad, params[f"{key}.{name}"].grad, NETWORK_TOL, f"{kind} {key}.{name}")


@pytest.mark.parametrize("keep_states", [True, False])
@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_unet_backward_other_conditionings(rng, kind, keep_states):
    torch_model, folder = tiny_unet(kind, seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    c = ours.config
    sample, context, grad_output = random_case(rng, c, 2, 8, 8, 5)
    timestep = int(rng.integers(0, 1000))
    ours_extra, torch_extra = {}, {}
    if kind == "sdxl":
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((2, pooled), dtype=np.float32),
                 "time_ids": rng.uniform(0, 1024, (2, 6)).astype(np.float32)}
        ours_extra["added_cond_kwargs"] = added
        torch_extra["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    else:
        cond = rng.standard_normal((2, c["time_cond_proj_dim"]), dtype=np.float32)
        ours_extra["timestep_cond"], torch_extra["timestep_cond"] = cond, torch.from_numpy(cond)
    _, expected_sample, expected_context = torch_grads(torch_model, sample, timestep, context, grad_output,
                                                       **torch_extra)
    grad_sample, grad_context = unet_backward(ours, sample, timestep, context, grad_output, keep_states=keep_states,
                                              **ours_extra)
    assert_rel_close(grad_context, expected_context, NETWORK_TOL, f"{kind} d encoder_hidden_states")
    assert_rel_close(grad_sample, expected_sample, NETWORK_TOL, f"{kind} d sample")


@pytest.mark.parametrize("flip_sin_to_cos,freq_shift", [(True, 0), (False, 1)])
def test_timestep_embedding_backward_matches_autograd(rng, flip_sin_to_cos, freq_shift):
    dim = int(rng.integers(2, 40)) * 2
    timesteps = rng.uniform(0, 1000, size=3).astype(np.float32)
    grad_emb = rng.standard_normal((3, dim)).astype(np.float32)
    t = torch.from_numpy(timesteps).requires_grad_(True)
    get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift).backward(
        torch.from_numpy(grad_emb))
    ours = timestep_embedding_backward(timesteps, dim, flip_sin_to_cos, freq_shift, grad_emb)
    assert_rel_close(ours, t.grad, KERNEL_TOL, "d timesteps")


def test_timestep_mlp_backward_matches_autograd(rng):
    torch.manual_seed(int(rng.integers(0, 2**31)))
    module = TimestepEmbedding(16, 64)
    weights = {f"time_embedding.{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}

    class Dict:  # the .take interface (and .precision) the model classes read weights with
        precision = "fp32"

        def take(self, key, shape):
            assert weights[key].shape == shape, key
            return weights[key]

    ours = OurTimestepEmbedding(Dict(), "time_embedding", 16, 64)
    t_emb = rng.standard_normal((3, 16)).astype(np.float32)
    grad_out = rng.standard_normal((3, 64)).astype(np.float32)
    t_emb_t = torch.from_numpy(t_emb).requires_grad_(True)
    module(t_emb_t).backward(torch.from_numpy(grad_out))
    weight_grads = {}
    grad_t_emb = timestep_mlp_backward(ours, t_emb, grad_out, weight_grads)
    assert_rel_close(grad_t_emb, t_emb_t.grad, KERNEL_TOL, "d t_emb")
    params = dict(module.named_parameters())
    for key, grads in weight_grads.items():
        for name, grad in grads.items():
            assert_rel_close(grad, params[f"{key.split('.', 1)[1]}.{name}"].grad, KERNEL_TOL, f"{key}.{name}")
    assert set(weight_grads) == {"time_embedding.linear_1", "time_embedding.linear_2"}


def test_group_norm_layer_backward_of_leading_groups_matches_autograd(rng):
    """group_norm_layer_backward given the gradient of x's first whole groups only (a resnet reading a
    concatenation whose skip needs no gradient): autograd's dx of those channels, residual added; a cut
    through a group is refused."""
    from types import SimpleNamespace

    from npdiff.models.blocks_backward import group_norm_layer_backward
    groups, per_group = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    channels, kept_groups = groups * per_group, int(rng.integers(1, groups))
    wanted = kept_groups * per_group
    x = rng.standard_normal((2, channels, 5, 6)).astype(np.float32)
    weight, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    grad_out = rng.standard_normal((2, wanted, 5, 6)).astype(np.float32)
    residual = rng.standard_normal((2, wanted, 5, 6)).astype(np.float32)
    x_t = torch.from_numpy(x).requires_grad_(True)
    out = torch.nn.functional.silu(torch.nn.functional.group_norm(x_t, groups, torch.from_numpy(weight),
                                                                  torch.from_numpy(bias), 1e-5))
    out[:, :wanted].backward(torch.from_numpy(grad_out))
    layer = SimpleNamespace(num_groups=groups, weight=weight, bias=bias, eps=1e-5)
    ours = group_norm_layer_backward(layer, x, grad_out, silu_after=True, residual=residual)
    assert_rel_close(ours, x_t.grad[:, :wanted].numpy() + residual, KERNEL_TOL, "dx of the leading groups")
    if per_group > 1:
        with pytest.raises(NpdiffError, match="not whole groups"):
            group_norm_layer_backward(layer, x, grad_out[:, :wanted - 1], silu_after=True)
