"""`npdiff verify` on tiny random SDXL folders (base and refiner) saved by diffusers: every row of the table
(both tokenizers, both text encoders, the SDXL UNet's blocks with add_embedding, the VAE) within
tolerance, and a wrong block flagged."""

import io
import sys
from pathlib import Path

import pytest
from tiny_models import UNET_KINDS, _process_root, randomize_

sys.path.insert(0, str(Path(__file__).parent.parent / "pipeline"))
from tiny_sd import VAE_CONFIG, tiny_clip_text_model  # noqa: E402
from tiny_sdxl import building_tokenizer, copy_clip_tokenizer  # noqa: E402  (tokenizer files made once per process)

from npdiff import verify  # noqa: E402

CLIP_L = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
              layer_norm_eps=1e-5)
CLIP_G = dict(CLIP_L, hidden_size=16, num_hidden_layers=3, hidden_act="gelu", projection_dim=16)  # pooled 16


def tiny_sdxl(kind, root):
    """A diffusers SDXL folder: "base" (two encoders, 6 ids) or "refiner" (text_encoder_2 only, 5 ids)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    refiner = kind == "refiner"
    unet_config = dict(UNET_KINDS["sdxl-refiner" if refiner else "sdxl"], sample_size=8,
                       cross_attention_dim=16 if refiner else 32)
    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(**unet_config), 1)
    vae = randomize_(AutoencoderKL(**dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)), 2)
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    randomize_(text_encoder_2, 4)
    tokenizer_2 = building_tokenizer("!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
                                                tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
                                                scheduler=scheduler, requires_aesthetics_score=True)
    else:
        tokenizer = building_tokenizer()
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_clip_text_model(5, CLIP_L),
                                         text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                         unet=unet, scheduler=scheduler)
    folder = root / f"sdxl-{kind}"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    copy_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    if not refiner:
        copy_clip_tokenizer(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl_folder(request):
    root = _process_root() / "verify-sdxl"
    root.mkdir(exist_ok=True)
    return request.param, tiny_sdxl(request.param, root)


def test_verify_sdxl_prints_every_block_within_tolerance(sdxl_folder):
    kind, folder = sdxl_folder
    out = io.StringIO()
    side = 64 if kind == "refiner" else 32                # the refiner's 4 blocks: multiples of 64 pixels
    code = verify.verify_model(folder, steps=2, height=side, width=side, out=out)
    table = out.getvalue()
    rows = ["tokenizer_2", "text_encoder_2", "text_embeds (pooled, projected)", "add_embedding", "down_blocks.2",
            "mid_block", "up_blocks.2", "noise prediction", "decoder.up_blocks.3", "all within tolerance"]
    rows += ["refiner"] if kind == "refiner" else ["text_encoder  ", "layer 1"]
    rows += ["final latents", "8-bit picture"] if kind == "base" else []  # the whole loop (not for a refiner)
    for row in rows:
        assert row in table, f"verify table lacks {row!r}:\n{table}"
    assert code == 0 and "ABOVE" not in table, table


def test_verify_sdxl_flags_a_wrong_add_embedding(sdxl_folder, monkeypatch):
    """add_embedding's output 1% off: verify flags it and the UNet blocks after it."""
    from npdiff import verify_sdxl

    kind, folder = sdxl_folder
    side = 64 if kind == "refiner" else 32
    load = verify_sdxl.load_sdxl_networks

    def with_noisy_add_embedding(path, precision="fp32"):
        ours = load(path, precision)
        real = ours.unet.add_embedding

        class Noisy:
            def __call__(self, x):
                out = real(x)
                return out * 1.01

        ours.unet.add_embedding = Noisy()
        return ours

    monkeypatch.setattr(verify_sdxl, "load_sdxl_networks", with_noisy_add_embedding)
    out = io.StringIO()
    assert verify.verify_model(folder, steps=1, height=side, width=side, out=out) == 1
    table = out.getvalue()
    flagged = [line.split()[1] for line in table.splitlines() if "ABOVE" in line]
    assert "add_embedding" in flagged and "mid_block" in flagged, table
