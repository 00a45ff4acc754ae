"""The training pictures of textual inversion and their captions (diffusers' TextualInversionDataset).

    paths = find_pictures("pictures/")                       # sorted; NpdiffError when there are none
    check_same_size(paths)                                   # NpdiffError naming two sizes, unless mixed_sizes
    pixels = load_training_pictures(paths, size)             # [N,3,S,S] in [-1,1]
    latents = encode_training_latents(pipe.vae, pixels)      # [2,N,C,s,s]: as they are, and flipped

Each picture is center-cropped to a square (the largest one) and resized to the model's size with
bicubic resampling, as diffusers' script with --center_crop (its interpolation default is bicubic).
Pictures of mixed sizes are refused before any work (check_same_size reads the sizes from the files'
headers): a folder where one picture is 512x512 and another 1024x576 is most often a mistake (a stray file,
a picture not prepared like the others), and the centre crop would cut the wide one's sides without a word.
Pass mixed_sizes=True (`--mixed-sizes`) to take them anyway: each is then cropped and resized on its own.

Captions: the templates (default diffusers' object templates below) with the new word for "{}"; a picture
with a sidecar text file of the same name (`cat1.png` + `cat1.txt`, as kohya's scripts read captions) gets
the captions in it instead, one a line, each with "{}" where the word goes. LoRA training (lora_train.py)
reads the same files (sidecar_lines) as plain captions, without "{}", as kohya's scripts do.

Flips: diffusers' script flips each picture at random (p = 0.5) and encodes it with the VAE at every
step. Here each picture is encoded ONCE as it is and once flipped; each step then picks one of the two
at random: the same distribution of training latents without a VAE encode per step (the encoder is
~3x the UNet's cost at SD size).

Which latent: the posterior's MEAN (latent_dist.mean, times scaling_factor). diffusers' script takes
latent_dist.sample(), a fresh draw at every step; with the latents encoded once, one fixed draw would
be a fixed error in every step, whereas the mean is the centre those draws scatter around (SD's VAE
posterior std is small, ~1e-2 of the latents' scale).
"""

from pathlib import Path

import numpy as np

from npdiff.backend import to_numpy
from npdiff.errors import NpdiffError
from npdiff.images import load_image

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# diffusers' examples/textual_inversion/textual_inversion.py, imagenet_templates_small (learnable_property
# "object"); "{}" is the new word
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


def find_pictures(folder):
    """The picture files of `folder` (by suffix), sorted by name; NpdiffError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NpdiffError(f"training pictures: {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
    if not paths:
        raise NpdiffError(f"training pictures: no pictures ({', '.join(PICTURE_SUFFIXES)}) in {folder}")
    return paths


def check_same_size(paths, mixed_sizes=False):
    """Every picture's width x height from its file's header (nothing decoded) -> NpdiffError naming the first
    picture whose size differs from the first one's, unless mixed_sizes. A file that cannot be identified is
    left to load_training_pictures, which names it."""
    from PIL import Image, UnidentifiedImageError

    if mixed_sizes:
        return
    first = None
    for path in paths:
        try:
            with Image.open(path) as picture:
                size = picture.size                                     # (width, height)
        except (OSError, UnidentifiedImageError, ValueError):
            continue
        if first is None:
            first = (path, size)
        elif size != first[1]:
            (first_path, (w0, h0)), (w1, h1) = first, size
            raise NpdiffError(f"training pictures: {Path(path).name} is {w1}x{h1} pixels but {Path(first_path).name} "
                              f"is {w0}x{h0}: give pictures of one size (or --mixed-sizes / mixed_sizes=True to "
                              "center-crop and resize each on its own)")


def center_crop_resize(picture, size):
    """An RGB PIL picture -> its central square, resized to size x size (bicubic) -> uint8 [S,S,3]."""
    from PIL import Image

    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = picture.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)  # [S,S,3]


def load_training_pictures(paths, size):
    """Every picture (read, cropped, resized) -> float32 [N,3,S,S] in [-1,1]. A picture that cannot be read
    is an NpdiffError naming it (all are read before any training work)."""
    pictures = []
    for path in paths:
        picture = load_image(path, what="training picture")
        pixels = center_crop_resize(picture, size)                      # [S,S,3] uint8
        pictures.append(pixels.transpose(2, 0, 1))                      # [S,S,3] -> [3,S,S]
    stacked = np.stack(pictures).astype(np.float32)                     # [N,3,S,S] in [0,255]
    return stacked / np.float32(127.5) - np.float32(1.0)                # [N,3,S,S] in [-1,1]


def encode_training_latents(vae, pixels):
    """[N,3,S,S] pictures -> float32 [2,N,C,s,s]: the posterior means times scaling_factor, of the pictures
    as they are (index 0) and flipped left to right (index 1). One picture at a time (the VAE encoder's
    activations at 512x512 are ~2 GiB per picture)."""
    both = []
    for flipped in (False, True):
        latents = []
        for picture in pixels:
            view = picture[:, :, ::-1] if flipped else picture         # [3,S,S]
            batch = np.ascontiguousarray(view[None])                   # [1,3,S,S]
            mean = to_numpy(vae.encode(batch).mean)                    # [1,C,s,s]
            latents.append(np.asarray(mean, dtype=np.float32)[0] * np.float32(vae.scaling_factor))
        both.append(np.stack(latents))                                  # [N,C,s,s]
    return np.stack(both)                                               # [2,N,C,s,s]


def sidecar_lines(path):
    """The non-empty lines of the picture's caption file `<name>.txt`, or None when it has none; NpdiffError
    when it cannot be read or holds no caption."""
    sidecar = Path(path).with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        lines = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise NpdiffError(f"caption file {sidecar}: cannot be read ({exc})") from exc
    if not lines:
        raise NpdiffError(f"caption file {sidecar} is empty: give one caption a line")
    return lines


def picture_captions(paths, templates):
    """Each picture's caption templates: the lines of its sidecar `<name>.txt` when there is one (each line a
    caption with "{}" for the word, e.g. "a {} on a green background"), else `templates` -> tuples, one a
    picture."""
    captions = []
    for path in paths:
        lines = sidecar_lines(path)
        if lines is None:
            captions.append(templates)
        else:
            captions.append(check_templates(lines, Path(path).with_suffix(".txt")))
    return captions


def check_templates(templates, source="templates"):
    """Caption templates -> a tuple of strings, each with one "{}" where the new word goes."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise NpdiffError(f"{source}: give at least one caption template such as 'a photo of a {{}}'")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise NpdiffError(f"{source}: caption template {template!r} must be a string with one '{{}}' for "
                              "the new word")
        try:
            template.format("word")  # what each step does; "{0}", "{x}" or a lone "{" fail there
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise NpdiffError(f"{source}: caption template {template!r} is not a template with one '{{}}' "
                              f"for the new word ({type(exc).__name__}: {exc}); write other braces doubled, "
                              "'{{' and '}}'") from None
    return templates
