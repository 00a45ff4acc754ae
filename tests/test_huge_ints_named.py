"""An int past Python's 4300-digit int -> str limit (repr raises ValueError) inside a value npdiff quotes in a
message (a list passed as a path, a scale or a height) is still an NpdiffError naming the value: before,
errors.shorten took every such value for an int (AttributeError: 'list' object has no attribute 'bit_length'),
and load_lora_weights formatted the path and a scale with str()/repr() before checking them (ValueError:
Exceeds the limit (4300 digits))."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from lora_helpers import load_ours  # noqa: E402
from shipped import MODEL_DIR  # noqa: E402

from npdiff.errors import NpdiffError, shorten  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def huge(rng):
    return 10 ** int(rng.integers(4400, 6000))


def huge_digits(rng):
    """The JSON text of an integer of over 4300 digits (str() of such an int raises)."""
    return "1" + "0" * int(rng.integers(4400, 6000))


def test_shorten_names_a_container_of_a_huge_int(rng):
    number = huge(rng)
    assert shorten(number).startswith("an integer of about")
    for value in ([number], (1, number), {"height": number}):
        assert type(value).__name__ in shorten(value)


@pytest.fixture(scope="module")
def pipe():
    return load_ours(MODEL_DIR)


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


# JSON read from files: Python's json.loads raises a plain ValueError (not JSONDecodeError) for an integer of
# over 4300 digits; before, each of these was that ValueError's traceback.
def test_a_batch_line_with_a_huge_int_fails_alone(tmp_path, rng):
    from npdiff.batch_jobs import read_jobs

    digits = huge_digits(rng)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a red circle", "seed": ' + digits + '}\n{"prompt": "a blue square"}\n',
                         encoding="utf-8")
    jobs, failures = read_jobs(jobs_file, {})
    assert [job.line for job in jobs] == [2]
    assert "an integer of over 4300 digits" in failures[1]


def test_a_json_file_with_a_huge_int_is_named(tmp_path, rng):
    from npdiff.json_files import read_json

    path = tmp_path / "config.json"
    path.write_text('{"sample_size": ' + huge_digits(rng) + '}', encoding="utf-8")
    with pytest.raises(NpdiffError, match="config.json is not valid JSON: .*4300"):
        read_json(path)


def test_lora_metadata_with_a_huge_int_is_named(pipe, tmp_path, rng):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "big-alpha.safetensors"
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 32, 1, 1), f"{layer}.lora_up.weight": torch.zeros(32, 4, 1, 1)},
              str(path), metadata={"lora_adapter_metadata": '{"unet.lora_alpha": ' + huge_digits(rng) + '}'})
    with pytest.raises(NpdiffError, match="header entry 'lora_adapter_metadata' is not JSON: .*4300"):
        pipe.load_lora_weights(path)
