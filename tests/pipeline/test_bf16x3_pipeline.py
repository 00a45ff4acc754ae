"""precision="bf16x3" pipelines: the shipped model's picture against its float32 picture from the same seed.

bf16x3 multiplies within a few 1e-6 of float32 (tests/kernels/test_matmul_bf16x3.py), so the picture is
float32's within 1 level per pixel (the task's bound; bf16 differs by several levels).
"""

import numpy as np
from precision_cli import check_precision_round_trip
from shipped import MODEL_DIR, shapes_data, to_uint8

import npdiff

PICTURE_LEVELS = 1


def test_shipped_model_at_bf16x3_draws_float32s_picture(seed):
    prompts, _ = shapes_data.random_prompts(2, seed)
    pictures = {}
    for precision in ("fp32", "bf16x3"):
        pipe = npdiff.StableDiffusionPipeline.from_pretrained(MODEL_DIR, precision=precision)
        pipe.show_progress = False
        assert pipe.precision == precision
        output = pipe(prompts, num_inference_steps=8, guidance_scale=7.0, seed=seed, output_type="np")
        pictures[precision] = to_uint8(output.images).astype(int)
    difference = np.abs(pictures["bf16x3"] - pictures["fp32"])
    print(f"shipped model, seed {seed}: bf16x3 vs fp32 picture max {difference.max()} levels, "
          f"mean {difference.mean():.4f}")
    assert difference.max() <= PICTURE_LEVELS


def test_cli_precision_bf16x3_is_stored_and_reproduced(tmp_path, capsys):
    """--precision bf16x3: in the PNG's JSON and AUTOMATIC1111 text; --reproduce loads bf16x3 again."""
    from tiny_sd import tiny_sd_folder

    check_precision_round_trip("bf16x3", tiny_sd_folder(), tmp_path, capsys)
