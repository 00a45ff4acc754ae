"""--reproduce as a webui user expects it: what a PNG's parameters ask for that the options given do not settle.

The options on the command line always win; the PNG fills in only what is unset (recipe.options_from_png).
What is left is said here, once, in the user's terms, before the model loads:

  problems_with_stored(stored, given, command)  -> (errors, warnings): a sampler or hires upscaler npdiff lacks
                                  when none is given; a picture made by another mode (img2img, inpaint) than
                                  `command`; a VAE not given again with --vae
  find_loras(stored_loras, lora_dir, given_names)  the PNG's LoRAs (webui's <lora:name:scale> tags or npdiff's
                                  list) found as NAME.safetensors in --lora-dir, each hash checked when the PNG
                                  has one -> ([(path, scale)], warnings for those not found or not matching)
  without_refiner_settings(from_png, stored, refiner)  the PNG's refiner settings (switch, aesthetic scores)
                                  left out when it names a refiner and no --refiner is given: the base alone
  refiner_mismatch(stored, refiner, source)  a warning when the --refiner loaded is not the one the PNG names
  stored_controlnets(stored, source)  the PNG's list of ControlNets; anything else is an NpdiffError
  controlnet_precisions(stored, source)  {net name: precision} of the PNG's ControlNets that ran at another
                                  precision than the model (a net loaded at fp32 beside a bf16 model)
  lora_hashes(path)               the short hashes a LoRA file is known by: npdiff's (the whole file's SHA-256)
                                  and webui's ("addnet": the SHA-256 of the tensor bytes after the header)
"""

import hashlib
from pathlib import Path

from npdiff.errors import NpdiffError, clip, shorten
from npdiff.infotext import refiner_title
from npdiff.loading.weights import PRECISIONS
from npdiff.model_identity import file_sha256

MODE_NAMES = {"generate": "txt2img", "txt2img": "txt2img", "img2img": "img2img", "inpaint": "inpaint"}


def problems_with_stored(stored, given, command, source):
    """stored: the PNG's parameters (images.read_png_params); given: {option name: value} from the command line
    (None = unset). -> (errors, warnings), lists of one-line texts naming `source`."""
    errors, warnings = [], []
    # 1. a sampler npdiff lacks matters only when none is given
    if stored.get("unsupported_sampler") and given.get("sampler") is None:
        errors.append(f"{source} was made with sampler {clip(stored['unsupported_sampler'])!r}, which npdiff does "
                      "not have: pass --sampler NAME (e.g. euler_a, dpmpp_2m_karras) to draw it with another")
    hires_used = given.get("hires_scale") is not None or stored.get("hires_scale") is not None
    if (command == "generate" and hires_used and stored.get("unsupported_hires_upscaler")
            and given.get("hires_upscaler") is None):
        errors.append(f"{source} was made with hires upscaler {clip(stored['unsupported_hires_upscaler'])!r}, "
                      "which npdiff does not have: pass --hires-upscaler (latent, latent-nearest, "
                      "latent-nearest-exact, latent-bicubic or lanczos)")
    # 2. a picture made by another mode is said so, never silently redrawn as this one
    made_by = MODE_NAMES.get(stored.get("command") or stored.get("mode") or "txt2img", "txt2img")
    if made_by != MODE_NAMES[command]:
        strength = f" at strength {clip(stored.get('strength'))}" if stored.get("strength") is not None else ""
        how = "in webui's img2img or inpaint tab" if stored.get("mode") and not stored.get("command") else \
            f"by npdiff {made_by}"
        dropped = " (this command takes no strength: it is not used)" if command == "generate" and strength else ""
        warnings.append(f"{source} was made {how}{strength}, not {MODE_NAMES[command]}: drawn here with "
                        f"`npdiff {command}`{dropped}; to redraw it as made, run npdiff "
                        f"{'img2img' if made_by == 'img2img' else made_by} --reproduce {source} --image PICTURE")
    # 3. a VAE is named, never found: it must be given again
    if stored.get("vae") and not given.get("vae"):
        warnings.append(f"{source} was made with VAE {clip(stored['vae'])!r}: the picture will differ unless you "
                        "pass that VAE again with --vae FOLDER")
    # 4. an SDXL refiner, like the model, is named, never found: it must be given again
    if stored.get("refiner") and not given.get("refiner"):
        warnings.append(f"{source} was made with SDXL refiner {clip(refiner_title(stored))} (switching at "
                        f"{clip(stored.get('refiner_switch'))}): drawn here by the base alone, and the picture will "
                        "differ unless you pass that refiner again with --refiner FILE_OR_FOLDER")
    return errors, warnings


def stored_controlnets(stored, source):
    """-> the PNG's ControlNet entries ([] when it names none); anything but a list (an edited PNG) is an
    NpdiffError naming the PNG, not a TypeError further on."""
    nets = stored.get("controlnets")
    if nets is None:
        return []
    if not isinstance(nets, list):
        raise NpdiffError(f"{source}: stored parameter 'controlnets' must be a list, got {shorten(nets)}")
    return nets


def controlnet_precisions(stored, source):
    """-> {net name: precision} for the PNG's ControlNets recorded with their own precision (one that differs
    from the model's); --control nets of those names are loaded at it. A precision npdiff does not know is an
    NpdiffError naming the PNG and the net."""
    precisions = {}
    for net in stored_controlnets(stored, source):
        if not isinstance(net, dict) or "precision" not in net:
            continue
        if net["precision"] not in PRECISIONS:
            raise NpdiffError(f"{source}: ControlNet {clip(net.get('name'))!r}: precision {clip(net['precision'])!r} "
                              f"is not one of {', '.join(PRECISIONS)}")
        precisions[str(net.get("name"))] = net["precision"]
    return precisions


REFINER_SETTINGS = ("refiner_switch", "aesthetic_score", "negative_aesthetic_score")


def without_refiner_settings(from_png, stored, refiner):
    """The options read from a PNG, less its refiner's settings when it names a refiner and `refiner` (the
    --refiner given) is None: they would ask the base alone for what only the refiner does."""
    if not stored.get("refiner") or refiner:
        return from_png
    return {name: value for name, value in from_png.items() if name not in REFINER_SETTINGS}


def refiner_mismatch(stored, refiner, source):
    """-> [a warning] when the PNG names a refiner hash and the loaded refiner (sdxl_recipe.Refiner) has another."""
    wanted = str(stored.get("refiner_hash") or "").lower()
    if refiner is None or not wanted or wanted == refiner.identity["refiner_hash"]:
        return []
    return [f"{source} was made with SDXL refiner {clip(refiner_title(stored))}, but the refiner loaded is "
            f"{refiner.identity['refiner']!r} (hash {refiner.identity['refiner_hash']}): the picture will differ"]


def lora_hashes(path):
    """-> the 12-hex-digit hashes a LoRA file is named by: npdiff's (SHA-256 of the whole file) and webui's
    addnet hash (SHA-256 of what follows the safetensors header), as webui's "Lora hashes" writes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        header_length = int.from_bytes(stream.read(8), "little")
        stream.seek(8 + header_length)
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return {file_sha256(path)[:12], digest.hexdigest()[:12]}


def find_loras(stored_loras, lora_dir, given_names):
    """The PNG's LoRAs [{"name", "scale", "sha256" or None}] not given with --lora (given_names: their file
    stems) -> ([(path, scale)] found in lora_dir with a matching hash, [warning texts for the others])."""
    found, warnings = [], []
    for lora in stored_loras:
        name, scale, wanted = lora.get("name"), lora.get("scale"), (lora.get("sha256") or "").lower()
        if name in given_names:
            continue
        path = Path(lora_dir) / f"{name}.safetensors" if lora_dir else None
        if path is None or "/" in name or "\\" in name or not path.is_file():
            where = f"found in --lora-dir {lora_dir}" if lora_dir else "given"
            warnings.append(f"was made with LoRA {clip(name)} (scale {clip(scale)}"
                            f"{', hash ' + clip(wanted) if wanted else ''}), which is not {where}: the picture will differ unless you pass it with --lora FILE:"
                            f"{clip(scale)} (or --lora-dir DIR holding {clip(name)}.safetensors)")
            continue
        if wanted and not any(known.startswith(wanted) or wanted.startswith(known) for known in lora_hashes(path)):
            warnings.append(f"LoRA {path} does not match the hash {clip(wanted)} the picture names: not loaded; "
                            "pass the right file with --lora FILE:SCALE")
            continue
        found.append((str(path), float(scale)))
    return found, warnings
