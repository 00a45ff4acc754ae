"""`npdiff serve` refuses bad requests with a 4xx in webui's error shape, naming the field, in under a second,
and answers the next good request; --api-auth, --host and a missing serve extra."""

import base64
import io
import json
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from serve_server import free_port, running_server

import requests
import webuiapi

from npdiff import memory_estimate, serve  # noqa: E402
from npdiff.errors import NpdiffError  # noqa: E402

GOOD = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 1}
NOT_A_PNG = base64.b64encode(b"GIF89a not really").decode()


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, app):
        yield url


def base64_png(width, height):
    """A black PNG of width x height pixels, base64 as in init_images."""
    data = io.BytesIO()
    Image.new("RGB", (width, height)).save(data, "PNG")
    return base64.b64encode(data.getvalue()).decode()


def raw_post(url, path, head_extra=b"", data=b""):
    """A request written by hand (a header that lies about its body), -> (status, body text)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head_extra
                           + b"\r\n" + data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


BAD_REQUESTS = [
    # (what, path, body (a dict is sent as JSON, bytes as they are), status, words the message holds)
    ("invalid JSON", "/sdapi/v1/txt2img", b'{"prompt": "x",', 400, "invalid JSON"),
    ("a JSON list", "/sdapi/v1/txt2img", b"[1, 2]", 422, "JSON object"),
    ("NaN", "/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN}', 400, "NaN"),
    ("Infinity", "/sdapi/v1/txt2img", b'{"prompt": "x", "steps": Infinity}', 400, "Infinity"),
    ("steps a string", "/sdapi/v1/txt2img", dict(GOOD, steps="ten"), 422, "steps"),
    ("steps 0", "/sdapi/v1/txt2img", dict(GOOD, steps=0), 422, "steps"),
    ("prompt a number", "/sdapi/v1/txt2img", dict(GOOD, prompt=5), 422, "prompt"),
    ("prompt with NUL", "/sdapi/v1/txt2img", dict(GOOD, prompt="a\x00b"), 422, "prompt"),
    ("cfg_scale a bool", "/sdapi/v1/txt2img", dict(GOOD, cfg_scale=True), 422, "cfg_scale"),
    ("seed too large", "/sdapi/v1/txt2img", dict(GOOD, seed=2**40), 422, "seed"),
    ("width not a multiple", "/sdapi/v1/txt2img", dict(GOOD, width=33), 422, "width"),
    ("size past the memory estimate", "/sdapi/v1/txt2img", dict(GOOD, width=1024, height=1024), 422,
     ("memory", "lower width/height")),  # what to lower named as the request's keys, not the CLI's flags
    ("size past the attention limit", "/sdapi/v1/txt2img", dict(GOOD, width=4096, height=4096), 422,
     ("self-attention", "lower width/height")),
    ("hires past the attention limit", "/sdapi/v1/txt2img", dict(GOOD, width=768, height=768, enable_hr=True,
                                                                  hr_scale=2), 422, ("self-attention", "lower hr_scale")),
    ("picture past the attention limit", "/sdapi/v1/img2img", dict(GOOD, init_images=["PICTURE 1040x1024"]), 422,
     ("self-attention", "send a smaller init_images[0]")),
    ("width past the limit", "/sdapi/v1/txt2img", dict(GOOD, width=10**9), 422, "width"),
    ("unknown sampler", "/sdapi/v1/txt2img", dict(GOOD, sampler_name="Euler z"), 422, "sampler_name"),
    ("unknown schedule", "/sdapi/v1/txt2img", dict(GOOD, sampler_name="Euler", scheduler="Uniform"), 422, "scheduler"),
    ("batch too large", "/sdapi/v1/txt2img", dict(GOOD, batch_size=64, n_iter=64), 422, "batch_size"),
    ("override_settings a list", "/sdapi/v1/txt2img", dict(GOOD, override_settings=[1]), 422, "override_settings"),
    ("a model path in override_settings", "/sdapi/v1/txt2img",
     dict(GOOD, override_settings={"sd_model_checkpoint": "../etc/model"}), 400, "sd_model_checkpoint"),
    ("a LoRA path in the prompt", "/sdapi/v1/txt2img", dict(GOOD, prompt="x <lora:../../a:1>"), 400, "lora"),
    ("a LoRA that is not there", "/sdapi/v1/txt2img", dict(GOOD, prompt="x <lora:absent:1>"), 404, "absent"),
    ("bad base64", "/sdapi/v1/img2img", dict(GOOD, init_images=["!!not base64!!"]), 400, "init_images[0]"),
    ("base64 of no picture", "/sdapi/v1/img2img", dict(GOOD, init_images=[NOT_A_PNG]), 422, "init_images[0]"),
    ("no init_images", "/sdapi/v1/img2img", dict(GOOD), 422, "init_images"),
    ("denoising_strength 2", "/sdapi/v1/img2img", dict(GOOD, init_images=[NOT_A_PNG], denoising_strength=2), 422,
     "denoising_strength"),
    ("bad mask base64", "/sdapi/v1/img2img", dict(GOOD, init_images=[NOT_A_PNG], mask="%%%"), 400, "mask"),
    ("png-info of no PNG", "/sdapi/v1/png-info", {"image": NOT_A_PNG}, 422, "PNG"),
    ("png-info without image", "/sdapi/v1/png-info", {}, 422, "image"),
    ("a model path", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}, 400, "sd_model_checkpoint"),
    ("a model name not served", "/sdapi/v1/options", {"sd_model_checkpoint": "sd-v1-5"}, 404, "sd_model_checkpoint"),
]


@pytest.mark.parametrize("what, path, body, status, words", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_fast_and_the_server_keeps_serving(server, monkeypatch, what, path, body,
                                                                       status, words):
    # the same refusal on any machine: 1024x1024, the largest the shipped model's attention takes, needs ~0.7 GiB
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: 2**29)
    if isinstance(body, dict) and body.get("init_images", [""])[0].startswith("PICTURE "):
        width, height = map(int, body["init_images"][0].removeprefix("PICTURE ").split("x"))
        body = dict(body, init_images=[base64_png(width, height)])
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.monotonic()
    response = requests.post(server + path, data=data, headers={"Content-Type": "application/json"}, timeout=10)
    elapsed = time.monotonic() - start
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "detail", "body", "errors"}
    for part in (words,) if isinstance(words, str) else words:
        assert part.lower() in error["detail"].lower(), error["detail"]
    if not isinstance(words, str):  # a size refusal: no CLI flag in it
        assert "--" not in error["detail"], error["detail"]
    assert elapsed < 1.0, f"{what}: answered in {elapsed:.2f} s"
    good = requests.post(f"{server}/sdapi/v1/txt2img", json=GOOD, timeout=30)
    assert good.status_code == 200 and len(good.json()["images"]) == 1


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    start = time.monotonic()
    status, text = raw_post(server, "/sdapi/v1/txt2img", b"Content-Length: 60000000\r\n")
    assert status == 413 and "limit" in json.loads(text)["detail"]
    assert time.monotonic() - start < 1.0
    assert requests.post(f"{server}/sdapi/v1/txt2img", json=GOOD, timeout=30).status_code == 200


def test_a_wrongly_typed_query_gets_webuis_error_shape(server):
    response = requests.get(f"{server}/sdapi/v1/progress?skip_current_image=maybe", timeout=10)
    assert response.status_code == 422 and "skip_current_image" in response.json()["detail"]


def test_api_auth_is_required_when_given():
    with running_server(api_auth="painter:s3cret") as (url, app):
        assert requests.get(f"{url}/sdapi/v1/samplers", timeout=10).status_code == 401
        assert requests.get(f"{url}/sdapi/v1/samplers", auth=("painter", "wrong"), timeout=10).status_code == 401
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        api.set_auth("painter", "s3cret")
        result = api.txt2img(prompt="a circle", width=32, height=32, seed=2)
        assert result.info["all_seeds"] == [2]


def serve_args(**given):
    values = {"host": "127.0.0.1", "port": 7860, "queue": 8, "api_auth": None}
    values.update(given)
    return type("Args", (), values)()


def test_binding_past_loopback_asks_for_api_auth():
    serve.check_serve_arguments(serve_args())
    serve.check_serve_arguments(serve_args(host="::1"))
    serve.check_serve_arguments(serve_args(host="0.0.0.0", api_auth="a:b"))
    for bad in (serve_args(host="0.0.0.0"), serve_args(host="192.168.1.5"), serve_args(queue=0),
                serve_args(port=70000), serve_args(api_auth="nocolon")):
        with pytest.raises(NpdiffError):
            serve.check_serve_arguments(bad)


def test_without_the_serve_extra_npdiff_imports_and_serve_says_how_to_install():
    script = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
              "import importlib.util\n"
              "importlib.util.find_spec = lambda name, *a: None if name in ('fastapi', 'uvicorn') else 1\n"
              "from npdiff import cli\n"
              "sys.exit(cli.main(['serve']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("npdiff: error: npdiff serve needs the 'serve' extra: "
                                                            "pip install 'npdiff[serve]'")


def test_npdiff_serve_starts_from_the_command_line_and_stops_on_sigterm():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "npdiff.cli", "serve", "--port", str(port), "--queue", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                samplers = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=2).json()
                break
            except requests.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "npdiff serve did not answer within 60 s"
                time.sleep(0.2)
        assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<title>npdiff serve</title>" in page.text
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "serving http://127.0.0.1:" in stderr


def test_a_lora_that_is_not_there_is_refused_before_the_request_is_queued(tmp_path):
    """Before: the 404 came from the worker thread, after the request had waited its turn in the queue."""
    (tmp_path / "loras").mkdir()
    with running_server(lora_dir=tmp_path / "loras") as (url, app):
        queued = []
        app.state.jobs.submit = queued.append  # a job that reached the queue is recorded, never run
        response = requests.post(url + "/sdapi/v1/txt2img", json=dict(GOOD, prompt="x <lora:absent:0.5> y"),
                                 timeout=60)
        assert response.status_code == 404, response.text
        assert "prompt: <lora:absent:...> names no LoRA in --lora-dir; known: none" in response.json()["detail"]
        assert queued == []
