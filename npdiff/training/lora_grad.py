"""LoRA factors on the UNet's attention projections and the gradient of the denoising loss with respect to them:
what LoRA training (DreamBooth-style, lora_train.py) descends on.

    lora = UNetLora.create(pipe, rank=4, alpha=4, seed=0)    # down random, up zeros (peft's init)
    loss, grads = lora_grad(pipe, lora, input_ids, latents, noise, timesteps)
    grads["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]["down"]   # [r,in]; "up": [out,r]

The layers: to_q, to_k, to_v and to_out.0 of attn1 and attn2 of every transformer block of the UNet (peft's
target_modules=["to_q", "to_k", "to_v", "to_out.0"], kohya's attention-only network). Each layer's weight
becomes W + s * up @ down, s = alpha / r, as peft computes it (and as npdiff/lora.py fuses a file):
    down [r,in]  peft's lora_A, kohya's lora_down: kaiming-uniform as peft (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))
    up [out,r]   peft's lora_B, kohya's lora_up: zeros, so training starts from the model itself
Every factor lives in one flat float32 vector (`lora.params`; the factors are views of it), so one AdamW and
one checkpoint tensor hold them all.

lora_grad's steps (the denoising loss is text_embedding_grad's, embedding_grad.py):
    1. the factors fused into the layers' weights (W + s up @ down: the forward is the plain one)
    2. the caption's hidden states from CLIP (frozen: no CLIP backward)
    3. noisy latents, target, UNet forward, loss, UNet backward; at each LoRA layer the backward's
       gradient of its output is routed through the pair (kernels/linear_backward.py: lora_backward)
       instead of making the layer's [out,in] weight gradient
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.kernels.linear_backward import linear_backward, lora_backward
from npdiff.lora import named_layers
from npdiff.models.clip_backward import clip_forward_for_backward, clip_token_embeds
from npdiff.pipeline_utils import check_positive_int
from npdiff.training.embedding_grad import check_training_batch, unet_denoising_loss

TARGET_ENDINGS = (".to_q", ".to_k", ".to_v", ".to_out.0")


def attention_projections(unet):
    """{diffusers module name: Linear} of the attention projections in the UNet's transformer blocks, sorted."""
    layers = named_layers(unet, "unet")
    names = sorted(name for name in layers if ".transformer_blocks." in name and name.endswith(TARGET_ENDINGS))
    if not names:
        raise NpdiffError("LoRA training: this UNet has no transformer blocks (no attention projections to train)")
    return {name: layers[name] for name in names}


def check_rank_alpha(rank, alpha):
    """-> (rank int >= 1, alpha float > 0; alpha None means alpha = rank)."""
    rank = check_positive_int(rank, "LoRA rank")
    if alpha is None:
        return rank, float(rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not np.isfinite(alpha) or alpha <= 0:
        raise NpdiffError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    return rank, float(alpha)


class UNetLora:
    """A LoRA pair per attention projection, the layers it changes and their weights before it."""

    def __init__(self, layers, rank, alpha):
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank                                       # s
        self.layers = layers                                            # {name: Linear}
        self.base = {}                                                  # {name: W [out,in]}, float32
        for name, layer in layers.items():
            weight = layer.weight
            if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 2:
                raise NpdiffError(f"LoRA training needs the UNet's weights in float32 on NumPy; {name}.weight "
                                  "is not (load the model with precision='fp32' on the CPU)")
            self.base[name] = weight
        sizes = [rank * layer.weight.shape[1] + layer.weight.shape[0] * rank for layer in layers.values()]
        self.params = np.zeros(sum(sizes), np.float32)                  # [P] every factor, flat
        self.down, self.up = {}, {}                                     # views of params: [r,in], [out,r]
        start = 0
        for name, layer in layers.items():
            out_features, in_features = layer.weight.shape
            self.down[name] = self.params[start:start + rank * in_features].reshape(rank, in_features)
            start += rank * in_features
            self.up[name] = self.params[start:start + out_features * rank].reshape(out_features, rank)
            start += out_features * rank
        self.applied = False

    @classmethod
    def create(cls, pipe, rank=4, alpha=None, seed=0):
        """peft's init: down kaiming-uniform (a = sqrt(5)), up zeros; drawn from a generator seeded by `seed`."""
        rank, alpha = check_rank_alpha(rank, alpha)
        lora = cls(attention_projections(pipe.unet), rank, alpha)
        rng = np.random.default_rng([int(seed), 27])
        for down in lora.down.values():
            bound = 1.0 / np.sqrt(down.shape[1])                        # gain sqrt(1/3) * sqrt(3 / fan_in)
            down[...] = rng.uniform(-bound, bound, down.shape).astype(np.float32)  # [r,in]
        return lora

    def apply(self):
        """Put W + s up @ down in every layer (new arrays: the base weights are never written)."""
        scale = np.float32(self.scale)
        for name, layer in self.layers.items():
            update = np.matmul(self.up[name], self.down[name])          # [out,r] @ [r,in] -> [out,in]
            layer.weight = self.base[name] + scale * update             # [out,in]
        self.applied = True

    def remove(self):
        """The layers' weights as they were before apply()."""
        for name, layer in self.layers.items():
            layer.weight = self.base[name]
        self.applied = False

    def flat(self, grads):
        """{name: {"down", "up"}} -> one [P] vector laid out as params."""
        pieces = []
        for name in self.layers:
            pieces.append(grads[name]["down"].ravel())
            pieces.append(grads[name]["up"].ravel())
        return np.concatenate(pieces)                                   # [P]


class LoraGradients:
    """Takes the attention projections' backward over in the UNet backward (blocks_backward.linear_layer_backward):
    dx through the fused weight, and each pair's gradients summed into self.grads."""

    def __init__(self, lora):
        self.lora = lora
        self.grads = {name: {"down": np.zeros_like(lora.down[name]), "up": np.zeros_like(lora.up[name])}
                      for name in lora.layers}

    def linear_backward(self, layer, x, grad_out):
        grad_x, _, _ = linear_backward(x, layer.weight, grad_out, need_weight_grad=False)  # [..., in]
        name = layer.key
        if name in self.grads:
            grad_down, grad_up = lora_backward(x, self.lora.down[name], self.lora.up[name], grad_out,
                                               self.lora.scale)         # [r,in], [out,r]
            self.grads[name]["down"] += grad_down
            self.grads[name]["up"] += grad_up
        return grad_x


def lora_grad(pipe, lora, input_ids, latents, noise, timesteps, clip_skip=None):
    """The denoising loss and its gradient with respect to every LoRA factor -> (loss float,
    {name: {"down": [r,in], "up": [out,r]}} float32). Arguments as text_embedding_grad's (embedding_grad.py);
    lora: a UNetLora made on this pipe. The factors stay fused in the UNet afterwards (lora.remove() undoes)."""
    # 0. every check before the long work
    prediction_type, ids, latents, noise, timesteps = check_training_batch(pipe, input_ids, latents, noise, timesteps)
    if not isinstance(lora, UNetLora):
        raise NpdiffError(f"lora must be a UNetLora (UNetLora.create(pipe, rank, alpha)); got {type(lora).__name__}")
    projections = attention_projections(pipe.unet)
    if any(projections.get(name) is not layer for name, layer in lora.layers.items()):
        raise NpdiffError("this LoRA was made for another pipeline's UNet: make it with UNetLora.create(pipe, ...)")
    # 1. the factors into the weights
    lora.apply()
    # 2. the caption's hidden states (CLIP frozen: its tape is dropped)
    token_embeds = clip_token_embeds(pipe.text_encoder, ids)            # [B,L] -> [B,L,C]
    hidden, _ = clip_forward_for_backward(pipe.text_encoder, token_embeds, clip_skip)  # [B,L,C]
    # 3. the loss, and the UNet backward with the pairs' gradients collected
    collector = LoraGradients(lora)
    loss, _ = unet_denoising_loss(pipe, latents, noise, timesteps, hidden, prediction_type, weight_grads=collector)
    return loss, collector.grads
