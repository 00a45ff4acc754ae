"""npdiff/loading/config_checks.py: the one home of every model config's defaults and rules.

Compared with diffusers/transformers: the defaults are their constructors' defaults. Checked once: the
loader checks what it reads (naming the file), the model's constructor only a config made by hand.
"""

import inspect
import json
import shutil

import pytest
from tiny_models import tiny_unet

from npdiff.errors import NpdiffError
from npdiff.loading import config_checks, load_component
from npdiff.models import CLIPTextModel, UNet2DConditionModel
from npdiff.models import clip as clip_module
from npdiff.models import unet as unet_module


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_defaults_are_the_libraries_defaults(component):
    if component == "text_encoder":
        from transformers import CLIPTextConfig

        theirs = CLIPTextConfig().to_dict()
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel as TorchUNet

        cls = TorchUNet if component == "unet" else AutoencoderKL
        theirs = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
    ours = config_checks.DEFAULTS[component]
    for key, value in ours.items():
        assert key in theirs, f"{component}: {key} is not a {component} config key"
        assert _listed(value) == _listed(theirs[key]), f"{component} default {key}: {value!r} != {theirs[key]!r}"


def test_supported_names_are_the_ones_the_models_build():
    assert set(unet_module.DOWN_TYPES) == set(config_checks.UNET_DOWN_BLOCK_TYPES)
    assert set(unet_module.UP_TYPES) == set(config_checks.UNET_UP_BLOCK_TYPES)
    assert set(clip_module.ACTIVATIONS) == set(config_checks.CLIP_ACTIVATIONS)


@pytest.fixture
def count_checks(monkeypatch):
    """component -> how many times its cross-checks ran (step 2 of every check)."""
    counts = {}
    real = config_checks._cross_checks

    def counting(component, full):
        counts[component] = counts.get(component, 0) + 1
        return real(component, full)

    monkeypatch.setattr(config_checks, "_cross_checks", counting)
    return counts


def test_a_config_is_checked_once(count_checks):
    _, folder = tiny_unet("sd1", seed=0)
    config, weights = load_component(folder)
    checked = config_checks.check_component_config("unet", config, str(folder / "config.json"))
    UNet2DConditionModel(checked, weights)  # the loader checked it: the constructor does not again
    assert count_checks == {"unet": 1}
    UNet2DConditionModel(dict(config), load_component(folder)[1])  # made by hand: checked by the constructor
    assert count_checks == {"unet": 2}


def test_unsupported_values_name_the_file_at_load(tmp_path):
    from npdiff.loading import load_pipeline_components

    _, folder = tiny_unet("sd1", seed=0)
    shutil.copytree(folder, tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "class_embed_type": "timestep"}))
    with pytest.raises(NpdiffError) as info:
        load_pipeline_components(tmp_path)
    assert str(info.value).startswith(f"{path}: class_embed_type='timestep' is not supported")
    with pytest.raises(NpdiffError, match="^unet config: class_embed_type=.timestep. is not supported"):
        UNet2DConditionModel(json.loads(path.read_text()), load_component(folder)[1])


def test_clip_activation_refused_by_the_table():
    with pytest.raises(NpdiffError, match="text_encoder config: hidden_act 'relu6' is not supported"):
        CLIPTextModel({"hidden_act": "relu6"}, weights=None)


@pytest.mark.parametrize("component, key, value", [
    ("unet", "layers_per_block", 10**9), ("unet", "layers_per_block", [2, 10**9]),
    ("unet", "transformer_layers_per_block", 10**9), ("vae", "layers_per_block", 10**9),
    ("text_encoder", "num_hidden_layers", 10**9)])
def test_absurd_layer_counts_refused_at_once(component, key, value):
    """A layer count of 10**9 (a damaged config) is refused by its rule, not by running out of memory building
    a list of 10**9 transformer depths (what a fuzzed config found: 18 s and a MemoryError, or a killed
    process). A count the rule allows, like SDXL's 10, still passes the rule."""
    with pytest.raises(NpdiffError, match=f"^{component} config: {key}.*<= 1000"):
        config_checks.check_component_config(component, {key: value})
    config_checks.check_component_config(component, {key: 10})
