"""`npdiff batch`: a LoRA scale that is not finite ("FILE:nan", "FILE:1e309", on a line or in the batch's --lora)
fails its line when the job file is read, as `npdiff generate --lora FILE:nan` is refused before the model
loads (lora.check_scale). Before, such lines passed the reading and each failed in a worker once the model
had loaded."""

import json
from pathlib import Path

import pytest

from npdiff.batch_jobs import read_jobs

LORA = Path(__file__).parent.parent / "weights" / "tiny-shapes" / "lcm-lora.safetensors"


@pytest.mark.parametrize("scale", ["nan", "1e309", "-inf"])
def test_a_non_finite_lora_scale_fails_its_line_when_read(tmp_path, rng, scale):
    good = round(float(rng.uniform(0.1, 1.5)), 3)
    lines = [{"prompt": "a red circle", "lora": f"{LORA}:{good}"},
             {"prompt": "a red circle", "lora": [f"{LORA}:{good}", f"{LORA}:{scale}"]}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    jobs, failures = read_jobs(jobs_file, {})
    assert [job.line for job in jobs] == [1] and jobs[0].loras[0][1] == good
    assert "LoRA scale must be finite" in failures[2]
    # the batch's own --lora: every line that takes it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n", encoding="utf-8")
    jobs, failures = read_jobs(prompts, {"lora": [f"{LORA}:{scale}"]})
    assert jobs == [] and sorted(failures) == [1, 2]
    assert all("LoRA scale must be finite" in message for message in failures.values())
