"""`npdiff batch`: picture sizes checked against the model before any worker loads it (its configs only).

    check_batch_size(defaults, model)           the batch's own --height/--width, once: NpdiffError naming the flags
    jobs = check_jobs_for_model(jobs, failures, model)   each line's size; a line the model refuses goes to failures

The pipeline's own rules, read from the model's configs (pipeline_utils.model_size_config): sides that are
multiples of its size rule (picture_size.size_rule), a picture within its self-attention limit
(memory_estimate.check_attention_size), and with hires_scale the second pass's size (hires.second_size).
"""

from npdiff.errors import NpdiffError, shorten
from npdiff.hires import second_size
from npdiff.memory_estimate import PictureSizeError, check_attention_size
from npdiff.option_numbers import integral, is_int
from npdiff.picture_size import check_size, size_rule
from npdiff.pipeline_utils import model_size_config

# What to lower when a picture is too large (memory_estimate.PictureSizeError), named as a line's keys
SIZE_HINTS = {"size": "lower 'height'/'width'", "hires_scale": "lower 'hires_scale'",
              "image": "use a smaller 'image' (img2img works at its size)"}
SIDE_KEYS = ("'height'", "'width'")
# ... and the batch's own --height/--width (check_batch_size)
BATCH_SIDE_NAMES = ("the batch's --height", "the batch's --width")
BATCH_SIZE_HINTS = {"size": "lower the batch's --height/--width"}


def check_batch_size(defaults, model):
    """The batch's own height/width (--height/--width: what a line leaves out), checked once against the model
    before any line is read: a size the model refuses is the command's error, named by its flags (checked per
    line it failed every line that took it, each blaming the line's 'height'/'width'). The side not given is
    the model's default, as for a line."""
    given = {side: defaults.get(side) for side in ("height", "width")}
    if given["height"] is None and given["width"] is None:
        return
    for side, name in zip(("height", "width"), BATCH_SIDE_NAMES):
        if given[side] is not None:
            number = integral(given[side])  # 64.0 -> 64, as on a line
            if not is_int(number) or number < 1:
                raise NpdiffError(f"{name} must be an integer >= 1, got {shorten(given[side])}")
            given[side] = number
            if given[side] % 8:
                raise NpdiffError(f"{name} must be a positive multiple of 8 (pixels), got {given[side]!r}")
    unet_config, vae_factor = model_size_config(model)
    try:
        check_sides(given, unet_config, vae_factor, BATCH_SIDE_NAMES)
    except PictureSizeError as exc:
        raise NpdiffError(exc.hinted(BATCH_SIZE_HINTS)) from None


def check_jobs_for_model(jobs, failures, model):
    """-> the jobs the model can draw, checked before any worker loads it; each other line's message goes into
    `failures` under its line number. Only the model's configs are read (pipeline_utils.model_size_config)."""
    unet_config, vae_factor = model_size_config(model)
    drawable = []
    for job in jobs:
        try:
            check_job_size(job, unet_config, vae_factor)
            drawable.append(job)
        except PictureSizeError as exc:
            failures[job.line] = exc.hinted(SIZE_HINTS)
        except NpdiffError as exc:
            failures[job.line] = str(exc)
    return drawable


def check_job_size(job, unet_config, vae_factor):
    """NpdiffError when the model cannot draw this line's picture, by the pipeline's own rules: sides that are
    not multiples of its size rule (picture_size.size_rule), a picture past its self-attention limit
    (memory_estimate.check_attention_size), and with hires_scale the second pass's size (hires.second_size)."""
    if job.command == "img2img":  # the picture's own size, rounded down to the size rule
        multiple, _ = size_rule(unet_config, vae_factor)
        size = picture_file_size(job.image)
        if size is not None:
            check_attention_size(unet_config, vae_factor, *(side - side % multiple for side in size), ("image",))
        return
    first = check_sides(job.options, unet_config, vae_factor, SIDE_KEYS)
    if job.options.get("hires_scale") is not None:
        second_size(unet_config, vae_factor, first, job.options["hires_scale"])


def check_sides(options, unet_config, vae_factor, names):
    """options' "height"/"width" (None: the model's default side, what the pipeline draws) by the model's size
    rule and its self-attention limit -> (height, width); names: the two sides as the messages call them."""
    multiple, why = size_rule(unet_config, vae_factor)
    default_side = unet_config["sample_size"] * vae_factor
    height, width = (default_side if options.get(side) is None else options[side] for side in ("height", "width"))
    first = check_size(height, width, multiple, why, names=names)
    check_attention_size(unet_config, vae_factor, *first)
    return first


def picture_file_size(path):
    """-> (height, width) of a picture file from its header, or None when npdiff.images.load_image will refuse it
    (not a picture, a decompression bomb: the worker that loads it says why, as for any line)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # as load_image: a bomb is its to refuse
            with Image.open(path) as picture:
                return picture.height, picture.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
