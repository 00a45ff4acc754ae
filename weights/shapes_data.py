"""The shapes dataset: one flat-coloured shape on a plain background, with a caption.

Every picture is drawn with Pillow from a seed (nothing is stored): a circle, square or triangle in one
of eight named colours, of varied size and position, on a background of another named colour. Shapes
are axis-aligned (squares unrotated, triangles upright) so that the fill ratio of the shape's bounding
box tells them apart (weights/shape_classifier.py reads them back: a triangle holds 1/4 of its area in
the top half of its box, a square fills the corners of its box, a circle does not).

Captions come in a few variants so that the text encoder has to read the words, not their slots:
    "a red circle on a blue background"                (canonical; the tests prompt with it)
    "a large red circle on a blue background"          (size word)
    "a red circle on the left of a blue background"    (position word)
    "a blue background with a red circle"              (background first)
    "red circle, blue background"                      (terse)
and, for an optional last stage of training (train.py --caption-steps; not in the shipped run), partial
captions that name only part of the picture, so that a short prompt such as "red" means something:
    "a red circle"   "red"   "blue"   "a blue background"   "a circle"

    python weights/shapes_data.py --out grid.png      # a contact sheet of 64 examples
"""

import argparse

import numpy as np
from PIL import Image, ImageDraw

# Named colours: far apart in RGB so that a nearest-colour classifier is unambiguous.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "cyan": (40, 220, 230),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw 4x larger, then downsample: anti-aliased edges like a real picture
# Shape side in pixels (at 32x32). The smallest is 12: the VAE downsamples 4x, so a 12-pixel shape is three
# latent pixels wide; at 9-11 pixels (under three) the first VAE's reconstructions kept the shape only 70%
# of the time (against 89% at 12-14 and 100% from 15 up; weights/README.md).
SIZE_RANGE = (12, 24)
SMALL_MAX = 17  # small <= 17 < large: splits SIZE_RANGE in half


def position_word(center_x, center_y, size=IMAGE_SIZE):
    """'left'/'right'/'top'/'bottom'/'center' from the shape's centre (the strongest offset wins)."""
    dx = (center_x - size / 2) / size
    dy = (center_y - size / 2) / size
    if max(abs(dx), abs(dy)) < 0.1:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


FULL_CAPTIONS = 5  # variants 0..4 describe the whole picture
CAPTION_VARIANTS = 10  # variants 5..9 describe part of it


def caption_for(shape, color, background, side, center_x, center_y, variant):
    """One of CAPTION_VARIANTS caption templates for the same picture: 0..4 whole, 5..9 partial."""
    if variant == 0:
        return f"a {color} {shape} on a {background} background"
    if variant == 1:
        size_word = "small" if side <= SMALL_MAX else "large"
        return f"a {size_word} {color} {shape} on a {background} background"
    if variant == 2:
        where = position_word(center_x, center_y)
        if where == "center":
            return f"a {color} {shape} in the center of a {background} background"
        return f"a {color} {shape} on the {where} of a {background} background"
    if variant == 3:
        return f"a {background} background with a {color} {shape}"
    if variant == 4:
        return f"{color} {shape}, {background} background"
    partial = [f"a {color} {shape}", color, background, f"a {background} background", f"a {shape}"]
    return partial[variant - FULL_CAPTIONS]


def draw_shape(shape, color, background, side, center_x, center_y, size=IMAGE_SIZE):
    """-> PIL RGB image size x size with one shape of bounding box side x side centred at (cx, cy)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[background])
    draw = ImageDraw.Draw(image)
    half = side * SUPERSAMPLE / 2
    cx, cy = center_x * SUPERSAMPLE, center_y * SUPERSAMPLE
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:  # upright triangle: apex at top centre, base along the bottom of the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=COLORS[color])
    return image.resize((size, size), Image.Resampling.BOX)


def sample_spec(rng):
    """Random (shape, colour, background, side, cx, cy) with background != colour."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color_index = rng.integers(len(COLOR_NAMES))
    background_index = (color_index + 1 + rng.integers(len(COLOR_NAMES) - 1)) % len(COLOR_NAMES)
    side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    margin = side / 2 + 1
    center_x = float(rng.uniform(margin, IMAGE_SIZE - margin))
    center_y = float(rng.uniform(margin, IMAGE_SIZE - margin))
    return shape, COLOR_NAMES[color_index], COLOR_NAMES[background_index], side, center_x, center_y


def random_prompts(count, seed):
    """-> (prompts, specs): canonical captions for random (shape, colour, background) with colour != bg;
    what weights/evaluate.py and tests/pipeline/test_shipped_model.py prompt with."""
    rng = np.random.default_rng(seed)
    prompts, specs = [], []
    for _ in range(count):
        shape, color, background, _, _, _ = sample_spec(rng)
        prompts.append(f"a {color} {shape} on a {background} background")
        specs.append(dict(shape=shape, color=color, background=background))
    return prompts, specs


def unrelated_colors(specs, seed):
    """-> one colour name per spec that is neither its shape's colour nor its background (a negative
    prompt that should leave the picture as prompted)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for spec in specs:
        others = [name for name in COLOR_NAMES if name not in (spec["color"], spec["background"])]
        chosen.append(others[rng.integers(len(others))])
    return chosen


def make_dataset(count, seed):
    """-> (images uint8 [N,32,32,3], captions list of N variant lists, specs list of N dicts).

    Each picture keeps all CAPTION_VARIANTS captions; training picks one per step, so the same latent is
    seen with several wordings.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # [N,H,W,3]
    captions, specs = [], []
    for i in range(count):
        shape, color, background, side, center_x, center_y = sample_spec(rng)
        images[i] = np.asarray(draw_shape(shape, color, background, side, center_x, center_y))
        captions.append([caption_for(shape, color, background, side, center_x, center_y, variant)
                         for variant in range(CAPTION_VARIANTS)])
        specs.append(dict(shape=shape, color=color, background=background, side=side,
                          center_x=center_x, center_y=center_y))
    return images, captions, specs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="shapes_examples.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, captions, _ = make_dataset(64, args.seed)
    sheet = Image.new("RGB", (8 * IMAGE_SIZE, 8 * IMAGE_SIZE))
    for i in range(64):
        sheet.paste(Image.fromarray(images[i]), ((i % 8) * IMAGE_SIZE, (i // 8) * IMAGE_SIZE))
    sheet.save(args.out)
    for i in range(8):
        print(captions[i])


if __name__ == "__main__":
    main()
