"""The OpenVINO side of benchmarks/models.py: the engine a CPU user would pick instead of torch.

    from _openvino import OPENVINO_SIDES, convert_to_ir, ir_path, openvino_callable

    path = ir_path(cache, "unet")
    info = convert_to_ir(build_module, inputs, path)          # once, in its own process; saved float32 IR
    fn, info = openvino_callable("bf16", path, inputs)          # fn() -> the output as a NumPy array

As a CPU user would: the network is converted once and saved, then each run reads the saved model
and compiles it. The network is the same diffusers/transformers module the torch side times
(models.torch_module), converted with `openvino.convert_model(module, example_input=...)`, its inputs
fixed to the call's shapes, saved as OpenVINO IR in float32 (`save_model(..., compress_to_fp16=False)`)
in the weights' cache folder, and compiled for the CPU at one inference precision ("f32" or "bf16")
with as many threads as the torch side uses. OpenVINO's CPU plugin runs bf16 by default on a CPU
with AVX-512 BF16 or AMX, so the precision is always given explicitly and read back from the
compiled model.
"""

import json
import os
import time
import resource
import warnings
from pathlib import Path

import numpy as np

# side name -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_SIDES = {"openvino_f32": "f32", "openvino_bf16": "bf16"}
# the optimisation capability (ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")) each needs
REQUIRED_CAPABILITY = {"f32": "FP32", "bf16": "BF16"}


def openvino_version():
    import openvino as ov

    return ov.get_version()


def unsupported_reason(precision):
    """None when this CPU runs `precision` natively, else a sentence saying why the row is empty."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if REQUIRED_CAPABILITY[precision] not in capabilities:
        return f"this CPU has no {precision} support in OpenVINO (capabilities: {', '.join(capabilities)})"
    return None


def as_arrays(inputs):
    """The network's inputs as NumPy arrays (the timestep: a 0-d int64 array, as torch.tensor(500))."""
    return [value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.int64) for value in inputs]


def ir_path(cache, component):
    """Where the converted network is saved: one folder per OpenVINO release beside the weights."""
    return Path(cache) / f"openvino-{openvino_version().split('-')[0]}" / f"{component}.xml"


def read_conversion(path, inputs):
    """The record convert_to_ir left beside a saved IR, or None when there is no complete IR for these
    inputs' shapes (the IR's shapes are fixed)."""
    record = path.with_suffix(".json")
    if not (path.is_file() and path.with_suffix(".bin").is_file() and record.is_file()):
        return None
    info = json.loads(record.read_text())
    return info if info.get("input_shapes") == [list(a.shape) for a in as_arrays(inputs)] else None


def convert_to_ir(build_module, inputs, path):
    """Convert the torch module and save it as float32 IR at path (.xml + .bin, then a .json record).

    build_module() -> torch.nn.Module whose forward(*tensors) returns one tensor; inputs: the
    network's inputs (NumPy arrays or Python numbers) in the order forward takes them.
    """
    import openvino as ov
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    arrays = as_arrays(inputs)
    info = {"openvino_version": ov.get_version(), "input_shapes": [list(a.shape) for a in arrays]}

    # 1. the torch module, from the same cached weights as the torch side
    t0 = time.perf_counter()
    module = build_module()
    info["torch_load_seconds"] = time.perf_counter() - t0

    # 2. convert (a TorchScript trace of one call on the example inputs), then fix the call's shapes
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the trace is only ever run at these shapes
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, hit by the converter
        model = ov.convert_model(module, example_input=tuple(torch.from_numpy(a) for a in arrays))
    model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, arrays)})
    info["convert_seconds"] = time.perf_counter() - t0

    # 3. save in float32 (save_model would halve the weights to fp16 by default); the .xml and the
    #    record appear last, so an interrupted run leaves no IR that looks complete
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.xml")
    ov.save_model(model, partial, compress_to_fp16=False)
    partial.with_suffix(".bin").replace(path.with_suffix(".bin"))
    partial.replace(path)
    info["save_seconds"] = time.perf_counter() - t0
    info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    path.with_suffix(".json").write_text(json.dumps(info) + "\n")
    return info


def openvino_callable(precision, path, inputs, threads=None):
    """Read the saved IR and compile it for the CPU; returns (fn, info) with the seconds of each step."""
    import openvino as ov

    threads = threads or os.cpu_count() or 1
    arrays = as_arrays(inputs)
    core = ov.Core()
    info = {"openvino_version": ov.get_version(), "precision_asked": precision}

    # 1. read the converted network (float32 weights)
    t0 = time.perf_counter()
    model = core.read_model(path)
    info["read_seconds"] = time.perf_counter() - t0

    # 2. compile for the CPU at the asked precision: one stream of `threads` threads, for one call at a time
    t0 = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    })
    info["compile_seconds"] = time.perf_counter() - t0
    del model
    # what the compiled model actually runs at (the hint is not an order)
    info["precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "f32", "bf16"
    info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))

    request = compiled.create_infer_request()

    def run():
        # [the network's inputs] -> its one output, copied out of OpenVINO's buffer
        return np.array(request.infer(arrays)[0], dtype=np.float32, copy=True)

    return run, info
