"""Per-kernel counters for the npdiff side of benchmarks/models.py: FLOPs and seconds of every kernel call.

    from _kernel_counters import install_counters

    stats, uninstall = install_counters()   # stats[name] = {"calls", "seconds", "flops"}
    model(...)                              # one forward, every npdiff.kernels call counted
    uninstall()

FLOPs count convolutions, linear layers and the two attention matmuls; norms and activations are
counted in calls and seconds only.

    stats, blocks, uninstall = install_backward_counters()   # the backward kernels, and apart the
    tape.backward(...)                                       # block-level backward functions (inclusive)
"""

import time
from collections import defaultdict


def kernel_flops(name, args, out):
    name = name.removesuffix("_bf16")  # the bf16 kernels count as their float32 twins (packed weights keep .shape)
    if name in ("conv2d", "upsample_nearest2x_conv2d", "group_norm_silu_conv2d"):  # (the folded convs: conv_fused.py)
        weight = args[5] if name == "group_norm_silu_conv2d" else args[1]
        return 2.0 * out.size * weight.shape[1] * weight.shape[2] * weight.shape[3]
    if name in ("linear", "linear_activation", "geglu", "geglu_forward_saved"):
        x, weight = args[0], args[1]
        return 2.0 * (x.size // x.shape[-1]) * weight.shape[0] * weight.shape[1]
    if name == "linear_packed":  # (x, panels, outputs, ...): CLIP's GEMMs (npdiff/models/packed_linear.py)
        x, panels, outputs = args[0], args[1], args[2]
        return 2.0 * x.shape[0] * outputs * panels.shape[1]
    if name == "clip_layer_by_prompt":  # (h, out, batch, norm1, q, k, v, o, norm2, fc1, act, fc2, heads, scale):
        h, batch, fc1 = args[0], args[2], args[9]  # one whole CLIP layer (kernels/clip_layer_rows.py)
        rows, dim, inner = h.shape[0], h.shape[1], fc1[1].shape[0]
        attention = 2.0 * rows * (rows // batch) * 2 * dim  # as causal_attention_rows counts it
        return 2.0 * rows * (4 * dim * dim + 2 * dim * inner) + attention
    if name == "clip_layers_by_prompt":  # (h, states, batch, layers, activation, heads, scale): every CLIP layer
        h, batch, layers = args[0], args[2], args[3]
        rows, dim, inner = h.shape[0], h.shape[1], layers[0][6][1].shape[0]  # layers[i][6]: fc1's (panels, bias)
        attention = 2.0 * rows * (rows // batch) * 2 * dim
        return len(layers) * (2.0 * rows * (4 * dim * dim + 2 * dim * inner) + attention)
    if name == "causal_attention_rows":  # (q, k, v, batch, heads, scale): q, k, v [B*L, heads*d]
        q, batch = args[0], args[3]
        return 2.0 * q.shape[0] * (q.shape[0] // batch) * 2 * q.shape[1]  # as the full score matrix, as above
    if name in ("scaled_dot_product_attention", "attention_fused"):
        q, k, v = args[0], args[1], args[2]
        queries = q.size // q.shape[-1]
        return 2.0 * queries * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0.0


FORWARD_NAMES = ("conv2d", "linear", "linear_activation", "geglu", "scaled_dot_product_attention", "group_norm",
                 "layer_norm", "silu", "gelu", "quick_gelu", "softmax", "upsample_nearest2x", "group_norm_silu_conv2d",
                 "upsample_nearest2x_conv2d")


BF16_NAMES = ("conv2d_bf16", "linear_bf16", "linear_activation_bf16", "geglu_bf16")


def install_counters():
    """Wrap npdiff.kernels' public functions (models call them as kernels.NAME) -> the stats dict."""
    stats = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0})
    return stats, wrap_sites({"npdiff.kernels": FORWARD_NAMES,
                              "npdiff.models.transformer_backward": ("geglu_forward_saved", "scaled_dot_product_attention",
                                                                    "attention_fused"),  # the tape's, with lse
                              # precision="bf16": the layers call these by name (npdiff/models/precision.py, transformer.py)
                              "npdiff.models.precision": BF16_NAMES,
                              "npdiff.models.transformer": ("scaled_dot_product_attention_bf16",),
                              # CLIP's float32 layers (PackedLinear; clip.py's packed forward)
                              "npdiff.models.packed_linear": ("linear_packed",),
                              "npdiff.models.clip": ("causal_attention_rows", "layer_norm_rows", "clip_layer_by_prompt",
                                                     "clip_layers_by_prompt")},
                             stats, kernel_flops)


# The backward kernels: the model-level backward modules import them by name, so they are wrapped where
# they are used. FLOPs are the useful products only (attention_backward's recomputed q k^T is not counted).
BACKWARD_SITES = {
    "npdiff.models.blocks_backward": ("conv2d_input_grad", "linear_backward", "group_norm_backward",
                                      "upsample_nearest2x_backward", "silu_backward"),
    "npdiff.models.transformer_backward": ("attention_backward", "geglu_backward", "geglu_input_grad",
                                           "layer_norm_backward", "linear_input_grad"),
    "npdiff.models.clip_backward": ("attention_backward", "linear_activation_backward", "layer_norm_backward",
                                    "linear_input_grad"),
}
# Whole-block backward functions (inclusive times: they contain the kernels above and the forward kernels
# they rerun; before linear_input_grad, the frozen projections were np.matmul calls no counter saw).
# A name a module lacks (an older npdiff) is skipped.
BLOCK_SITES = {
    "npdiff.models.unet_backward": ("resnet_backward", "transformer_2d_backward"),
    "npdiff.models.transformer_backward": ("basic_block_backward", "attention_backward_pass",
                                           "feed_forward_backward"),
}


def backward_flops(name, args, out):
    if name == "conv2d_input_grad":
        x_shape, weight, grad_out = args[0], args[1], args[2]
        return 2.0 * grad_out.size * weight.shape[1] * weight.shape[2] * weight.shape[3]
    if name == "linear_input_grad":
        weight, grad_out = args[0], args[1]
        return 2.0 * grad_out.size * weight.shape[1]
    if name == "geglu_input_grad":
        hidden, weight = args[0], args[1]
        return 2.0 * hidden.size * weight.shape[1]
    if name in ("linear_backward", "linear_activation_backward", "geglu_backward"):
        x, weight = args[0], args[1]
        recomputed = 0 if name == "linear_backward" else 1
        need_weight_grad = out[1] is not None
        products = 1 + recomputed + int(need_weight_grad)
        return 2.0 * products * (x.size // x.shape[-1]) * weight.shape[0] * weight.shape[1]
    if name == "attention_backward":
        q, k, v = args[0], args[1], args[2]
        queries = q.size // q.shape[-1]
        return 2.0 * queries * k.shape[-2] * 2 * (q.shape[-1] + v.shape[-1])
    return 0.0


def wrap_sites(sites, stats, flops):
    """Wrap module.NAME for each site -> the undo function."""
    import importlib

    originals = []
    for module_name, names in sites.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name, None)
            if original is None:
                continue
            originals.append((module, name, original))

            def counted(*args, _name=name, _original=original, **kwargs):
                t0, cpu0 = time.perf_counter(), time.process_time()
                out = _original(*args, **kwargs)
                entry = stats[_name]
                entry["seconds"] += time.perf_counter() - t0
                entry["cpu_seconds"] += time.process_time() - cpu0  # all threads: steadier than wall under load
                entry["calls"] += 1
                entry["flops"] += flops(_name, args, out)
                return out

            setattr(module, name, counted)

    def undo():
        for module, name, original in originals:
            setattr(module, name, original)

    return undo


def install_backward_counters():
    """Count the backward kernels and, apart, the block-level backward functions ->
    (kernel stats, block stats, uninstall); each stats[name] = {"calls", "seconds", "flops"}."""
    stats = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0})
    blocks = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0})
    undo_kernels = wrap_sites(BACKWARD_SITES, stats, backward_flops)
    undo_blocks = wrap_sites(BLOCK_SITES, blocks, lambda *_: 0.0)

    def uninstall():
        undo_blocks()
        undo_kernels()

    return stats, blocks, uninstall
