"""An int past Python's 4300-digit int -> str limit (repr raises ValueError) inside a value npdiff quotes in a
message (a list passed as a path, a scale or a height) is still an NpdiffError naming the value: before,
errors.shorten took every such value for an int (AttributeError: 'list' object has no attribute 'bit_length'),
and load_lora_weights formatted the path and a scale with str()/repr() before checking them (ValueError:
Exceeds the limit (4300 digits))."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from shipped import MODEL_DIR  # noqa: E402

from npdiff.errors import NpdiffError, shorten  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def huge(rng):
    return 10 ** int(rng.integers(4400, 6000))


def test_shorten_names_a_container_of_a_huge_int(rng):
    number = huge(rng)
    assert shorten(number).startswith("an integer of about")
    for value in ([number], (1, number), {"height": number}):
        assert type(value).__name__ in shorten(value)


@pytest.fixture(scope="module")
def pipe():
    loaded = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    loaded.show_progress = False
    return loaded


def test_api_values_holding_a_huge_int_are_named(pipe, rng):
    number = huge(rng)
    lora = MODEL_DIR / "lcm-lora.safetensors"
    calls = [
        (lambda: pipe.load_lora_weights([number]), "LoRA: expected the path of a .safetensors file"),
        (lambda: pipe.load_lora_weights(lora, scale=[number]), "LoRA scale must be a number"),
        (lambda: pipe("a circle", height=[number], num_inference_steps=1), "height"),
    ]
    for call, words in calls:
        with pytest.raises(NpdiffError, match=words):
            call()
