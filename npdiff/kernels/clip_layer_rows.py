"""CLIP's transformer layers on packed weights with one prompt per thread: a whole layer, or all of them, in one
parallel call.

    clip_layer_by_prompt(h, out, batch, norm1, q, k, v, o, norm2, fc1, activation, fc2, heads, scale)  # [B*L, D]
    clip_layers_by_prompt(h, states, batch, layers, activation, heads, scale)   # states [layers, B*L, D]

The layer (transformers' CLIPEncoderLayer, pre-LN, causal):
    a = h + out_proj(attention(layer_norm1(h)))        q, k, v, out_proj: linear_packed.gemm_panels
    out = a + fc2(act(fc1(layer_norm2(a))))            attention: causal_rows.attention_head_rows, every head

Why: split by columns (linear_packed's own parallel loop), each of a layer's 8 steps is a parallel call, and each
GEMM reads rows its neighbour wrote in the step before: half of x (473 KB for a [154, 768] operand, 946 KB of
fc1's output for fc2) comes from the other core's cache, and the two threads meet 8 times a layer. The prompts of
a batch are independent all through a layer (attention mixes tokens of one prompt only), so here each thread
takes whole prompts and runs the 8 steps on its own rows, in its own cache: one parallel call a layer. The
prompts stay independent from the first layer to the last, so clip_layers_by_prompt runs every layer in one call:
the threads meet once a forward instead of once a layer. Both
threads read every weight (both cores stream all of CLIP-L's 340 MB, at the same time, so the second read
mostly hits the shared L3), and each weight panel meets 77 rows instead of 154 while it is in L2.
Taken when the batch divides among the threads (CLIP-L's 2 prompts on 2 threads); else clip.py runs the steps
one by one, each split by columns.

The same bits as the steps one by one: every element of every step is made by the same serial function in the
same order of operations (each GEMM element by row_tile in one order of k, with the same epilogue; each row's
layer norm by norm._layer_norm_row; each head's attention by attention_head_rows), whichever rows share its tile.
No fastmath flag here or below.
"""

import numpy as np
from numba import config, get_num_threads, get_thread_id

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.attention.causal_rows import attention_head_rows, work_floats
from npdiff.kernels.linear_packed import ACTIVATIONS, aligned_scratch, gemm_panels
from npdiff.kernels.linear_packed_tile import NO_ACTIVATION
from npdiff.kernels.norm import _layer_norm_serial
from npdiff.kernels.vecmath import LOG2E

ALIGN = 16  # floats: each buffer below starts on a 64-byte boundary (so does each row of D = 768 floats)


def _rounded(floats):
    return -(-floats // ALIGN) * ALIGN


def _buffer_sizes(length, dim, inner, head_dim):
    """Floats of each per-thread buffer: normed, q, k, v, attended, attention out (each [L, D]), hidden [L, I],
    the attention's buffers; each rounded up to a whole number of cache lines."""
    row_buffer = _rounded(length * dim)
    return np.array((row_buffer,) * 6 + (_rounded(length * inner), _rounded(work_floats(length, head_dim))),
                    np.int64)


def runs_by_prompt(batch):
    """Whether clip_layer_by_prompt suits a batch: the prompts divide evenly among Numba's threads."""
    return batch > 0 and batch % get_num_threads() == 0


def clip_layer_by_prompt(h, out, batch, norm1, q, k, v, o, norm2, fc1, activation, fc2, heads, scale):
    """One CLIP layer, each prompt on one thread: h [B*L, D] C-contiguous rows -> out [B*L, D] (may be h itself).

    norm1, norm2: (weight [D], bias [D], eps); q, k, v, o: (panels, bias [D]) of the [D, D] projections, fc1:
    (panels, bias [I]), fc2: (panels, bias [D]), each panels as linear_packed.pack_panels packs the weight;
    activation: "quick_gelu", "gelu" or "gelu_tanh"; scale: the attention's (head_dim ** -0.5)."""
    work, sizes = _thread_buffers(h.shape[0] // batch, h.shape[1], fc1[1].shape[0], heads)
    _layer_by_prompt_numba(h, out, batch, norm1[0], norm1[1], float(norm1[2]), q[0], q[1], k[0], k[1], v[0], v[1],
                           o[0], o[1], norm2[0], norm2[1], float(norm2[2]), fc1[0], fc1[1], ACTIVATIONS[activation],
                           fc2[0], fc2[1], heads, np.float32(scale * LOG2E), work, sizes)
    return out


def clip_layers_by_prompt(h, states, batch, layers, activation, heads, scale):
    """Every CLIP layer in one parallel call, each prompt on one thread from the first layer to the last: h [B*L, D]
    C-contiguous rows -> states [layers, B*L, D] (states[i]: layer i's output; the last is the encoder's).

    layers: one tuple (norm1, q, k, v, o, norm2, fc1, fc2) a layer, each as clip_layer_by_prompt takes it; they
    share activation, heads and scale. The same bytes as clip_layer_by_prompt layer by layer (the same serial
    steps, _layer_rows), without the threads meeting after each layer (a call a layer waited for the slower thread
    12 times, and paid the Python call and its arguments' unboxing 12 times)."""
    norm1, q, k, v, o, norm2, fc1, fc2 = zip(*layers)  # each: one entry a layer
    work, sizes = _thread_buffers(h.shape[0] // batch, h.shape[1], fc1[0][1].shape[0], heads)

    def column(pairs, index):  # the layers' arrays of one kind, as a tuple (Numba: a UniTuple, indexed by layer)
        return tuple(pair[index] for pair in pairs)

    def epsilons(norms):
        return np.array([norm[2] for norm in norms], np.float64)  # [layers]

    _layers_by_prompt_numba(h, states, batch, column(norm1, 0), column(norm1, 1), epsilons(norm1), column(q, 0),
                            column(q, 1), column(k, 0), column(k, 1), column(v, 0), column(v, 1), column(o, 0),
                            column(o, 1), column(norm2, 0), column(norm2, 1), epsilons(norm2), column(fc1, 0),
                            column(fc1, 1), ACTIVATIONS[activation], column(fc2, 0), column(fc2, 1), heads,
                            np.float32(scale * LOG2E), work, sizes)
    return states


def _thread_buffers(length, dim, inner, heads):
    """Each Numba thread's buffer for the steps of a layer, and the sizes that cut it (_buffer_sizes)."""
    sizes = _buffer_sizes(length, dim, inner, dim // heads)  # [8]
    # one array per thread (views of one shared array would take its reference count, an atomic add on one
    # header, in every view the threads make: ~40 a tile of the GEMMs' and the softmax's rows)
    work = tuple(aligned_scratch(f"clip layer by prompt {thread}", (int(sizes.sum()),))
                 for thread in range(config.NUMBA_NUM_THREADS))  # threads x [floats]
    return work, sizes


@njit(**PARALLEL)
def _layer_by_prompt_numba(h, out, batch, ln1_weight, ln1_bias, ln1_eps, q_panels, q_bias, k_panels, k_bias,
                           v_panels, v_bias, o_panels, o_bias, ln2_weight, ln2_bias, ln2_eps, fc1_panels, fc1_bias,
                           which, fc2_panels, fc2_bias, heads, scale_log2, work, sizes):
    """prange over the prompts: each task runs the whole layer on its prompt's rows. work: a tuple of one array
    per thread, cut by `sizes` (_buffer_sizes) into the [L, D] and [L, I] rows of the steps."""
    length = h.shape[0] // batch
    for prompt in prange(batch):
        rows = slice(prompt * length, (prompt + 1) * length)
        _layer_rows(h[rows], out[rows], ln1_weight, ln1_bias, ln1_eps, q_panels, q_bias, k_panels, k_bias, v_panels,
                    v_bias, o_panels, o_bias, ln2_weight, ln2_bias, ln2_eps, fc1_panels, fc1_bias, which, fc2_panels,
                    fc2_bias, heads, scale_log2, work[get_thread_id()], sizes)


@njit(**PARALLEL)
def _layers_by_prompt_numba(h, states, batch, ln1_weight, ln1_bias, ln1_eps, q_panels, q_bias, k_panels, k_bias,
                            v_panels, v_bias, o_panels, o_bias, ln2_weight, ln2_bias, ln2_eps, fc1_panels, fc1_bias,
                            which, fc2_panels, fc2_bias, heads, scale_log2, work, sizes):
    """prange over the prompts: each task runs every layer on its prompt's rows, layer i from states[i - 1] (h for
    the first) into states[i]. Every weight argument is a tuple of the layers' arrays (ln1_eps, ln2_eps: [layers])."""
    length = h.shape[0] // batch
    for prompt in prange(batch):
        rows = slice(prompt * length, (prompt + 1) * length)
        mine = work[get_thread_id()]
        for layer in range(states.shape[0]):
            layer_in = h[rows] if layer == 0 else states[layer - 1, rows]  # [L, D]
            _layer_rows(layer_in, states[layer, rows], ln1_weight[layer], ln1_bias[layer], ln1_eps[layer],
                        q_panels[layer], q_bias[layer], k_panels[layer], k_bias[layer], v_panels[layer], v_bias[layer],
                        o_panels[layer], o_bias[layer], ln2_weight[layer], ln2_bias[layer], ln2_eps[layer],
                        fc1_panels[layer], fc1_bias[layer], which, fc2_panels[layer], fc2_bias[layer], heads,
                        scale_log2, mine, sizes)


@njit(**SERIAL)
def _layer_rows(h_rows, out_rows, ln1_weight, ln1_bias, ln1_eps, q_panels, q_bias, k_panels, k_bias, v_panels, v_bias,
                o_panels, o_bias, ln2_weight, ln2_bias, ln2_eps, fc1_panels, fc1_bias, which, fc2_panels, fc2_bias,
                heads, scale_log2, mine, sizes):
    """The layer's 8 steps on one prompt's rows h_rows [L, D] -> out_rows [L, D], on the calling thread; mine: its
    buffer, cut by `sizes` (_buffer_sizes) into the [L, D] and [L, I] rows of the steps."""
    length, dim = h_rows.shape
    inner = fc1_bias.shape[0]
    head_dim = dim // heads
    start = 0
    normed = mine[start:start + length * dim].reshape((length, dim))  # [L, D]
    start += sizes[0]
    q = mine[start:start + length * dim].reshape((length, dim))  # [L, D]
    start += sizes[1]
    k = mine[start:start + length * dim].reshape((length, dim))  # [L, D]
    start += sizes[2]
    v = mine[start:start + length * dim].reshape((length, dim))  # [L, D]
    start += sizes[3]
    attended = mine[start:start + length * dim].reshape((length, dim))  # [L, D], heads merged
    start += sizes[4]
    attention_out = mine[start:start + length * dim].reshape((length, dim))  # [L, D]
    start += sizes[5]
    hidden = mine[start:start + length * inner].reshape((length, inner))  # [L, I]
    start += sizes[6]
    attention_work = mine[start:start + sizes[7]]
    # 1. causal self-attention on layer_norm1(h), + h
    _layer_norm_serial(h_rows, ln1_weight, ln1_bias, ln1_eps, normed)                     # [L, D]
    gemm_panels(normed, q_panels, 0, q_panels.shape[0], q_bias, True, NO_ACTIVATION, normed, False, q)
    gemm_panels(normed, k_panels, 0, k_panels.shape[0], k_bias, True, NO_ACTIVATION, normed, False, k)
    gemm_panels(normed, v_panels, 0, v_panels.shape[0], v_bias, True, NO_ACTIVATION, normed, False, v)
    for head in range(heads):
        attention_head_rows(q, k, v, head * head_dim, head_dim, scale_log2, attended, attention_work)
    gemm_panels(attended, o_panels, 0, o_panels.shape[0], o_bias, True, NO_ACTIVATION, h_rows, True,
                attention_out)                                                        # [L, D] + h
    # 2. MLP on layer_norm2(a), + a
    _layer_norm_serial(attention_out, ln2_weight, ln2_bias, ln2_eps, normed)              # [L, D]
    gemm_panels(normed, fc1_panels, 0, fc1_panels.shape[0], fc1_bias, True, which, normed, False,
                hidden)                                                               # [L, D] -> [L, I]
    gemm_panels(hidden, fc2_panels, 0, fc2_panels.shape[0], fc2_bias, True, NO_ACTIVATION, attention_out,
                True, out_rows)                                                       # [L, I] -> [L, D] + a
