"""The command line's ControlNet options (`--control CONTROLNET:IMAGE[:SCALE]`, `--control-start/-end`,
`--canny`, `--guess-mode`): registered on generate/img2img/inpaint by npdiff/cli.py, checked before the model
loads (load_controls), the nets loaded and put on the SD or SDXL pipeline by npdiff/pipeline_controlnet_attach.py,
and what --reproduce says of a PNG's nets (warn_about_missing_controlnets). The pictures are made by recipe.render
with `control=`."""

import sys
from pathlib import Path

from npdiff.errors import NpdiffError, clip
from npdiff.images import load_image
from npdiff.recipe import (
    CONTROL_SETTINGS,
    check_control_settings,
    control_for_render,
    parse_control_option,
)
from npdiff.recipe_reproduce import stored_controlnets


def add_control_options(p):
    """--control, --control-start, --control-end, --canny, --guess-mode on a picture command's parser."""
    p.add_argument("--control", action="append", default=None, metavar="CONTROLNET:IMAGE[:SCALE]",
                   help="steer the picture with a ControlNet (a diffusers folder, or a .safetensors file: "
                   "original-layout such as control_v11p_sd15_canny, or diffusers-layout as SDXL nets are shared) "
                   "made for the model's family (SD 1.x/2.x or SDXL), and its control picture (an edge map, "
                   "depth map, pose), at SCALE (default 1); repeatable")
    p.add_argument("--control-start", type=float, default=0.0, metavar="F",
                   help="the ControlNets act from this fraction of the steps on (default 0)")
    p.add_argument("--control-end", type=float, default=1.0, metavar="F",
                   help="... up to this fraction of the steps (default 1)")
    p.add_argument("--canny", action="store_true",
                   help="make each --control picture's Canny edge map first (npdiff.preprocess.canny, thresholds "
                   "100/200 as OpenCV's examples), for canny ControlNets; recorded as the module in the PNG")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: the nets see only the prompted half, their outputs ramped from "
                   "0.1 to 1 (diffusers' guess_mode)")


def warn_about_missing_controlnets(args, stored):
    """A PNG names its ControlNets, never their paths or control pictures: say which were not given again."""
    given = {Path(parse_control_option(spec)[0]).stem for spec in (getattr(args, "control", None) or [])}
    given |= {Path(parse_control_option(spec)[0]).name for spec in (getattr(args, "control", None) or [])}
    missing = [net for net in stored_controlnets(stored, args.reproduce) if not isinstance(net, dict)
               or net.get("name") not in given]
    if missing:
        listed = ", ".join(f"{clip(net.get('name'))} (scale {clip(net.get('scale'))}, sha256 "
                           f"{clip(net.get('sha256'))})" for net in missing[:10] if isinstance(net, dict))
        print(f"npdiff: warning: {args.reproduce} was made with ControlNet {listed}; the picture will differ "
              "unless you pass each again with --control CONTROLNET:IMAGE:SCALE and its control picture",
              file=sys.stderr)


def load_controls(args):
    """--control CONTROLNET:IMAGE[:SCALE]...: the pictures loaded and the settings checked before the model
    loads -> render()'s `control` (None without --control), made as a batch line's (recipe.control_for_render)."""
    if not args.control:
        return None
    specs = [parse_control_option(spec) for spec in args.control]
    for net, _, _ in specs:
        if not Path(net).exists():
            raise NpdiffError(f"--control {net}: no such ControlNet file or folder")
    settings = check_control_settings({name: getattr(args, name) for name in CONTROL_SETTINGS}, "--control")
    pictures = [load_image(image, what="control picture") for _, image, _ in specs]
    return control_for_render(pictures, [scale for _, _, scale in specs], settings)
