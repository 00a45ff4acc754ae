"""Under load: 50 requests from 5 clients all complete, each with its own picture, and memory stays flat
(RSS after the 50th within 10% of after the 5th). The server runs in this process, so this process's RSS
is the server's."""

import threading
from pathlib import Path

import pytest

from serve_server import running_server

import requests

CLIENTS = 5
REQUESTS_PER_CLIENT = 10


def rss_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status VmRSS on this system")


def test_fifty_requests_from_five_clients_nothing_lost_memory_flat():
    finished, rss_after, pictures, lock = [], {}, {}, threading.Lock()

    def client(number, url):
        with requests.Session() as session:
            for index in range(REQUESTS_PER_CLIENT):
                seed = number * 1000 + index
                response = session.post(f"{url}/sdapi/v1/txt2img", timeout=120,
                                        json={"prompt": "a shape", "steps": 2, "width": 32, "height": 32,
                                              "seed": seed, "sampler_name": "Euler"})
                with lock:
                    assert response.status_code == 200, response.text
                    pictures[seed] = response.json()["images"][0]
                    finished.append(seed)
                    if len(finished) in (5, CLIENTS * REQUESTS_PER_CLIENT):
                        rss_after[len(finished)] = rss_bytes()

    with running_server(queue_limit=CLIENTS) as (url, app):
        threads = [threading.Thread(target=client, args=(number, url)) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    assert len(finished) == CLIENTS * REQUESTS_PER_CLIENT and len(set(finished)) == len(finished)
    assert len(set(pictures.values())) == len(pictures)  # each its own picture, none repeated or swapped
    growth = rss_after[50] / rss_after[5] - 1
    assert growth < 0.10, f"RSS grew {growth:.1%} from the 5th to the 50th request"
