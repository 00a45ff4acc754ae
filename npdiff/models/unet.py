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
Supported configuration: what SD 1.x/2.x and SDXL use (see npdiff/loading/config_checks.py); anything
else (class embeddings, other added embeddings, other block types) raises NpdiffError naming the key.
"""

import numpy as np

from npdiff.backend import array_module, to_device, to_numpy
from npdiff.errors import NpdiffError
from npdiff.loading.config_checks import full_config, per_block, transformer_depths
from npdiff.loading.configs import load_component
from npdiff.loading.resident import mapped_arrays, release_resident_pages
from npdiff.models.blocks import (
    Conv2d,
    GroupNorm,
    TimestepEmbedding,
    timestep_embedding,
)
from npdiff.models.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

# A UNet whose weights mapped from their files pass this size (SD 1.5's 3.4 GB, SDXL's 10 GB in float32; the
# packed bf16 ones) drops each block's weight pages as soon as the block has run (release_weights_after_each_block,
# see _block_done); smaller ones (the tests' tiny models) keep theirs resident and the pipeline drops them after
# the denoising loop. Measured on SD 1.5 (benchmarks/pipeline.py pndm4-vae at 512x512): the job's peak RSS 4.12
# -> 1.74 GiB (the denoise phase had held the whole UNet's 3.30 GiB of file pages), each forward's refault
# from the page cache ~0.3 s of system time against ~14 s of work (within the noise of A/B runs).
PER_BLOCK_RELEASE_BYTES = 1 * 2**30
DOWN_TYPES = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_TYPES = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


class UNet2DConditionModel:
    """The SD 1.x/2.x/SDXL UNet. Build with `from_pretrained(folder)` or `UNet2DConditionModel(config, weights)`."""

    release_weights_after_each_block = False  # set per model in __init__ (a ControlNet keeps False)

    def __init__(self, config, weights):
        self.config = full_config("unet", config)  # defaults filled in; checked unless the loader did
        time_embed_dim, heads, layers, up_depths, attention = self.build_down_path(weights)
        c = self.config
        channels = list(c["block_out_channels"])
        blocks = len(channels)
        groups, eps, k_out = c["norm_num_groups"], c["norm_eps"], c["conv_out_kernel"]

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
        self.precision = weights.precision  # "fp32" or "bf16": what the Linear/Conv2d layers hold
        mapped = sum(array.nbytes for array in mapped_arrays(self))
        self.release_weights_after_each_block = mapped > PER_BLOCK_RELEASE_BYTES

    def _block_done(self, block):
        """A block has run: with release_weights_after_each_block, drop its weights' resident pages.

        A forward reads each weight once, block after block, so the SDXL UNet's 10 GB need never be
        resident at once: the largest block (up_blocks.0, ~4.4 GB) sets the peak instead. The pages stay
        in the kernel's page cache, and the next forward faults them back in from there (the whole UNet in
        about a second, against a minute per SDXL step on 2 cores); outputs are bit-identical. Weights in
        private memory (LoRA-fused, on a GPU) are skipped (npdiff/loading/resident.py)."""
        if self.release_weights_after_each_block:
            release_resident_pages(block)

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None, precision="fp32"):
        """precision "bf16": Linear and Conv2d weights packed in bfloat16 (npdiff/models/precision.py)."""
        return cls(*load_component(folder, subfolder, variant, precision))

    def build_down_path(self, weights):
        """Time (and SDXL's added) embedding, conv_in, the down blocks and the middle: the part of the UNet a
        ControlNet (models/controlnet.py) has too. -> what the up path is built from."""
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
        k_in = c["conv_in_kernel"]
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

        return time_embed_dim, heads, layers, up_depths, attention

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
        text_embeds = to_numpy(added_cond_kwargs["text_embeds"]).astype(np.float32)        # [B,P]
        time_ids = to_numpy(added_cond_kwargs["time_ids"]).astype(np.float32)              # [B,n]
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
        return to_device(text_embeds), time_ids                         # [B,P] beside the weights, [B,n] host

    def added_embedding(self, text_embeds, time_ids):
        """SDXL: add_embedding(concat(text_embeds, add_time_proj(time_ids))) -> [B,4*C0], added to temb."""
        c = self.config
        batch = time_ids.shape[0]
        # 1. add_time_proj: every id through the sinusoidal embedding, on the host like the timestep's
        ids = time_ids.reshape(-1)                                      # [B,n] -> [B*n]
        time_embeds = timestep_embedding(ids, c["addition_time_embed_dim"], c["flip_sin_to_cos"],
                                         c["freq_shift"])               # [B*n] -> [B*n,A]
        time_embeds = time_embeds.reshape(batch, -1)                    # [B*n,A] -> [B,n*A]
        time_embeds = to_device(time_embeds)                            # beside the weights
        # 2. after the pooled text embedding, through add_embedding (linear_1, SiLU, linear_2)
        xp = array_module(text_embeds)
        add_embeds = xp.concatenate([text_embeds, time_embeds], axis=1)  # [B,P] + [B,n*A] -> [B,P+n*A]
        return self.add_embedding(add_embeds)                           # [B,P+n*A] -> [B,4*C0]

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """-> the model output [B,C_out,h,w] (diffusers' `unet(...).sample`).

        added_cond_kwargs: for SDXL UNets (addition_embed_type "text_time"), diffusers' dict
        {"text_embeds": [B,P] pooled text embedding, "time_ids": [B,n] micro-conditioning ids}; ignored
        by other UNets, as diffusers ignores it.
        down_block_additional_residuals / mid_block_additional_residual: a ControlNet's outputs
        (models/controlnet.py), one array per skip ([B,C,H,W] each, in the order the down path makes them)
        and one for the middle, added to the skips and to the middle's output as diffusers adds them."""
        h, skips, temb = self.down_path(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        if down_block_additional_residuals is not None:
            skips = add_residuals(skips, down_block_additional_residuals, "down_block_additional_residuals")
        if mid_block_additional_residual is not None:
            h = add_residuals([h], [mid_block_additional_residual], "mid_block_additional_residual")[0]

        # 4. up path: each block takes (and frees) as many skips as it has resnets
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips = skips[-count:]
            del skips[-count:]
            h = block(h, block_skips, temb, encoder_hidden_states)      # [B,C,H,W] -> [B,C',2H,2W]
            self._block_done(block)

        # 5. output: group norm + SiLU, conv_out
        h = self.conv_norm_out(h, silu=True)                            # [B,C0,h,w]
        return self.conv_out(h)                                         # [B,C0,h,w] -> [B,Cout,h,w]

    def down_path(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None,
                  conditioning=None):
        """Steps 1-3 of the forward: -> (middle output [B,C,H,W], skips, temb [B,4*C0]).
        conditioning: a ControlNet's embedded control picture [B,C0,h,w], added to conv_in's output."""
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

        # 2. conv_in (+ a ControlNet's embedded control picture), then the down path; every intermediate
        #    result is kept as a skip
        h = self.conv_in(sample)                                        # [B,Cin,h,w] -> [B,C0,h,w]
        if conditioning is not None:
            h = h + conditioning                                        # [B,C0,h,w] + [B,C0,h,w]
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)      # [B,C,H,W] -> [B,C',H/2,W/2]
            skips.extend(block_skips)
            self._block_done(block)

        # 3. middle
        if self.mid_block is not None:
            h = self.mid_block(h, temb, encoder_hidden_states)          # [B,C,H,W]
            self._block_done(self.mid_block)
        return h, skips, temb


def add_residuals(tensors, residuals, name):
    """tensors[i] + residuals[i] (a ControlNet's outputs), after checking their number and shapes."""
    residuals = list(residuals)
    if len(residuals) != len(tensors):
        raise NpdiffError(f"{name}: {len(residuals)} arrays given; this UNet has {len(tensors)} "
                          "(a ControlNet made for another model?)")
    summed = []
    for index, (tensor, residual) in enumerate(zip(tensors, residuals)):
        pooled = tuple(residual.shape[2:]) == (1, 1)                    # a global_pool_conditions net's [B,C,1,1]
        if tuple(residual.shape[:2]) != tuple(tensor.shape[:2]) or (
                tuple(residual.shape[2:]) != tuple(tensor.shape[2:]) and not pooled):
            raise NpdiffError(f"{name}[{index}] has shape {tuple(residual.shape)}; the UNet's is {tuple(tensor.shape)} "
                              "(a ControlNet made for another model?)")
        summed.append(tensor + to_device(residual))                     # [B,C,H,W] + [B,C,H,W] (or [B,C,1,1])
    return summed
