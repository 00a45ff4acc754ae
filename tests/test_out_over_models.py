"""generate/img2img/inpaint: --out (or the --save-steps grid) naming a model file given on the same command line
is refused before the model loads: the SDXL --refiner and a single-file ControlNet of --control, as the --model,
--vae and --lora files are. Before, the picture was written over the refiner or the ControlNet after sampling
(atomically: the file was simply replaced by a PNG). Input pictures (--image, a control picture) may still be
overwritten by the result, on purpose."""

import pytest

from npdiff import cli


@pytest.mark.parametrize("over", ["--refiner", "--control"])
def test_out_over_the_refiner_or_a_controlnet_is_refused(tmp_path, rng, capsys, over):
    net, refiner = tmp_path / "canny.safetensors", tmp_path / "refiner.safetensors"
    for path in (net, refiner):
        path.write_bytes(rng.bytes(64))  # never read: the refusal comes first
    edges = tmp_path / "edges.png"
    edges.write_bytes(b"")
    target = refiner if over == "--refiner" else net
    before = target.read_bytes()
    option = ["--refiner", str(refiner)] if over == "--refiner" else ["--control", f"{net}:{edges}:0.8"]
    code = cli.main(["generate", *option, "--steps", "1", "--out", str(target), "a cat"])
    assert code == 2
    assert f"--out {target} is the {over} file" in capsys.readouterr().err
    assert target.read_bytes() == before
