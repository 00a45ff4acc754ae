"""What the tests of the shipped model share: where it lives, the picture rules of weights/ (the
shape classifier and the random prompts, which are not installed with the package), and diffusers'
rounding of float pictures to 8 bits."""

import sys
from pathlib import Path

import numpy as np

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
MODEL_DIR = WEIGHTS_DIR / "tiny-shapes"
sys.path.insert(0, str(WEIGHTS_DIR))
import shape_classifier  # noqa: E402,F401  (re-exported)
import shapes_data  # noqa: E402,F401  (re-exported)


def to_uint8(images):
    """float [N,H,W,3] in [0,1] -> uint8 [N,H,W,3] (diffusers' rounding)."""
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
