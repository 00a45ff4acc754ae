"""The pipeline's sampling loop runs inside keep_freed_memory (npdiff/freed_memory.py): each UNet forward reuses
the memory the one before freed instead of faulting fresh pages."""

from contextlib import contextmanager

from tiny_sd import tiny_sd_folder

import npdiff.pipeline as pipeline_module


def test_the_sampling_loop_runs_inside_keep_freed_memory(monkeypatch):
    inside = []

    @contextmanager
    def recording():
        inside.append(True)
        yield
        inside.append(False)

    pipe = pipeline_module.StableDiffusionPipeline.from_pretrained(tiny_sd_folder(kind="test"))
    pipe.show_progress = False
    denoise = pipe.denoise
    states = []
    monkeypatch.setattr(pipe, "denoise", lambda *a, **k: (states.append(list(inside)), denoise(*a, **k))[1])
    monkeypatch.setattr(pipeline_module, "keep_freed_memory", recording)
    pipe("a red circle", num_inference_steps=2, seed=0)
    assert states == [[True]] and inside == [True, False]  # denoise ran once, inside the block, which then closed
