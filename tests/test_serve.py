"""`npdiff serve` driven with the real webuiapi client: the same bytes as `npdiff generate`, progress with a
live picture, interrupt, concurrent clients, a full queue, a client that goes away, model switching."""

import base64
import io
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from serve_server import running_server

import webuiapi
import requests

from npdiff import cli  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.pipeline_utils import StopSampling, default_model_path  # noqa: E402

LONG_STEPS = 400  # a job that runs for seconds on the shipped model: long enough to watch and interrupt
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    shutil.copy(default_model_path() / "lcm-lora.safetensors", folder / "lcm-lora.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(lora_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(default_model_path(), models / "shapes-copy")
    (models / "broken").mkdir()
    (models / "broken" / "model_index.json").write_text("{}")  # a model folder with nothing in it
    with running_server(models_dir=models, lora_dir=lora_dir, queue_limit=3) as (url, app):
        yield url


def client(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def generate_bytes(tmp_path, name, *arguments, command="generate"):
    """The command's PNG; the server reads prompts with webui's syntax, so the command does too."""
    out = tmp_path / name
    assert cli.main([command, *arguments, "--prompt-syntax", "a1111", "--out", str(out)]) == 0
    return out.read_bytes()


def wait_until(condition, what, seconds=WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_pictures_are_npdiff_generates_bytes(server, tmp_path):
    api = client(server)
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, steps=6, cfg_scale=7.5,
                         width=32, height=32, sampler_name="DDIM", eta=0, n_iter=2)
    served = [base64.b64decode(image) for image in result.json["images"]]
    assert result.info["all_seeds"] == [5, 6]  # webui's rule: seed + i for the i-th picture
    common = ["a red circle", "--negative", "blue", "--steps", "6", "--guidance", "7.5", "--sampler", "ddim",
              "--height", "32", "--width", "32", "--eta", "0"]
    assert served[0] == generate_bytes(tmp_path, "a.png", *common, "--seed", "5")
    assert served[1] == generate_bytes(tmp_path, "b.png", *common, "--seed", "6")
    assert result.info["infotexts"][0].startswith("a red circle\nNegative prompt: blue\nSteps: 6, Sampler: DDIM")


def test_prompts_are_read_with_webuis_syntax(server, tmp_path):
    """A webui client's emphasis reaches the picture: (red:1.6) is generate --prompt-syntax a1111's, not the words
    '(red:1.6)' of the plain reading."""
    api = client(server)
    result = api.txt2img(prompt="a (red:1.6) circle, [blue] background", seed=3, steps=4, cfg_scale=7.5,
                         width=32, height=32, sampler_name="Euler", eta=0)
    served = base64.b64decode(result.json["images"][0])
    common = ["a (red:1.6) circle, [blue] background", "--seed", "3", "--steps", "4", "--guidance", "7.5",
              "--sampler", "euler", "--height", "32", "--width", "32", "--eta", "0"]
    assert served == generate_bytes(tmp_path, "a1111.png", *common)
    plain = tmp_path / "plain.png"
    assert cli.main(["generate", *common, "--out", str(plain)]) == 0
    assert np.asarray(Image.open(io.BytesIO(served))).tolist() != np.asarray(Image.open(plain)).tolist()


def test_a_prompts_lora_tag_is_generates_lora_option(server, tmp_path, lora_dir):
    api = client(server)
    assert [lora["name"] for lora in api.get_loras()] == ["lcm-lora"]
    result = api.txt2img(prompt="a green square <lora:lcm-lora:0.9>", seed=11, steps=4, cfg_scale=1,
                         width=32, height=32, sampler_name="LCM", eta=0)
    served = base64.b64decode(result.json["images"][0])
    expected = generate_bytes(tmp_path, "lora.png", "a green square", "--seed", "11", "--steps", "4", "--guidance",
                              "1", "--sampler", "lcm", "--height", "32", "--width", "32",
                              "--lora", f"{lora_dir / 'lcm-lora.safetensors'}:0.9")
    assert served == expected
    # the LoRA is unfused after the request: the next picture without it is the plain model's
    plain = api.txt2img(prompt="a green square", seed=11, steps=4, cfg_scale=1, width=32, height=32,
                        sampler_name="LCM", eta=0)
    assert base64.b64decode(plain.json["images"][0]) != served


def test_png_info_reads_a_served_picture(server):
    api = client(server)
    result = api.txt2img(prompt="a blue triangle", seed=21, steps=3, width=32, height=32, cfg_scale=5)
    info = requests.post(f"{server}/sdapi/v1/png-info", json={"image": result.json["images"][0]}, timeout=10).json()
    assert info["parameters"]["Prompt"] == "a blue triangle"
    assert info["parameters"]["Seed"] == 21 and info["parameters"]["Sampler"] == "Euler a"
    assert (info["parameters"]["Size-1"], info["parameters"]["Size-2"]) == (32, 32)
    assert info["info"] == result.info["infotexts"][0]


def long_job(url, results, steps=LONG_STEPS, seed=1):
    def run():
        results.append(requests.post(f"{url}/sdapi/v1/txt2img", timeout=WAIT_SECONDS,
                                     json={"prompt": "a circle", "steps": steps, "seed": seed, "width": 32,
                                           "height": 32, "sampler_name": "Euler"}))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def progress(url):
    return requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()


def test_progress_moves_the_live_picture_changes_and_interrupt_ends_the_job(server):
    results = []
    thread = long_job(server, results)
    seen_images, seen_progress = set(), []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(seen_images) < 3 or len(set(seen_progress)) < 3:
        assert time.monotonic() < deadline, "progress did not move"
        state = progress(server)
        if state["state"]["sampling_steps"]:
            seen_progress.append(state["progress"])
            assert 0 <= state["progress"] < 1 and state["eta_relative"] >= 0
        if state["current_image"]:
            seen_images.add(state["current_image"])
        time.sleep(0.1)
    assert seen_progress == sorted(seen_progress)
    requests.post(f"{server}/sdapi/v1/interrupt", timeout=10)
    thread.join(WAIT_SECONDS)
    response = results[0]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True
    png = base64.b64decode(response.json()["images"][0])
    params = json.loads(Image.open(io.BytesIO(png)).text["npdiff"])
    assert 1 <= params["steps_done"] < LONG_STEPS and params["steps"] == LONG_STEPS
    assert progress(server)["state"]["job_count"] == 0


def test_serve_precision_mixed_reaches_the_models_and_the_picture():
    assert cli.build_parser().parse_args(["serve", "--precision", "mixed"]).precision == "mixed"
    with running_server(precision="mixed") as (url, app):
        result = client(url).txt2img(prompt="a star", seed=7, steps=2, width=32, height=32)
    assert "Precision: mixed" in result.info["infotexts"][0]
    assert np.asarray(result.image).shape == (32, 32, 3)


def test_four_concurrent_clients_each_get_their_own_picture(server):
    results = {}

    def run(seed):
        # --queue 3 counts waiting jobs: when all four arrive before the worker takes the first (a loaded
        # machine), the fourth is answered 503 + Retry-After, as it should be; a client then tries again
        for attempt in range(20):
            try:
                results[seed] = client(server).txt2img(prompt="a star", seed=seed, steps=3, width=32, height=32)
                return
            except RuntimeError as error:
                if error.args[0] != 503:
                    raise
                time.sleep(0.5)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (101, 102, 103, 104)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    assert sorted(results) == [101, 102, 103, 104]
    for seed, result in results.items():
        assert result.info["all_seeds"] == [seed]
        assert f"Seed: {seed}," in result.info["infotexts"][0]
    pictures = {result.json["images"][0] for result in results.values()}
    assert len(pictures) == 4


def test_a_full_queue_answers_503_with_retry_after(server):
    results = []
    running = long_job(server, results)
    wait_until(lambda: progress(server)["state"]["sampling_step"] > 0, "the long job to start")
    waiting = [long_job(server, results, steps=2, seed=seed) for seed in (1, 2, 3)]  # --queue 3: now full
    wait_until(lambda: progress(server)["state"]["job_count"] == 4, "three jobs waiting")
    refused = requests.post(f"{server}/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 32}, timeout=10)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"] == "QueueFull" and "queue" in refused.json()["detail"]
    requests.post(f"{server}/sdapi/v1/interrupt", timeout=10)
    for thread in [running, *waiting]:
        thread.join(WAIT_SECONDS)
    assert [response.status_code for response in results] == [200] * 4
    wait_until(lambda: progress(server)["state"]["job_count"] == 0, "the queue to empty")


def post_and_hang_up(url, body, seconds=1.0):
    """POST a txt2img request on a socket of our own and close it after `seconds`, before any answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        time.sleep(seconds)


def test_a_client_that_disconnects_cancels_its_job_waiting_or_running(server):
    results = []
    running = long_job(server, results)
    wait_until(lambda: progress(server)["state"]["sampling_step"] > 0, "the long job to start")
    post_and_hang_up(server, {"prompt": "gone", "width": 32, "height": 32})  # waits in the queue, goes away
    wait_until(lambda: progress(server)["state"]["job_count"] == 1, "the waiting job to leave the queue", seconds=10)
    requests.post(f"{server}/sdapi/v1/interrupt", timeout=10)
    running.join(WAIT_SECONDS)
    post_and_hang_up(server, {"prompt": "gone", "steps": 100000, "width": 32, "height": 32})  # runs, goes away
    wait_until(lambda: progress(server)["state"]["job_count"] == 0, "the abandoned job to stop", seconds=10)


def test_models_switch_by_name_only(server):
    api = client(server)
    names = [model["model_name"] for model in api.get_sd_models()]
    assert names == ["tiny-shapes", "broken", "shapes-copy"]
    api.util_set_model("shapes-copy")
    assert requests.get(f"{server}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"].startswith("shapes-copy")
    result = api.txt2img(prompt="a red circle", seed=3, steps=2, width=32, height=32)
    assert "Model: shapes-copy" in result.info["infotexts"][0]
    for name in ("../shapes-copy", "/etc/passwd", "..", "shapes-copy/unet", "nonexistent"):
        response = requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=10)
        assert response.status_code in (400, 404) and "sd_model_checkpoint" in response.json()["detail"]
    api.util_set_model("tiny-shapes")
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-shapes")


def test_stop_sampling_keeps_the_latents_of_the_step_it_was_raised_at():
    """StopSampling after step k returns the latents an uninterrupted call had after step k, decoded."""
    pipe = StableDiffusionPipeline.from_pretrained()
    pipe.show_progress = False
    recorded = []

    def record(step, timestep, latents):
        recorded.append(np.array(latents))

    full = pipe("a circle", num_inference_steps=6, seed=4, height=32, width=32, callback=record)

    def stop_after_third(step, timestep, latents):
        if step == 2:
            raise StopSampling

    stopped = pipe("a circle", num_inference_steps=6, seed=4, height=32, width=32, callback=stop_after_third)
    np.testing.assert_array_equal(stopped.latents, recorded[2])
    assert stopped.parameters["steps_done"] == 3 and "steps_done" not in full.parameters


def test_img2img_and_inpainting_are_npdiffs_commands_bytes(server, tmp_path):
    api = client(server)
    start = api.txt2img(prompt="a blue square", seed=8, steps=3, width=32, height=32).image
    start.save(tmp_path / "start.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # repaint the middle
    mask.save(tmp_path / "mask.png")
    common = dict(prompt="a red circle", seed=9, steps=6, cfg_scale=7.5, sampler_name="Euler", eta=0)
    cli_common = ["a red circle", "--seed", "9", "--steps", "6", "--guidance", "7.5", "--sampler", "euler",
                  "--eta", "0", "--image", str(tmp_path / "start.png")]
    changed = api.img2img(images=[start], denoising_strength=0.6, width=32, height=32, **common)
    assert base64.b64decode(changed.json["images"][0]) == generate_bytes(
        tmp_path, "img2img.png", *cli_common, "--strength", "0.6", command="img2img")
    assert any("img2img keeps the picture's own size" in item for item in changed.info["npdiff_ignored"])
    repainted = api.img2img(images=[start], mask_image=mask, denoising_strength=0.9, width=32, height=32, **common)
    assert base64.b64decode(repainted.json["images"][0]) == generate_bytes(
        tmp_path, "inpaint.png", *cli_common, "--mask", str(tmp_path / "mask.png"), "--strength", "0.9",
        "--height", "32", "--width", "32", command="inpaint")


def test_hires_fix_and_clip_skip_are_npdiff_generates_and_other_fields_listed_as_ignored(server, tmp_path):
    result = client(server).txt2img(prompt="a red circle", seed=1, steps=4, width=32, height=32, enable_hr=True,
                                    hr_scale=2, hr_upscaler="Latent (nearest)", denoising_strength=0.6,
                                    hr_second_pass_steps=5, cfg_scale=7.5, sampler_name="Euler", eta=0,
                                    restore_faces=True, override_settings={"CLIP_stop_at_last_layers": 2,
                                                                           "some_setting": 1})
    ignored = result.info["npdiff_ignored"]
    for name in ("restore_faces=True", "override_settings.some_setting"):
        assert name in ignored, ignored
    assert not any(name.startswith(("enable_hr", "hr_", "denoising_strength", "override_settings.CLIP"))
                   for name in ignored), ignored
    served = base64.b64decode(result.json["images"][0])
    assert Image.open(io.BytesIO(served)).size == (64, 64)  # the second pass at hr_scale x the size
    expected = generate_bytes(tmp_path, "hires.png", "a red circle", "--seed", "1", "--steps", "4", "--height", "32",
                              "--width", "32", "--guidance", "7.5", "--sampler", "euler", "--eta", "0",
                              "--hires-scale", "2", "--hires-upscaler", "latent-nearest", "--hires-strength", "0.6",
                              "--hires-steps", "5", "--clip-skip", "2")
    assert served == expected
    unknown = requests.post(f"{server}/sdapi/v1/txt2img", timeout=30,
                            json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "a_field_of_tomorrow": [1]})
    assert unknown.status_code == 200
    assert "a_field_of_tomorrow=[1]" in json.loads(unknown.json()["info"])["npdiff_ignored"]
    bad = requests.post(f"{server}/sdapi/v1/txt2img", timeout=30,
                        json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "enable_hr": True,
                              "hr_upscaler": "R-ESRGAN 4x+"})
    assert bad.status_code == 422 and "hr_upscaler" in bad.json()["detail"]


def test_override_settings_model_for_one_request(server):
    api = client(server)
    result = api.txt2img(prompt="a circle", seed=2, steps=2, width=32, height=32,
                         override_settings={"sd_model_checkpoint": "shapes-copy"})
    assert "Model: shapes-copy" in result.info["infotexts"][0]
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-shapes")  # restored afterwards, as webui


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(server):
    response = requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "broken"}, timeout=60)
    assert 400 <= response.status_code < 500 and set(response.json()) == {"error", "detail", "body", "errors"}
    assert progress(server)["state"]["job_count"] == 0
    assert client(server).get_options()["sd_model_checkpoint"].startswith("tiny-shapes")
    assert client(server).txt2img(prompt="a circle", seed=2, steps=2, width=32, height=32).info["all_seeds"] == [2]
