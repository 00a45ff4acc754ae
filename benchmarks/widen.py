"""float16 weights: widened into private memory, into a file-backed map (what npdiff does), or per use.

    npdiff bench widen [--millions 400]      (or python benchmarks/widen.py)

A float16 .safetensors file of random tensors (2 M values each, --millions in all, cached under
/tmp/npdiff-bench-widen) is loaded with npdiff.loading.open_weights + take, each way in a fresh process:
  private   the widened copy in anonymous memory (what happens when no widening file can be made)
  file      the widened copy in an unlinked file's map (npdiff.loading.widened)
and for both: time to load, memory after loading (RSS, anonymous, file-backed), and the time of one pass
reading every weight (what a network step does) after the pages were released, and resident.
  per-use   option not taken: keep the float16 map and widen each tensor into one reused float32
            buffer when it is used: the time of one pass (widen + read).
"""

import argparse
import json
import os
import subprocess
import sys
import time

FOLDER = "/tmp/npdiff-bench-widen"
PER_TENSOR = 2_000_000


def memory_mib():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) // 1024
    return fields


def make_file(count):
    import numpy as np
    from safetensors.numpy import save_file

    path = os.path.join(FOLDER, f"half-{count}.safetensors")
    if not os.path.exists(path):
        os.makedirs(FOLDER, exist_ok=True)
        rng = np.random.default_rng(0)
        save_file({f"t{i}": rng.standard_normal(PER_TENSOR, dtype=np.float32).astype(np.float16)
                   for i in range(count)}, path)
    return path


def one_pass(arrays):
    start = time.perf_counter()
    for array in arrays:
        array.max()
    return time.perf_counter() - start


def worker(mode, path, count):
    import warnings

    import npdiff  # noqa: F401  (first: OpenBLAS settings)
    import numpy as np

    from npdiff.loading import open_weights
    from npdiff.loading.resident import release_array_pages
    from npdiff.loading.safetensors_io import SafetensorsFile
    from npdiff.loading.widened import widen_into

    os.environ["NPDIFF_WIDEN_DIR"] = os.path.join(FOLDER, "widened") if mode == "file" else "/proc/npdiff-none"
    warnings.simplefilter("ignore")  # private: the "could not make a file" warning is the point
    result = {"mode": mode}
    if mode == "per-use":
        source = SafetensorsFile(path)
        buffer = np.empty(PER_TENSOR, np.float32)
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(count):
                widen_into(source.raw_view(f"t{i}"), buffer, "F16")
                buffer.max()
            passes.append(time.perf_counter() - start)
        return {**result, "pass_s": min(passes), "memory_mib": memory_mib()}
    start = time.perf_counter()
    weights = open_weights(path)
    arrays = [weights.take(f"t{i}", (PER_TENSOR,)) for i in range(count)]
    weights.check_all_used()
    result["load_s"] = time.perf_counter() - start
    result["after_load_mib"] = memory_mib()
    released = []
    for _ in range(3):
        release_array_pages(arrays)
        released.append(one_pass(arrays))
    result["pass_after_release_s"] = min(released)
    result["pass_resident_s"] = min(one_pass(arrays) for _ in range(3))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=int, default=400, help="float16 parameters, in millions")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = max(1, args.millions * 1_000_000 // PER_TENSOR)
    path = make_file(count)
    if args.worker:
        print(json.dumps(worker(args.worker, path, count)))
        return
    print(f"{count * PER_TENSOR / 1e6:.0f} M float16 parameters ({count * PER_TENSOR * 4 / 2**30:.2f} GiB as float32)")
    for mode in ("private", "file", "per-use"):
        done = subprocess.run([sys.executable, __file__, "--millions", str(args.millions), "--worker", mode],
                              capture_output=True, text=True, check=True)
        print(done.stdout.strip())


if __name__ == "__main__":
    main()
