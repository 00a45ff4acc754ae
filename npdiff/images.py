"""Pictures in and out of the pipeline: arrays <-> PIL, PNG metadata, the "watch it emerge" grid.

  decoded_to_uint8(x)      VAE output [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], rounded as diffusers does
  to_pil(x)                the same, as a list of PIL images
  image_to_model_input(im) PIL / uint8 array / float array in [0,1] -> [1,3,H,W] float32 in [-1,1],
                           sides rounded down to a given multiple (the size rule), or resized to a
                           given height and width (diffusers' VaeImageProcessor.preprocess)
  mask_to_model_input(m)   an inpainting mask (PIL in any mode, or an array) -> [1,1,H,W] of 0/1, 1 =
                           repaint (diffusers' mask_processor: resize, grey, binarize at 0.5)
  load_image(path)         a picture file -> RGB PIL image; NpdiffError for corrupt, truncated, bomb, 16-bit
  save_png(im, path, p)    a PNG whose text chunk "npdiff" holds the generation parameters as JSON, and
                           "parameters" the same in AUTOMATIC1111's text form (npdiff.infotext)
                           (written atomically, npdiff/atomic_files.py: never a partial file)
  read_png_params(path)    those parameters back (npdiff's JSON, else AUTOMATIC1111's text), so a picture
                           can be regenerated from itself
  StepRecorder             a pipeline callback that keeps the latents every K steps
  emergence_grid(...)      those latents decoded side by side: the picture emerging from noise

PIL is imported inside the functions that need it, so `import npdiff.images` costs only NumPy.
"""

import json
from pathlib import Path
from struct import error as struct_error

import numpy as np

from npdiff import backend
from npdiff.atomic_files import atomic_write
from npdiff.errors import NpdiffError
from npdiff.infotext import format_infotext, other_tool, parse_infotext

PNG_PARAMS_KEY = "npdiff"  # the tEXt chunk keyword
A1111_PARAMS_KEY = "parameters"  # AUTOMATIC1111's text chunk


# ---------------------------------------------------------------------------------------------
# Arrays <-> PIL
# ---------------------------------------------------------------------------------------------
def decoded_to_float(x):
    """VAE output [B,3,H,W] in [-1,1] -> float32 [B,H,W,3] in [0,1] (diffusers' postprocess, 'np')."""
    x = backend.to_numpy(x)
    if x.ndim != 4 or x.shape[1] != 3:
        raise NpdiffError(f"images: expected decoded images [B,3,H,W], got shape {tuple(x.shape)}")
    x = np.clip(x / 2 + 0.5, 0.0, 1.0)  # [B,3,H,W] in [-1,1] -> [0,1]
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)  # [B,3,H,W] -> [B,H,W,3]


def decoded_to_uint8(x):
    """VAE output [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]: round(255 * clamp(x/2 + 0.5, 0, 1))."""
    return (decoded_to_float(x) * 255).round().astype(np.uint8)  # [B,H,W,3]


def to_pil(x):
    """VAE output [B,3,H,W] in [-1,1] -> list of B RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(picture) for picture in decoded_to_uint8(x)]


# Modes that become RGB without losing meaning; 16-bit and float pictures ("I", "I;16", "F") do not.
CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La", "RGBa")


def load_image(source, name=None, what="image"):
    """Open a picture for img2img or inpainting -> an RGB PIL image; NpdiffError naming it for anything else.

    source: a file path, or the file's bytes (npdiff batch sends them to its workers) with `name` to use in
    messages, and `what` the role ("image", "mask") messages name. Every entry point (the commands'
    --image/--mask, batch lines, the server) loads pictures here.
    Refused: a missing file or a folder, a file PIL cannot identify, a truncated or corrupt file, a
    decompression bomb (more pixels than PIL.Image.MAX_IMAGE_PIXELS, checked from the header before any
    pixel is decoded: PIL's warning is turned into an error too, so a 90-megapixel PNG of a few kilobytes
    cannot eat the memory), and modes that do not convert to 8-bit RGB.
    """
    import warnings
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        path, opened = (name or "picture"), BytesIO(source)
    else:
        path = Path(source)
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as exc:  # a name too long, a loop of links
            raise NpdiffError(f"{what} {str(path)[:200]}: cannot be looked up ({exc.strerror or exc})") from exc
        if not is_file:
            raise NpdiffError(f"{what} {path}: no such file" + (" (it is a folder)" if is_dir else ""))
        opened = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as picture:
                width, height, mode = picture.width, picture.height, picture.mode
                if mode not in CONVERTIBLE_MODES:
                    raise NpdiffError(f"{what} {path}: mode {mode!r} ({width}x{height} pixels) is not an "
                                      "8-bit picture; save it as 8-bit RGB (or grey) PNG/JPEG")
                picture.load()  # decode now: a truncated file fails here, not later
                return picture.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NpdiffError(f"{what} {path}: refusing a decompression bomb ({exc}); the limit is "
                          f"{Image.MAX_IMAGE_PIXELS} pixels") from exc
    except UnidentifiedImageError as exc:
        raise NpdiffError(f"{what} {path}: not a picture PIL can read (PNG, JPEG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, NpdiffError):
            raise
        raise NpdiffError(f"{what} {path}: corrupt or truncated picture file ({exc})") from exc


def decode_opened(image, what):
    """Decode a lazily opened PIL picture now: a truncated or corrupt one is an NpdiffError naming `what`."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, NpdiffError):
            raise
        name = getattr(image, "filename", "") or "the picture"
        raise NpdiffError(f"{what}: {name} is a corrupt or truncated picture ({exc})") from exc


def image_to_model_input(image, multiple=8, height=None, width=None):
    """An input picture -> float32 [1,3,H,W] in [-1,1] for vae.encode (diffusers' preprocess).

    image: a PIL image (converted to RGB), a uint8 array [H,W,3], or a float array [H,W,3] in [0,1].
    H and W are `height` and `width` when given (inpainting), else the picture's sides rounded down to
    multiples of `multiple` (the pipeline's size rule: 64 pixels for SD); the picture is resized to them
    with Lanczos, as diffusers does.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        raise NpdiffError(f"image: pass an opened picture (PIL.Image.open({str(image)!r})), not a path")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise NpdiffError(f"image: expected an array [H,W,3], got shape {image.shape}")
        if image.dtype == np.uint8:
            image = Image.fromarray(image)
        else:
            if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
                raise NpdiffError("image: a float array must hold values in [0, 1]")
            image = Image.fromarray((image * 255).round().astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise NpdiffError(f"image: expected a PIL image or a numpy array, got {type(image).__name__}")
    decode_opened(image, "image")  # a lazily opened, truncated file fails here as an NpdiffError
    if image.mode not in CONVERTIBLE_MODES:
        raise NpdiffError(f"image: mode {image.mode!r} ({image.width}x{image.height} pixels) is not an 8-bit "
                          "picture; convert it to RGB first")
    if height is None or width is None:
        width = image.width - image.width % multiple
        height = image.height - image.height % multiple
    if width == 0 or height == 0:
        raise NpdiffError(f"image: {image.width}x{image.height} pixels is smaller than "
                          f"{multiple}x{multiple}, the least picture this model takes")
    image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
    pixels = np.asarray(image).astype(np.float32) / 255.0  # [H,W,3] uint8 -> [0,1]
    pixels = pixels.transpose(2, 0, 1)[None]  # [H,W,3] -> [1,3,H,W]
    return np.ascontiguousarray(2.0 * pixels - 1.0, dtype=np.float32)  # [0,1] -> [-1,1]


def picture_size(picture):
    """(width, height) in pixels of a PIL image or an array [H,W,...]."""
    if isinstance(picture, np.ndarray):
        return int(picture.shape[1]), int(picture.shape[0])
    return picture.size


def resize_nearest(values, height, width):
    """[..., h0, w0] -> [..., height, width] by nearest neighbour, exactly as torch's F.interpolate
    (mode "nearest"): source index floor(i * (h0 / height)) in float32, at most h0 - 1."""
    def source_index(size_in, size_out):
        scale = np.float32(size_in) / np.float32(size_out)
        index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(index, size_in - 1)

    rows = source_index(values.shape[-2], height)
    columns = source_index(values.shape[-1], width)
    return values[..., rows[:, None], columns[None, :]]  # [..., h0, w0] -> [..., height, width]


def _mask_array_values(mask):
    """A mask array [H,W], [H,W,1], [H,W,3] or [H,W,4] -> float32 [H,W] in [0,1] (colour -> grey, alpha unused)."""
    if not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[2] in (1, 3, 4))) or 0 in mask.shape:
        raise NpdiffError(f"mask_image: expected an array [H,W] or [H,W,1|3|4], got shape {mask.shape}")
    if mask.ndim == 3:
        mask = mask[:, :, 0] if mask.shape[2] == 1 else mask[:, :, :3]  # [H,W,1] -> [H,W]; RGBA -> RGB
    if mask.dtype == np.bool_:
        values = mask.astype(np.float32)
    elif mask.dtype == np.uint8:
        values = mask.astype(np.float32) / 255.0
    elif mask.dtype.kind == "f":
        values = mask.astype(np.float32)
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
            raise NpdiffError("mask_image: a float array must hold values in [0, 1]")
    else:
        raise NpdiffError(f"mask_image: an array must be bool, uint8 (0-255) or float in [0, 1], got {mask.dtype}")
    if values.ndim == 3:  # RGB -> grey with the weights of PIL's convert("L") (ITU-R 601-2 luma)
        values = values @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [H,W,3] -> [H,W]
    return values


def mask_to_model_input(mask, height, width):
    """An inpainting mask -> float32 [1,1,height,width] of 0 (keep) and 1 (repaint): white = repaint.

    As diffusers' mask_processor (VaeImageProcessor with do_normalize=False, do_binarize=True,
    do_convert_grayscale=True) does it: a PIL image is resized with Lanczos in its own mode, made
    grey (convert("L")) and scaled to [0,1]; an array ([H,W], or [H,W,C] made grey; bool, uint8 0-255
    or float in [0,1]) is resized by nearest neighbour; then values >= 0.5 become 1, the rest 0.
    """
    from PIL import Image

    if isinstance(mask, (str, Path)):
        raise NpdiffError(f"mask_image: pass an opened picture (PIL.Image.open({str(mask)!r})), not a path")
    if isinstance(mask, Image.Image):
        decode_opened(mask, "mask_image")
        try:
            grey = mask.resize((width, height), resample=Image.LANCZOS).convert("L")  # [height,width] uint8
        except (ValueError, OSError) as exc:
            raise NpdiffError(f"mask_image: cannot resize a {mask.mode!r} picture to {width}x{height}: {exc}") from exc
        values = np.asarray(grey).astype(np.float32) / 255.0  # [height,width] in [0,1]
    elif isinstance(mask, np.ndarray):
        values = resize_nearest(_mask_array_values(mask), height, width)  # [H,W] -> [height,width]
    else:
        raise NpdiffError(f"mask_image: expected a PIL image or a numpy array, got {type(mask).__name__}")
    binary = (values >= 0.5).astype(np.float32)  # [height,width] of 0/1
    return binary[None, None]  # [height,width] -> [1,1,height,width]


# ---------------------------------------------------------------------------------------------
# PNG metadata
# ---------------------------------------------------------------------------------------------
def save_png(image, path, params=None):
    """Write `image` (PIL) to `path` (or a binary file) as PNG with `params` (a JSON-able dict) in two text chunks:

      "npdiff"      the parameters as JSON, which --reproduce reads first;
      "parameters"  the same as AUTOMATIC1111's text (npdiff.infotext), which other tools read.

    Neither holds a local path: the caller names the model by name and hash (npdiff.model_identity).
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if params is not None:
        try:
            # tEXt is Latin-1 only: ASCII JSON (\uXXXX escapes) keeps non-Latin prompts intact.
            text = json.dumps(params, ensure_ascii=True, sort_keys=True)
        except TypeError as exc:
            raise NpdiffError(f"save_png: params must be JSON-serialisable: {exc}") from exc
        infotext = format_infotext(params)
        if "\x00" in infotext:  # the PNG format forbids NUL in text chunks: refused, not written broken
            raise NpdiffError("save_png: the parameters hold a NUL character (in a prompt?); a PNG's text "
                              "cannot store one")
        info.add_text(PNG_PARAMS_KEY, text)
        # PIL writes a non-Latin-1 text as an iTXt chunk (UTF-8), as AUTOMATIC1111's own pictures do
        info.add_text(A1111_PARAMS_KEY, infotext)
    if not isinstance(path, (str, Path)):  # a binary file object (npdiff batch): the caller owns the file
        image.save(path, format="PNG", pnginfo=info)
        return path
    atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))  # no partial file
    return Path(path)


def png_text_chunks(path):
    """A PNG's text chunks {keyword: text}; NpdiffError when the file is not a readable PNG or declares
    more pixels than PIL's decompression-bomb limit (checked from the header, before any pixel is decoded).

    The chunks before the pixel data (where npdiff, AUTOMATIC1111 and PIL write them) are read without
    decoding the pixels; only a PNG holding neither parameter chunk there has its pixels decoded, to
    reach text chunks stored after them.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:  # reads the chunks before the pixel data, checks the size
                kind = picture.format
                chunks = {key: value for key, value in picture.info.items() if isinstance(value, str)}
                if kind == "PNG" and PNG_PARAMS_KEY not in chunks and A1111_PARAMS_KEY not in chunks:
                    chunks.update(picture.text)  # text chunks after the pixels (size already checked)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NpdiffError(f"{path}: refused, the picture is too large to be safe: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        raise NpdiffError(f"{path} is not a readable PNG: {exc}") from exc
    if kind != "PNG":
        raise NpdiffError(f"{path} is a {kind} picture, not a PNG")
    return chunks


def read_png_params(path):
    """The generation parameters stored in a PNG (a dict); NpdiffError if there are none.

    npdiff's own JSON chunk is preferred; else AUTOMATIC1111's "parameters" text is parsed
    (npdiff.infotext.parse_infotext), so pictures from other tools can be reproduced too: the dict then
    also holds "unmapped", the settings npdiff could not take over.
    """
    path = Path(path)
    if not path.is_file():
        raise NpdiffError(f"read_png_params: no such file {path}")
    chunks = png_text_chunks(path)
    text = chunks.get(PNG_PARAMS_KEY)
    if text is None and other_tool(chunks):  # Fooocus, ComfyUI, InvokeAI, NovelAI: refused in one line
        raise NpdiffError(f"{path} was made by {other_tool(chunks)}, whose settings npdiff cannot read; give "
                          "the prompt and options on the command line instead of --reproduce")
    if text is None:
        if A1111_PARAMS_KEY in chunks:
            return parse_infotext(chunks[A1111_PARAMS_KEY])
        raise NpdiffError(f"{path} carries no npdiff parameters (no PNG text chunk {PNG_PARAMS_KEY!r}, "
                          f"nor AUTOMATIC1111's {A1111_PARAMS_KEY!r})")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NpdiffError(f"{path}: the {PNG_PARAMS_KEY!r} text chunk is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # e.g. 100 000 nested "[": no parameters nest that deep
        raise NpdiffError(f"{path}: the {PNG_PARAMS_KEY!r} text chunk nests too deeply to be parameters") from exc
    except ValueError as exc:  # Python's int limit: an integer of over 4300 digits
        raise NpdiffError(f"{path}: the {PNG_PARAMS_KEY!r} text chunk holds an integer of over 4300 digits, "
                          "which no parameter is") from exc
    if not isinstance(params, dict):
        raise NpdiffError(f"{path}: the {PNG_PARAMS_KEY!r} text chunk holds a JSON {type(params).__name__}, "
                          "not an object of parameters")
    return params


# ---------------------------------------------------------------------------------------------
# Grids and "watch it emerge"
# ---------------------------------------------------------------------------------------------
def make_grid(images, columns=None, labels=None):
    """PIL images of one size -> one PIL image, `columns` per row (default: all in one row).

    labels: optional list of short strings drawn in the top-left corner of each cell.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise NpdiffError("make_grid: no images given")
    width, height = images[0].size
    columns = len(images) if columns is None else max(1, int(columns))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), color=(255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, picture in enumerate(images):
        left, top = (index % columns) * width, (index // columns) * height
        grid.paste(picture.convert("RGB"), (left, top))
        if labels is not None:
            draw.text((left + 2, top + 1), str(labels[index]), fill=(255, 255, 255), stroke_width=1,
                      stroke_fill=(0, 0, 0))
    return grid


class StepRecorder:
    """A pipeline callback that keeps a copy of the latents at every `every`-th call.

        recorder = StepRecorder()
        out = pipe("a cat", callback=recorder, callback_steps=5)
        emergence_grid(pipe, recorder).save("emerge.png")
    """

    def __init__(self):
        self.steps = []      # step index the pipeline passed
        self.timesteps = []  # scheduler timestep at that step
        self.latents = []    # numpy copies [B,4,h,w]

    def __call__(self, step, timestep, latents):
        self.steps.append(int(step))
        self.timesteps.append(float(timestep))
        self.latents.append(np.array(backend.to_numpy(latents), copy=True))


def emergence_grid(pipe, recorder, final_latents=None, image_index=0, labels=True, min_size=128):
    """Decode the recorded latents of picture `image_index` into one row: the image emerging from noise.

    pipe: anything with decode_latents(latents [B,4,h,w]) -> images [B,3,H,W] in [-1,1].
    final_latents: the output's .latents, appended as the last cell when given (and not recorded already).
    labels: write "step k" / "final" in each cell's corner.
    min_size: small pictures are enlarged (nearest neighbour, a whole factor) to at least this height.
    """
    if not recorder.latents:
        raise NpdiffError("emergence_grid: the recorder holds no steps (was it passed as callback=?)")
    cells = [lat[image_index:image_index + 1] for lat in recorder.latents]  # each [1,4,h,w]
    names = [f"step {s}" for s in recorder.steps]
    if final_latents is not None and not np.array_equal(recorder.latents[-1], final_latents):
        cells.append(np.asarray(final_latents)[image_index:image_index + 1])
        names.append("final")
    stacked = np.concatenate(cells, axis=0)  # [N,4,h,w]
    pictures = to_pil(pipe.decode_latents(stacked))  # [N,4,h,w] -> N PIL images
    factor = max(1, -(-min_size // pictures[0].height))  # ceil(min_size / height)
    if factor > 1:
        from PIL import Image

        pictures = [p.resize((p.width * factor, p.height * factor), resample=Image.NEAREST) for p in pictures]
    return make_grid(pictures, labels=names if labels else None)
