"""Start `npdiff serve`'s app on 127.0.0.1 on a free port, in a thread of the test process (the Numba
kernels compiled by one test serve the next), and stop it again. Only loopback traffic."""

import socket
import threading
import time
from contextlib import contextmanager


import uvicorn  # the serve extra's, in the test extra

from npdiff.serve_app import create_app  # noqa: E402
from npdiff.serve_models import ModelShelf  # noqa: E402

START_SECONDS = 30


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(model=None, models_dir=None, lora_dir=None, queue_limit=8, api_auth=None, preview_vae=None,
                   precision="fp32"):
    """-> (base URL, app); the server stops when the block ends."""
    shelf = ModelShelf(model, models_dir, lora_dir, preview_vae, precision)
    shelf.load()
    app = create_app(shelf, queue_limit=queue_limit, api_auth=api_auth)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="npdiff-serve-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        assert thread.is_alive(), "the server thread ended"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        app.state.jobs.interrupt()
        server.should_exit = True
        thread.join(START_SECONDS)
        app.state.jobs.stop()
