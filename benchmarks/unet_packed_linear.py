"""The UNet's Linear shapes on weights packed once (kernels.linear_rows) against today's path and torch.

    flock /work/bench.lock python benchmarks/unet_packed_linear.py [--repeat 11] [--shapes 0,2] [--no-torch]

Per shape ([R, in] x [in, out] at batch 2, 64x64 latent, with a bias), in one process, the variants called in
turn, round after round (so a busy minute hits them all alike):
    linear       npdiff.kernels.linear: OpenBLAS sgemm, one block of rows per worker of npdiff's pool
    rows         kernels.linear_rows on the packed panels, its "rows" driver (the next row block fetched into L2)
    panels       its "panels" driver (each tile fetches the weight's next panel into L2)
                 (both with a fresh output array per call, as kernels.linear and torch make one; "rows, out given":
                 into one array reused from call to call, as the first measurements did: 0-5% faster)
    torch's threads spin after its calls (OpenMP) and slowed the next variant, kernels.linear, by up to 25% in
    the first measurements: --no-torch for a comparison of npdiff's two paths alone
    torch        torch.nn.functional.linear (oneDNN), torch.set_num_threads(cores)
Best wall time and best process CPU time per call over the rounds, GFLOP/s on both; the sgemm peak (NumPy,
2048^2) and the load average before and after. Output: a table and benchmarks/out/unet_packed_linear.json.
"""

import argparse
import os
import time

import numpy as np  # first, as a user's script

SHAPES = (  # (rows, in, out): C x C, ff.net.2 at each level; proj_in/out and to_q/k/v/out are the C x C ones
    (8192, 320, 320), (8192, 1280, 320), (2048, 640, 640), (2048, 2560, 640), (512, 1280, 1280),
    (512, 5120, 1280), (128, 1280, 1280),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--shapes", default="", help="indices into SHAPES")
    args = parser.parse_args()

    from _common import print_table, sgemm_peak_gflops, write_json

    from npdiff import kernels
    from npdiff.kernels.linear_packed import pack_panels
    from npdiff.kernels.linear_rows import DRIVERS, linear_rows

    load_before = os.getloadavg()
    peak = sgemm_peak_gflops()
    torch = None
    if not args.no_torch:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(0)
    rows_out = []
    chosen = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    for rows, depth, outputs in chosen:
        x = rng.standard_normal((rows, depth), dtype=np.float32)  # [R,in]
        weight = rng.standard_normal((outputs, depth), dtype=np.float32) * np.float32(0.05)  # [out,in]
        bias = rng.standard_normal(outputs, dtype=np.float32)  # [out]
        panels = pack_panels(weight)  # [out/64, in, 64]
        out = np.empty((rows, outputs), np.float32)
        calls = {"linear": lambda: kernels.linear(x, weight, bias)}
        for driver in DRIVERS:  # a fresh output per call, as the layer (and kernels.linear) makes one
            calls[driver] = lambda driver=driver: linear_rows(x, panels, outputs, bias, driver=driver)
        calls["rows, out given"] = lambda: linear_rows(x, panels, outputs, bias, out=out, driver="rows")
        if torch is not None:
            x_t, w_t, b_t = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)

            def torch_call():
                with torch.inference_mode():
                    return F.linear(x_t, w_t, b_t)

            calls["torch"] = torch_call
        wall = {name: float("inf") for name in calls}
        cpu = {name: float("inf") for name in calls}
        for call in calls.values():
            call()  # warm-up
        reference = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
        for name in calls:
            if name != "linear" and name != "torch":
                error = np.abs(calls[name]() - reference).max() / np.abs(reference).max()
                assert error < 1e-5, (name, error)
        for _ in range(args.repeat):
            for name, call in calls.items():
                c0, w0 = time.process_time(), time.perf_counter()
                call()
                w1, c1 = time.perf_counter(), time.process_time()
                wall[name] = min(wall[name], w1 - w0)
                cpu[name] = min(cpu[name], c1 - c0)
        flop = 2.0 * rows * depth * outputs
        row = {"shape": f"[{rows},{depth}] x [{depth},{outputs}]"}
        for name in calls:
            row[name] = flop / wall[name] / 1e9
            row[name + " cpu"] = flop / cpu[name] / 1e9
        rows_out.append(row)
        print(row, flush=True)
    load_after = os.getloadavg()
    names = list(calls)
    print(f"sgemm peak {peak:.0f} GFLOP/s; load {load_before[0]:.2f} -> {load_after[0]:.2f}; GFLOP/s, best of "
          f"{args.repeat} alternated rounds; wall (cpu: per CPU-second of the process)")
    print_table(rows_out, [("shape", "shape", None)] + [(n, n, "{:.0f}") for n in names]
                + [(n + " cpu", n + " cpu", "{:.0f}") for n in names])
    write_json("unet_packed_linear", {"rows": rows_out, "sgemm_peak_gflops": peak, "load_before": load_before,
                                      "load_after": load_after})


if __name__ == "__main__":
    main()
