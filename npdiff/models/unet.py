"""UNet2DConditionModel: the noise predictor of Stable Diffusion 1.x, 2.x and SDXL, over diffusers' weights.

    unet = UNet2DConditionModel.from_pretrained("sd15/unet")      # or UNet2DConditionModel(config, weights)
    eps = unet(sample, timestep, encoder_hidden_states)             # = diffusers' unet(...).sample
    eps = sdxl_unet(sample, timestep, encoder_hidden_states,        # SDXL (addition_embed_type "text_time")
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

sample [B,C_in,h,w] float32 (h and w multiples of 2**(number of down blocks - 1), so any multiple of
8 for SD); timestep an int/float or an array [B]; encoder_hidden_states [B,L,cross_attention_dim].
LCM-distilled UNets (config time_cond_proj_dim) also take timestep_cond [B,time_cond_proj_dim], the
guidance embedding (blocks.guidance_scale_embedding), added to the time features through cond_proj.

What SDXL (base, refiner, Turbo, LCM-SDXL) adds, all read from config.json as diffusers reads it:
  - addition_embed_type "text_time": the pooled text embedding `text_embeds` [B,P] and the
    micro-conditioning `time_ids` [B,n] (base: original size, crop top-left, target size, n=6;
    refiner: original size, crop, aesthetic score, n=5) become a second time feature:
        add_time_proj (sinusoidal, addition_time_embed_dim A, flattened)  [B,n] -> [B,n*A]
        concat [text_embeds, that]                                         -> [B,P+n*A]
        add_embedding (linear_1, SiLU, linear_2)                           -> [B,4*C0], added to temb
    P+n*A must equal projection_class_embeddings_input_dim (2816 = 1280 + 6*256 for the base).
  - transformer_layers_per_block: an int, one per block ([1, 2, 10] for the base), or per block a
    list with one depth per resnet layer (nested lists); the up path takes the down list reversed,
    or reverse_transformer_layers_per_block (required by diffusers for nested lists) as given.
    The mid block takes the last block's depth (the first entry of a nested one).
  - attention_head_dim as a per-block head count ([5, 10, 20]: 64-wide heads), linear proj_in/out,
    DownBlock2D first (no attention at the highest resolution), upcast_attention null.
  num_attention_heads must stay null: diffusers' UNet2DConditionModel refuses it too.

Config keys diffusers itself ignores for these block types are ignored here too: resnet_out_scale_factor
(only the ResnetDownsample/SimpleCrossAttn blocks read it), dropout (inference), sample_size.
upcast_attention changes nothing here: scores are always float32 (see models/transformer.py).

The call tree (diffusers models/unets/unet_2d_condition.py):
    time_proj (sinusoidal) [+ cond_proj(timestep_cond)] -> time_embedding (linear_1, SiLU, linear_2)
                                                                             -> temb [B,4*C0]
    [SDXL: + add_embedding(concat(text_embeds, add_time_proj(time_ids)))]    -> temb [B,4*C0]
    conv_in -> down_blocks[i] (skips kept) -> mid_block -> up_blocks[i] (skips consumed)
    -> conv_norm_out + SiLU -> conv_out
Supported configuration: what SD 1.x/2.x and SDXL use (see `check_config`); anything else (class
embeddings, other added embeddings, other block types) raises NpdiffError naming the key.
"""

import numpy as np

from npdiff import backend
from npdiff.backend import array_module, to_device
from npdiff.errors import NpdiffError
from npdiff.models.blocks import Conv2d, GroupNorm, TimestepEmbedding, timestep_embedding
from npdiff.models.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                       UNetMidBlock2DCrossAttn, UpBlock2D)

# diffusers' defaults for the keys a config.json may leave out (UNet2DConditionModel.__init__).
DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "mid_block_only_cross_attention": None, "addition_embed_type_num_heads": 64,
}

# Keys whose value must be exactly this (None/False/"default"...) for the SD/SDXL network built here.
MUST_BE = {
    "class_embed_type": None, "num_class_embeds": None,
    "num_attention_heads": None, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None,
    "attention_type": "default", "class_embeddings_concat": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "cross_attention_norm": None,
}
DOWN_TYPES = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_TYPES = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


def per_block(config, key, count):
    """A config value given as one int or as a per-block list -> a list of `count` values."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise NpdiffError(f"unet config: {key} has {len(value)} entries; expected {count} (one per block)")
        return list(value)
    return [value] * count


def per_layer(value, count, key, block):
    """One block's transformer depth (an int, or one per resnet layer) -> a list of `count` depths.
    diffusers reads a list's first `count` entries; a shorter list is refused."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) < count:
        raise NpdiffError(f"unet config: {key} entry {block} is {list(value)}; the block has {count} resnet "
                          f"layers, so it needs {count} depths")
    return list(value[:count])


def transformer_depths(config, layers):
    """-> (down, mid, up): the transformer depth of every resnet layer of every block, read as diffusers
    reads transformer_layers_per_block and reverse_transformer_layers_per_block."""
    blocks = len(layers)
    given = per_block(config, "transformer_layers_per_block", blocks)   # per block: an int or a list
    down = [per_layer(given[i], layers[i], "transformer_layers_per_block", i) for i in range(blocks)]
    mid = per_layer(given[-1], 1, "transformer_layers_per_block", blocks - 1)[0]
    reverse = config["reverse_transformer_layers_per_block"]
    if reverse is None:
        if any(isinstance(value, (list, tuple)) for value in given):
            raise NpdiffError("unet config: transformer_layers_per_block is a nested list; diffusers then needs "
                              "reverse_transformer_layers_per_block (the up blocks' depths), and it is missing")
        up_given = given[::-1]
        key = "transformer_layers_per_block"
    else:
        up_given = per_block(config, "reverse_transformer_layers_per_block", blocks)
        key = "reverse_transformer_layers_per_block"
    up = [per_layer(up_given[i], layers[blocks - 1 - i] + 1, key, i) for i in range(blocks)]
    return down, mid, up


def check_config(config):
    """Config dict -> the same dict with diffusers' defaults filled in; NpdiffError for what is unsupported."""
    from npdiff.loading.config_checks import check_component_config

    check_component_config("unet", config)  # types and ranges of every value (norm_eps > 0, ...)
    full = {**DEFAULTS, **config}
    for key, expected in MUST_BE.items():
        if full[key] != expected:
            raise NpdiffError(f"unet config: {key}={full[key]!r} is not supported (npdiff runs SD 1.x/2.x and "
                              f"SDXL UNets, which have {key}={expected!r})")
    if full["addition_embed_type"] not in (None, "text_time"):
        raise NpdiffError(f"unet config: addition_embed_type={full['addition_embed_type']!r} is not supported; "
                          "expected null (SD 1.x/2.x) or 'text_time' (SDXL)")
    if full["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if full[key] is None:
                raise NpdiffError(f"unet config: addition_embed_type 'text_time' needs {key}; it is missing")
    for key in ("only_cross_attention", "mid_block_only_cross_attention"):
        only_cross = full[key]
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            raise NpdiffError(f"unet config: {key}={only_cross!r} is not supported (SD and SDXL UNets have "
                              "False)")
    if full["act_fn"] not in ("silu", "swish"):
        raise NpdiffError(f"unet config: act_fn={full['act_fn']!r} is not supported; expected 'silu'")
    if full["norm_num_groups"] is None:
        raise NpdiffError("unet config: norm_num_groups=None is not supported; expected an int")
    if full["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        raise NpdiffError(f"unet config: mid_block_type={full['mid_block_type']!r} is not supported; expected "
                          "'UNetMidBlock2DCrossAttn'")
    blocks = len(full["block_out_channels"])
    for key, known in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        if len(full[key]) != blocks:
            raise NpdiffError(f"unet config: {key} has {len(full[key])} entries; block_out_channels has {blocks}")
        for name in full[key]:
            if name not in known:
                raise NpdiffError(f"unet config: {key} entry {name!r} is not supported; known: {', '.join(known)}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if full[key] % 2 != 1:
            raise NpdiffError(f"unet config: {key}={full[key]} must be odd")
    transformer_depths(full, per_block(full, "layers_per_block", blocks))  # nested lists: the right lengths
    return full


class UNet2DConditionModel:
    """The SD 1.x/2.x/SDXL UNet. Build with `from_pretrained(folder)` or `UNet2DConditionModel(config, weights)`."""

    def __init__(self, config, weights):
        self.config = check_config(config)
        c = self.config
        channels = list(c["block_out_channels"])
        blocks = len(channels)
        heads = per_block(c, "attention_head_dim", blocks)          # diffusers' name; it is the head count
        cross_dims = per_block(c, "cross_attention_dim", blocks)
        layers = per_block(c, "layers_per_block", blocks)
        down_depths, mid_depth, up_depths = transformer_depths(c, layers)   # per block, one per resnet layer
        groups, eps = c["norm_num_groups"], c["norm_eps"]
        time_embed_dim = c["time_embedding_dim"] or channels[0] * 4
        self.num_upsamplers = blocks - 1

        def attention(i, depths):
            return {"cross_attention_dim": cross_dims[i], "use_linear_projection": c["use_linear_projection"],
                    "transformer_layers": depths, "norm_num_groups": groups}

        # input and time embedding
        k_in, k_out = c["conv_in_kernel"], c["conv_out_kernel"]
        self.conv_in = Conv2d(weights, "conv_in", c["in_channels"], channels[0], k_in, padding=(k_in - 1) // 2)
        self.time_embedding = TimestepEmbedding(weights, "time_embedding", channels[0], time_embed_dim,
                                                cond_proj_dim=c["time_cond_proj_dim"])
        self.add_embedding = None                                   # SDXL's text_time conditioning
        if c["addition_embed_type"] == "text_time":
            self.add_embedding = TimestepEmbedding(weights, "add_embedding", c["projection_class_embeddings_input_dim"],
                                                   time_embed_dim)

        # down path
        self.down_blocks = []
        out_ch = channels[0]
        for i, block_type in enumerate(c["down_block_types"]):
            in_ch, out_ch = out_ch, channels[i]
            cross = block_type == "CrossAttnDownBlock2D"
            self.down_blocks.append(DOWN_TYPES[block_type](
                weights, f"down_blocks.{i}", in_ch, out_ch, time_embed_dim, layers[i], groups, eps,
                add_downsample=i < blocks - 1, downsample_padding=c["downsample_padding"],
                heads=heads[i] if cross else None, attention=attention(i, down_depths[i]) if cross else None))

        # middle
        self.mid_block = None
        if c["mid_block_type"] is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                weights, "mid_block", channels[-1], time_embed_dim, groups, eps, heads[-1],
                attention(blocks - 1, [mid_depth]),
                output_scale_factor=c["mid_block_scale_factor"])

        # up path (reversed per-block settings)
        self.up_blocks = []
        reversed_channels = channels[::-1]
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(c["up_block_types"]):
            prev_out, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, blocks - 1)]
            j = blocks - 1 - i                                      # the down block this one mirrors
            cross = block_type == "CrossAttnUpBlock2D"
            self.up_blocks.append(UP_TYPES[block_type](
                weights, f"up_blocks.{i}", in_ch, prev_out, out_ch, time_embed_dim, layers[j] + 1, groups, eps,
                add_upsample=i < blocks - 1, heads=heads[j] if cross else None,
                attention=attention(j, up_depths[i]) if cross else None))

        # output
        self.conv_norm_out = GroupNorm(weights, "conv_norm_out", groups, channels[0], eps)
        self.conv_out = Conv2d(weights, "conv_out", channels[0], c["out_channels"], k_out, padding=(k_out - 1) // 2)
        weights.check_all_used()

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None):
        from npdiff.loading import load_component

        return cls(*load_component(folder, subfolder, variant))

    # -----------------------------------------------------------------------------------------
    def check_inputs(self, sample, timesteps, encoder_hidden_states, timestep_cond=None):
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c["in_channels"]:
            raise NpdiffError(f"sample must have shape [B,{c['in_channels']},h,w]; got {tuple(sample.shape)}")
        factor = 2 ** self.num_upsamplers
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise NpdiffError(f"sample height and width must be multiples of {factor}; got "
                              f"{sample.shape[2]}x{sample.shape[3]}")
        batch = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise NpdiffError(f"encoder_hidden_states must have shape [{batch},L,D]; got "
                              f"{tuple(encoder_hidden_states.shape)}")
        context_dims = set(per_block(c, "cross_attention_dim", len(c["block_out_channels"])))
        if encoder_hidden_states.shape[-1] not in context_dims:
            raise NpdiffError(f"encoder_hidden_states has feature size {encoder_hidden_states.shape[-1]}; the "
                              f"model expects cross_attention_dim {c['cross_attention_dim']}")
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, batch):
            raise NpdiffError(f"timestep must be a scalar or an array of shape [{batch}]; got shape "
                              f"{timesteps.shape}")
        if timestep_cond is not None:
            dim = c["time_cond_proj_dim"]
            if dim is None:
                raise NpdiffError("timestep_cond was given but this UNet has no time_cond_proj_dim (it is not "
                                  "LCM-distilled)")
            if timestep_cond.ndim != 2 or tuple(timestep_cond.shape) != (batch, dim):
                raise NpdiffError(f"timestep_cond must have shape [{batch},{dim}] (time_cond_proj_dim); got "
                                  f"{tuple(timestep_cond.shape)}")

    def check_added_cond(self, added_cond_kwargs, batch):
        """SDXL's added conditions -> (text_embeds, time_ids) as float32 arrays; NpdiffError naming what is wrong."""
        c = self.config
        if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            raise NpdiffError("this UNet has addition_embed_type 'text_time' (SDXL): it needs added_cond_kwargs="
                              "{'text_embeds': [B,P] pooled text embedding, 'time_ids': [B,n] micro-conditioning}")
        xp = backend.array_module(added_cond_kwargs["text_embeds"])
        text_embeds = xp.asarray(added_cond_kwargs["text_embeds"], dtype=np.float32)              # [B,P]
        time_ids = backend.to_numpy(added_cond_kwargs["time_ids"]).astype(np.float32)              # [B,n]
        if text_embeds.ndim != 2 or text_embeds.shape[0] != batch:
            raise NpdiffError(f"added_cond_kwargs['text_embeds'] must have shape [{batch},P]; got "
                              f"{tuple(text_embeds.shape)}")
        if time_ids.ndim != 2 or time_ids.shape[0] != batch:
            raise NpdiffError(f"added_cond_kwargs['time_ids'] must have shape [{batch},n]; got {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * c["addition_time_embed_dim"]
        if width != c["projection_class_embeddings_input_dim"]:
            raise NpdiffError(f"added_cond_kwargs: text_embeds {tuple(text_embeds.shape)} and time_ids "
                              f"{tuple(time_ids.shape)} give {width} features (P + n*{c['addition_time_embed_dim']}); "
                              f"the model expects projection_class_embeddings_input_dim "
                              f"{c['projection_class_embeddings_input_dim']} (SDXL base: 1280 + 6 ids, "
                              "refiner: 1280 + 5 ids with the aesthetic score)")
        return text_embeds, time_ids

    def added_embedding(self, text_embeds, time_ids):
        """SDXL: add_embedding(concat(text_embeds, add_time_proj(time_ids))) -> [B,4*C0], added to temb."""
        c = self.config
        batch = time_ids.shape[0]
        # 1. add_time_proj: every id through the sinusoidal embedding, on the host like the timestep's
        ids = time_ids.reshape(-1)                                      # [B,n] -> [B*n]
        time_embeds = timestep_embedding(ids, c["addition_time_embed_dim"], c["flip_sin_to_cos"],
                                         c["freq_shift"])               # [B*n] -> [B*n,A]
        time_embeds = time_embeds.reshape(batch, -1)                    # [B*n,A] -> [B,n*A]
        time_embeds = to_device(time_embeds) if backend.array_module(text_embeds) is not np else time_embeds
        # 2. after the pooled text embedding, through add_embedding (linear_1, SiLU, linear_2)
        xp = backend.array_module(text_embeds)
        add_embeds = xp.concatenate([text_embeds, time_embeds], axis=1)  # [B,P] + [B,n*A] -> [B,P+n*A]
        return self.add_embedding(add_embeds)                           # [B,P+n*A] -> [B,4*C0]

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None):
        """-> the model output [B,C_out,h,w] (diffusers' `unet(...).sample`).

        added_cond_kwargs: for SDXL UNets (addition_embed_type "text_time"), diffusers' dict
        {"text_embeds": [B,P] pooled text embedding, "time_ids": [B,n] micro-conditioning ids}; ignored
        by other UNets, as diffusers ignores it."""
        xp = array_module(sample)
        timesteps = np.atleast_1d(np.asarray(timestep.get() if hasattr(timestep, "get") else timestep))
        self.check_inputs(sample, timesteps, encoder_hidden_states, timestep_cond)
        c = self.config
        batch = sample.shape[0]
        if self.add_embedding is not None:
            text_embeds, time_ids = self.check_added_cond(added_cond_kwargs, batch)
        if c["center_input_sample"]:
            sample = 2 * sample - 1.0                                   # [B,Cin,h,w]

        # 1. time embedding
        timesteps = np.broadcast_to(timesteps, (batch,))                # [B]
        t_emb = timestep_embedding(timesteps, c["block_out_channels"][0], c["flip_sin_to_cos"], c["freq_shift"])
        t_emb = to_device(t_emb) if xp is not np else t_emb             # [B,C0]
        if timestep_cond is not None:
            timestep_cond = to_device(timestep_cond)                    # [B,Dc] float32, beside the sample
        temb = self.time_embedding(t_emb, timestep_cond)                # [B,C0] (+ [B,Dc]) -> [B,4*C0]
        if self.add_embedding is not None:
            temb = temb + self.added_embedding(text_embeds, time_ids)   # SDXL: [B,4*C0] + [B,4*C0]

        # 2. conv_in, then the down path; every intermediate result is kept as a skip
        h = self.conv_in(sample)                                        # [B,Cin,h,w] -> [B,C0,h,w]
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)      # [B,C,H,W] -> [B,C',H/2,W/2]
            skips.extend(block_skips)

        # 3. middle
        if self.mid_block is not None:
            h = self.mid_block(h, temb, encoder_hidden_states)          # [B,C,H,W]

        # 4. up path: each block takes (and frees) as many skips as it has resnets
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips = skips[-count:]
            del skips[-count:]
            h = block(h, block_skips, temb, encoder_hidden_states)      # [B,C,H,W] -> [B,C',2H,2W]

        # 5. output: group norm + SiLU, conv_out
        h = self.conv_norm_out(h, silu=True)                            # [B,C0,h,w]
        return self.conv_out(h)                                         # [B,C0,h,w] -> [B,Cout,h,w]
