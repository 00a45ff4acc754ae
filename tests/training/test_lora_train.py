"""npdiff.training.train_lora and `npdiff train-lora` on the tiny random SD of tests/pipeline/tiny_sd.py: two training
steps against the same steps by torch (peft adapters on diffusers' UNet, torch.optim.AdamW; SD 1.x and 2.x), checkpoint + resume
equal to an uninterrupted run, the kohya-layout file loaded by npdiff's and diffusers' load_lora_weights giving the
same picture within 2 levels, kohya's metadata without local paths, and bad input refused before any work."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, assert_rel_close, rel_err
from safetensors import safe_open
from safetensors.numpy import load_file
from test_lora_grad import torch_loss_and_grads, torch_unet_with_lora
from test_textual_inversion import draw_pictures, fresh_pipe, training_latents

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import StableDiffusionPipeline, cli
from npdiff.errors import NpdiffError
from npdiff.lora import named_layers
from npdiff.training import UNetLora, lora_grad, train_lora
from npdiff.training.loop import draw_batch

PROMPT = "a photo of sks disc"
pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder(kind="test")


@pytest.fixture
def pictures(tmp_path, rng):
    return draw_pictures(tmp_path / "pictures", rng)


@pytest.mark.parametrize("kind", ["test", "sd2"])
def test_two_steps_equal_torch_adamw_on_peft_gradients(kind, pictures, seed):
    folder = tiny_sd_folder(kind=kind)
    lr, rank, alpha, steps = 1e-2, 2, 3.0, 2
    result = train_lora(fresh_pipe(folder), pictures, prompt=PROMPT, rank=rank, alpha=alpha, steps=steps, lr=lr,
                        batch_size=2, seed=seed, progress=False)
    # the same steps by torch: peft adapters holding the same init, torch's AdamW, the same draws
    pipe = fresh_pipe(folder)
    start = UNetLora.create(pipe, rank, alpha, seed)
    torch_pipe, adapted = torch_unet_with_lora(folder, start, init_lora_weights=True)
    parameters = [tensor for pair in adapted.values() for tensor in pair]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    latents = training_latents(pipe, pictures)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")  # sd2: v_prediction
    for step in range(steps):
        draw = draw_batch(seed, step, 2, [(PROMPT,)] * 3, 1000, latents.shape[2:])
        ids = pipe.tokenizer(draw["templates"])
        optimizer.zero_grad()
        loss, _ = torch_loss_and_grads(torch_pipe, adapted, ids, latents[draw["flips"], draw["pictures"]],
                                       draw["noise"], draw["timesteps"], prediction_type)
        optimizer.step()
        assert abs(result.losses[step] - loss) <= 1e-5 * loss, (step, result.losses[step], loss)
    expected = np.concatenate([np.concatenate([down.detach().numpy().ravel(), up.detach().numpy().ravel()])
                               for down, up in (adapted[name] for name in start.layers)])
    # AdamW divides each gradient by its own size: a gradient within float32 rounding of zero becomes a +-lr step
    # whose sign the rounding picks. So: at most 1 in 1000 factors may step differently (by > lr/20), and the
    # update of the other factors within 1e-3; a differing factor by no more than two steps each way (4 lr: with
    # bias correction each of the first two Adam steps is at most 1.0013 lr). Measured over 6 runs: 0-3 of 16640-23296 factors, 1.1e-5 to 1.8e-4. Seed 2105395693: 4
    # factors differing by up to 0.33 lr made the whole update 2.0e-3 from torch's while the rest agreed. Seed
    # 837564791: one layer's up factors (attn2.to_out, zero at the start, its first gradient near rounding) stepped
    # 1-9% of their step apart (25 factors by 0.011-0.044 lr against lr/100 then), the same amplified rounding.
    update, expected_update = result.lora.params - start.params, expected - start.params
    gap = np.abs(update - expected_update)
    stepped_differently = gap > 5e-2 * lr
    differing = int(np.count_nonzero(stepped_differently))
    assert differing <= update.size // 1000, f"{differing} of {update.size} factors stepped differently"
    assert gap.max() <= 4 * lr * 1.01, f"a factor differs by {gap.max():.3g}, more than two steps each way"
    assert_rel_close(update[~stepped_differently], expected_update[~stepped_differently], 1e-3, "two steps' update")
    assert all(layer.weight is result.lora.base[name] for name, layer in result.lora.layers.items())


def test_checkpoint_and_resume_equal_an_uninterrupted_run(folder, pictures, tmp_path, seed):
    options = {"prompt": PROMPT, "rank": 2, "lr": 1e-2, "seed": seed, "progress": False}
    whole = train_lora(fresh_pipe(folder), pictures, steps=3, out=tmp_path / "whole.safetensors", **options)
    first = train_lora(fresh_pipe(folder), pictures, steps=2, out=tmp_path / "part.safetensors",
                       checkpoint_every=2, **options)
    assert first.paths["checkpoint"] == tmp_path / "part.checkpoint.safetensors"
    resumed = train_lora(fresh_pipe(folder), pictures, steps=3, out=tmp_path / "part.safetensors",
                         resume=first.paths["checkpoint"], **options)
    np.testing.assert_array_equal(resumed.lora.params, whole.lora.params)
    assert resumed.losses == whole.losses
    with pytest.raises(NpdiffError, match="made with rank 2, this run has 3"):
        train_lora(fresh_pipe(folder), pictures, steps=3, resume=first.paths["checkpoint"],
                   **dict(options, rank=3))


def test_saved_lora_draws_the_same_picture_in_npdiff_and_diffusers(folder, pictures, tmp_path, seed):
    out = tmp_path / "sks.safetensors"
    result = train_lora(fresh_pipe(folder), pictures, prompt=PROMPT, rank=4, alpha=2.0, steps=3, lr=3e-2,
                        seed=seed, out=out, progress=False)
    assert sorted(result.paths) == ["lora", "loss_csv", "loss_png"]
    # kohya's layout: down [r,in], up [out,r], a scalar alpha per layer; kohya's metadata, no local path
    tensors = load_file(str(out))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    np.testing.assert_array_equal(tensors[f"{key}.lora_down.weight"], result.lora.down[name])
    np.testing.assert_array_equal(tensors[f"{key}.lora_up.weight"], result.lora.up[name])
    assert tensors[f"{key}.alpha"].shape == () and float(tensors[f"{key}.alpha"]) == 2.0
    assert len(tensors) == 3 * len(result.lora.layers)
    with safe_open(str(out), framework="numpy") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_num_train_images"] == "3"
    assert json.loads(metadata["ss_tag_frequency"]) == {"pictures": {PROMPT: 3}}
    for value in metadata.values():
        assert str(tmp_path) not in value and str(folder) not in value and "/" not in value, value

    kwargs = {"num_inference_steps": 3, "guidance_scale": 6.0}
    theirs = torch_pipeline(folder, "euler")
    plain = theirs(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    theirs.load_lora_weights(str(out))
    expected = theirs(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    ours = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    assert ours.load_lora_weights(out).layer_count == len(result.lora.layers)
    fused = named_layers(ours.unet, "unet")
    for name in result.lora.layers:  # npdiff's load fuses W + (alpha/r) up @ down, as training did
        expected_weight = result.lora.base[name] + 0.5 * (result.lora.up[name] @ result.lora.down[name])
        assert_rel_close(fused[name].weight, expected_weight, 1e-6, name)
    out_ours = ours(PROMPT, seed=seed, output_type="np", **kwargs)
    worst = int(np.max(np.abs(np.round(out_ours.images * 255) - np.round(expected * 255))))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    assert rel_err(expected, plain) > 1e-3, "the trained LoRA did not change diffusers' picture"


def test_captions_from_files_and_the_loss_going_down(folder, tmp_path, rng, seed):
    """Caption files replace the prompt; a few steps at a high learning rate lower the loss on the same draws."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=2)
    (pictures / "picture0.txt").write_text("sks disc, blue background\n")
    (pictures / "picture1.txt").write_text("a sks disc\nsks, a red disc\n")
    pipe = fresh_pipe(folder)
    first = train_lora(pipe, pictures, rank=4, steps=1, lr=5e-2, batch_size=4, seed=seed, progress=False)
    trained = train_lora(pipe, pictures, rank=4, steps=8, lr=5e-2, batch_size=4, seed=seed, progress=False)
    assert trained.losses[0] == first.losses[0]
    # the loss of step 0's draw, with the trained LoRA, against its value before training
    latents = training_latents(pipe, pictures)
    captions = [("sks disc, blue background",), ("a sks disc", "sks, a red disc")]
    draw = draw_batch(seed, 0, 4, captions, 1000, latents.shape[2:])
    ids = pipe.tokenizer(draw["templates"])
    loss, _ = lora_grad(pipe, trained.lora, ids, latents[draw["flips"], draw["pictures"]], draw["noise"],
                        draw["timesteps"])
    trained.lora.remove()
    assert loss < first.losses[0], (loss, first.losses[0])


@pytest.mark.parametrize("changes,message", [
    ({"dir": "empty"}, "no pictures"),
    ({"--rank": "0"}, "--rank must be >= 1"),
    ({"--alpha": "0"}, "--alpha must be a finite number > 0"),
    ({"--alpha": "inf"}, "--alpha must be a finite number > 0"),
    ({"--steps": "0"}, "--steps must be >= 1"),
    ({"--lr": "-1"}, "learning rate must be a finite number > 0"),
    ({"--prompt": None}, "no caption file (picture0.txt) and no prompt given"),
    ({"--out": "missing/x.safetensors"}, "does not exist"),
    ({"--resume": "nothing.safetensors"}, "no such file"),
])
def test_train_lora_bad_options(folder, pictures, tmp_path, capsys, changes, message):
    (tmp_path / "empty").mkdir()
    options = {"dir": str(pictures), "--prompt": PROMPT, "--steps": "1", "--out": str(tmp_path / "x.safetensors"),
               "--model": str(folder)}
    for key, value in changes.items():
        if value is None:
            options.pop(key)
        elif key in ("dir", "--out", "--resume"):
            options[key] = str(tmp_path / value)
        else:
            options[key] = value
    args = ["train-lora", options.pop("dir")] + [part for item in options.items() for part in item]
    assert cli.main([*args, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("npdiff: error:") and message in error, error
    assert not (tmp_path / "x.safetensors").exists()


def test_train_lora_refuses_before_work(folder, pictures, tmp_path):
    pipe = fresh_pipe(folder)
    (pictures / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(NpdiffError, match="broken.png"):
        train_lora(pipe, pictures, prompt=PROMPT, out=tmp_path / "x.safetensors")
    (pictures / "broken.png").unlink()
    with pytest.raises(NpdiffError, match="LoRA rank must be an integer >= 1"):
        train_lora(pipe, pictures, prompt=PROMPT, rank=0)
    with pytest.raises(NpdiffError, match="prompt must be a non-empty caption"):
        train_lora(pipe, pictures, prompt="  ")
    with pytest.raises(NpdiffError, match="checkpoints need an output file"):
        train_lora(pipe, pictures, prompt=PROMPT, checkpoint_every=2)
    bf16 = StableDiffusionPipeline.from_pretrained(folder, precision="bf16")
    with pytest.raises(NpdiffError, match="float32"):
        train_lora(bf16, pictures, prompt=PROMPT)
    assert not any(tmp_path.glob("x*"))


def test_train_lora_command_end_to_end(folder, pictures, tmp_path, seed, capsys):
    out = tmp_path / "disc.safetensors"
    args = ["train-lora", str(pictures), "--prompt", PROMPT, "--rank", "2", "--alpha", "1", "--steps", "2",
            "--lr", "0.01", "--seed", str(seed), "--model", str(folder), "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    assert "trained a rank-2 LoRA (alpha 1) in 2 steps" in capsys.readouterr().out
    for name in ("disc.safetensors", "disc.loss.csv", "disc.loss.png"):
        assert (tmp_path / name).is_file(), name
    expected = train_lora(fresh_pipe(folder), pictures, prompt=PROMPT, rank=2, alpha=1.0, steps=2, lr=0.01,
                          seed=seed, progress=False)
    tensors = load_file(str(out))
    for name in expected.lora.layers:
        key = "lora_unet_" + name.replace(".", "_")
        np.testing.assert_array_equal(tensors[f"{key}.lora_up.weight"], expected.lora.up[name])
