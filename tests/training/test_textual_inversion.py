"""npdiff.training.textual_inversion on the tiny random SD of tests/pipeline/tiny_sd.py: AdamW against
torch.optim.AdamW (1e-6), one training step against a torch AdamW step on the same gradient, the loss going
down, checkpoint + resume equal to an uninterrupted run, the saved files loaded by npdiff and by diffusers
(the same hidden states as the trained pipeline), and bad input refused before any work."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import KERNEL_TOL, assert_rel_close
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from tiny_sd import tiny_sd_folder, torch_pipeline
from tiny_sdxl import tiny_sdxl_folder

from npdiff import StableDiffusionPipeline
from npdiff.errors import NpdiffError
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline
from npdiff.textual_inversion import add_rows
from npdiff.training import text_embedding_grad, textual_inversion
from npdiff.training.adamw import AdamW
from npdiff.training.pictures import (
    encode_training_latents,
    find_pictures,
    load_training_pictures,
    picture_captions,
)
from npdiff.training.textual_inversion import draw_batch, new_rows_grad

ADAM_TOL = 1e-6
TEMPLATES = ["a photo of a {}", "a rendering of the {}"]


def draw_pictures(folder, rng, count=3, mixed_sizes=False):
    """`count` pictures of a red disc on blue, the disc placed at random -> folder. One random size for all
    (the crop to a square is exercised when it is not square), or one per picture with mixed_sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = int(rng.integers(64, 100)), int(rng.integers(64, 100))
    for index in range(count):
        if mixed_sizes:
            width, height = int(rng.integers(64, 100)), int(rng.integers(64, 100))
        picture = Image.new("RGB", (width, height), (30, 60, 200))
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        ImageDraw.Draw(picture).ellipse([x, y, x + 36, y + 36], fill=(220, 40, 40))
        picture.save(folder / f"picture{index}.png")
    return folder


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder(kind="test")


@pytest.fixture
def pictures(tmp_path, rng):
    return draw_pictures(tmp_path / "pictures", rng)


def fresh_pipe(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.show_progress = False
    return pipe


def training_latents(pipe, pictures):
    """[2,P,C,h,w]: the latents textual_inversion trains on (as they are, flipped)."""
    size = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    return encode_training_latents(pipe.vae, load_training_pictures(find_pictures(pictures), size))


def test_adamw_matches_torch(rng):
    shape = (int(rng.integers(1, 4)), int(rng.integers(8, 64)))
    start = rng.standard_normal(shape, dtype=np.float32)
    lr, weight_decay = float(rng.uniform(1e-3, 1e-1)), float(rng.uniform(0, 0.1))
    ours, optimizer = start.copy(), AdamW(shape, lr, weight_decay=weight_decay)
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    expected = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    for _ in range(5):
        grad = rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(1e-4, 10))
        optimizer.step(ours, grad)
        param.grad = torch.from_numpy(grad.copy())
        expected.step()
        assert_rel_close(ours - start, param.detach().numpy() - start, ADAM_TOL, "AdamW update")


def test_one_step_equals_torch_adamw_on_the_same_gradient(folder, pictures, seed):
    lr = 1e-2
    result = textual_inversion(fresh_pipe(folder), pictures, "<x>", "cat", vectors=2, steps=1, lr=lr, batch_size=2,
                               seed=seed, templates=TEMPLATES, progress=False)
    # the same step by hand: the init word's rows, the gradient of step 0's draw, torch's AdamW
    pipe = fresh_pipe(folder)
    start = np.repeat(pipe.text_encoder.token_embedding[pipe.tokenizer.encode("cat")[0]][None], 2, axis=0)
    add_rows(pipe.tokenizer, pipe.text_encoder, "<x>", ["<x>", "<x>_1"], start)
    new_ids = pipe.tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"])
    latents = training_latents(pipe, pictures)
    draw = draw_batch(seed, 0, 2, [TEMPLATES] * 3, 1000, latents.shape[2:])
    ids = pipe.tokenizer([template.format("<x>") for template in draw["templates"]])
    assert (ids == new_ids[0]).any() and (ids == new_ids[1]).any()
    loss, grad = text_embedding_grad(pipe, ids, latents[draw["flips"], draw["pictures"]], draw["noise"],
                                     draw["timesteps"])
    assert loss == result.losses[0]
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = torch.optim.AdamW([param], lr=lr)
    param.grad = torch.from_numpy(new_rows_grad(grad, ids, new_ids))
    optimizer.step()
    assert_rel_close(result.vectors - start, param.detach().numpy() - start, ADAM_TOL, "one step's update")


def test_training_lowers_the_loss(folder, pictures, seed):
    """Train on a fixed set of draws; the mean loss over those draws is lower afterwards, from the same seed."""
    pipe = fresh_pipe(folder)
    result = textual_inversion(pipe, pictures, "<x>", "cat", steps=6, lr=5e-2, batch_size=2, seed=seed,
                               templates=TEMPLATES, progress=False)

    def mean_loss(rows):
        pipe.text_encoder.token_embedding[pipe.tokenizer.convert_tokens_to_ids(["<x>"])] = rows
        latents = training_latents(pipe, pictures)
        losses = []
        for step in range(6):
            draw = draw_batch(seed, step, 2, [TEMPLATES] * 3, 1000, latents.shape[2:])
            ids = pipe.tokenizer([template.format("<x>") for template in draw["templates"]])
            losses.append(text_embedding_grad(pipe, ids, latents[draw["flips"], draw["pictures"]], draw["noise"],
                                              draw["timesteps"])[0])
        return np.mean(losses)

    learned = result.vectors
    start = pipe.text_encoder.token_embedding[pipe.tokenizer.encode("cat")[0]][None].copy()
    before, after = mean_loss(start), mean_loss(learned)
    assert np.isfinite(before) and after < before, (before, after)


def test_checkpoint_and_resume_equal_an_uninterrupted_run(folder, pictures, tmp_path, seed):
    options = {"vectors": 2, "lr": 2e-2, "batch_size": 1, "seed": seed, "templates": TEMPLATES, "progress": False}
    whole = textual_inversion(fresh_pipe(folder), pictures, "<x>", "cat", steps=4, **options)
    out = tmp_path / "run" / "x.safetensors"
    out.parent.mkdir()
    first = textual_inversion(fresh_pipe(folder), pictures, "<x>", "cat", steps=2, out=out, checkpoint_every=2,
                              **options)
    checkpoint = first.paths["checkpoint"]
    assert checkpoint.is_file()
    resumed = textual_inversion(fresh_pipe(folder), pictures, "<x>", "cat", steps=4, out=out, resume=checkpoint,
                                **options)
    np.testing.assert_array_equal(resumed.vectors, whole.vectors)
    assert resumed.losses == whole.losses
    with pytest.raises(NpdiffError, match="made with token"):
        textual_inversion(fresh_pipe(folder), pictures, "<y>", "cat", steps=4, resume=checkpoint, **options)
    with pytest.raises(NpdiffError, match="at step 2"):
        textual_inversion(fresh_pipe(folder), pictures, "<x>", "cat", steps=2, resume=checkpoint, **options)


def test_saved_embedding_loads_in_npdiff_and_diffusers(folder, pictures, tmp_path, seed):
    out = tmp_path / "learned_embeds.safetensors"
    trained = fresh_pipe(folder)
    result = textual_inversion(trained, pictures, "<x>", "cat", vectors=2, steps=2, lr=5e-2, seed=seed, out=out,
                               templates=TEMPLATES, progress=False)
    assert set(result.paths) == {"embedding", "a1111", "loss_csv", "loss_png"}
    assert out.read_bytes() and len(result.paths["loss_csv"].read_text().splitlines()) == 3
    assert Image.open(result.paths["loss_png"]).size == (640, 360)
    prompt = "a photo of a <x> on the grass"
    expected = trained.encode_prompt(prompt, do_classifier_free_guidance=False)[0]  # [1,77,D]
    for path, token in ((out, None), (result.paths["a1111"], "<x>")):
        ours = fresh_pipe(folder)
        assert ours.load_textual_inversion(path, token=token) == ["<x>", "<x>_1"]
        np.testing.assert_array_equal(ours.encode_prompt(prompt, do_classifier_free_guidance=False)[0], expected)
        diffusers_pipe = torch_pipeline(folder)
        diffusers_pipe.load_textual_inversion(str(path), token=token)
        with torch.no_grad():
            theirs = diffusers_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        assert_rel_close(expected, theirs, KERNEL_TOL, f"diffusers with {path.name}")


def test_bad_input_refused_before_any_work(folder, pictures, tmp_path):
    pipe = fresh_pipe(folder)
    rows = pipe.text_encoder.token_embedding.shape[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    draw_pictures(broken, np.random.default_rng(0), 2)
    (broken / "picture9.png").write_bytes(b"not a png")
    bad_caption = tmp_path / "bad_caption"
    draw_pictures(bad_caption, np.random.default_rng(1), 1)
    (bad_caption / "picture0.txt").write_text("a photo without the word\n")
    cases = [
        ({"folder": bad_caption}, "picture0.txt: caption template"),
        ({"folder": empty}, "no pictures"),
        ({"folder": broken}, "picture9.png"),
        ({"token": "cat"}, "already in the tokenizer"),
        ({"init_word": "a red cat"}, "init word 'a red cat' is 3 tokens"),
        ({"vectors": 0}, "vectors must be an integer >= 1"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"lr": float("nan")}, "learning rate"),
        ({"templates": ["no slot"]}, "caption template"),
        ({"checkpoint_every": 2}, "checkpoints need an output file"),
        ({"clip_skip": 3}, "clip_skip 3 skips more layers"),
        ({"out": tmp_path / "missing" / "x.safetensors"}, "does not exist"),
        ({"resume": tmp_path / "nothing.safetensors"}, "no such file"),
    ]
    for changes, message in cases:
        arguments = {"folder": pictures, "token": "<x>", "init_word": "cat", "steps": 1, "progress": False} | changes
        with pytest.raises(NpdiffError, match=message):
            textual_inversion(pipe, arguments.pop("folder"), **arguments)
        assert pipe.text_encoder.token_embedding.shape[0] == rows and "<x>" not in pipe.tokenizer.get_vocab()


def test_mixed_sizes_refused_unless_asked_for(folder, tmp_path, rng):
    pictures = draw_pictures(tmp_path / "mixed", rng, count=3, mixed_sizes=True)
    (pictures / "picture9.png").write_bytes(b"not a png")  # unidentifiable: left to the reading, not the size check
    with Image.open(pictures / "picture0.png") as first:
        Image.new("RGB", (first.width + 7, first.height), (30, 60, 200)).save(pictures / "picture1.png")
        expected = f"picture1.png is {first.width + 7}x{first.height} pixels but picture0.png is {first.width}x{first.height}"
    pipe = fresh_pipe(folder)
    with pytest.raises(NpdiffError, match=expected):
        textual_inversion(pipe, pictures, "<x>", "cat", steps=1, progress=False)
    assert "<x>" not in pipe.tokenizer.get_vocab()
    (pictures / "picture9.png").unlink()
    result = textual_inversion(pipe, pictures, "<x>", "cat", steps=1, progress=False, mixed_sizes=True)
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])


def test_sidecar_captions_replace_the_templates(pictures):
    (pictures / "picture1.txt").write_text("a {} on a blue background\n\n{}, blue background\n")
    captions = picture_captions(find_pictures(pictures), tuple(TEMPLATES))
    assert captions == [tuple(TEMPLATES), ("a {} on a blue background", "{}, blue background"), tuple(TEMPLATES)]
    draws = [draw_batch(0, step, 4, captions, 1000, (4, 8, 8)) for step in range(20)]
    chosen = {t for draw in draws for p, t in zip(draw["pictures"], draw["templates"]) if p == 1}
    assert chosen == set(captions[1])


def test_sdxl_refused(pictures):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder())
    with pytest.raises(NpdiffError, match="SD 1.x/2.x models only"):
        textual_inversion(pipe, pictures, "<x>", "cat", steps=1, progress=False)
