"""`npdiff serve` throughput: requests per minute through the server, and its overhead against the same
pictures made without it.

    npdiff bench serve [--requests 50] [--clients 5] [--steps 20]

On the shipped model (32x32 pictures), in this process:
    direct      recipe.render on the loaded pipeline, one picture after another (what `npdiff generate`
                does after loading, without writing the file)
    server      the same pictures as txt2img requests from --clients threads over loopback HTTP
                (JSON, base64, the queue, the progress callback)
and `npdiff generate` once in a fresh process (wall time, loading included): what a user pays per picture
without a server. The server's pictures are compared byte for byte with the direct ones before any rate
is printed. RSS after the 5th and the last request shows whether memory stays flat.
There is no PyTorch anchor: this measures the server's own cost.
"""

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import print_table, write_json  # noqa: E402  (imports npdiff first)
from _rss import proc_status_gib  # noqa: E402

import requests  # noqa: E402
from serve_server import running_server  # noqa: E402

from npdiff.recipe import render  # noqa: E402
from npdiff.serve_models import ModelShelf  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="pictures per mode (default 50)")
    parser.add_argument("--clients", type=int, default=5, help="concurrent clients of the server (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per picture (default 20)")
    return parser.parse_args(argv)


def request_body(seed, steps):
    return {"prompt": "a red circle", "steps": steps, "width": 32, "height": 32, "seed": seed,
            "sampler_name": "Euler", "cfg_scale": 7.5}


def run_direct(count, steps):
    shelf = ModelShelf()
    shelf.load()
    shelf.use_sampler("euler")
    pictures = {}
    start = time.perf_counter()
    for seed in range(count):
        options = {"prompt": "a red circle", "negative": "", "steps": steps, "guidance": 7.5, "seed": seed,
                   "eta": 0.0, "width": 32, "height": 32}
        pictures[seed] = render(shelf.pipe, "generate", options, identity=shelf.identity).png
    return pictures, time.perf_counter() - start


def run_server(count, clients, steps):
    pictures, rss = {}, {}
    lock = threading.Lock()
    seeds = iter(range(count))

    def client(url):
        with requests.Session() as session:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                response = session.post(f"{url}/sdapi/v1/txt2img", json=request_body(seed, steps), timeout=600)
                response.raise_for_status()
                with lock:
                    pictures[seed] = base64.b64decode(response.json()["images"][0])
                    if len(pictures) in (5, count):
                        rss[len(pictures)] = proc_status_gib("VmRSS")

    with running_server(queue_limit=clients) as (url, app):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    return pictures, elapsed, rss


def run_generate_process(steps):
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "npdiff.cli", "generate", "a red circle", "--steps", str(steps),
                        "--sampler", "euler", "--height", "32", "--width", "32", "--seed", "0",
                        "--out", str(Path(folder) / "one.png")], check=True, capture_output=True)
        return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    run_direct(2, 2)  # Numba's kernels compiled or loaded from its cache before any clock runs
    direct, direct_seconds = run_direct(args.requests, args.steps)
    served, server_seconds, rss = run_server(args.requests, args.clients, args.steps)
    mismatched = [seed for seed in direct if served.get(seed) != direct[seed]]
    if mismatched:
        sys.exit(f"the server's pictures differ from render()'s for seeds {mismatched[:10]}")
    generate_seconds = run_generate_process(args.steps)
    load_after = os.getloadavg()[0]
    rows = [
        {"mode": "direct render()", "seconds": direct_seconds, "per_minute": 60 * args.requests / direct_seconds},
        {"mode": f"server, {args.clients} clients", "seconds": server_seconds,
         "per_minute": 60 * args.requests / server_seconds},
        {"mode": "npdiff generate (fresh process, 1 picture)", "seconds": generate_seconds,
         "per_minute": 60 / generate_seconds},
    ]
    print_table(rows, [("mode", "mode", "{}"), ("seconds", "total s", "{:.2f}"),
                       ("per_minute", "pictures/min", "{:.1f}")])
    overhead = server_seconds / direct_seconds - 1
    print(f"server overhead against direct render(): {overhead:+.1%}; RSS after the 5th request "
          f"{rss.get(5, 0):.3f} GiB, after the {args.requests}th {rss.get(args.requests, 0):.3f} GiB; "
          f"load average {load_before:.1f} -> {load_after:.1f}; pictures byte-identical: yes")
    path = write_json("serve", {"args": vars(args), "rows": rows, "overhead": overhead, "rss_gib": rss,
                                "load_average": [load_before, load_after]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
