"""SDXL single files that are damaged, inconsistent or of an unusual variant: every refusal is an NpdiffError
naming the file and key, raised before any tensor is read; variants (the projection stored as a Linear
weight) load. The tiny SDXL parts and the writer: tests/single_file.py (see test_single_file_sdxl.py).
"""

import copy
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from single_file import BIGG, tiny_sdxl_parts, to_sdxl_original_layout, write_sdxl

from npdiff.errors import NpdiffError
from npdiff.loading import load_single_file
from npdiff.loading.resident import mapping_of
from npdiff.loading.safetensors_io import SafetensorsFile


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_parts()


# --------------------------------------------------------------------------------------------------
# 5. Refusals: NpdiffError naming the file and key, before anything is read
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_checkpoint(parts):
    kind_parts = parts["base"]
    return to_sdxl_original_layout(kind_parts["unet"][:2], kind_parts["vae"][:2], kind_parts["text_encoder"][1],
                                   kind_parts["text_encoder_2"][1])


def save_changed(checkpoint, path, add=None, drop=None):
    changed = {k: v for k, v in checkpoint.items() if not (drop and re.fullmatch(drop, k))}
    changed.update(add or {})
    save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
    return path


BIGG_KEY = "conditioner.embedders.1.model."
REFUSALS = {
    "missing unet key": (dict(drop=r"model\.diffusion_model\.out\.2\.weight"),
                         r"missing key 'model\.diffusion_model\.out\.2\.weight' of the unet in .*sdxl\.safetensors"),
    "missing label_emb": (dict(drop=r"model\.diffusion_model\.label_emb\..*"),
                          r"missing key 'model\.diffusion_model\.label_emb\.0\.0\.weight' of the unet in "),
    "missing bigG key": (dict(drop=re.escape(BIGG_KEY + "positional_embedding")),
                         r"missing key 'conditioner\.embedders\.1\.model\.positional_embedding' of the text_encoder_2"),
    "missing projection": (dict(drop=re.escape(BIGG_KEY + "text_projection")),
                           r"neither 'conditioner\.embedders\.1\.model\.text_projection' nor "
                           r"'conditioner\.embedders\.1\.model\.text_projection\.weight' \(bigG's projection"),
    "two projections": (dict(add={BIGG_KEY + "text_projection.weight": torch.zeros(32, 128)}),
                        r"both 'conditioner\.embedders\.1\.model\.text_projection' and "),
    "no vae": (dict(drop=r"first_stage_model\..*"),
               r"sdxl\.safetensors has no vae weights \(no keys starting with 'first_stage_model\.'\)"),
    "no CLIP-L": (dict(drop=r"conditioner\.embedders\.0\..*"),
                  r"has no text_encoder weights \(no keys starting with 'conditioner\.embedders\.0\.transformer\.'\)"),
    "unexpected embedder": (dict(add={"conditioner.embedders.2.model.weight": torch.zeros(2)}),
                            r"unexpected key 'conditioner\.embedders\.2\.model\.weight' in .*sdxl\.safetensors: it "
                            r"belongs to none of the sdxl file's parts"),
    "unexpected unet key": (dict(add={"model.diffusion_model.label_emb.0.1.weight": torch.zeros(2)}),
                            r"unexpected key 'model\.diffusion_model\.label_emb\.0\.1\.weight' in .*: no diffusers "
                            r"name for it in the unet key map"),
    "unexpected bigG key": (dict(add={BIGG_KEY + "visual.proj": torch.zeros(2)}),
                            r"unexpected key 'conditioner\.embedders\.1\.model\.visual\.proj' in .*: no diffusers name "
                            r"for it in the OpenCLIP text encoder key map"),
    "v-prediction marker": (dict(add={"v_pred": torch.tensor([])}),
                            r"sdxl\.safetensors is a v-prediction SDXL model \(its \"v_pred\" marker\) "
                            r"\(key 'v_pred'\)"),
    "SD 1.x encoder too": (dict(add={"cond_stage_model.transformer.text_model.x": torch.zeros(2)}),
                           r"unexpected key 'cond_stage_model\.transformer\.text_model\.x' in .*sdxl\.safetensors"),
    "refiner and base mixed": (dict(add={"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2)}),
                               r"sdxl\.safetensors mixes an SDXL refiner's text encoder"),
    "label_emb width": (dict(add={"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4 * 64, 32 + 6 * 8 + 1)}),
                        r"key 'model\.diffusion_model\.label_emb\.0\.0\.weight' in .* has shape \(256, 81\); an sdxl "
                        r"UNet takes the pooled text embedding \(32\) and 6 time ids of equal width"),
    "projection shape": (dict(add={BIGG_KEY + "text_projection": torch.zeros(64, 32)}),
                         r"key 'conditioner\.embedders\.1\.model\.text_projection' in .* has shape \(64, 32\); "
                         r"expected \(128, P\)"),
    "in_proj rows": (dict(add={BIGG_KEY + "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(256, 128)}),
                     r"key 'conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.attn\.in_proj_weight' in .* "
                     r"has shape \(256, 128\); expected q, k and v stacked: \(384, \.\.\.\)"),
    "context width": (dict(drop=r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.1\..*",
                           add={"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                                torch.zeros(1000, 128)}),
                      r"the UNet's cross-attention takes 192 text channels \(attn2\.to_k\), but the file's text "
                      r"encoders give 128 \+ 128"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_sdxl_files_name_file_and_key(case, base_checkpoint, tmp_path, monkeypatch):
    change, message = REFUSALS[case]
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors", **change)
    read = []  # nothing may be read before the refusal
    monkeypatch.setattr(SafetensorsFile, "read_float32", lambda self, key: read.append(key))
    with pytest.raises(NpdiffError, match=message):
        load_single_file(path)
    assert read == []


def test_wrong_shape_at_take_names_the_stored_key(base_checkpoint, tmp_path):
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors")
    _, bigg = load_single_file(path)["text_encoder_2"]
    expected = re.escape(f"key 'text_projection.weight' in {path} (text_encoder_2 part), stored as "
                         f"'{BIGG_KEY}text_projection' transposed has shape (32, 128); the config expects (128, 32)")
    with pytest.raises(NpdiffError, match=expected):
        bigg.take("text_projection.weight", (128, 32))


UNET_KEY = "model.diffusion_model."
BUILD_REFUSALS = {  # keys the mapping cannot judge alone: the model's constructor refuses them, before any work
    "missing resnet weight": (dict(drop=re.escape(UNET_KEY + "input_blocks.4.0.in_layers.2.weight")),
                              r"missing key 'down_blocks\.1\.resnets\.0\.conv1\.weight' in .*sdxl\.safetensors "
                              r"\(unet part\)"),
    "wrong conv shape": (dict(add={UNET_KEY + "input_blocks.4.0.in_layers.2.weight": torch.zeros(64, 64, 1, 1)}),
                         r"key 'down_blocks\.1\.resnets\.0\.conv1\.weight' in .*sdxl\.safetensors \(unet part\), "
                         r"stored as 'model\.diffusion_model\.input_blocks\.4\.0\.in_layers\.2\.weight' has shape "
                         r"\(64, 64, 1, 1\); the config expects \(64, 64, 3, 3\)"),
}


@pytest.mark.parametrize("case", list(BUILD_REFUSALS))
def test_bad_unet_tensors_refused_when_the_model_is_built(case, base_checkpoint, tmp_path):
    from npdiff.models import UNet2DConditionModel

    change, message = BUILD_REFUSALS[case]
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors", **change)
    with pytest.raises(NpdiffError, match=message):
        UNet2DConditionModel(*load_single_file(path)["unet"])


def test_truncated_and_pickle_files_are_refused(base_checkpoint, tmp_path):
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(NpdiffError, match=re.escape(str(path)) + " is not a readable safetensors file"):
        load_single_file(path)
    pickle = tmp_path / "sd_xl_base_1.0.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(NpdiffError, match=r"refusing to read a '\.ckpt' checkpoint"):
        load_single_file(pickle)


def test_nan_weight_refused_naming_the_stored_key(parts, tmp_path):
    kind_parts = copy.copy(parts["refiner"])
    config, state, model = kind_parts["text_encoder_2"]
    state = dict(state, **{"text_projection.weight": state["text_projection.weight"].clone()})
    state["text_projection.weight"][3, 5] = float("nan")
    kind_parts["text_encoder_2"] = (config, state, model)
    path = write_sdxl(kind_parts, tmp_path / "refiner.safetensors", dtype=torch.bfloat16)
    _, bigg = load_single_file(path)["text_encoder_2"]
    with pytest.raises(NpdiffError, match=r"key 'text_projection\.weight' in .*stored as 'conditioner\.embedders\.0\."
                                          r"model\.text_projection' transposed holds nan at index \(3, 5\)"):
        bigg.take("text_projection.weight", (32, 128))
    assert os.path.getsize(path) > 0


def test_projection_stored_as_a_linear_weight(parts, base_checkpoint, tmp_path):
    """text_projection.weight [P,D] (files re-saved from a Linear) is taken as it is, a view of the file."""
    projection = parts["base"]["text_encoder_2"][1]["text_projection.weight"]  # [P,D]
    path = save_changed(base_checkpoint, tmp_path / "sdxl.safetensors", drop=re.escape(BIGG_KEY + "text_projection"),
                        add={BIGG_KEY + "text_projection.weight": projection})
    config, bigg = load_single_file(path)["text_encoder_2"]
    assert config["projection_dim"] == BIGG["projection_dim"]
    taken = bigg.take("text_projection.weight", tuple(projection.shape))
    np.testing.assert_array_equal(taken, projection.numpy())
    assert mapping_of(taken) is not None
