"""The options the picture commands share (generate, img2img, inpaint), and generate's hires fix.

    add_sampling_options(parser)   # the prompt, sampling, model, precision, VAE, LoRA, ControlNet, SDXL,
                                   # webui-habit and device options: every picture command's
    add_hires_options(parser)      # generate's --hires-* (webui's hires fix)

Every option defaults to None so that recipe.resolve_options can tell "not given" (take the --reproduce
PNG's value, else the default in recipe.DEFAULTS) from a value given on the command line. The commands
themselves (what runs) are in npdiff/cli.py.
"""

from npdiff.cli_controlnet import add_control_options
from npdiff.hires_names import HIRES_UPSCALERS
from npdiff.loading.weights import PRECISIONS
from npdiff.recipe import DEFAULTS
from npdiff.sdxl_refiner import add_sdxl_options

# --device -> the backends it means (the first is what --device alone picks)
DEVICE_BACKENDS = {"cpu": ("numpy", "cpu"), "cuda": ("cupy", "cuda", "gpu")}


def add_sampling_options(p):
    p.add_argument("prompt", nargs="?", default=None, help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (default: empty)")
    p.add_argument("--prompt-2", default=None, help="SDXL: what the second text encoder reads (default: PROMPT)")
    p.add_argument("--negative-2", "--negative-prompt-2", default=None, dest="negative_2",
                   help="SDXL: the second text encoder's negative prompt (default: --negative)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale; <= 1 turns it off (default {DEFAULTS['guidance']})")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed and stored)")
    p.add_argument("--sampler", default=None, help="pndm, ddim, ddpm, lms(_karras), euler, euler_a, heun, "
                   "dpm2(_karras), dpm2_a(_karras), dpmpp_2m(_karras), dpmpp_2m_sde(_karras), unipc, deis, lcm, tcd "
                   "(default: the model's own scheduler)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM's eta / TCD's gamma: 0 (the default) is deterministic; stored in the PNG")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: shipped model)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts, instead of the model's own; an SD 2.x single file defaults to "
                   "v_prediction (the 768-pixel models): give epsilon for the 512-pixel SD 2.x base models")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="fp32 (the default) or bf16: the networks' weights in bfloat16 (half the memory, AVX-512 "
                   "BF16 products summed in float32; a picture within a few levels of fp32's) or bf16x3 (Linear "
                   "layers as three bf16 products on AMX tiles, float32's accuracy) or mixed (only the UNet's "
                   "transformer matmuls and attention in bf16: fp32's picture within a level or two); "
                   "stored in the PNG")
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="decode (and encode) with this VAE instead of the model's: a diffusers AutoencoderKL or "
                   "AutoencoderTiny (TAESD) folder; its name is stored in the PNG")
    p.add_argument("--vae-tiling", action="store_true", default=None,
                   help="decode (and encode) pictures larger than the VAE's sample_size in overlapping tiles, as "
                   "diffusers' enable_vae_tiling(): memory bounded by one tile; switched on by itself when the "
                   "whole picture would not fit; stored in the PNG")
    p.add_argument("--out", default=None, help="output PNG (default npdiff-SEED.png)")
    p.add_argument("--save-steps", type=int, default=None, metavar="K",
                   help="also write OUT-steps.png: the picture decoded every K steps")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA .safetensors (kohya or diffusers) at SCALE (default 1); repeatable")
    add_control_options(p)
    add_sdxl_options(p)  # --refiner, --refiner-switch, size/crop conditioning, aesthetic scores
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="with --reproduce: find the PNG's LoRAs (webui's <lora:NAME:SCALE> tags) as DIR/NAME.safetensors, "
                   "their hashes checked when the PNG has them")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="webui's Clip skip: condition on the text encoder's output N-1 layers before its last "
                   "(1, the default: the last; 2: the one before)")
    p.add_argument("--prompt-syntax", default=None, choices=["plain", "a1111"],
                   help="plain (diffusers', the default) or a1111 (webui's (word:1.2), [word], BREAK, any length); "
                   "--reproduce of a webui picture turns a1111 on")
    p.add_argument("--reproduce", default=None, metavar="PNG",
                   help="take unset options from the parameters stored in a PNG (npdiff's, or AUTOMATIC1111's "
                   "'parameters' text); options given on the command line win; the model comes from --model (a "
                   "differing model hash is warned about), img2img's picture from --image: paths in a PNG are never "
                   "opened")
    p.add_argument("--device", default=None, choices=sorted(DEVICE_BACKENDS),
                   help="cpu (NumPy/Numba, the default) or cuda (CuPy on an NVIDIA GPU; pip install -e '.[gpu]')")
    p.add_argument("--fp16", action="store_true", help="with --device cuda: weights and activations in float16")
    p.add_argument("--backend", default=None, help="numpy (default) or cupy: the same choice as --device")


def add_hires_options(p):
    """generate's webui hires fix: draw, upscale, img2img again."""
    p.add_argument("--hires-scale", type=float, default=None, metavar="X",
                   help="webui's hires fix: draw at HEIGHTxWIDTH, upscale X times, then img2img at --hires-strength")
    p.add_argument("--hires-strength", type=float, default=None, metavar="S",
                   help="hires fix: the second pass's denoising strength (default 0.7, webui's)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="hires fix: the second pass's steps (default 0: as many as --steps)")
    p.add_argument("--hires-upscaler", default=None, choices=list(HIRES_UPSCALERS),
                   help="hires fix: latent (bilinear, the default), latent-nearest, latent-nearest-exact, "
                   "latent-bicubic (the latents, as webui's Latent modes), lanczos (the decoded picture)")
