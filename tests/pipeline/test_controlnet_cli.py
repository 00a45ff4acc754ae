"""npdiff generate/img2img --control: the picture is the ControlNet pipeline's from the same seed (the pipeline
is checked against diffusers in test_controlnet_sd.py), the PNG names each net by name, hash and scale in
npdiff's JSON and in AUTOMATIC1111's text (webui's `ControlNet 0: "Module: ..., Model: name [hash], ..."`),
--reproduce warns about nets not given again, and bad --control values fail before the model loads."""

import numpy as np
import pytest
from PIL import Image
from test_controlnet_sd import edge_picture, net_folders
from tiny_sd import tiny_sd_folder

from npdiff import cli
from npdiff.images import png_text_chunks, read_png_params
from npdiff.models import ControlNetModel
from npdiff.pipeline_controlnet import StableDiffusionControlNetPipeline


def test_generate_with_control(tmp_path, rng, capsys):
    folder, net_folder = tiny_sd_folder(), net_folders(count=1)[0]
    edges = tmp_path / "edges.png"
    edge_picture(rng).save(edges)
    out = tmp_path / "out.png"
    code = cli.main(["generate", "a red circle", "--model", str(folder), "--steps", "3", "--seed", "5",
                     "--control", f"{net_folder}:{edges}:0.7", "--control-end", "0.8", "--out", str(out)])
    assert code == 0
    params = read_png_params(out)
    (net,) = params["controlnets"]
    assert net["name"] == net_folder.name and net["scale"] == 0.7 and net["end"] == 0.8 and len(net["sha256"]) == 10
    text = png_text_chunks(out)["parameters"]
    assert f'ControlNet 0: "Module: none, Model: {net_folder.name} [{net["sha256"][:8]}], Weight: 0.7' in text
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ControlNetModel.from_pretrained(net_folder))
    pipe.show_progress = False
    direct = pipe("a red circle", image=Image.open(edges), num_inference_steps=3, seed=5,
                  controlnet_conditioning_scale=0.7, control_guidance_end=0.8, guidance_scale=params["guidance_scale"])
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(direct.images[0]))
    capsys.readouterr()
    # --reproduce without the net: a warning naming it
    cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out", str(tmp_path / "again.png")])
    assert f"made with ControlNet {net_folder.name}" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("nothing", "expected CONTROLNET:IMAGE"),
                                           ("missing_net:edges.png", "no such ControlNet"),
                                           ("NET:missing.png", "no such file")])
def test_bad_control_options(tmp_path, capsys, spec, message):
    spec = spec.replace("NET", str(net_folders(count=1)[0]))
    code = cli.main(["generate", "x", "--model", str(tiny_sd_folder()), "--control", spec,
                     "--out", str(tmp_path / "o.png")])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_canny_makes_the_edge_map(tmp_path, rng):
    """--canny: the control picture is npdiff.preprocess.canny's edge map of the given picture."""
    from npdiff.preprocess import canny

    folder, net_folder = tiny_sd_folder(), net_folders(count=1)[0]
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((64, 64)).save(photo)
    out = tmp_path / "out.png"
    assert cli.main(["generate", "a red circle", "--model", str(folder), "--steps", "2", "--seed", "3", "--canny",
                     "--control", f"{net_folder}:{photo}", "--out", str(out)]) == 0
    assert read_png_params(out)["controlnets"][0]["module"] == "canny"
    assert 'ControlNet 0: "Module: canny' in png_text_chunks(out)["parameters"]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ControlNetModel.from_pretrained(net_folder))
    pipe.show_progress = False
    direct = pipe("a red circle", image=canny(Image.open(photo).convert("RGB")), num_inference_steps=2, seed=3)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(direct.images[0]))


@pytest.mark.parametrize("model_precision, net_precision", [
    ("bf16", "fp32"), ("fp32", "bf16"), ("mixed", "fp32"), ("fp32", "mixed"), ("mixed", "mixed"),
    ("bf16x3", "fp32"), ("fp32", "bf16x3"), ("bf16x3", "bf16x3"),
])  # mixed and bf16x3 too: a PNG may record either for the model or the net
def test_reproduce_loads_each_net_at_the_precision_it_ran(tmp_path, rng, capsys, model_precision, net_precision):
    """A pipeline at one precision given a ControlNet loaded at another through the API: the PNG records the net's
    own precision, and --reproduce (the net and its picture given again) loads it so and draws the same picture."""
    from npdiff.images import save_png
    from npdiff.recipe import control_for_render, model_png_identity, render

    folder, net_folder = tiny_sd_folder(), net_folders(count=1)[0]
    edges = tmp_path / "edges.png"
    edge_picture(rng).save(edges)
    net = ControlNetModel.from_pretrained(net_folder, precision=net_precision)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=net, precision=model_precision)
    pipe.show_progress = False
    settings = {"canny": False, "control_start": 0.0, "control_end": 1.0, "guess_mode": False}
    options = {"prompt": "a red circle", "steps": 3, "seed": int(rng.integers(1 << 31)), "guidance": 5.0}
    rendered = render(pipe, "generate", options, identity=model_png_identity(folder),
                      control=control_for_render([Image.open(edges).convert("RGB")], [0.8], settings))
    out = tmp_path / "out.png"
    save_png(rendered.output.images[0], out, rendered.params)
    params = read_png_params(out)
    assert params.get("precision", "fp32") == model_precision
    # the net's own precision, beside the model's, when they differ (none recorded: the model's)
    assert params["controlnets"][0].get("precision", model_precision) == net_precision
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--control",
                     f"{net_folder}:{edges}:0.8", "--out", str(again)]) == 0
    assert f"precision {model_precision}" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(again).convert("RGB")),
                                  np.asarray(Image.open(out).convert("RGB")))
    assert read_png_params(again)["controlnets"][0].get("precision", model_precision) == net_precision


def test_a_png_with_an_unknown_net_precision_is_refused_by_name(tmp_path, rng, capsys):
    from npdiff.images import save_png

    folder, net_folder = tiny_sd_folder(), net_folders(count=1)[0]
    edges = tmp_path / "edges.png"
    edge_picture(rng).save(edges)
    png = tmp_path / "made.png"
    save_png(Image.new("RGB", (64, 64)), png, {"prompt": "a red circle", "steps": 2, "seed": 1, "command": "generate",
                                               "controlnets": [{"name": net_folder.name, "scale": 1.0,
                                                                "precision": "fp8"}]})
    out = tmp_path / "out.png"
    assert cli.main(["generate", "--reproduce", str(png), "--model", str(folder), "--control",
                     f"{net_folder}:{edges}", "--out", str(out)]) == 2
    assert f"ControlNet {net_folder.name!r}: precision 'fp8' is not one of" in capsys.readouterr().err
    assert not out.exists()
