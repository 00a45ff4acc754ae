"""Helpers for the rng tests: raw bits of arrays and tensors, torch dtypes, the math path torch uses
here, and MT19937 state words that make torch draw chosen numbers."""

import numpy as np
import torch

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def our_bits(values, dtype_name):
    """Raw bits of our output (bfloat16 comes as float32 holding bf16 values: take the high half)."""
    values = np.ascontiguousarray(values)
    if dtype_name == "bfloat16":
        assert values.dtype == np.float32, values.dtype
        assert not (values.view(np.uint32) & 0xFFFF).any(), "bfloat16 result has low mantissa bits set"
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    assert values.dtype == np.dtype(dtype_name), (values.dtype, dtype_name)
    return values.view({"float32": np.uint32, "float64": np.uint64, "float16": np.uint16}[dtype_name])


def torch_bits(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    array = tensor.contiguous().numpy()
    return array.view({np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64,
                       np.dtype(np.float16): np.uint16}[array.dtype])


def assert_same_bits(ours, theirs, dtype_name, what):
    a, b = our_bits(ours, dtype_name), torch_bits(theirs)
    assert tuple(ours.shape) == tuple(theirs.shape), f"{what}: shape {ours.shape} != torch {tuple(theirs.shape)}"
    differ = int(np.count_nonzero(a.reshape(-1) != b.reshape(-1)))
    assert differ == 0, f"{what}: {differ} of {a.size} values differ from torch's bits"


def math_path_for(capability):
    """Our `math=` for a torch CPU capability string: the AVX2 Box-Muller kernel runs on AVX2 and
    AVX512 builds; every other capability (DEFAULT, and non-x86 ones) runs the portable libm one."""
    return "avx2" if capability.upper() in ("AVX2", "AVX512") else "default"


def torch_math_path():
    return math_path_for(torch.backends.cpu.get_cpu_capability())


def untemper(values):
    """Inverse of MT19937's tempering (uint32 array): the state words whose draws are `values`."""
    y = values.astype(np.uint64)
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    # y ^= (y << 7) & 0x9D2C5680 undone 7 bits at a time
    result = y.copy()
    for _ in range(4):
        result = y ^ ((result << 7) & 0x9D2C5680)
    y = result & 0xFFFFFFFF
    # y ^= y >> 11 undone
    result = y.copy()
    for _ in range(2):
        result = y ^ (result >> 11)
    return (result & 0xFFFFFFFF).astype(np.uint32)


def torch_state_drawing(words, seed=0):
    """A torch CPU generator state (uint8 tensor) whose next len(words) <= 623 draws are `words`."""
    assert len(words) <= 623
    torch.manual_seed(seed)
    state = torch.get_rng_state().numpy().copy()
    mt_words = np.zeros(624, dtype=np.uint64)
    mt_words[:len(words)] = untemper(np.asarray(words, dtype=np.uint32))
    state[8:12] = np.frombuffer(np.int32(624).tobytes(), np.uint8)  # left: no twist for 623 draws
    state[16:24] = np.frombuffer(np.uint64(0).tobytes(), np.uint8)  # next
    state[24:24 + 624 * 8] = np.frombuffer(mt_words.tobytes(), np.uint8)
    return torch.from_numpy(state)
