"""Memory (and time) of the UNet backward at SD 1.5 size: what textual inversion's step keeps.

    python benchmarks/training_memory.py [--size 64] [--tokens 77] [--recompute]

Builds an SD 1.5-shaped UNet (860 M parameters) over random weights, one array per distinct shape
shared by every tensor of that shape (so the weights take ~0.7 GiB here instead of 3.2 GiB; the
activations, what is measured, are the same), then runs npdiff.models.unet_backward's tape forward
and its backward for latents [1,4,size,size]. Reports the resident memory the tape keeps between
forward and backward, the peak during the backward above the built model (RSS sampled every 50 ms
and the kernel's VmHWM), and the seconds of each. Writes benchmarks/out/training_memory.json.
"""

import npdiff  # noqa: F401, I001  (first: OpenBLAS settings before numpy)
import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402
from _rss import proc_status_gib  # noqa: E402

from npdiff.models.unet import UNet2DConditionModel  # noqa: E402
from npdiff.models.unet_backward import unet_forward_for_backward  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
            norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)


class SharedRandomWeights:
    """The .take interface of npdiff.loading.Weights; every tensor of one shape is the same random array."""

    precision = "fp32"  # what the models ask a loader for (clip.py keeps float32 weights transposed)

    def __init__(self, seed=0):
        self.by_shape = {}
        self.parameters = 0
        self.rng = np.random.default_rng(seed)

    def take(self, key, shape, finite=True):
        shape = tuple(shape)
        self.parameters += int(np.prod(shape))
        if shape not in self.by_shape:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            values = self.rng.standard_normal(shape) / np.sqrt(fan_in)
            self.by_shape[shape] = values.astype(np.float32)
        return self.by_shape[shape]

    def has(self, key):
        return False

    def check_all_used(self):
        pass


class PeakSampler:
    """VmRSS sampled every 50 ms on a thread: the peak since reset()."""

    def __init__(self):
        self.peak = 0.0
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            self.peak = max(self.peak, proc_status_gib("VmRSS"))
            time.sleep(0.05)

    def reset(self):
        self.peak = proc_status_gib("VmRSS")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--recompute", action="store_true",
                        help="keep block inputs only (keep_states=False): each block's backward recomputes its internals")
    args = parser.parse_args()
    weights = SharedRandomWeights()
    unet = UNet2DConditionModel(SD15, weights)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((1, 4, args.size, args.size)).astype(np.float32)
    context = rng.standard_normal((1, args.tokens, 768)).astype(np.float32)
    sampler = PeakSampler()
    built = proc_status_gib("VmRSS")
    sampler.reset()
    start = time.perf_counter()
    out, tape = unet_forward_for_backward(unet, sample, 981, context, keep_states=not args.recompute)
    forward_s = time.perf_counter() - start
    kept = proc_status_gib("VmRSS") - built
    start = time.perf_counter()
    tape.backward(rng.standard_normal(out.shape).astype(np.float32))
    backward_s = time.perf_counter() - start
    result = {
        "parameters_M": weights.parameters / 1e6, "float32_weights_GiB": weights.parameters * 4 / 2**30,
        "built_rss_GiB": built, "tape_kept_GiB": kept, "peak_above_built_GiB": sampler.peak - built,
        "vmhwm_GiB": proc_status_gib("VmHWM"), "forward_s": forward_s, "backward_s": backward_s,
        "load_average": list(os.getloadavg()), "latent": [1, 4, args.size, args.size],
        "keep_states": not args.recompute,
    }
    for name, value in result.items():
        print(f"{name:22s} {value}")
    print("->", write_json("training_memory", result))


if __name__ == "__main__":
    main()
