"""Batch throughput: pictures per minute of `npdiff batch` with 1 and 2 local workers and on local Ray.

    npdiff bench batch [--pictures 12] [--steps 20] [--modes 1,1t,2,ray]

The same job file (--pictures prompts of the shipped model's kind, seeds = line numbers) runs once in
each mode on the shipped model (32x32 pictures), into a fresh folder each time:
    1 worker     this process, all cores' threads (--workers 1)
    1t           one spawned process with 1 thread: what a single thread does alone (on a loaded
                 machine, many threads per process can be much slower than one)
    2 workers    two spawned processes, cores // 2 threads each (--workers 2)
    Ray          `--ray local`: a Ray started for the run, one actor per CPU
The time is the whole run as a user sees it: starting the workers (spawning, Ray's start-up, each
loading the model) included; "start-up" is the part before the first picture came back. The
pictures of every mode are compared byte for byte with the 1-worker run before any rate is printed.
There is no PyTorch anchor: this measures npdiff's own scaling, not its kernels.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402  (imports npdiff first)

from npdiff import batch  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
MODES = {"1": ("1 worker", 1, None), "1t": ("1 process, 1 thread", 1, None), "2": ("2 workers", 2, None),
         "ray": ("Ray (local)", None, "local")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=12, help="pictures per mode (default 12)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per picture (default 20)")
    parser.add_argument("--modes", default="1,1t,2,ray", help="comma-separated: 1, 1t, 2, ray (default all)")
    return parser.parse_args(argv)


def write_jobs(path, count):
    prompts = []
    for i in range(count):
        colour, background = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
        prompts.append(f"a {colour} {SHAPES[i % len(SHAPES)]} on a {background} background")
    path.write_text("\n".join(prompts) + "\n")
    return path


class FirstResultClock:
    """Wraps a worker pool to note when the first picture comes back (the end of start-up)."""

    def __init__(self, pool):
        self.pool, self.first = pool, None

    def results(self, payloads):
        for result in self.pool.results(payloads):
            if self.first is None:
                self.first = time.perf_counter()
            yield result


def run_mode(mode, jobs, out, steps, workers, ray_address):
    start = time.perf_counter()
    if mode == "1t":
        pool = batch.ProcessPool(None, workers=1, threads=1)
    else:
        pool = batch.make_pool(None, workers, ray_address)
    clock = FirstResultClock(pool)
    try:
        summary = batch.run_batch(jobs, out, defaults={"steps": steps}, pool=clock, progress=False)
    finally:
        pool.close()
    seconds = time.perf_counter() - start
    if summary.failures or summary.written != summary.total:
        raise SystemExit(f"bench batch: {summary.report()}")
    return {"seconds": seconds, "startup_s": clock.first - start, "per_minute": 60.0 * summary.written / seconds,
            "steady_per_minute": 60.0 * (summary.written - 1) / max(1e-9, time.perf_counter() - clock.first)}


def main(argv=None):
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"bench batch: unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    rows, pictures = [], {}
    with tempfile.TemporaryDirectory() as folder:
        jobs = write_jobs(Path(folder) / "jobs.txt", args.pictures)
        for mode in modes:
            name, workers, ray_address = MODES[mode]
            out = Path(folder) / f"out-{mode}"
            row = {"mode": name, "pictures": args.pictures, "steps": args.steps,
                   **run_mode(mode, jobs, out, args.steps, workers, ray_address)}
            pictures[mode] = {p.name: p.read_bytes() for p in out.iterdir()}
            row["same_bytes"] = pictures[mode] == pictures[modes[0]]
            rows.append(row)
            print(f"{name}: {row['per_minute']:.1f} pictures/minute", file=sys.stderr)
    if not all(row["same_bytes"] for row in rows):
        raise SystemExit("bench batch: the modes made different pictures; no rates reported")
    print_table(rows, [("mode", "mode", None), ("pictures", "pictures", None), ("steps", "steps", None),
                       ("seconds", "total s", "{:.1f}"), ("startup_s", "start-up s", "{:.1f}"),
                       ("per_minute", "pictures/min", "{:.1f}"),
                       ("steady_per_minute", "after start-up /min", "{:.1f}"), ("same_bytes", "same bytes", None)])
    path = write_json("batch", {"rows": rows, "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
