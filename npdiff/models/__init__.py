"""The networks of Stable Diffusion, built from weights keyed by their diffusers/transformers names.

    CLIPTextModel          npdiff/models/clip.py
    CLIPTextModelWithProjection  npdiff/models/clip.py   (SDXL's text_encoder_2)
    UNet2DConditionModel   npdiff/models/unet.py
    AutoencoderKL          npdiff/models/vae.py
    AutoencoderTiny        npdiff/models/vae_tiny.py   (TAESD)
    ControlNetModel        npdiff/models/controlnet.py

Each is built as `Model(config, weights)` (config: the component's config.json as a dict; weights: an
npdiff.loading.Weights) or `Model.from_pretrained(folder, subfolder=None, variant=None, precision="fp32")`
(npdiff.loading.load_component), and called on float32 NCHW arrays. precision="bf16" (not TAESD) packs the
Linear/Conv2d weights in bfloat16 (precision.py: which kernel a layer's weight runs on).
Imported lazily so that `import npdiff.models` costs nothing until a model is used.
"""

import importlib

_WHERE = {
    "CLIPTextModel": "npdiff.models.clip",
    "CLIPTextModelWithProjection": "npdiff.models.clip",
    "UNet2DConditionModel": "npdiff.models.unet",
    "AutoencoderKL": "npdiff.models.vae",
    "AutoencoderTiny": "npdiff.models.vae_tiny",
    "ControlNetModel": "npdiff.models.controlnet",
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'npdiff.models' has no attribute {name!r}")


__all__ = list(_WHERE)
