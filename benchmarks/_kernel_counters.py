"""Per-kernel counters for the npdiff side of benchmarks/models.py: FLOPs and seconds of every kernel call.

    from _kernel_counters import install_counters

    stats, uninstall = install_counters()   # stats[name] = {"calls", "seconds", "flops"}
    model(...)                              # one forward, every npdiff.kernels call counted
    uninstall()

FLOPs count convolutions, linear layers and the two attention matmuls; norms and activations are
counted in calls and seconds only.
"""

import time
from collections import defaultdict


def kernel_flops(name, args, out):
    if name == "conv2d":
        x, weight = args[0], args[1]
        return 2.0 * out.size * weight.shape[1] * weight.shape[2] * weight.shape[3]
    if name in ("linear", "linear_activation", "geglu"):
        x, weight = args[0], args[1]
        return 2.0 * (x.size // x.shape[-1]) * weight.shape[0] * weight.shape[1]
    if name == "scaled_dot_product_attention":
        q, k, v = args[0], args[1], args[2]
        queries = q.size // q.shape[-1]
        return 2.0 * queries * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0.0


def install_counters():
    """Wrap npdiff.kernels' public functions (models call them as kernels.NAME) -> the stats dict."""
    import npdiff.kernels as kernels

    stats = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "flops": 0.0})
    originals = {}
    for name in ("conv2d", "linear", "linear_activation", "geglu", "scaled_dot_product_attention",
                 "group_norm", "layer_norm",
                 "silu", "gelu", "quick_gelu", "softmax", "upsample_nearest2x"):
        original = getattr(kernels, name)
        originals[name] = original

        def counted(*args, _name=name, _original=original, **kwargs):
            t0 = time.perf_counter()
            out = _original(*args, **kwargs)
            entry = stats[_name]
            entry["seconds"] += time.perf_counter() - t0
            entry["calls"] += 1
            entry["flops"] += kernel_flops(_name, args, out)
            return out

        setattr(kernels, name, counted)

    def uninstall():
        for name, original in originals.items():
            setattr(kernels, name, original)

    return stats, uninstall
