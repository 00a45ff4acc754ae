"""What textual inversion writes: the learned embedding (two layouts), checkpoints, the loss log and plot.
Every file is written atomically (npdiff/atomic_files.py): a crash never leaves half a file.

    out                        diffusers' learned_embeds.safetensors layout: {token: [N,C]}; read by
                               pipe.load_textual_inversion and diffusers' load_textual_inversion; webui
                               reads it too (one tensor: the word is the file's name)
    <stem>-a1111.safetensors   {"emb_params": [N,C]}: the flat .safetensors form of A1111's
                               string_to_param {"*": [N,C]} (kohya's scripts write it so); read by webui
                               (the word is the file's name), npdiff, and diffusers with token=
    <stem>.checkpoint.safetensors  the vectors, AdamW's moments and the losses so far; the settings in the
                               file's metadata ("npdiff_training", JSON): --resume reads it
    <stem>.loss.csv / .loss.png    the loss per step, and its plot (with a running mean)
"""

import json
from pathlib import Path

import numpy as np

from npdiff.atomic_files import atomic_write, same_place
from npdiff.errors import NpdiffError

CHECKPOINT_KEY = "npdiff_training"  # the metadata entry holding the settings, JSON
A1111_KEY = "emb_params"


def output_paths(out):
    """-> {"embedding", "a1111", "checkpoint", "loss_csv", "loss_png"} for the --out file `out`."""
    out = Path(out)
    stem = out.name.removesuffix(".safetensors")
    folder = out.parent
    return {"embedding": out, "a1111": folder / f"{stem}-a1111.safetensors",
            "checkpoint": folder / f"{stem}.checkpoint.safetensors",
            "loss_csv": folder / f"{stem}.loss.csv", "loss_png": folder / f"{stem}.loss.png"}


def check_outputs_apart(paths, folder, model=None, what="output"):
    """NpdiffError when an output file would be written into the pictures' `folder` (it could overwrite a picture
    or caption, and its loss plot .png would be read as a training picture by the next run) or over the `model`
    file (a single-file checkpoint); before any work."""
    for path in paths:
        if same_place(Path(path).parent or ".", folder):
            raise NpdiffError(f"{what} {path} is in the training pictures' folder {folder}: write the results "
                              "elsewhere (they could overwrite a picture, and the loss plot would be read as a "
                              "training picture next time)")
        if model is not None and same_place(path, model):
            raise NpdiffError(f"{what} {path} is the model file {model}: writing there would destroy the model")


def write_safetensors(path, tensors, metadata=None):
    from safetensors.numpy import save

    data = save({key: np.require(value, requirements="C") for key, value in tensors.items()}, metadata=metadata)  # 0-d stays 0-d
    atomic_write(path, lambda handle: handle.write(data))
    return Path(path)


def save_embedding(paths, token, vectors):
    """The learned vectors [N,C] in diffusers' and A1111's layouts -> the two paths."""
    vectors = np.asarray(vectors, dtype=np.float32)                     # [N,C]
    write_safetensors(paths["embedding"], {token: vectors})
    write_safetensors(paths["a1111"], {A1111_KEY: vectors})
    return paths["embedding"], paths["a1111"]


def save_checkpoint(path, settings, vectors, optimizer, losses):
    """settings (JSON-able dict incl. "step"), vectors [N,C], the AdamW state and the losses so far."""
    arrays, numbers = optimizer.state()
    tensors = {"vectors": vectors, **arrays, "losses": np.asarray(losses, dtype=np.float64)}
    metadata = {CHECKPOINT_KEY: json.dumps(dict(settings, **numbers), sort_keys=True)}
    return write_safetensors(path, tensors, metadata)


def load_checkpoint(path):
    """-> (settings dict, {"vectors", "exp_avg", "exp_avg_sq", "losses"} arrays); NpdiffError naming the file
    when it is not an npdiff training checkpoint."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NpdiffError(f"--resume {path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:  # TypeError: a bfloat16 tensor (numpy has none)
        raise NpdiffError(f"--resume {path}: not a readable .safetensors file ({exc})") from exc
    expected = {"vectors", "exp_avg", "exp_avg_sq", "losses"}
    if CHECKPOINT_KEY not in metadata or set(arrays) != expected:
        raise NpdiffError(f"--resume {path}: not an npdiff training checkpoint (expected the tensors "
                          f"{sorted(expected)} and the metadata {CHECKPOINT_KEY!r}; found {sorted(arrays)})")
    return check_checkpoint(path, metadata[CHECKPOINT_KEY], arrays), arrays


def check_checkpoint(path, settings_text, arrays):
    """The checkpoint's settings (JSON text) -> a dict; NpdiffError naming what is damaged: settings that are not
    a JSON object with integer "step" and "step_count", tensors that are not float or hold NaN/Inf, losses that
    are not one number a step, or a negative second moment (its square root would be NaN at the first step)."""
    where = f"--resume {path}: a damaged checkpoint:"
    try:
        settings = json.loads(settings_text)
    except ValueError as exc:  # JSONDecodeError, and an integer of over 4300 digits (Python's int limit)
        raise NpdiffError(f"{where} its {CHECKPOINT_KEY!r} metadata is not JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise NpdiffError(f"{where} its {CHECKPOINT_KEY!r} metadata is a JSON {type(settings).__name__}, not an "
                          "object")
    for name in ("step", "step_count"):
        value = settings.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise NpdiffError(f"{where} {name} is {value!r}; expected an integer >= 0")
    for name, values in arrays.items():
        if values.dtype.kind != "f":
            raise NpdiffError(f"{where} {name!r} holds {values.dtype} values; expected floats")
        if not np.isfinite(values).all():
            raise NpdiffError(f"{where} {name!r} holds NaN or Inf")
    if arrays["losses"].ndim != 1:
        raise NpdiffError(f"{where} 'losses' has shape {arrays['losses'].shape}; expected one loss a step")
    if (arrays["exp_avg_sq"] < 0).any():
        raise NpdiffError(f"{where} 'exp_avg_sq' (AdamW's second moment) holds negative values")
    return settings


def write_loss_csv(path, losses):
    lines = ["step,loss"] + [f"{step},{loss:.8g}" for step, loss in enumerate(losses, start=1)]
    atomic_write(path, lambda handle: handle.write("\n".join(lines) + "\n"), mode="w")


def running_mean(values, window):
    """The mean of the last `window` values at each position (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))                   # [n+1]
    ends = np.arange(1, len(values) + 1)                                # [n]
    starts = np.maximum(ends - window, 0)                               # [n]
    return (sums[ends] - sums[starts]) / (ends - starts)                # [n]


def write_loss_png(path, losses, width=640, height=360, margin=48):
    """The loss per step (grey) and its running mean over ~5% of the steps, at least 5 (blue), drawn with Pillow."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) == 1:
        losses = np.repeat(losses, 2)  # a line needs two points
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = margin, margin // 2, width - margin // 2, height - margin
    draw.rectangle([left, top, right, bottom], outline="black")
    low, high = float(losses.min()), float(losses.max())
    span = high - low if high > low else 1.0

    def points(values):
        xs = left + (right - left) * np.arange(len(values)) / max(len(values) - 1, 1)
        ys = bottom - (bottom - top) * (values - low) / span
        return list(zip(xs.tolist(), ys.tolist()))

    window = min(len(losses), max(5, len(losses) // 20))
    draw.line(points(losses), fill=(170, 170, 170), width=1)
    draw.line(points(running_mean(losses, window)), fill=(30, 80, 200), width=2)
    draw.text((left, 4), f"loss per step (grey), mean of the last {window} (blue)", fill="black")
    draw.text((4, top), f"{high:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill="black")
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
