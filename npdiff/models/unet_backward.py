"""The UNet's backward: d(loss)/d(encoder_hidden_states) and d(loss)/d(sample), what textual
inversion needs (the gradient with respect to the text embeddings the UNet attends to), with the
weights frozen; LoRA's weight gradients (the attention projections) on request.

    output, tape = unet_forward_for_backward(unet, sample, timestep, encoder_hidden_states)
    loss_grad = ...                                           # d(loss)/d(output) [B,Cout,h,w]
    grad_sample, grad_context = tape.backward(loss_grad)      # [B,Cin,h,w], [B,L,Dc]
    # or, textual inversion: tape.backward(loss_grad, sample_grad=False) -> (None, grad_context), only the
    # gradients between the context and the loss (as autograd for a sample without requires_grad)

or unet_backward(unet, sample, timestep, encoder_hidden_states, grad_output) for both at once.

It walks the same weight tree as UNet2DConditionModel.__call__ (npdiff/models/unet.py), block by
block. What is kept between the forward and the backward (keep_states=True, the default): the INPUT
of each layer-level block (conv_in, each ResnetBlock2D, each Transformer2DModel, each resampler,
conv_norm_out; the up path's skips are exactly these) and the internals its backward needs: a
resnet's norm2 input [B,Cout,H,W]; a transformer's block inputs, residual states [B,N,D], its
attentions' q, k, v and outputs (and the log-sum-exp [B,h,N] of those from backward.V4_MIN_KEYS keys:
the 64x64 self-attentions, whose backward then runs version 4 with them) and its GEGLU's hidden
layer [B,N,8D] (40 MiB per 64x64 block; kept since it
saved one GEMM per block: geglu dx at 64x64 86 ms from the kept layer against 147 ms recomputing it)
(blocks_backward.resnet_forward_saved, transformer_backward.transformer_2d_forward_saved), so the
backward reruns no forward. Never kept: the attention probabilities ([1,8,4096,4096] floats =
512 MiB per 64x64 self-attention): attention_backward recomputes them per query block.
keep_states=False keeps the block inputs only and each block's backward recomputes its internals
from its input: about one more forward in all, for the memory of one block's internals at a time.

Measured (benchmarks/training_memory.py) at SD 1.5 size (860 M parameters, random weights), 64x64
latent, batch 1, 77 tokens, one process: see benchmarks/RESULTS.md, "Training". With
keep_states=False (before this was the default; load 7-12, times only indicative): the tape keeps
0.36 GiB; the backward's peak is 0.64 GiB above the built model; tape forward 77 s, backward 68 s.

The tape: every recorded op is (its output's id, its inputs' ids, a backward function grad ->
input grads). tape.backward walks the ops last to first, summing the gradients of values used
twice (the skips: once on the down path, once by the up block's concatenation).
"""

import numpy as np

from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.models.blocks import timestep_embedding
from npdiff.models.blocks_backward import (
    conv_layer_backward,
    downsample_backward,
    group_norm_layer_backward,
    resnet_backward,
    resnet_forward_saved,
    upsample_backward,
)
from npdiff.models.transformer_backward import (
    transformer_2d_backward,
    transformer_2d_forward_saved,
)


class UNetTape:
    """The ops of one UNet forward, each with its backward; value 0 is the sample."""

    def __init__(self, context, center_input_sample):
        self.ops = []  # (output id, input ids, backward: grad -> tuple of input grads)
        self.count = 1  # ids handed out; 0 is the sample
        self.output_id = None
        self.context = context  # [B,L,Dc]
        self.grad_context = np.zeros(context.shape, np.float32)  # [B,L,Dc], summed over every attention
        self.center_input_sample = center_input_sample
        self.weight_grads = None
        self.keep_states = True  # keep each block's internals (else its backward recomputes them)
        self.from_context = set()  # ids of the values that depend on the context (made after a transformer)
        self.leading_from_context = {}  # id -> C: a concatenation whose first C channels only depend on it
        self.sample_grad = True  # during backward: whether d sample is wanted (else see backward)

    def record(self, backward, inputs, reads_context=False):
        """A new value made from `inputs` (ids), reading the context too when reads_context; -> its id."""
        output_id = self.count
        if reads_context or any(input_id in self.from_context for input_id in inputs):
            self.from_context.add(output_id)
        self.ops.append((output_id, tuple(inputs), backward))
        self.count += 1
        return output_id

    def input_grad_needed(self, input_id):
        """Whether the backward must make d value for this value (id): always when d sample is wanted;
        else only when the value depends on the context (only those lie between the context and the loss)."""
        return self.sample_grad or input_id in self.from_context

    def channels_needed(self, input_id):
        """How many leading channels of this value need a gradient: None for all; C for a concatenation
        [x, skip] whose skip does not depend on the context when d sample is not wanted (only x's C)."""
        return None if self.sample_grad else self.leading_from_context.get(input_id)

    def backward(self, grad_output, sample_grad=True):
        """d(loss)/d(output) [B,Cout,h,w] -> (d sample [B,Cin,h,w], d encoder_hidden_states [B,L,Dc]).
        The tape is used up (its stored inputs are released as it goes).

        sample_grad=False (textual inversion: the noisy latents are not trained): d sample is None, and
        only the gradients on a path from the context to the loss are made, as torch's autograd does
        for a sample without requires_grad: the ops before the first transformer (conv_in, the first
        resnet: nothing there reads the context) are skipped, and the first transformer stops after
        its first block's cross-attention (transformer_2d_backward's need_input_grad)."""
        if self.output_id is None:
            raise NpdiffError("this UNet tape has been used already: run unet_forward_for_backward again")
        self.sample_grad = bool(sample_grad)
        grads = {self.output_id: np.ascontiguousarray(grad_output, dtype=np.float32)}
        while self.ops:
            output_id, inputs, backward = self.ops.pop()
            grad = grads.pop(output_id, None)
            if grad is None or not self.input_grad_needed(output_id):
                continue  # nothing depends on this value, or nothing wanted lies before it
            for input_id, input_grad in zip(inputs, backward(grad)):
                if input_grad is None:
                    continue  # not wanted (input_grad_needed)
                grads[input_id] = grads[input_id] + input_grad if input_id in grads else input_grad
        self.output_id = None
        if not self.sample_grad:
            return None, self.grad_context
        grad_sample = grads.pop(0)  # [B,Cin,h,w]: conv_in always reads the sample
        if self.center_input_sample:
            grad_sample = 2 * grad_sample  # sample -> 2 * sample - 1
        return grad_sample, self.grad_context

    # -----------------------------------------------------------------------------------------
    # One recorder per block kind: run the block forward, record its backward over its input.
    # -----------------------------------------------------------------------------------------
    def conv(self, layer, x, x_id):
        out = layer(x)                                                  # [B,Cin,H,W] -> [B,Cout,H,W]
        shape = x.shape
        return out, self.record(lambda grad: (conv_layer_backward(layer, shape, grad),), [x_id])

    def resnet(self, block, x, x_id, temb):
        if self.keep_states:
            out, norm2_input = resnet_forward_saved(block, x, temb)     # [B,Cin,H,W] -> [B,Cout,H,W]
        else:
            out, norm2_input = block(x, temb), None                     # (recomputed by the backward)
        def backward(grad):
            return (resnet_backward(block, x, temb, grad, norm2_input, self.channels_needed(x_id)),)

        return out, self.record(backward, [x_id])

    def transformer(self, model, x, x_id):
        if self.keep_states:
            out, saved = transformer_2d_forward_saved(model, x, self.context)  # [B,C,H,W]
        else:
            out, saved = model(x, self.context), None                   # (recomputed by the backward)

        def backward(grad):
            grad_x, grad_context = transformer_2d_backward(model, x, self.context, grad, self.weight_grads, saved,
                                                           need_input_grad=self.input_grad_needed(x_id))
            self.grad_context += grad_context                           # [B,L,Dc]
            return (grad_x,)

        return out, self.record(backward, [x_id], reads_context=True)

    def downsample(self, block, x, x_id):
        out = block(x)                                                  # [B,C,H,W] -> [B,C,H/2,W/2]
        shape = x.shape
        return out, self.record(lambda grad: (downsample_backward(block, shape, grad),), [x_id])

    def upsample(self, block, x, x_id):
        out = block(x)                                                  # [B,C,H,W] -> [B,C,2H,2W]
        shape = x.shape
        return out, self.record(lambda grad: (upsample_backward(block, shape, grad),), [x_id])

    def concat(self, x, x_id, skip, skip_id):
        out = np.concatenate([x, skip], axis=1)                         # [B,C,H,W] + [B,Cs,H,W] -> [B,C+Cs,H,W]
        channels = x.shape[1]

        def backward(grad):
            grad_x = np.ascontiguousarray(grad[:, :channels]) if self.input_grad_needed(x_id) else None
            grad_skip = np.ascontiguousarray(grad[:, channels:]) if self.input_grad_needed(skip_id) else None
            return grad_x, grad_skip

        out_id = self.record(backward, [x_id, skip_id])
        if x_id in self.from_context and skip_id not in self.from_context:
            self.leading_from_context[out_id] = channels                # (its reader's backward makes only those)
        return out, out_id

    def norm_silu(self, layer, x, x_id):
        out = layer(x, silu=True)                                       # [B,C,H,W]
        return out, self.record(lambda grad: (group_norm_layer_backward(layer, x, grad, silu_after=True),), [x_id])


def time_embedding(unet, batch, timestep, timestep_cond=None, added_cond_kwargs=None):
    """temb [B,4*C0], as UNet2DConditionModel.__call__ step 1 (not differentiated: no gradient to t)."""
    c = unet.config
    timesteps = np.broadcast_to(np.atleast_1d(np.asarray(timestep)), (batch,))  # [B]
    t_emb = timestep_embedding(timesteps, c["block_out_channels"][0], c["flip_sin_to_cos"], c["freq_shift"])
    temb = unet.time_embedding(t_emb, timestep_cond)                    # [B,C0] -> [B,4*C0]
    if unet.add_embedding is not None:
        text_embeds, time_ids = unet.check_added_cond(added_cond_kwargs, batch)
        temb = temb + unet.added_embedding(text_embeds, time_ids)       # SDXL: [B,4*C0] + [B,4*C0]
    return temb


def unet_forward_for_backward(unet, sample, timestep, encoder_hidden_states, timestep_cond=None,
                              added_cond_kwargs=None, weight_grads=None, keep_states=True):
    """UNet forward (NumPy arrays) -> (output [B,Cout,h,w], tape); tape.backward(d output) gives the
    gradients. weight_grads: a dict to receive the attention projections' weight gradients
    ({diffusers name of the layer: {"weight": dW, "bias": db}}), or None (weights frozen).
    keep_states: keep each block's internals for its backward (faster); False keeps block inputs
    only and recomputes the rest in the backward (less memory; see the header)."""
    if array_module(sample) is not np:
        raise NpdiffError("the UNet backward runs on NumPy arrays; got a sample on another device")
    unet.check_inputs(sample, np.atleast_1d(np.asarray(timestep)), encoder_hidden_states, timestep_cond)
    center = bool(unet.config["center_input_sample"])
    tape = UNetTape(np.ascontiguousarray(encoder_hidden_states, dtype=np.float32), center)
    tape.weight_grads = weight_grads
    tape.keep_states = bool(keep_states)
    temb = time_embedding(unet, sample.shape[0], timestep, timestep_cond, added_cond_kwargs)
    if center:
        sample = 2 * sample - 1.0                                       # [B,Cin,h,w]

    # 1. conv_in, then the down path; each block's outputs are the up path's skips
    h, h_id = tape.conv(unet.conv_in, sample, 0)                        # [B,Cin,h,w] -> [B,C0,h,w]
    skips = [(h, h_id)]
    for block in unet.down_blocks:
        for i, resnet in enumerate(block.resnets):
            h, h_id = tape.resnet(resnet, h, h_id, temb)                # [B,C,H,W] -> [B,C',H,W]
            if block.attentions:
                h, h_id = tape.transformer(block.attentions[i], h, h_id)
            skips.append((h, h_id))
        if block.downsampler is not None:
            h, h_id = tape.downsample(block.downsampler, h, h_id)       # [B,C,H,W] -> [B,C,H/2,W/2]
            skips.append((h, h_id))

    # 2. middle: resnet, then (transformer, resnet) per layer
    if unet.mid_block is not None:
        mid = unet.mid_block
        h, h_id = tape.resnet(mid.resnets[0], h, h_id, temb)
        for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
            h, h_id = tape.transformer(attention, h, h_id)
            h, h_id = tape.resnet(resnet, h, h_id, temb)

    # 3. up path: per resnet, concatenate the newest skip first
    for block in unet.up_blocks:
        for i, resnet in enumerate(block.resnets):
            skip, skip_id = skips.pop()
            h, h_id = tape.concat(h, h_id, skip, skip_id)               # [B,C+Cs,H,W]
            h, h_id = tape.resnet(resnet, h, h_id, temb)                # [B,C+Cs,H,W] -> [B,Cout,H,W]
            if block.attentions:
                h, h_id = tape.transformer(block.attentions[i], h, h_id)
        if block.upsampler is not None:
            h, h_id = tape.upsample(block.upsampler, h, h_id)           # [B,C,H,W] -> [B,C,2H,2W]

    # 4. output: group norm + SiLU, conv_out
    h, h_id = tape.norm_silu(unet.conv_norm_out, h, h_id)               # [B,C0,h,w]
    out, tape.output_id = tape.conv(unet.conv_out, h, h_id)             # [B,C0,h,w] -> [B,Cout,h,w]
    return out, tape


def unet_backward(unet, sample, timestep, encoder_hidden_states, grad_output, **options):
    """-> (d sample, d encoder_hidden_states) for d(loss)/d(output) grad_output [B,Cout,h,w]."""
    _, tape = unet_forward_for_backward(unet, sample, timestep, encoder_hidden_states, **options)
    return tape.backward(grad_output)
