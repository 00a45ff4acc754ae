"""All of Stable Diffusion in one file: NumPy and the Python standard library, nothing else.

This is the plain, slow-enough version of what the rest of npdiff does fast. It takes a diffusers
model folder (text_encoder/, tokenizer/, unet/, vae/, scheduler/) and draws a picture from a prompt,
and for the same seed it draws what diffusers' StableDiffusionPipeline with DDIMScheduler draws
(tests/test_reference.py checks every part against torch, transformers and diffusers).

    from npdiff.reference import txt2img
    picture = txt2img("weights/tiny-shapes", "a red circle on a blue background", seed=1)  # uint8 [H,W,3]

    python -m npdiff.reference "a red circle on a blue background" out.png --seed 1

Weights stay in nested dicts keyed by the checkpoint's own names, so that
`unet["down_blocks"]["0"]["resnets"]["1"]["conv1"]["weight"]` is the tensor the file calls
"down_blocks.0.resnets.1.conv1.weight", and every layer is a function whose arguments are its
sub-modules: `resnet(x, temb, **block["resnets"]["0"])`. The checkpoint's tree is the call tree.

Read it top to bottom:
  1. safetensors     the weight file format, read by hand
  2. tokenizer       CLIP's byte-level BPE: prompt -> 77 token ids
  3. random numbers  torch's CPU randn (MT19937 + Box-Muller), bit for bit: same seed, same noise
  4. layers          linear, conv2d, group/layer norm, activations, softmax attention
  5. text encoder    CLIP: token ids -> [77, width] embeddings
  6. UNet            (noisy latents, timestep, text embeddings) -> predicted noise
  7. VAE decoder     latents -> pixels
  8. DDIM            the schedule and one denoising step
  9. txt2img         all of it together, with classifier-free guidance
 10. command line    and a PNG writer (zlib + struct)
"""

import argparse
import json
import math
import numbers
import re
import struct
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

F = np.float32  # all arithmetic is float32, as torch's


def require(condition, message):
    """Bad input -> a ValueError that names it (called before any long work)."""
    if not condition:
        raise ValueError(message)


# =================================================================================================
# 1. safetensors: 8 bytes (little-endian header length), a JSON header, then raw little-endian data
# =================================================================================================
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path):
    """-> {name: array}; F32/F16/BF16/F64 tensors come back as float32."""
    data = Path(path).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])  # {name: {"dtype", "shape", "data_offsets"}}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        require(info["dtype"] in SAFETENSORS_DTYPES, f"{path}: {name} has dtype {info['dtype']}, not one of "
                f"{list(SAFETENSORS_DTYPES)}")
        begin, end = info["data_offsets"]  # byte offsets after the header
        require(8 + header_length + end <= len(data), f"{path} is truncated: {name} ends past the end of the file")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        raw = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize, offset=8 + header_length + begin)
        if info["dtype"] == "BF16":  # bfloat16 = the upper 16 bits of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        if raw.dtype.kind == "f":
            raw = raw.astype(np.float32, copy=False)  # (float32 stays a read-only view of the bytes)
        tensors[name] = raw.reshape(info["shape"])
    return tensors


def nest(flat):
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}: the checkpoint's dotted names become a tree."""
    tree = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def numbered(node):
    """The children "0", "1", ... of a tree node (a ModuleList in the checkpoint), in order."""
    return [node[str(i)] for i in range(len(node))]


def load_part(model_dir, part):
    """model_dir/part/config.json and its .safetensors weights -> (config dict, weight tree)."""
    folder = Path(model_dir) / part
    names = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # what diffusers loads first
    files = [folder / name for name in names if (folder / name).is_file()] or sorted(folder.glob("*.safetensors"))
    require((folder / "config.json").is_file() and files, f"{folder}: no config.json and .safetensors file")
    config = json.loads((folder / "config.json").read_text())
    flat = read_safetensors(files[0])
    # VAE files saved before diffusers 0.14 name the attention's projections query/key/value/proj_attn
    old_names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    flat = {re.sub(r"\.(query|key|value|proj_attn)\.", lambda m: f".{old_names[m[1]]}.", k): v for k, v in flat.items()}
    return config, nest(flat)


# =================================================================================================
# 2. The CLIP tokenizer: byte-level BPE with "</w>" marking the end of a word
# =================================================================================================
def bytes_to_unicode():
    """GPT-2's table: byte value -> a printable character. Printable bytes stand for themselves; the
    others (controls, space, ...) get the characters 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def is_space(ch):
    """Unicode White_Space (the regex class \\s of the tokenizer library; Python's str.isspace also
    counts the separators U+001C..U+001F)."""
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


def char_kind(ch):
    """'space', 'letter' (\\p{L}), 'number' (\\p{N}) or 'other'."""
    if is_space(ch):
        return "space"
    return {"L": "letter", "N": "number"}.get(unicodedata.category(ch)[0], "other")


class CLIPTokenizer:
    """Prompt -> 77 ids: [<|startoftext|>] + at most 75 BPE ids + [<|endoftext|>] + padding."""

    CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / "vocab.json").is_file():  # vocab.json: piece -> id; merges.txt: "a b" per line
            self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        else:  # folders saved by transformers 5 hold both in tokenizer.json
            require((folder / "tokenizer.json").is_file(), f"{folder}: no vocab.json + merges.txt or tokenizer.json")
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            self.vocab = model["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # earlier merge = applied first
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second one wins
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}  # SD 2.x pads with "!" (id 0): its folder says so
        special = {key: config.get(key) or default for key, default in special.items()}
        special = {key: text["content"] if isinstance(text, dict) else text for key, text in special.items()}
        self.bos, self.eos, self.unk, self.pad = (self.vocab[special[key]] for key in special)
        self.specials = sorted(set(special.values()), key=len, reverse=True)  # found in the raw prompt, never split
        length = config.get("model_max_length", 77)
        self.length = length if isinstance(length, int) and length < 10**6 else 77  # 1e30 means "not set"
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    def normalize(self, text):
        """NFC, runs of whitespace -> one space, lowercase (character by character, as the
        tokenizer library does: a final capital sigma becomes σ, not ς)."""
        text = unicodedata.normalize("NFC", text)
        text = "".join(" " if is_space(ch) else ch for ch in text)
        text = re.sub(" +", " ", text)
        return "".join(ch.lower() for ch in text)

    def split_words(self, text):
        """CLIP's pre-tokenizer pattern, written out with str methods (stdlib `re` has no \\p{L}):
            's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+
        At each position the first alternative that matches wins; whitespace between matches is
        dropped. (The pattern also lists <|startoftext|> and <|endoftext|>, but the tokenizer
        library's byte-level step cuts those at "|" again, so here they are not whole words.)"""
        words, i = [], 0
        while i < len(text):
            word = next((w for w in self.CONTRACTIONS if text.startswith(w, i)), None)
            if word is None:
                kind = char_kind(text[i])
                if kind == "space":
                    i += 1
                    continue
                end = i + 1
                if kind != "number":  # letters and "other" come in runs, digits one by one
                    while end < len(text) and char_kind(text[end]) == kind:
                        end += 1
                word = text[i:end]
            words.append(word)
            i += len(word)
        return words

    def bpe(self, word):
        """One word (as byte characters) -> its pieces: start from single characters, the last one
        marked "</w>", and merge the adjacent pair of lowest rank (leftmost first) until no pair is
        in the merge list."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, prompt):
        """Prompt -> BPE ids without start/end (unknown pieces -> the unk token, <|endoftext|>)."""
        ids = []
        pattern = "(" + "|".join(re.escape(s) for s in self.specials) + ")"
        for k, segment in enumerate(re.split(pattern, prompt)):  # odd k: a special token
            if k % 2:
                ids.append(self.vocab[segment])
                continue
            for word in self.split_words(self.normalize(segment)):
                chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
                ids += [self.vocab.get(piece, self.unk) for piece in self.bpe(chars)]
        return ids

    def __call__(self, prompt):
        """-> int64 [77]: start, the first 75 ids, end, then padding (longer prompts are truncated)."""
        ids = [self.bos] + self.encode(prompt)[:self.length - 2] + [self.eos]
        return np.array(ids + [self.pad] * (self.length - len(ids)), dtype=np.int64)  # [77]


# =================================================================================================
# 3. torch's CPU random numbers, bit for bit: torch.manual_seed(s); torch.randn(shape)
# =================================================================================================
# The same seed must give the same starting noise as diffusers, so this is torch's algorithm exactly:
#   1. MT19937 seeded with the seed's low 32 bits; float32 uniforms u = (24 bits of a draw) / 2^24.
#   2. n >= 16 values: Box-Muller on blocks of 16 uniforms, pairing u[j] with u[j + 8]:
#      r = sqrt(-2 log(1 - u[j])), theta = 2 pi u[j + 8]  ->  r cos(theta), r sin(theta).
#      log, sin and cos are the float32 Cephes polynomials of torch's AVX2 kernel, which every x86 CPU
#      with AVX2 runs (other CPUs use libm there and differ in the last bit or two), and the compiler
#      fused some of their multiply-adds: each fma32 below stands where torch's binary has one.
#   3. n < 16 values: a scalar Box-Muller in double precision instead.
class MT19937:
    """The Mersenne Twister as torch's CPU generator runs it (seeded from the seed's low 32 bits)."""

    def __init__(self, seed):
        state = [int(seed) & 0xFFFFFFFF]  # (negative seeds: two's complement, as torch)
        for j in range(1, 624):
            state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + j) & 0xFFFFFFFF)
        self.state, self.index = state, 624  # the first draw twists

    def twist(self):
        """Regenerate the 624 words in place (word k reads k, k+1 and k+397, mod 624)."""
        mt = self.state
        for k in range(624):
            y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
            mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        y = np.array(mt, dtype=np.uint32)  # [624] tempering, all words at once
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        self.tempered, self.index = y ^ (y >> 18), 0

    def draw(self, n):
        """-> the next n 32-bit outputs, uint32 [n]."""
        chunks = []
        while n > 0:
            if self.index == 624:
                self.twist()
            take = min(n, 624 - self.index)
            chunks.append(self.tempered[self.index:self.index + take])
            self.index, n = self.index + take, n - take
        return np.concatenate(chunks)  # [n]

    def uniform_f32(self, n):
        """float32 [n] in [0, 1): 24 bits of one draw."""
        return (self.draw(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)

    def uniform_f64(self):
        """One float in [0, 1): 53 bits of two draws (the first gives the high bits)."""
        high, low = (int(w) for w in self.draw(2))
        return (((high << 32) | low) & (2**53 - 1)) * 2.0**-53


def fma32(a, b, c):
    """a*b + c on float32 arrays, rounded ONCE (the FMA instructions in torch's compiled kernel).
    The product is exact in float64 (24 + 24 bits < 53), the float64 sum is not, and rounding it
    again to float32 could round twice; so the sum is first rounded "to odd" (take the neighbour with
    an odd last bit when the sum was inexact, found with TwoSum's exact error), which makes the final
    float32 rounding correct."""
    product = a.astype(np.float64) * b  # [n] exact
    total = product + c  # [n] rounded to float64
    error = (product - (total - (total - product))) + (c - (total - product))  # [n] exact: sum - total
    make_odd = (error != 0) & (total.view(np.uint64) % 2 == 0)
    total = np.where(make_odd, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)  # [n]


LOG_P = [F(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]


def log_f32(x):
    """Natural log of float32 x > 0 as torch's AVX2 kernel computes it (Cephes polynomial, avx_mathfun.h)."""
    bits = x.view(np.int32)  # [n]
    exponent = ((bits >> 23) - 127).astype(np.float32) + F(1)  # x = m * 2^e, m in [0.5, 1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(np.float32)
    small = m < F(0.707106781186547524)  # then use 2m - 1 and e - 1, so that |m - 1| is small
    exponent = np.where(small, exponent - F(1), exponent)
    m = (m - F(1)) + np.where(small, m, F(0))
    z = m * m
    y = fma32(LOG_P[0], m, LOG_P[1])
    for p in LOG_P[2:]:
        y = fma32(y, m, p)
    y = y * m
    y = fma32(y, z, exponent * F(-2.12194440e-4))
    y = y - z * F(0.5)
    return fma32(exponent, F(0.693359375), m + y)  # + e * log(2), log(2) in two parts


def sincos_f32(x):
    """(sin x, cos x) of float32 x as torch's AVX2 kernel computes them (Cephes, avx_mathfun.h)."""
    sign_sin = x.view(np.uint32) & 0x80000000
    x = np.abs(x)
    octant = (x * F(1.27323954473516)).astype(np.int32)  # x * 4/pi, truncated, rounded up to even
    octant = (octant + 1) & ~1
    y = octant.astype(np.float32)
    sign_sin = sign_sin ^ ((octant & 4) << 29).astype(np.uint32)
    sign_cos = ((~(octant - 2) & 4) << 29).astype(np.uint32)
    x = fma32(y, F(-0.78515625), x)  # x - y * pi/4, pi/4 in three parts
    x = fma32(y, F(-2.4187564849853515625e-4), x)
    x = fma32(y, F(-3.77489497744594108e-8), x)
    z = x * x
    cos_poly = fma32(fma32(F(2.443315711809948e-5), z, F(-1.388731625493765e-3)), z, F(4.166664568298827e-2))
    cos_poly = fma32(cos_poly * z, z, -(z * F(0.5))) + F(1)
    sin_poly = fma32(fma32(F(-1.9515295891e-4), z, F(8.3321608736e-3)), z, F(-1.6666654611e-1))
    sin_poly = fma32(sin_poly * z, x, x)
    swap = (octant & 2) != 0
    sin_x, cos_x = np.where(swap, cos_poly, sin_poly), np.where(swap, sin_poly, cos_poly)
    return (sin_x.view(np.uint32) ^ sign_sin).view(np.float32), (cos_x.view(np.uint32) ^ sign_cos).view(np.float32)


def box_muller_blocks(uniforms):
    """float32 [16k] uniforms -> normals, in blocks of 16: lane j pairs with lane j + 8."""
    blocks = uniforms.reshape(-1, 2, 8)  # [k, 2, 8]
    radius = np.sqrt(F(-2) * log_f32(F(1) - blocks[:, 0]))  # [k, 8]
    sin_theta, cos_theta = sincos_f32(F(2 * math.pi) * blocks[:, 1])  # [k, 8] each
    normals = np.stack([radius * cos_theta, radius * sin_theta], axis=1) + F(0)  # [k,2,8]; -0 -> +0
    return normals.reshape(-1)  # [16k]


def torch_randn(shape, seed):
    """float32 normals of `shape`, equal to torch.manual_seed(seed); torch.randn(shape) on an x86 CPU."""
    n, rng = math.prod(shape), MT19937(seed)
    if n < 16:  # torch's scalar path: Box-Muller in double, pairs (cos, then the cached sin)
        out = []
        while len(out) < n:
            u1, u2 = rng.uniform_f64(), rng.uniform_f64()
            radius, theta = math.sqrt(-2 * math.log1p(-u2)), 2 * math.pi * u1
            out += [radius * math.cos(theta), radius * math.sin(theta)]
        return np.array(out[:n], dtype=np.float32).reshape(shape)
    # 16 or more: n uniforms, Box-Muller on every full block of 16; if n % 16, 16 FRESH uniforms
    # make the last block, written over the last 16 values
    normals = np.empty(n, dtype=np.float32)  # [n]
    full = n // 16 * 16
    normals[:full] = box_muller_blocks(rng.uniform_f32(n)[:full])
    if n % 16:
        normals[n - 16:] = box_muller_blocks(rng.uniform_f32(16))
    return normals.reshape(shape)


# =================================================================================================
# 4. Layers (float32; images are [B,C,H,W], token sequences [B,N,C])
# =================================================================================================
def linear(x, weight, bias=None):
    """torch.nn.Linear: [..., in] -> [..., out]."""
    y = x @ weight.T  # [..., in] @ [in, out] -> [..., out]
    return y if bias is None else y + bias


def conv2d(x, weight, bias=None, stride=1, padding=None):
    """torch.nn.Conv2d, "same" padding by default: im2col (every k x k window becomes one row of
    C*k*k numbers), then one matrix product with the [O, C*k*k] filters."""
    out_channels, channels, kh, kw = weight.shape
    padding = kh // 2 if padding is None else padding
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))  # [B,C,H+2p,W+2p]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [B,C,H',W',kh,kw]
    batch, _, height, width = windows.shape[:4]
    rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * height * width, channels * kh * kw)  # im2col
    y = rows @ weight.reshape(out_channels, -1).T  # [B*H'*W', O]
    y = np.ascontiguousarray(y.reshape(batch, height, width, out_channels).transpose(0, 3, 1, 2))  # [B,O,H',W']
    return y if bias is None else y + bias[:, None, None]


def group_norm(x, weight, bias, groups, eps):
    """torch.nn.GroupNorm: normalise each group of C/groups channels over (channels, H, W)."""
    batch, channels = x.shape[:2]
    g = x.reshape(batch, groups, -1)  # [B,C,H,W] -> [B,G,C/G*H*W]
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)  # [B,G,C/G*H*W]
    return g.reshape(x.shape) * weight[:, None, None] + bias[:, None, None]  # [B,C,H,W]


def layer_norm(x, weight, bias, eps=1e-5):
    """torch.nn.LayerNorm over the last axis: [..., C] -> [..., C]."""
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias  # [..., C]


def sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives the right limit, 0
        return 1 / (1 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation."""
    return x * sigmoid(F(1.702) * x)


def erf(x):
    """Error function, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7; NumPy has no erf)."""
    t = 1 / (1 + 0.3275911 * np.abs(x.astype(np.float64)))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1 - poly * np.exp(-np.square(x.astype(np.float64))))).astype(np.float32)


def gelu(x):
    """The exact GELU, x * P(N(0,1) < x) (torch.nn.functional.gelu)."""
    return F(0.5) * x * (1 + erf(x / F(math.sqrt(2))))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": silu}


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))  # [..., M]
    return e / e.sum(-1, keepdims=True)


def multi_head_attention(q, k, v, heads, causal=False):
    """softmax(q k^T / sqrt(d)) v in each of `heads` slices of width d: q [B,N,C], k,v [B,M,C] -> [B,N,C]."""
    batch, n, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(batch, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))  # [B,h,N|M,d]
    scores = q @ k.transpose(0, 1, 3, 2) * F(d ** -0.5)  # [B,h,N,M]
    if causal:  # token i sees tokens 0..i only
        scores = scores + np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)  # [B,h,N,N]
    out = softmax(scores) @ v  # [B,h,N,d]
    return out.transpose(0, 2, 1, 3).reshape(batch, n, width)  # [B,N,C]


# =================================================================================================
# 5. The CLIP text encoder: ids [B,77] -> embeddings [B,77,width]
# =================================================================================================
def clip_layer(x, layer_norm1, self_attn, layer_norm2, mlp, heads, act, eps):
    """One pre-norm transformer layer: causal self-attention, then an MLP, each added to x."""
    h = layer_norm(x, **layer_norm1, eps=eps)  # [B,77,C]
    q, k, v = (linear(h, **self_attn[name]) for name in ("q_proj", "k_proj", "v_proj"))  # [B,77,C] each
    x = x + linear(multi_head_attention(q, k, v, heads, causal=True), **self_attn["out_proj"])  # [B,77,C]
    h = layer_norm(x, **layer_norm2, eps=eps)  # [B,77,C]
    return x + linear(act(linear(h, **mlp["fc1"])), **mlp["fc2"])  # [B,77,C] -> [B,77,4C] -> [B,77,C]


def clip_text_encoder(ids, weights, config):
    """transformers' CLIPTextModel(ids).last_hidden_state."""
    weights = weights.get("text_model", weights)  # older files name every key "text_model.<...>"
    # 1. Token embedding + position embedding
    embeddings = weights["embeddings"]
    x = embeddings["token_embedding"]["weight"][ids]  # [B,77] -> [B,77,C]
    x = x + embeddings["position_embedding"]["weight"][:ids.shape[1]]  # + [77,C]
    # 2. The transformer layers, then a last layer norm
    for layer in numbered(weights["encoder"]["layers"]):
        x = clip_layer(x, **layer, heads=config["num_attention_heads"], act=ACTIVATIONS[config["hidden_act"]],
                       eps=config["layer_norm_eps"])
    return layer_norm(x, **weights["final_layer_norm"], eps=config["layer_norm_eps"])  # [B,77,C]


# =================================================================================================
# 6. The UNet: (latents [B,4,h,w], timestep, text [B,77,C]) -> predicted noise [B,4,h,w]
# =================================================================================================
def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift):
    """Sinusoids of the timestep at dim/2 frequencies from 1 down to 1/10000: [B] -> [B,dim]."""
    half = dim // 2
    frequencies = np.exp(F(-math.log(10000)) * np.arange(half, dtype=np.float32) / F(half - freq_shift))  # [dim/2]
    angles = timesteps.astype(np.float32)[:, None] * frequencies[None]  # [B,dim/2]
    sin, cos = np.sin(angles), np.cos(angles)
    return np.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)  # [B,dim]


def resnet(x, temb, norm1, conv1, norm2, conv2, time_emb_proj=None, conv_shortcut=None,
           groups=32, eps=1e-5, output_scale_factor=1.0):
    """diffusers' ResnetBlock2D: two norm-silu-conv steps, the timestep added in between."""
    h = conv2d(silu(group_norm(x, **norm1, groups=groups, eps=eps)), **conv1)  # [B,Cin,H,W] -> [B,C,H,W]
    if time_emb_proj is not None:
        h = h + linear(silu(temb), **time_emb_proj)[:, :, None, None]  # + [B,C,1,1]
    h = conv2d(silu(group_norm(h, **norm2, groups=groups, eps=eps)), **conv2)  # [B,C,H,W]
    shortcut = x if conv_shortcut is None else conv2d(x, **conv_shortcut)  # [B,C,H,W] (1x1 conv if Cin != C)
    return (shortcut + h) / F(output_scale_factor)


def attention(x, context, to_q, to_k, to_v, to_out, heads):
    """diffusers' Attention: x [B,N,C] attends to context [B,M,Cc] (to x itself when None)."""
    context = x if context is None else context
    q, k, v = linear(x, **to_q), linear(context, **to_k), linear(context, **to_v)  # [B,N,C], [B,M,C] x2
    return linear(multi_head_attention(q, k, v, heads), **to_out["0"])  # [B,N,C]


def transformer_block(x, context, norm1, attn1, norm2, attn2, norm3, ff, heads):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention to the text, GEGLU MLP."""
    x = x + attention(layer_norm(x, **norm1), None, **attn1, heads=heads)  # [B,N,C]
    x = x + attention(layer_norm(x, **norm2), context, **attn2, heads=heads)  # [B,N,C]
    h, gate = np.split(linear(layer_norm(x, **norm3), **ff["net"]["0"]["proj"]), 2, axis=-1)  # [B,N,4C] x2
    return x + linear(h * gelu(gate), **ff["net"]["2"])  # [B,N,4C] -> [B,N,C]


def transformer_2d(x, context, norm, proj_in, transformer_blocks, proj_out, heads, groups):
    """diffusers' Transformer2DModel: the pixels of a feature map as a sequence of tokens.
    proj_in/proj_out are 1x1 convs (SD 1.x) or linear layers (SD 2.x, use_linear_projection)."""
    batch, _, height, width = x.shape
    linear_projection = proj_in["weight"].ndim == 2
    h = group_norm(x, **norm, groups=groups, eps=1e-6)  # [B,C,H,W]
    if not linear_projection:
        h = conv2d(h, **proj_in)  # [B,C,H,W]
    h = h.transpose(0, 2, 3, 1).reshape(batch, height * width, -1)  # [B,C,H,W] -> [B,H*W,C]
    if linear_projection:
        h = linear(h, **proj_in)  # [B,H*W,C]
    for block in numbered(transformer_blocks):
        h = transformer_block(h, context, **block, heads=heads)  # [B,H*W,C]
    if linear_projection:
        h = linear(h, **proj_out)  # [B,H*W,C]
    h = h.reshape(batch, height, width, -1).transpose(0, 3, 1, 2)  # [B,H*W,C] -> [B,C,H,W]
    if not linear_projection:
        h = conv2d(h, **proj_out)  # [B,C,H,W]
    return h + x


def upsample(x, conv):
    """Nearest-neighbour 2x, then a 3x3 conv: [B,C,H,W] -> [B,C,2H,2W]."""
    return conv2d(x.repeat(2, axis=2).repeat(2, axis=3), **conv)


def unet(latents, timestep, context, weights, config):
    """diffusers' UNet2DConditionModel (SD 1.x/2.x layout)."""
    groups, eps = config["norm_num_groups"], config["norm_eps"]
    n_blocks = len(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config["attention_head_dim"]  # SD's "head dim" is the head count
    heads = [heads] * n_blocks if isinstance(heads, int) else list(heads)
    for key, supported in (("time_embedding_type", "positional"), ("class_embed_type", None),
                           ("addition_embed_type", None), ("center_input_sample", False),
                           ("resnet_time_scale_shift", "default"), ("mid_block_type", "UNetMidBlock2DCrossAttn")):
        require(config.get(key, supported) == supported, f"unet/config.json: {key}={config.get(key)!r} is not "
                f"supported here (only {supported!r})")
    # 1. Timestep -> embedding [B,4*C0]
    timesteps = np.full(latents.shape[0], timestep)  # [B]
    temb = timestep_embedding(timesteps, config["block_out_channels"][0], config["flip_sin_to_cos"],
                              config["freq_shift"])  # [B,C0]
    temb = linear(silu(linear(temb, **weights["time_embedding"]["linear_1"])), **weights["time_embedding"]["linear_2"])
    # 2. conv_in: [B,4,h,w] -> [B,C0,h,w]
    x = conv2d(latents, **weights["conv_in"])
    skips = [x]
    # 3. Down: resnet (+ transformer) per layer, then a stride-2 conv; every output is kept for the up path
    for block, block_heads in zip(numbered(weights["down_blocks"]), heads):
        for i, resnet_weights in enumerate(numbered(block["resnets"])):
            x = resnet(x, temb, **resnet_weights, groups=groups, eps=eps)  # [B,C,H,W]
            if "attentions" in block:
                x = transformer_2d(x, context, **block["attentions"][str(i)], heads=block_heads, groups=groups)
            skips.append(x)
        if "downsamplers" in block:
            x = conv2d(x, **block["downsamplers"]["0"]["conv"], stride=2, padding=1)  # [B,C,H/2,W/2]
            skips.append(x)
    # 4. Middle: resnet, transformer, resnet at the lowest resolution
    mid = weights["mid_block"]
    scale = config.get("mid_block_scale_factor", 1.0)
    x = resnet(x, temb, **mid["resnets"]["0"], groups=groups, eps=eps, output_scale_factor=scale)
    for i, resnet_weights in enumerate(numbered(mid["resnets"])[1:]):
        x = transformer_2d(x, context, **mid["attentions"][str(i)], heads=heads[-1], groups=groups)
        x = resnet(x, temb, **resnet_weights, groups=groups, eps=eps, output_scale_factor=scale)
    # 5. Up: each resnet takes the last skip concatenated along channels; then upsample 2x
    for block, block_heads in zip(numbered(weights["up_blocks"]), heads[::-1]):
        for i, resnet_weights in enumerate(numbered(block["resnets"])):
            x = np.concatenate([x, skips.pop()], axis=1)  # [B,C+Cskip,H,W]
            x = resnet(x, temb, **resnet_weights, groups=groups, eps=eps)  # [B,C,H,W]
            if "attentions" in block:
                x = transformer_2d(x, context, **block["attentions"][str(i)], heads=block_heads, groups=groups)
        if "upsamplers" in block:
            x = upsample(x, **block["upsamplers"]["0"])  # [B,C,2H,2W]
    # 6. Out: norm, silu, conv -> [B,4,h,w]
    return conv2d(silu(group_norm(x, **weights["conv_norm_out"], groups=groups, eps=eps)), **weights["conv_out"])


# =================================================================================================
# 7. The VAE decoder: latents [B,4,h,w] -> pixels [B,3,H,W] in about [-1, 1]
# =================================================================================================
def vae_attention(x, to_q, to_k, to_v, to_out, groups, **norm):
    """The VAE's one-head self-attention over all pixels, with its own group norm (norm["group_norm"],
    taken as ** so that the name does not hide the function group_norm) and a residual."""
    batch, channels, height, width = x.shape
    h = group_norm(x, **norm["group_norm"], groups=groups, eps=1e-6)  # [B,C,H,W]
    h = h.reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,H*W,C]
    h = attention(h, None, to_q, to_k, to_v, to_out, heads=1)  # [B,H*W,C]
    return x + h.transpose(0, 2, 1).reshape(x.shape)  # [B,C,H,W]


def vae_decode(latents, weights, config):
    """diffusers' AutoencoderKL.decode(latents / scaling_factor)."""
    groups, eps = config["norm_num_groups"], 1e-6
    # 1. Undo the scaling that made the latents unit-variance for the UNet; 1x1 conv; conv_in
    z = latents / F(config["scaling_factor"])  # [B,4,h,w]
    if "post_quant_conv" in weights:
        z = conv2d(z, **weights["post_quant_conv"])  # 1x1 conv
    decoder = weights["decoder"]
    x = conv2d(z, **decoder["conv_in"])  # [B,C,h,w]
    # 2. Middle: resnet, attention, resnet (no timestep in the VAE)
    mid = decoder["mid_block"]
    x = resnet(x, None, **mid["resnets"]["0"], groups=groups, eps=eps)
    for i, resnet_weights in enumerate(numbered(mid["resnets"])[1:]):
        if "attentions" in mid:  # (mid_block_add_attention)
            x = vae_attention(x, **mid["attentions"][str(i)], groups=groups)  # [B,C,h,w]
        x = resnet(x, None, **resnet_weights, groups=groups, eps=eps)
    # 3. Up: resnets, then nearest 2x + conv, block after block
    for block in numbered(decoder["up_blocks"]):
        for resnet_weights in numbered(block["resnets"]):
            x = resnet(x, None, **resnet_weights, groups=groups, eps=eps)  # [B,C,H,W]
        if "upsamplers" in block:
            x = upsample(x, **block["upsamplers"]["0"])  # [B,C,2H,2W]
    # 4. Out: norm, silu, conv -> [B,3,H,W]
    return conv2d(silu(group_norm(x, **decoder["conv_norm_out"], groups=groups, eps=eps)), **decoder["conv_out"])


# =================================================================================================
# 8. DDIM (diffusers' DDIMScheduler with eta = 0): the noise schedule and one step
# =================================================================================================
def alphas_cumprod(config):
    """The training schedule: alphas_cumprod[t] = prod_{s <= t} (1 - beta_s), t = 0..T-1 -> float32 [T]."""
    steps, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config.get("trained_betas"):
        betas = np.array(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float32)  # [T]
    elif config["beta_schedule"] == "scaled_linear":  # Stable Diffusion's
        betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float32) ** 2  # [T]
    else:
        raise ValueError(f"scheduler_config.json: beta_schedule {config['beta_schedule']!r} is not supported here")
    return np.cumprod(1 - betas, dtype=np.float64).astype(np.float32)  # [T] (torch accumulates in double)


def ddim_timesteps(config, steps):
    """Which of the T training timesteps the sampler visits, from noisy to clean: int [steps]."""
    train_steps = config["num_train_timesteps"]
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "leading":  # SD 1.x: 0, 50, 100, ... (+ steps_offset), reversed
        leading = (np.arange(steps) * (train_steps // steps)).round()[::-1].astype(np.int64)  # [steps]
        return leading + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps).round()[::-1].astype(np.int64)
    raise ValueError(f"scheduler_config.json: timestep_spacing {spacing!r} is not supported here")


def ddim_step(model_output, t, sample, alphas, config, steps):
    """x_t [B,4,h,w] -> x_(t - T/steps): estimate the clean latents x0 and the noise from the model's
    output, then put back the noise at the previous timestep's level:
        x_prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev) * noise."""
    prev_t = t - config["num_train_timesteps"] // steps
    alpha = alphas[t]
    alpha_prev = alphas[prev_t] if prev_t >= 0 else (F(1) if config.get("set_alpha_to_one", True) else alphas[0])
    beta = 1 - alpha
    # 1. x0 and the noise, from what the model predicts
    kind = config.get("prediction_type", "epsilon")
    if kind == "epsilon":  # the noise itself
        x0, noise = (sample - np.sqrt(beta) * model_output) / np.sqrt(alpha), model_output  # [B,4,h,w] x2
    elif kind == "v_prediction":  # v = sqrt(alpha) * noise - sqrt(beta) * x0
        x0 = np.sqrt(alpha) * sample - np.sqrt(beta) * model_output  # [B,4,h,w]
        noise = np.sqrt(alpha) * model_output + np.sqrt(beta) * sample  # [B,4,h,w]
    elif kind == "sample":  # x0 itself
        x0, noise = model_output, (sample - np.sqrt(alpha) * model_output) / np.sqrt(beta)  # [B,4,h,w] x2
    else:
        raise ValueError(f"scheduler_config.json: prediction_type {kind!r} is not supported here")
    # 2. Optionally clip x0
    if config.get("clip_sample"):
        limit = config.get("clip_sample_range", 1.0)
        x0 = np.clip(x0, -limit, limit)
    # 3. Step back
    return np.sqrt(alpha_prev) * x0 + np.sqrt(1 - alpha_prev) * noise  # [B,4,h,w]


# =================================================================================================
# 9. txt2img
# =================================================================================================
def txt2img(model_dir, prompt, negative_prompt="", seed=0, steps=20, guidance_scale=7.5):
    """A picture, uint8 [H,W,3], as diffusers' StableDiffusionPipeline with DDIMScheduler draws it
    with generator=torch.Generator().manual_seed(seed)."""
    # 0. Check the arguments before any long work
    model_dir = Path(model_dir)
    require((model_dir / "model_index.json").is_file(), f"{model_dir} is not a diffusers model folder "
            "(no model_index.json)")
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        require(isinstance(value, str), f"{name} must be a string, got {type(value).__name__}")
    require(isinstance(seed, numbers.Integral) and -2**63 <= seed < 2**64, f"seed must be an int as torch takes it "
            f"(-2**63 <= seed < 2**64), got {seed!r}")
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    require(isinstance(steps, numbers.Integral) and 1 <= steps <= scheduler["num_train_timesteps"],
            f"steps must be an int in 1..{scheduler['num_train_timesteps']}, got {steps!r}")
    require(not scheduler.get("thresholding"), "scheduler_config.json: thresholding is not supported here")
    require(isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale),
            f"guidance_scale must be a finite number, got {guidance_scale!r}")
    require(scheduler.get("prediction_type", "epsilon") in ("epsilon", "v_prediction", "sample"),
            f"scheduler_config.json: prediction_type {scheduler.get('prediction_type')!r} is not supported here")
    timesteps = ddim_timesteps(scheduler, steps)  # [steps]: which timesteps the sampler visits
    alphas = alphas_cumprod(scheduler)  # [T]: the training noise schedule
    # 1. Read the model: configs and weight trees
    text_config, text_weights = load_part(model_dir, "text_encoder")
    unet_config, unet_weights = load_part(model_dir, "unet")
    vae_config, vae_weights = load_part(model_dir, "vae")
    tokenizer = CLIPTokenizer(model_dir / "tokenizer")
    # 2. Text -> embeddings. With guidance the UNet runs on [negative, prompt] and the two
    #    predictions are pushed apart: noise = uncond + guidance * (text - uncond)
    guided = guidance_scale > 1
    prompts = [negative_prompt, prompt] if guided else [prompt]
    ids = np.stack([tokenizer(p) for p in prompts])  # [B,77]
    context = clip_text_encoder(ids, text_weights, text_config)  # [B,77,C]
    # 3. The starting noise: torch.randn on a CPU generator seeded with `seed` (init_noise_sigma = 1 for DDIM)
    size = unet_config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    latents = torch_randn((1, unet_config["in_channels"], height, width), seed)  # [1,4,h,w]
    # 4. Denoise
    for t in timesteps:
        noise = unet(np.concatenate([latents] * len(prompts)), t, context, unet_weights, unet_config)  # [B,4,h,w]
        if guided:
            noise = noise[:1] + F(guidance_scale) * (noise[1:] - noise[:1])  # [1,4,h,w]
        latents = ddim_step(noise, int(t), latents, alphas, scheduler, steps)  # [1,4,h,w]
    # 5. Latents -> pixels: [-1, 1] -> [0, 255]
    image = vae_decode(latents, vae_weights, vae_config)[0]  # [3,H,W]
    image = np.clip(image / 2 + F(0.5), 0, 1).transpose(1, 2, 0)  # [H,W,3]
    return (image * 255).round().astype(np.uint8)  # [H,W,3]


# =================================================================================================
# 10. Command line: python -m npdiff.reference "a red circle on a blue background" out.png
# =================================================================================================
def write_png(path, image):
    """uint8 [H,W,3] -> an 8-bit RGB PNG: signature, IHDR, one zlib-compressed IDAT, IEND."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no filter, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


def default_model_dir():
    """weights/tiny-shapes beside the package in a source checkout, else npdiff/shipped_model."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "weights" / "tiny-shapes", package / "shipped_model"):
        if (candidate / "model_index.json").is_file():
            return candidate
    return package / "shipped_model"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m npdiff.reference", description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("output", help="the PNG file to write")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--model", type=Path, default=None, help="diffusers model folder (default: the shipped one)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if not output.parent.is_dir():
        parser.error(f"output folder {output.parent} does not exist")
    try:
        image = txt2img(args.model or default_model_dir(), args.prompt, args.negative, args.seed, args.steps,
                        args.guidance)
    except ValueError as error:
        parser.error(str(error))
    write_png(output, image)
    print(f"wrote {output} ({image.shape[1]}x{image.shape[0]})")


if __name__ == "__main__":
    sys.exit(main())
