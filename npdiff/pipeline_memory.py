"""What a pipeline does about memory: its weights' resident pages between stages, and its VAE (swapping it,
tiling it, decoding with it). StableDiffusionPipeline (npdiff/pipeline.py) takes these methods from
PipelineMemoryMixin, so every pipeline built on it (SDXL, ControlNet) has them.

    pipe.release_resident_pages("unet")     # -> bytes released; outputs stay bit-identical
    pipe._stage_done("unet")                # the same, when release_weights_between_stages (the default)
    pipe.vae = AutoencoderTiny.from_pretrained(...)   # checked against the UNet's latent space
    pipe.enable_vae_tiling(); pipe.decode_latents(latents)
"""

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.resident import release_resident_pages
from npdiff.models.vae_tiling import tiling_argument
from npdiff.pipeline_utils import check_vae_fits, vae_scale_factor


class PipelineMemoryMixin:
    """Stage page releases and the VAE of a pipeline; the pipeline sets text_encoder_names, unet, the
    release_weights_between_stages switch and auto_vae_tiling (see StableDiffusionPipeline)."""

    def release_resident_pages(self, *names):
        """Drop the resident pages of the memory-mapped weights of the named models ("text_encoder",
        "unet", "vae"; none named: all) from this process; -> bytes released.

        float32 weights are read-only views of their files' memory maps (npdiff.loading.safetensors_io):
        once read they stay resident, counted in this process's memory, until released. The pages stay
        in the kernel's page cache, and the next read of a weight faults its page back in from there
        (measured for the SD 1.5 UNet in benchmarks/memory.py: well under a second against a minute
        of sampling); results are bit-identical. At precision="bf16" the packed weights are mapped from
        their cache file (npdiff/models/packed_cache.py) and released the same way. A no-op where madvise is
        unavailable, and for weights held in private memory (F16/BF16 widened, LoRA-fused, on a GPU, packed
        with NPDIFF_BF16_CACHE=0)."""
        names = names or self.text_encoder_names + ("unet", "vae")
        return sum(release_resident_pages(getattr(self, name)) for name in names)

    def _stage_done(self, *names):
        """A stage is over: release its models' weight pages (release_weights_between_stages)."""
        if self.release_weights_between_stages:
            self.release_resident_pages(*names)

    @property
    def vae_scale_factor(self):
        """Pixels per latent: 2 ** (VAE blocks - 1) of the current VAE (pipeline_utils.vae_scale_factor)."""
        return vae_scale_factor(self.vae)

    @property
    def vae(self):
        return self._vae

    @vae.setter
    def vae(self, vae):
        """Set or swap the VAE (e.g. `pipe.vae = AutoencoderTiny.from_pretrained(...)`): a swapped-in one must
        work in the latent space of the model's own (pipeline_utils.check_vae_fits), else NpdiffError now."""
        own = "_vae" not in vars(self)  # the first VAE is the model's own: its cells are what the UNet learned
        self._vae = check_vae_fits(vae, self.unet.config, None if own else self.model_vae_scale_factor)
        if own:
            self.model_vae_scale_factor = vae_scale_factor(vae)

    def enable_vae_tiling(self):
        """diffusers' pipe.enable_vae_tiling(): pipe.vae.enable_tiling() (npdiff/models/vae_tiling.py)."""
        if not hasattr(self.vae, "enable_tiling"):
            raise NpdiffError(f"VAE tiling is for AutoencoderKL; this pipeline's VAE is a {type(self.vae).__name__}")
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        if hasattr(self.vae, "disable_tiling"):
            self.vae.disable_tiling()

    def vae_tiling_on(self):
        """Whether this call's VAE decodes (and encodes) large pictures in tiles: asked for, or switched on
        by the memory check; stored in the PNG (tiles change the pixels slightly)."""
        return bool(getattr(self.vae, "use_tiling", False) or self.auto_vae_tiling)

    def decode_latents(self, latents):
        """Latents [B,4,h,w] -> images [B,3,h*f,w*f] in [-1,1] (divides by the VAE scaling factor)."""
        latents = backend.to_device(latents)
        tiling = tiling_argument(self.vae, self.auto_vae_tiling)  # in tiles when the memory check said so
        return self.vae.decode(latents / self.vae.scaling_factor, **tiling)  # [B,4,h,w] -> [B,3,H,W]
