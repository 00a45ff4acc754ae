"""How much memory a pipeline call needs, estimated from the configs before any work starts.

    estimate_call_bytes(unet_config, vae_config, text_dim, batch, height, width, guidance, encode=False,
                        workers=1, vae_tile=None)
                                 -> dict of byte counts: unet, vae_decode, vae_encode, text, workspace, total
    available_bytes()            MemAvailable from /proc/meminfo (else os.sysconf pages), or None
    check_attention_size(unet_config, vae_factor, height, width)
        NpdiffError past MAX_ATTENTION_TOKENS positions in the UNet's largest self-attention (hours a step)
    check_call_memory(pipe, batch, height, width, guidance, encode=False)
        the attention check, then NpdiffError naming both numbers and what to lower, when the estimate
        exceeds what is free; when only the untiled VAE decode (or encode) is too big and a tiled one fits,
        the estimate says to switch tiling on for the call instead ("vae_tiling_auto"), and why in one line
        ("vae_tiling_note")
    controlnet_bytes(pipe, batch, height, width, guidance)
        -> (what a ControlNet pipeline's nets add to the sampling stage, their weights' bytes)

The formula (float32: 4 bytes a value). A "map" at level i is one feature map [B, C_i, h_i, w_i] of
the batch the network runs on (the UNet runs 2*batch when guiding; the VAE decodes the whole batch):

  UNet, at the latent size h x w = H/f x W/f (f the VAE factor), level i at h/2^i x w/2^i:
    skips   every skip connection kept for the up path, summed exactly from the config (conv_in,
            each down resnet, each downsampler): they are all alive at the middle of the network;
    work    the largest working set of one level: a resnet keeps ~6 maps (input, norm, conv, time
            added, residual, output); a transformer's GEGLU feed-forward holds [B, N, 8C] + [B, N, 4C]
            and q, k, v, out beside it: ~18 maps; plus the attention scores of one call,
            B*heads*N*M floats, but at most 2^23 of them (the kernels switch to key chunks above that);
  VAE decode, level j of the decoder at (h*2^j) x (w*2^j): ~4 maps of the widest channel count at that
    level, plus the nearest-2x upsampled map (4 maps' worth of the smaller level); the mid-block's
    single-head attention scores (capped as above) at the latent size;
  VAE encode (img2img): the same count over the encoder at batch 1;
  tiled VAE (vae.enable_tiling(), npdiff/models/vae_tiling.py; vae_tile = the latent tile's side): the same
    counts at one tile's size, plus the whole output ([B,3,H,W] decoded, [1,2*Lc,h,w] encoded), which is
    written tile by tile;
    (score matrices are counted once per call, not per picture: the kernels cap the whole call's);
  text: the embeddings [2*batch, 77, D] and CLIP's working set on them (~8 x that);
  workspace: the convolutions' im2col tiles, one per worker thread (at most 16 MiB each).
  total = text + workspace + max(unet, vae_decode, vae_encode): the stages run one after the other.

  ControlNets (controlnet_bytes): the residuals given to the UNet, one summed set the size of the UNet's skips
    and middle, alive through its call, plus one net's outputs beside the sum while it is added; the control
    pictures repeated to the batch; a net's own activations while it runs are its down path's, no more than
    the UNet's, which come after them (so not counted twice); added to the UNet's stage.
The weights are not part of it: float32 ones are read-only maps of their files, and float16/bfloat16
ones read-only maps of their widened copy (an unlinked file, npdiff/loading/widened.py), page cache that
the kernel may drop and read again under pressure rather than run out (npdiff/loading/safetensors_io.py;
where no widening file could be made they are private memory, already out of MemAvailable); what is
compared with the free memory is what the call adds in private memory. The estimate is an upper-side guess within a
small factor (tests/test_memory_estimate.py compares it with the traced peak of a small call); its
purpose is to refuse a 1048576x1048576 picture or a million images in a second, not to pack memory.
"""

import os

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.kernels.block_pool import worker_count
from npdiff.models.vae_tiling import check_tiling, tiling_choice
from npdiff.loading.resident import reachable

FLOAT_BYTES = 4
SCORES_CAP = 1 << 23  # kernels.attention.MEMORY_EFFICIENT_MIN_SCORES: larger score matrices are chunked
IM2COL_TILE_BYTES = 16 << 20  # kernels.conv.IM2COL_TILE_BYTES: one unfolded tile per worker thread
RESNET_MAPS = 6
VAE_MAPS = 4  # the VAE's resnets have no time embedding and free their inputs early
TRANSFORMER_MAPS = 18
TEXT_LENGTH = 77
# The most positions the UNet's largest self-attention may run over (check_attention_size): a 256x256 grid.
MAX_ATTENTION_TOKENS = 256 * 256
ATTENTION_EXAMPLES = "SD 1.x/2.x up to 2048x2048, SDXL up to 4096x4096"


# What a caller can lower when a picture is too large (PictureSizeError.lower), as the Python API names it. The
# CLI, the server and batch lines name the same things their own way (their flags, JSON keys and line keys).
KEYWORD_HINTS = {
    "size": "lower height=/width=",
    "hires_scale": "lower hires_scale=",
    "image": "pass a smaller image= (img2img works at its size)",
    "batch": "pass fewer prompts or a lower num_images_per_prompt=",
}


class PictureSizeError(NpdiffError):
    """A picture too large for the UNet's self-attention or for the free memory. problem: what is wrong;
    lower: the keys of KEYWORD_HINTS the caller can lower. str() names them as the Python API's keywords;
    an entry point that took them as flags or keys raises hinted(its own hints) instead."""

    def __init__(self, problem, lower):
        self.problem, self.lower = problem, tuple(lower)
        super().__init__(self.hinted(KEYWORD_HINTS))

    def __reduce__(self):  # pickled in a worker process, rebuilt in the caller: from both fields, not the message
        return type(self), (self.problem, self.lower)

    def hinted(self, hints):
        """The message with what to lower in the caller's words (hints: key -> "lower --height/--width", ...;
        a key left out is something that caller cannot set, such as the number of pictures of one CLI call)."""
        return f"{self.problem}; {' or '.join(hints[key] for key in self.lower if key in hints)}"


def _per_block(value, count):
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _scores_bytes(count):
    """One attention call's score matrix: count floats, or the capped chunks the kernels switch to."""
    return min(count, SCORES_CAP) * FLOAT_BYTES


def unet_bytes(config, batch, h, w):
    """Peak activation bytes of one UNet call on [batch, C, h, w] latents (see the module docstring)."""
    channels = list(config["block_out_channels"])
    blocks = len(channels)
    layers = _per_block(config.get("layers_per_block", 2), blocks)
    heads = _per_block(config.get("attention_head_dim", 8), blocks)
    types = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * blocks))
    skips = channels[0] * h * w  # conv_in
    work = scores = 0
    for i in range(blocks):
        positions = max(1, (h >> i) * (w >> i))
        skips += layers[i] * channels[i] * positions  # one skip per resnet (+ attention)
        if i < blocks - 1:
            skips += channels[i] * max(1, (h >> (i + 1)) * (w >> (i + 1)))  # the downsampler's output
        attention = "CrossAttn" in str(types[i])
        # up blocks see skip + input: up to 2x the channels
        work = max(work, (TRANSFORMER_MAPS if attention else RESNET_MAPS) * 2 * channels[i] * positions)
        if attention:
            scores = max(scores, _scores_bytes(batch * heads[i] * positions * max(positions, TEXT_LENGTH)))
    return batch * (skips + work) * FLOAT_BYTES + scores


def vae_decode_bytes(config, batch, h, w):
    """Peak activation bytes of decoding [batch, latent, h, w] (see the module docstring)."""
    channels = list(config["block_out_channels"])[::-1]  # decoder order: widest first, at the latent size
    peak = VAE_MAPS * channels[0] * h * w  # the mid block at the latent size
    for j, width in enumerate(channels):
        positions = (h << j) * (w << j)
        level = VAE_MAPS * max(width, channels[max(j - 1, 0)]) * positions
        if j < len(channels) - 1:
            level += 4 * width * positions  # the 2x-upsampled map, 4x the positions
        peak = max(peak, level)
    return batch * peak * FLOAT_BYTES + _scores_bytes(batch * (h * w) ** 2)  # + mid-block attention


def vae_tiled_bytes(vae_config, batch, h, w, tile, encode=False):
    """Peak bytes of a tiled decode (encode) of h x w latents in tiles of tile x tile: one tile's activations
    and the whole output, which the tiles are written into (npdiff/models/vae_tiling.py)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if encode:
        output = batch * 2 * vae_config["latent_channels"] * h * w                     # [B,2*Lc,h,w]
    else:
        output = batch * vae_config["out_channels"] * (h * factor) * (w * factor)     # [B,3,H,W]
    return vae_decode_bytes(vae_config, batch, min(h, tile), min(w, tile)) + output * FLOAT_BYTES


def conv_workspace_bytes(vae_config, height, width, workers):
    """im2col tiles: one per worker, at most IM2COL_TILE_BYTES, at most the unfolded largest input."""
    widest_full_size = max(list(vae_config["block_out_channels"])[:2])  # the decoder's last, full-size convs
    return workers * min(IM2COL_TILE_BYTES, 9 * widest_full_size * height * width * FLOAT_BYTES)


def estimate_call_bytes(unet_config, vae_config, text_dim, batch, height, width, guidance, encode=False,
                        workers=1, vae_tile=None):
    """-> {"unet", "vae_decode", "vae_encode", "text", "workspace", "total"} in bytes for `batch` pictures;
    vae_tile: the latent tile's side when the VAE decodes and encodes in tiles (None: whole pictures)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    h, w = max(1, height // factor), max(1, width // factor)
    unet_batch = 2 * batch if guidance else batch
    tiled = vae_tile is not None and max(h, w) > vae_tile  # diffusers' rule: only pictures larger than a tile
    if tiled:
        vae_decode = vae_tiled_bytes(vae_config, batch, h, w, vae_tile)
        vae_encode = vae_tiled_bytes(vae_config, 1, h, w, vae_tile, encode=True) if encode else 0
        pixels = (min(h, vae_tile) * factor, min(w, vae_tile) * factor)  # the convolutions see one tile
    else:
        vae_decode = vae_decode_bytes(vae_config, batch, h, w)
        vae_encode = vae_decode_bytes(vae_config, 1, h, w) if encode else 0
        pixels = (height, width)
    estimate = {
        "unet": unet_bytes(unet_config, unet_batch, h, w),
        "vae_decode": vae_decode,
        "vae_encode": vae_encode,
        "text": 8 * unet_batch * TEXT_LENGTH * int(text_dim) * FLOAT_BYTES,
        "workspace": conv_workspace_bytes(vae_config, *pixels, workers),
    }
    stages = max(estimate["unet"], estimate["vae_decode"], estimate["vae_encode"])
    estimate["total"] = estimate["text"] + estimate["workspace"] + stages
    return estimate


def available_bytes():
    """Memory a new allocation can get: MemAvailable (Linux), else free physical pages; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB -> bytes
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(count):
    """1.5 GiB, 300.0 MiB, 12.0 TiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if count >= size / 4:
            return f"{count / size:,.2f} {unit}"
    return f"{count / 2**20:.1f} MiB"


def largest_attention_tokens(unet_config, vae_factor, height, width):
    """-> (tokens, level): the positions of the UNet's largest self-attention at a height x width picture, the
    first down level with attention (SD 1.x/2.x: the latent itself; SDXL: half its side), and that level."""
    blocks = len(unet_config["block_out_channels"])
    types = list(unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * blocks))
    level = next((i for i, kind in enumerate(types) if "CrossAttn" in str(kind)), blocks - 1)  # else: the mid block
    h, w = height // vae_factor, width // vae_factor  # the latent
    return max(1, h >> level) * max(1, w >> level), level


def check_attention_size(unet_config, vae_factor, height, width, lower=("size",)):
    """PictureSizeError before any work when the UNet's self-attention would run over more than
    MAX_ATTENTION_TOKENS positions: its work grows with their square, so such a picture fits in memory (the
    attention kernels chunk the scores) but takes hours a step (a 1048576x64 picture: a million tokens).
    lower: what set the size (KEYWORD_HINTS' keys: "size" for height/width, "image" for img2img's picture)."""
    tokens, level = largest_attention_tokens(unet_config, vae_factor, height, width)
    if tokens > MAX_ATTENTION_TOKENS:
        cells = vae_factor * 2 ** level
        raise PictureSizeError(
            f"{width}x{height} pixels is too large: the UNet's self-attention would run over {tokens:,} positions "
            f"(one per {cells}x{cells} pixels), and its work grows with their square; npdiff accepts at most "
            f"{MAX_ATTENTION_TOKENS:,} ({MAX_ATTENTION_TOKENS * cells * cells:,} pixels for this model: "
            f"{ATTENTION_EXAMPLES})", lower)


def check_call_memory(pipe, batch, height, width, guidance, encode=False, lower=("size",)):
    """PictureSizeError before any work when the call's estimated memory exceeds what the machine has free, or
    when the picture is past what the UNet's attention does in reasonable time (check_attention_size).
    lower: what set the size, as check_attention_size's.

    The memory part is only for the NumPy backend (host memory); a GPU backend's memory is not measured here.
    """
    check_attention_size(pipe.unet.config, 2 ** (len(pipe.vae.config["block_out_channels"]) - 1), height, width,
                         lower)
    if backend.name() not in ("numpy", None):
        return None

    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]  # SDXL: both, side by side
    text_dim = sum(encoder.config.get("hidden_size", 768) for encoder in encoders if encoder is not None)
    vae = pipe.vae
    can_tile = hasattr(vae, "use_tiling")  # AutoencoderKL; TAESD has no tiling (and needs little memory)
    tiling = can_tile and tiling_choice(vae, None)  # a use_tiling that is not a bool: refused before any work
    if tiling:
        check_tiling(vae)  # bad tile sizes: refused before any work
    call = {"unet_config": pipe.unet.config, "vae_config": vae.config, "text_dim": text_dim, "batch": batch,
            "height": height, "width": width, "guidance": guidance, "encode": encode, "workers": worker_count()}
    tile = vae.tile_latent_min_size if tiling else None  # None: whole pictures
    estimate = with_controlnets(estimate_call_bytes(**call, vae_tile=tile), pipe, call)
    estimate["vae_tiling_auto"] = False
    free = available_bytes()
    if free is not None and estimate["total"] > free and can_tile and not tiling:
        tiled = auto_tiling_estimate(pipe, call, free, estimate["total"])
        if tiled is not None:
            return tiled
    if free is not None and estimate["total"] > free:
        biggest = max(("unet", "vae_decode", "vae_encode"), key=estimate.get)
        raise PictureSizeError(
            f"{width}x{height} pixels x {batch} picture(s) needs about {human_bytes(estimate['total'])} of memory "
            f"(mostly the {biggest.replace('_', ' ')}), but only {human_bytes(free)} is available",
            tuple(lower) + ("batch",))
    return estimate


def auto_tiling_estimate(pipe, call, free, untiled_total):
    """The estimate with the VAE in tiles, when that fits in `free` bytes (and the VAE can tile this
    picture: valid tile sizes, a side larger than a tile), with the one-line note the caller shows
    ("vae_tiling_note"). Else None."""
    vae = pipe.vae
    try:
        check_tiling(vae)
    except NpdiffError:
        return None  # tile sizes that cannot tile: the untiled estimate's error stands
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    if max(call["height"], call["width"]) // factor <= vae.tile_latent_min_size:
        return None  # one tile already: tiling would change nothing
    tiled = with_controlnets(estimate_call_bytes(**call, vae_tile=vae.tile_latent_min_size), pipe, call)
    if tiled["total"] > free:
        return None
    note = (f"the VAE decodes {call['width']}x{call['height']} in tiles (as with --vae-tiling / "
            f"vae.enable_tiling()): untiled the call needs about {human_bytes(untiled_total)}, "
            f"{human_bytes(free)} is available")
    return dict(tiled, vae_tiling_auto=True, vae_tiling_note=note)


def with_controlnets(estimate, pipe, call):
    """The estimate with a ControlNet pipeline's nets added to the sampling stage (and their weights'
    bytes reported beside it: "controlnet", "controlnet_weights"); unchanged numbers without nets."""
    estimate["controlnet"], estimate["controlnet_weights"] = controlnet_bytes(
        pipe, call["batch"], call["height"], call["width"], call["guidance"])
    estimate["unet"] += estimate["controlnet"]  # the nets run in the sampling stage, their residuals beside the UNet
    estimate["total"] = estimate["text"] + estimate["workspace"] + max(estimate["unet"], estimate["vae_decode"],
                                                                       estimate["vae_encode"])
    return estimate


def controlnet_bytes(pipe, batch, height, width, guidance):
    """-> (bytes a pipeline's ControlNets add to the sampling stage, bytes of their weights): (0, 0) without nets.

    The first (see the module docstring) goes into the estimate; the second is reported beside it and, as the
    UNet's weights, not compared with the free memory (float32 and widened weights are file-backed maps: page
    cache, released after the sampling with the UNet's, npdiff/pipeline_controlnet.py)."""
    nets = getattr(pipe, "controlnets", None) or []
    if not nets:
        return 0, 0
    factor = 2 ** (len(pipe.vae.config["block_out_channels"]) - 1)
    h, w = max(1, height // factor), max(1, width // factor)
    net_batch = 2 * batch if guidance else batch
    config = nets[0].config  # every net has the UNet's down path (checked when the pipeline took it)
    channels = list(config["block_out_channels"])
    layers = _per_block(config.get("layers_per_block", 2), len(channels))
    residual_values = channels[0] * h * w                              # conv_in's zero convolution
    for i, width_i in enumerate(channels):
        positions = max(1, (h >> i) * (w >> i))
        residual_values += layers[i] * width_i * positions             # one per resnet
        if i < len(channels) - 1:
            residual_values += width_i * max(1, (h >> (i + 1)) * (w >> (i + 1)))  # the downsampler's
    residual_values += channels[-1] * max(1, (h >> (len(channels) - 1)) * (w >> (len(channels) - 1)))  # middle
    residuals = 2 * net_batch * residual_values * FLOAT_BYTES         # the sum and one net's outputs beside it
    pictures = len(nets) * (1 + net_batch) * 3 * height * width * FLOAT_BYTES  # each [1,3,H,W] and its repeat
    weights = sum(int(array.nbytes) for net in nets for array in weight_arrays(net))
    return residuals + pictures, weights


def weight_arrays(model):
    """Every NumPy array an npdiff model holds (its weights), each once."""
    return [item for item in reachable(model) if isinstance(item, np.ndarray)]
