"""Helpers for the gpu tests: moving arrays between numpy, cupy and torch CUDA."""

import numpy as np


def host(array):
    """numpy, cupy or torch -> numpy."""
    if hasattr(array, "detach"):
        return array.detach().float().cpu().numpy()
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def to_torch_cuda(array, dtype=None):
    """numpy or cupy array -> torch tensor on the current CUDA device (optionally cast)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(host(array))).cuda()
    return tensor if dtype is None else tensor.to(dtype)
