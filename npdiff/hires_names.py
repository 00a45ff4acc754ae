"""Hires fix's names and defaults, shared by the flow (npdiff/hires.py), the PNG text (npdiff/infotext.py) and
the options (npdiff/recipe.py): nothing here imports any of them.

  HIRES_UPSCALERS  npdiff name -> (npdiff.kernels.resize mode, or None for PIL's Lanczos on the picture;
                   AUTOMATIC1111's name). webui's latent modes use no antialias ("Latent", "Latent (bicubic)",
                   "Latent (nearest)", "Latent (nearest-exact)"); its antialiased ones and its model-based
                   upscalers (ESRGAN, ...) are not here.
"""

HIRES_UPSCALERS = {
    "latent": ("bilinear", "Latent"),
    "latent-nearest": ("nearest", "Latent (nearest)"),
    "latent-nearest-exact": ("nearest-exact", "Latent (nearest-exact)"),
    "latent-bicubic": ("bicubic", "Latent (bicubic)"),
    "lanczos": (None, "Lanczos"),
}
WEBUI_UPSCALERS = {webui: ours for ours, (_, webui) in HIRES_UPSCALERS.items()}
DEFAULT_HIRES_STRENGTH = 0.7  # webui's "Denoising strength" for hires fix
DEFAULT_HIRES_UPSCALER = "latent"
