"""Pipelines and models called from several Python threads at once.

Numba's "workqueue" threading layer (npdiff's choice where TBB is not installed) may be entered by one
thread at a time: before npdiff/jit.py held a lock around each parallel kernel, two threads calling one
pipeline made Numba print "Concurrent access has been detected" and abort the process, so the calls run
in a child process here. Each thread's result must be the one a call alone gives, bit for bit.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_sd import tiny_sd_folder

TIMEOUT_S = 600

CHILD = r"""
import json, sys, threading
import numpy as np
import npdiff

folder, precision = sys.argv[1], sys.argv[2]
pipe = npdiff.StableDiffusionPipeline.from_pretrained(folder, scheduler="euler", precision=precision)
pipe.show_progress = False
latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)

def txt2img():
    return pipe("a red circle", num_inference_steps=3, seed=1, output_type="np").images
def img2img():
    return pipe.img2img("a blue square", image=np.full((64, 64, 3), 0.5, np.float32), strength=0.7,
                        num_inference_steps=3, seed=2, output_type="np").images
def decode():
    return pipe.vae.decode(latents)

jobs = {"txt2img": txt2img, "img2img": img2img, "decode": decode, "txt2img again": txt2img}
alone = {name: job() for name, job in jobs.items()}
together, errors = {}, []
def run(name):
    try:
        together[name] = jobs[name]()
    except BaseException as error:
        errors.append(f"{name}: {type(error).__name__}: {error}")
threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"errors": errors,
                  "differ": [name for name in jobs if name in together
                             and not np.array_equal(together[name], alone[name])]}))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_calls_from_several_threads_give_what_each_gives_alone(precision, tmp_path):
    folder = tiny_sd_folder()
    script = tmp_path / "threads.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script), str(folder), precision], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, f"the child died (rc {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "differ": []}
