"""`npdiff batch`: the pictures are `npdiff generate`'s / `npdiff img2img`'s byte for byte, bad lines are
reported while the rest are written, reruns resume (redoing corrupt or stale files, or pictures of another
model hash), and 2 local worker processes and a Ray cluster (one worker killed mid-run) give the same bytes,
each picture written once. No PNG names a local path: the model goes by name and hash, as in `npdiff generate`.

Everything runs on the shipped model (32x32) with 2 steps; one Ray session is shared by the Ray tests.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from npdiff import batch, batch_workers, cli
from npdiff.batch import BatchSummary, run_batch
from npdiff.batch_workers import ProcessPool, cpu_cores
from npdiff.batch_jobs import read_jobs
from npdiff.batch_ray import RayPool
from npdiff.images import png_text_chunks, read_png_params, save_png
from npdiff.model_identity import model_hash
from npdiff.pipeline_utils import SHIPPED_MODEL_NAME, default_model_path

STEPS = ["--steps", "2"]
DEFAULTS = {"steps": 2}
PROMPTS = ["a red circle on a blue background", "", "# a comment line", "a green square on a yellow background",
           "  a blue triangle on a white background  "]
# line number -> file name (seed = line number) for PROMPTS as a text job file
NAMES = {1: "000001-seed1.png", 4: "000004-seed4.png", 5: "000005-seed5.png"}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def folder_bytes(folder):
    """Every file in `folder` (hidden ones too) -> its bytes."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr()


def assert_no_local_path(folder, *private):
    """Every PNG in `folder` holds npdiff's and AUTOMATIC1111's text chunks, and neither names a local path:
    not the model's, the home folder's, the temporary folders', the output folder's, nor any of `private`."""
    model = default_model_path()
    paths = {str(model), str(model.resolve()), tempfile.gettempdir(), "/tmp/", str(Path(folder).resolve()),
             *map(str, private)}
    if len(str(Path.home())) > 1:
        paths.add(str(Path.home()))
    pictures = sorted(Path(folder).glob("*.png"))
    assert pictures
    for picture in pictures:
        chunks = png_text_chunks(picture)
        assert set(chunks) == {"npdiff", "parameters"}
        text = "\n".join(chunks.values())
        for path in paths:
            assert path not in text, f"{path!r} leaked into {picture.name}'s metadata"
        stored = read_png_params(picture)
        assert "model_path" not in stored and "image" not in stored
        assert (stored["model"], stored["model_hash"]) == (SHIPPED_MODEL_NAME, model_hash(model))


@pytest.fixture(scope="module", autouse=True)
def hash_cache(tmp_path_factory):
    """Model hashes are cached under $XDG_CACHE_HOME: this module's own, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def text_jobs(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("jobs") / "prompts.txt", PROMPTS)


@pytest.fixture(scope="module")
def reference(text_jobs, tmp_path_factory):
    """The text jobs rendered by `npdiff batch` with one local worker, in a fresh process as a user runs it:
    {file name: PNG bytes}.

    Fresh, as the worker processes and Ray are: what this file promises (2 worker processes and a Ray cluster
    giving a local run's bytes) is about fresh processes, and test_text_jobs_equal_npdiff_generate still holds
    this process's `npdiff generate` to them. That pair of checks caught kernels whose bits differed between
    a process that compiled them and one that loaded them from Numba's cache (one pixel one level off)."""
    out = tmp_path_factory.mktemp("reference")
    command = ["from npdiff import cli; import sys; sys.exit(cli.main(sys.argv[1:]))",
               "batch", str(text_jobs), "--out", str(out), *STEPS, "--quiet"]
    done = subprocess.run([sys.executable, "-c", *command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pictures = folder_bytes(out)
    assert set(pictures) == set(NAMES.values())
    assert_no_local_path(out, text_jobs, text_jobs.parent)
    return pictures


def test_import_batch_does_not_import_ray():
    code = "import sys, npdiff.batch, npdiff.batch_jobs, npdiff.cli; assert 'ray' not in sys.modules, 'ray imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_text_jobs_equal_npdiff_generate(reference, tmp_path, capsys):
    # one line of the text file = `npdiff generate PROMPT --seed <line number>` (the prompt stripped)
    for line in (1, 5):
        single = tmp_path / f"generate-{line}.png"
        code, _ = run_cli(["generate", PROMPTS[line - 1].strip(), "--seed", str(line), *STEPS, "--out", str(single)],
                          capsys)
        assert code == 0
        assert single.read_bytes() == reference[NAMES[line]], f"line {line} differs from npdiff generate"
    params = read_png_params(tmp_path / "generate-1.png")
    assert params["command"] == "generate" and params["seed"] == 1 and params["steps"] == 2


def test_jsonl_jobs_equal_generate_and_img2img(tmp_path, capsys, rng):
    source = tmp_path / "start.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    lines = [
        {"prompt": "a red square on a green background", "negative_prompt": "blue", "seed": 1234, "guidance": 5,
         "sampler": "euler_a", "height": 48, "width": 32},
        {"prompt": "a white circle on a black background", "negative": "red", "steps": 1},
        {"prompt": "a blue square on a red background", "image": "start.png", "strength": 0.7, "seed": 7},
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", [json.dumps(line) for line in lines])
    code, _ = run_cli(["batch", str(jobs), "--out", str(tmp_path / "out"), *STEPS, "--guidance", "6", "--quiet"],
                      capsys)
    assert code == 0
    written = folder_bytes(tmp_path / "out")
    assert sorted(written) == ["000001-seed1234.png", "000002-seed2.png", "000003-seed7.png"]
    same = {
        "000001-seed1234.png": ["generate", lines[0]["prompt"], "--negative", "blue", "--seed", "1234", *STEPS,
                                "--guidance", "5", "--sampler", "euler_a", "--height", "48", "--width", "32"],
        "000002-seed2.png": ["generate", lines[1]["prompt"], "--negative", "red", "--seed", "2", "--steps", "1",
                             "--guidance", "6"],
        "000003-seed7.png": ["img2img", lines[2]["prompt"], "--image", str(source), "--strength", "0.7",
                             "--seed", "7", *STEPS, "--guidance", "6"],
    }
    for name, args in same.items():
        single = tmp_path / f"single-{name}"
        assert run_cli(args + ["--out", str(single)], capsys)[0] == 0
        assert single.read_bytes() == written[name], f"{name} differs from npdiff {args[0]}"
    params = read_png_params(tmp_path / "out" / "000003-seed7.png")
    assert params["command"] == "img2img" and params["strength"] == 0.7
    assert_no_local_path(tmp_path / "out", source, source.resolve(), tmp_path, "start.png")


def test_bad_lines_are_reported_and_the_others_written(tmp_path, capsys, rng):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "start.png")
    lines = [
        json.dumps({"prompt": "a red circle on a blue background", "seed": 3}),
        json.dumps({"prompt": "a red circle", "colour": "red"}),  # unknown key
        "{not json",
        json.dumps({"prompt": "a red circle", "model": "elsewhere"}),  # a batch-wide option
        json.dumps({"prompt": "a red circle", "steps": 0}),
        json.dumps({"prompt": "a red circle", "image": "missing.png"}),
        json.dumps({"prompt": "a red circle", "strength": 0.5}),  # strength without an image
        json.dumps({"prompt": "a red circle", "height": 30}),
        json.dumps({"prompt": "a red circle", "sampler": "dpmpp_sde"}),
        json.dumps({"prompt": "a red circle", "negative": "x", "negative_prompt": "y"}),
        json.dumps(["a red circle"]),
        json.dumps({"prompt": "a red circle", "seed": -1}),
        "",
        # passes the checks, fails while rendering: int(2 steps * 0.1) = 0 denoising steps
        json.dumps({"prompt": "a red circle", "image": "start.png", "strength": 0.1}),
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", lines)
    code, captured = run_cli(["batch", str(jobs), "--out", str(tmp_path / "out"), *STEPS, "--quiet"], capsys)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000001-seed3.png"]
    expected = {2: "unknown key 'colour'", 3: "not valid JSON",
                4: "key 'model' cannot be set per line: the model is loaded once per worker",
                5: "'steps' must be an integer >= 1, got 0", 6: "'image' 'missing.png': no such file",
                7: "'strength' needs 'image'", 8: "'height' must be a positive multiple of 8", 9: "'sampler' 'dpmpp_sde'",
                10: "give 'negative' or 'negative_prompt', not both", 11: "expected a JSON object",
                12: "'seed' must be an integer in [0, 2**64)",
                14: "strength 0.1 with num_inference_steps 2 leaves no denoising step"}
    assert "1 picture written, 0 skipped (already done), 12 failed, of 13 lines" in captured.out
    assert "pictures/minute" in captured.out
    for line, message in expected.items():
        assert f"line {line}: {message}" in captured.out, captured.out


def test_missing_job_file_and_bad_options(tmp_path, capsys):
    code, captured = run_cli(["batch", str(tmp_path / "none.txt"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "none.txt: no such file" in captured.err
    jobs = write_lines(tmp_path / "jobs.txt", ["a red circle"])
    code, captured = run_cli(["batch", str(jobs), "--out", str(tmp_path), "--workers", "0"], capsys)
    assert code == 2 and "--workers must be an integer >= 1" in captured.err
    code, captured = run_cli(["batch", str(jobs), "--out", str(jobs)], capsys)
    assert code == 2 and "is a file; give a folder" in captured.err
    code, captured = run_cli(["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "m")],
                             capsys)
    assert code == 2 and "no such file or folder" in captured.err
    with pytest.raises(ValueError, match="no such file or folder on this machine"):  # the driver hashes it
        run_batch(jobs, tmp_path / "out", model=tmp_path / "m", ray_address="auto", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    comments = write_lines(tmp_path / "empty.txt", ["# nothing", ""])
    with pytest.raises(ValueError, match="holds no jobs"):
        read_jobs(comments, {})
    os.mkfifo(tmp_path / "fifo.txt")
    for special, what in ((tmp_path / "fifo.txt", "a FIFO"), (Path("/dev/null"), "a character device")):
        with pytest.raises(ValueError, match=f"{special} \\(job file\\) is {what}"):  # was "no such file"
            read_jobs(special, {})


def test_resume_skips_whole_pictures_and_redoes_corrupt_and_stale(text_jobs, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / NAMES[1]).write_bytes(reference[NAMES[1]])  # done: kept as it is
    (out / NAMES[4]).write_bytes(reference[NAMES[4]][: len(reference[NAMES[4]]) // 2])  # truncated
    (out / NAMES[5]).write_bytes(reference[NAMES[1]])  # whole, but another job's parameters
    kept = (out / NAMES[1]).stat()
    summary = run_batch(text_jobs, out, defaults=DEFAULTS, progress=False)
    assert (summary.written, summary.skipped, summary.failures) == (2, 1, {})
    assert folder_bytes(out) == reference
    assert (out / NAMES[1]).stat().st_mtime_ns == kept.st_mtime_ns  # not rewritten
    # the same pixels and parameters, but the model named by another hash (or another name): redone
    for stale in ({"model_hash": "0123456789"}, {"model": "another-model"}):
        with Image.open(out / NAMES[1]) as picture:
            pixels = picture.convert("RGB")
        save_png(pixels, out / NAMES[1], dict(read_png_params(out / NAMES[1]), **stale))
        summary = run_batch(text_jobs, out, defaults=DEFAULTS, progress=False)
        assert (summary.written, summary.skipped) == (1, 2), stale
        assert folder_bytes(out) == reference


class Interrupted(Exception):
    pass


class InterruptAfter:
    """A worker pool that stops the run (like Ctrl-C) after `count` results."""

    def __init__(self, pool, count):
        self.pool, self.count = pool, count

    def results(self, payloads):
        for index, result in enumerate(self.pool.results(payloads)):
            if index == self.count:
                raise Interrupted
            yield result


def test_resume_after_an_interrupted_run(text_jobs, reference, tmp_path):
    out = tmp_path / "out"
    pool = batch.make_pool(str(default_model_path()))
    with pytest.raises(Interrupted):
        run_batch(text_jobs, out, defaults=DEFAULTS, pool=InterruptAfter(pool, 2), progress=False)
    first = folder_bytes(out)  # two whole pictures, no temporary files
    assert len(first) == 2 and all(reference[name] == data for name, data in first.items())
    summary = run_batch(text_jobs, out, defaults=DEFAULTS, pool=pool, progress=False)
    assert (summary.written, summary.skipped) == (1, 2)
    assert folder_bytes(out) == reference


def test_two_worker_processes_same_bytes(text_jobs, reference, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pool = ProcessPool(str(default_model_path()), workers=2)
    try:
        summary = run_batch(text_jobs, tmp_path, defaults=DEFAULTS, pool=pool, progress=False)
        ready = pool.executor.submit(batch_workers._worker_process_ready).result()
    finally:
        pool.close()
    assert (summary.written, summary.failures) == (3, {})
    assert folder_bytes(tmp_path) == reference
    threads = max(1, cpu_cores() // 2)  # each child got half the cores, set before it imported numpy
    assert ready["numba_threads"] == threads and ready["blas_threads"] == str(threads)
    assert "OMP_NUM_THREADS" not in os.environ  # the parent's environment is restored


# ---------------------------------------------------------------------------------------------
# Ray: one local session for the module
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_same_bytes_as_local(ray_session, text_jobs, reference, tmp_path):
    summary = run_batch(text_jobs, tmp_path, defaults=DEFAULTS, ray_address="auto", progress=False)
    assert (summary.written, summary.failures) == (3, {})
    assert folder_bytes(tmp_path) == reference
    assert ray.is_initialized()  # a Ray this process started is left running


def test_ray_worker_killed_mid_run_every_picture_once(ray_session, text_jobs, reference, tmp_path, monkeypatch):
    jobs = write_lines(tmp_path / "more.txt", PROMPTS + PROMPTS[3:])  # 5 pictures: lines 1, 4, 5, 6, 7
    writes = []
    real_write = batch.write_atomically
    monkeypatch.setattr(batch, "write_atomically", lambda path, data: (writes.append(path.name),
                                                                      real_write(path, data)))
    pool = RayPool("auto", str(default_model_path()), workers=2)
    assert ray.get(pool.actors[0].ready.remote())["numba_threads"] == 1  # 2 CPUs / 2 workers
    first_actor = pool.actors[0]

    class KillAfterFirst:
        def results(self, payloads):
            for index, result in enumerate(pool.results(payloads)):
                if index == 0:
                    ray.kill(first_actor)  # lost mid-run, with a job in flight
                yield result

    try:
        summary = run_batch(jobs, tmp_path / "out", defaults=DEFAULTS, pool=KillAfterFirst(), progress=False)
    finally:
        pool.close()
    assert pool.replaced >= 1
    assert isinstance(summary, BatchSummary) and (summary.written, summary.failures) == (5, {})
    assert sorted(writes) == sorted(set(writes)) and len(writes) == 5  # each picture written exactly once
    pictures = folder_bytes(tmp_path / "out")
    assert len(pictures) == 5 and not [name for name in pictures if name.startswith(".")]
    for name, data in reference.items():
        assert pictures[name] == data


def test_ray_model_that_does_not_load_stops_before_any_job(ray_session, tmp_path):
    with pytest.raises(ValueError, match="a Ray worker could not load the model .*no-model"):
        RayPool("auto", str(tmp_path / "no-model"), workers=1)


# ---------------------------------------------------------------------------------------------
# Every option of generate / img2img / inpaint, through the one recipe (npdiff.recipe.render)
# ---------------------------------------------------------------------------------------------
def test_inpaint_lora_eta_and_vae_lines_equal_the_single_commands(tmp_path, capsys, rng):
    model = default_model_path()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "start.png")
    Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    (tmp_path / "lcm.safetensors").write_bytes((model / "lcm-lora.safetensors").read_bytes())
    lines = [
        {"prompt": "a red circle", "image": "start.png", "mask": "mask.png", "seed": 5, "strength": 0.9},
        {"prompt": "a blue square", "lora": "lcm.safetensors:0.7", "sampler": "tcd", "eta": 0.3, "seed": 6,
         "guidance": 1},
        {"prompt": "a blue square", "seed": 6, "sampler": "tcd", "guidance": 1},  # the LoRA unfused again
        {"prompt": "a green circle", "lora": ["lcm.safetensors:0.5"], "vae": str(model / "vae"), "seed": 8,
         "sampler": "ddim", "eta": 0.5},
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", [json.dumps(line) for line in lines])
    out = tmp_path / "out"
    code, captured = run_cli(["batch", str(jobs), "--out", str(out), *STEPS, "--quiet"], capsys)
    assert code == 0, captured.out
    written = folder_bytes(out)
    same = {
        "000001-seed5.png": ["inpaint", "a red circle", "--image", str(tmp_path / "start.png"), "--mask",
                             str(tmp_path / "mask.png"), "--seed", "5", "--strength", "0.9"],
        "000002-seed6.png": ["generate", "a blue square", "--lora", str(tmp_path / "lcm.safetensors") + ":0.7",
                             "--sampler", "tcd", "--eta", "0.3", "--seed", "6", "--guidance", "1"],
        "000003-seed6.png": ["generate", "a blue square", "--sampler", "tcd", "--seed", "6", "--guidance", "1"],
        "000004-seed8.png": ["generate", "a green circle", "--lora", str(tmp_path / "lcm.safetensors") + ":0.5",
                             "--vae", str(model / "vae"), "--seed", "8", "--sampler", "ddim", "--eta", "0.5"],
    }
    assert sorted(written) == sorted(same)
    for name, args in same.items():
        single = tmp_path / f"single-{name}"
        assert run_cli(args + [*STEPS, "--out", str(single)], capsys)[0] == 0
        assert single.read_bytes() == written[name], f"{name} differs from npdiff {args[0]}"
    assert written["000002-seed6.png"] != written["000003-seed6.png"]  # the LoRA and eta did change it
    params = read_png_params(out / "000002-seed6.png")
    assert params["eta"] == 0.3 and [lora["name"] for lora in params["loras"]] == ["lcm"]
    assert read_png_params(out / "000001-seed5.png")["command"] == "inpaint"
    assert read_png_params(out / "000004-seed8.png")["vae"] == "vae"
    assert_no_local_path(out, tmp_path)
    # a rerun recognises every picture as done, LoRAs, VAE and eta included
    summary = run_batch(jobs, out, defaults=DEFAULTS, progress=False)
    assert (summary.written, summary.skipped, summary.failures) == (0, 4, {})


def test_line_holes_are_per_line_errors(tmp_path, capsys):
    """Wrong types, duplicated keys, a folder at a picture's name, pictures that are bombs or truncated:
    each fails its own line, named, and the others are written."""
    bomb = tmp_path / "bomb.png"
    Image.new("L", (13000, 13000)).save(bomb, optimize=False)  # ~170 megapixels, a few hundred KB
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    lines = [
        json.dumps({"prompt": "a red circle", "seed": 3}),
        json.dumps({"prompt": "a red circle", "sampler": ["ddim"]}),
        '{"prompt": "a red circle", "seed": 1, "seed": 2}',
        json.dumps({"prompt": "a red circle", "image": "bomb.png"}),
        json.dumps({"prompt": "a red circle", "image": "truncated.png"}),
        json.dumps({"prompt": "a red circle", "eta": "x"}),
        json.dumps({"prompt": "a red circle", "lora": 5}),
        json.dumps({"prompt": "a red circle", "mask": "good.png"}),
        json.dumps({"prompt": "a red\u0000circle"}),
        json.dumps({"prompt": "a red circle", "seed": 10}),  # its picture's name is taken by a folder
        "[" * 100_000,
    ]
    jobs = write_lines(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    (out / "000010-seed10.png").mkdir(parents=True)
    code, captured = run_cli(["batch", str(jobs), "--out", str(out), *STEPS, "--quiet"], capsys)
    assert code == 1 and "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["000001-seed3.png", "000010-seed10.png"]
    expected = {2: "'sampler' must be a sampler name (a string), got ['ddim']", 3: "key 'seed' is given twice",
                4: "image bomb.png: refusing a decompression bomb", 5: "image truncated.png: corrupt or truncated",
                6: "'eta' must be a finite number >= 0, got 'x'", 7: "'lora' must be \"FILE[:SCALE]\"",
                8: "'mask' needs 'image'", 9: "'prompt' holds a NUL character",
                10: "000010-seed10.png in --out is a folder",
                11: "not a line of options: it nests too deeply"}
    for line, message in expected.items():
        assert f"line {line}: {message}" in captured.out, (line, captured.out)
    assert "1 picture written, 0 skipped (already done), 10 failed, of 11 lines" in captured.out


def test_byte_order_mark_and_unwritable_out(tmp_path, capsys):
    jobs = tmp_path / "prompts.txt"
    jobs.write_bytes("\ufeffa red circle on a blue background\n".encode("utf-8"))
    (job,), failures = read_jobs(jobs, {})
    assert job.options["prompt"] == "a red circle on a blue background" and failures == {}
    code, captured = run_cli(["batch", str(jobs), "--out", "/proc/npdiff-batch-out", "--quiet"], capsys)
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npdiff: error: --out /proc/npdiff-batch-out: cannot make")


def descendants(pid):
    """The process ids below `pid` (children, their children, ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_batch_ends_its_workers_and_the_resource_tracker(tmp_path, signum):
    jobs = write_lines(tmp_path / "prompts.txt", [f"a red circle number {n}" for n in range(40)])
    command = [sys.executable, "-m", "npdiff.cli", "batch", str(jobs), "--out", str(tmp_path / "out"),
               "--workers", "2", "--steps", "30", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        deadline = time.monotonic() + 240
        children = set()
        while time.monotonic() < deadline and len(children) < 3:  # 2 workers + the resource tracker
            time.sleep(0.5)
            children = descendants(driver.pid)
            assert driver.poll() is None, driver.communicate()
        assert len(children) >= 3, children
        time.sleep(3)  # the workers are loading the model or rendering
        children = descendants(driver.pid)
        driver.send_signal(signum)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode in (130, 143), err
    assert "stopped by" in err and "Traceback" not in err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [pid for pid in children if alive(pid)]:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "a worker or the resource tracker survived"


def test_sigterm_stops_a_one_worker_batch_too(tmp_path):
    """With --workers 1 the model renders in the driver itself: SIGTERM must not be taken for one line's error."""
    jobs = write_lines(tmp_path / "prompts.txt", [f"a red circle number {n}" for n in range(300)])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "npdiff.cli", "batch", str(jobs), "--out", str(out), "--steps", "10", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob("*.png")) and driver.poll() is None:
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        output, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143 and "stopped by SIGTERM" in err, (output, err)
    assert 0 < len(list(out.glob("*.png"))) < 300 and "failed" not in output


def test_a_lora_failing_half_way_is_unfused_before_the_next_line(tmp_path, capsys):
    model = default_model_path()
    (tmp_path / "lcm.safetensors").write_bytes((model / "lcm-lora.safetensors").read_bytes())
    (tmp_path / "broken.safetensors").write_bytes(b"not a LoRA")
    lines = [{"prompt": "a blue square", "lora": ["lcm.safetensors", "broken.safetensors"], "seed": 6},
             {"prompt": "a blue square", "seed": 6}]
    jobs = write_lines(tmp_path / "jobs.jsonl", [json.dumps(line) for line in lines])
    code, captured = run_cli(["batch", str(jobs), "--out", str(tmp_path / "out"), *STEPS, "--quiet"], capsys)
    assert code == 1 and "line 1: " in captured.out and "broken.safetensors" in captured.out
    single = tmp_path / "single.png"
    assert run_cli(["generate", "a blue square", "--seed", "6", *STEPS, "--out", str(single)], capsys)[0] == 0
    assert (tmp_path / "out" / "000002-seed6.png").read_bytes() == single.read_bytes()
