"""The shared model blocks against diffusers' own modules, one block at a time.

Each test builds a diffusers module with random parameters (tiny_models.randomize_), saves its
state_dict with safetensors, builds the npdiff block from those weights (same key names) and
compares the outputs on fresh random inputs. A block is a handful of kernels: tolerance 1e-5.
"""

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from helpers import KERNEL_TOL, assert_rel_close
from tiny_models import module_weights, randomize_

from npdiff.errors import NpdiffError
from npdiff.models.blocks import Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_embedding
from npdiff.models.transformer import AttentionBlock, BasicTransformerBlock, Transformer2DModel

# diffusers warns about its own deprecated output class when Transformer2DModel runs
pytestmark = pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput:FutureWarning")


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def torch_run(module, *arrays, **kwargs):
    with torch.no_grad():
        return module(*[torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays], **kwargs)


# ---------------------------------------------------------------------------------------------
# timestep embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("freq_shift", [0, 1])
@pytest.mark.parametrize("dim", [32, 320, 33])
def test_timestep_embedding_matches_diffusers(rng, flip_sin_to_cos, freq_shift, dim):
    int_steps = rng.integers(0, 1000, size=3)                                   # like scheduler timesteps
    float_steps = rng.uniform(0, 1000, size=2).astype(np.float32)               # fractional (Karras-style)
    for steps in (int_steps, float_steps):
        ours = timestep_embedding(steps, dim, flip_sin_to_cos, freq_shift)
        ref = get_timestep_embedding(torch.from_numpy(steps), dim, flip_sin_to_cos, freq_shift)
        assert ours.dtype == np.float32
        assert_rel_close(ours, ref, KERNEL_TOL, f"timestep embedding {steps.dtype}")


def test_timestep_embedding_rejects_2d_timesteps():
    with pytest.raises(NpdiffError, match="1-d"):
        timestep_embedding(np.zeros((2, 2)), 32, True, 0)


def test_timestep_embedding_mlp(rng, tmp_path, seed):
    torch_module = randomize_(TorchTimestepEmbedding(32, 128), seed)
    ours = TimestepEmbedding(module_weights(torch_module, tmp_path / "t.safetensors"), "", 32, 128)
    x = randn(rng, 3, 32)
    assert_rel_close(ours(x), torch_run(torch_module, x), KERNEL_TOL, "TimestepEmbedding")


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D, Downsample2D, Upsample2D
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_channels,out_channels,temb_channels,scale", [
    (16, 16, 24, 1.0),     # identity shortcut, time embedding (UNet)
    (16, 32, 24, 1.0),     # conv_shortcut
    (32, 16, None, 1.0),   # no time embedding (VAE)
    (16, 16, 24, 2.0),     # output_scale_factor
])
def test_resnet_block(rng, tmp_path, seed, in_channels, out_channels, temb_channels, scale):
    groups, eps = 8, float(rng.choice([1e-5, 1e-6]))
    torch_block = randomize_(TorchResnetBlock2D(in_channels=in_channels, out_channels=out_channels,
                                                temb_channels=temb_channels, groups=groups, eps=eps,
                                                output_scale_factor=scale), seed)
    weights = module_weights(torch_block, tmp_path / "r.safetensors")
    ours = ResnetBlock2D(weights, "", in_channels, out_channels, temb_channels, groups, eps, scale)
    weights.check_all_used()
    batch, height, width = int(rng.integers(1, 3)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
    x = randn(rng, batch, in_channels, height, width)
    temb = randn(rng, batch, temb_channels) if temb_channels else None
    ref = torch_run(torch_block, x, torch.from_numpy(temb) if temb is not None else None)
    assert_rel_close(ours(x, temb), ref, KERNEL_TOL, "ResnetBlock2D")


@pytest.mark.parametrize("padding", [1, 0])
def test_downsample(rng, tmp_path, seed, padding):
    torch_block = randomize_(TorchDownsample2D(16, use_conv=True, out_channels=16, padding=padding, name="op"), seed)
    ours = Downsample2D(module_weights(torch_block, tmp_path / "d.safetensors"), "", 16, padding=padding)
    x = randn(rng, 2, 16, 2 * int(rng.integers(2, 6)), 2 * int(rng.integers(2, 6)))
    assert_rel_close(ours(x), torch_run(torch_block, x), KERNEL_TOL, f"Downsample2D padding={padding}")


def test_upsample(rng, tmp_path, seed):
    torch_block = randomize_(TorchUpsample2D(16, use_conv=True, out_channels=16), seed)
    ours = Upsample2D(module_weights(torch_block, tmp_path / "u.safetensors"), "", 16)
    x = randn(rng, 2, 16, int(rng.integers(2, 7)), int(rng.integers(2, 7)))
    assert_rel_close(ours(x), torch_run(torch_block, x), KERNEL_TOL, "Upsample2D")


# ---------------------------------------------------------------------------------------------
# Attention blocks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,dim_head,context_dim", [(2, 8, 24), (4, 4, 40), (1, 16, 16)])
def test_basic_transformer_block(rng, tmp_path, seed, heads, dim_head, context_dim):
    dim = heads * dim_head
    torch_block = randomize_(TorchBasicTransformerBlock(dim, heads, dim_head, cross_attention_dim=context_dim,
                                                        activation_fn="geglu"), seed)
    weights = module_weights(torch_block, tmp_path / "b.safetensors")
    ours = BasicTransformerBlock(weights, "", dim, heads, dim_head, context_dim)
    weights.check_all_used()
    batch, tokens, text_tokens = int(rng.integers(1, 3)), int(rng.integers(4, 30)), int(rng.integers(1, 10))
    x, context = randn(rng, batch, tokens, dim), randn(rng, batch, text_tokens, context_dim)
    ref = torch_run(torch_block, x, encoder_hidden_states=torch.from_numpy(context))
    assert_rel_close(ours(x, context), ref, KERNEL_TOL, "BasicTransformerBlock")


@pytest.mark.parametrize("use_linear_projection,upcast_attention", [(False, False), (True, True)])
def test_transformer_2d(rng, tmp_path, seed, use_linear_projection, upcast_attention):
    channels, heads, context_dim = 32, 4, 24
    torch_block = randomize_(TorchTransformer2DModel(heads, channels // heads, in_channels=channels,
                                                     cross_attention_dim=context_dim, norm_num_groups=8,
                                                     use_linear_projection=use_linear_projection,
                                                     upcast_attention=upcast_attention), seed)
    weights = module_weights(torch_block, tmp_path / "t.safetensors")
    ours = Transformer2DModel(weights, "", channels, heads, channels // heads, context_dim, 8,
                              use_linear_projection)
    weights.check_all_used()
    x = randn(rng, 2, channels, int(rng.integers(2, 7)), int(rng.integers(2, 7)))  # non-square likely
    context = randn(rng, 2, 5, context_dim)
    ref = torch_run(torch_block, x, encoder_hidden_states=torch.from_numpy(context)).sample
    assert_rel_close(ours(x, context), ref, KERNEL_TOL, "Transformer2DModel")
    with pytest.raises(NpdiffError, match="cross_attention_dim 24"):
        ours(x, randn(rng, 2, 5, context_dim + 1))


def torch_vae_attention(channels, groups, rescale, seed):
    module = TorchAttention(channels, heads=1, dim_head=channels, rescale_output_factor=rescale, eps=1e-6,
                            norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
                            _from_deprecated_attn_block=True)
    return randomize_(module, seed)


@pytest.mark.parametrize("rescale", [1.0, 2.0])
def test_vae_attention_block(rng, tmp_path, seed, rescale):
    torch_block = torch_vae_attention(32, 8, rescale, seed)
    weights = module_weights(torch_block, tmp_path / "a.safetensors")
    ours = AttentionBlock(weights, "", 32, 8, 1e-6, rescale_output_factor=rescale)
    weights.check_all_used()
    x = randn(rng, 2, 32, int(rng.integers(2, 9)), int(rng.integers(2, 9)))
    assert_rel_close(ours(x), torch_run(torch_block, x), KERNEL_TOL, "VAE AttentionBlock")


def test_vae_attention_block_reads_legacy_names(rng, tmp_path, seed):
    """Older diffusers folders name the VAE attention query/key/value/proj_attn (diffusers renames on load)."""
    from safetensors.torch import save_file

    from npdiff.loading import open_weights

    torch_block = torch_vae_attention(16, 4, 1.0, seed)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for name, tensor in torch_block.state_dict().items():
        module, _, leaf = name.rpartition(".")
        tensors[f"{renames.get(module, module)}.{leaf}"] = tensor.contiguous()
    save_file(tensors, str(tmp_path / "legacy.safetensors"))
    weights = open_weights(tmp_path / "legacy.safetensors")
    ours = AttentionBlock(weights, "", 16, 4, 1e-6)
    weights.check_all_used()
    x = randn(rng, 1, 16, 4, 6)
    assert_rel_close(ours(x), torch_run(torch_block, x), KERNEL_TOL, "VAE AttentionBlock (legacy names)")


def test_block_weight_shape_mismatch_names_the_key(tmp_path, seed):
    torch_block = randomize_(TorchResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4), seed)
    weights = module_weights(torch_block, tmp_path / "r.safetensors")
    with pytest.raises(NpdiffError, match=r"conv1\.weight.*\(16, 16, 3, 3\).*\(32, 16, 3, 3\)"):
        ResnetBlock2D(weights, "", 16, 32, 8, 4, 1e-6)        # the config says 32 output channels
    with pytest.raises(NpdiffError, match="norm1.*not divisible"):
        ResnetBlock2D(weights, "", 16, 16, 8, 5, 1e-6)        # 16 channels in 5 groups
