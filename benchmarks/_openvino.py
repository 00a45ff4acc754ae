"""The OpenVINO side of benchmarks/models.py: the engine a CPU user would pick instead of torch.

    from _openvino import OPENVINO_SIDES, openvino_callable

    fn, info = openvino_callable("bf16", build_module, inputs)   # fn() -> the output as a NumPy array

The network is the same diffusers/transformers module the torch side times (models.torch_module),
converted with `openvino.convert_model(module, example_input=...)`, its inputs fixed to the call's
shapes, and compiled for the CPU at one inference precision ("f32" or "bf16") with as many threads
as the torch side uses. OpenVINO's CPU plugin runs bf16 by default on a CPU with AVX-512 BF16 or AMX,
so the precision is always given explicitly and read back from the compiled model.
"""

import gc
import os
import time
import warnings

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


def openvino_callable(precision, build_module, inputs, threads=None):
    """Load (torch), convert, compile; returns (fn, info) with the seconds of each step in info.

    build_module() -> torch.nn.Module whose forward(*tensors) returns one tensor; inputs: the
    network's inputs (NumPy arrays or Python numbers) in the order forward takes them.
    """
    import openvino as ov
    import torch

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    arrays = [np.asarray(value) if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.int64)
              for value in inputs]
    info = {"openvino_version": ov.get_version(), "precision_asked": precision}

    # 1. the torch module, from the same cached weights as the torch side
    t0 = time.perf_counter()
    module = build_module()
    info["torch_load_seconds"] = time.perf_counter() - t0

    # 2. convert (TorchScript trace of one call on the example inputs), then fix the call's shapes
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the trace is only ever run at these shapes
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, hit by the converter
        model = ov.convert_model(module, example_input=tuple(torch.from_numpy(a) for a in arrays))
    model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, arrays)})
    info["convert_seconds"] = time.perf_counter() - t0
    del module
    gc.collect()

    # 3. compile for the CPU at the asked precision, one stream, `threads` threads
    t0 = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    })
    info["compile_seconds"] = time.perf_counter() - t0
    del model
    gc.collect()
    # what the compiled model actually runs at (the hint is not an order)
    info["precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "f32", "bf16"
    info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))

    request = compiled.create_infer_request()

    def run():
        # [the network's inputs] -> its one output, copied out of OpenVINO's buffer
        return np.array(request.infer(arrays)[0], dtype=np.float32, copy=True)

    return run, info
