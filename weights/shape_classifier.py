"""Read a generated picture back: background colour, shape colour and shape kind, by simple rules.

No learned model judges the shipped model: the rules below are a few lines a reader can check.
  1. background = the named colour nearest to the median of the 2-pixel border ring;
  2. candidate shape pixels = pixels farther than 60 (RGB distance) from that median; keep the largest
     4-connected group of them;
  3. shape colour = the named colour nearest to the median of the group's pixels in a 5x5 window at
     its centroid (the centre region of the shape);
  4. the outline: pixels more than half way from the background colour to that centre colour
     (projected on the line between them), largest 4-connected group again: the 50% contour, which a
     soft (blurred) edge moves least;
  5. shape kind from two fill measures of the outline's bounding box (both halfway between the ideal
     values, so a soft edge or a clipped apex does not tip them):
       top share   = outline area in the top half of the box / outline area: an upright triangle
                     puts 1/4 of its area there, a circle or square 1/2: below 0.375 -> triangle;
       corner fill = the fraction of the four corner patches (a quarter of the box side each way)
                     covered: a square ~1, a circle ~0.1 (its edge misses the corners): above 0.55
                     -> square, else circle.
     The plain fill ratio (area / box area: square 1, circle 0.785, triangle 0.5) is reported too.
"""

from collections import deque

import numpy as np

from shapes_data import COLORS

COLOR_NAMES = list(COLORS)
COLOR_TABLE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float64)  # [8,3]
SHAPE_THRESHOLD = 60.0
TRIANGLE_MAX_TOP_SHARE = 0.375
SQUARE_MIN_CORNER_FILL = 0.55


def nearest_color(rgb):
    """[3] -> name of the nearest named colour."""
    distances = np.linalg.norm(COLOR_TABLE - np.asarray(rgb, dtype=np.float64)[None, :], axis=1)  # [8]
    return COLOR_NAMES[int(np.argmin(distances))]


def largest_component(mask):
    """bool [H,W] -> bool [H,W]: the largest 4-connected group of True pixels (all False if none)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)  # [H,W], 0 = unlabelled
    best_label, best_size, next_label = 0, 0, 1
    for start_y, start_x in zip(*np.nonzero(mask)):
        if labels[start_y, start_x]:
            continue
        labels[start_y, start_x] = next_label
        queue, size = deque([(start_y, start_x)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = next_label, size
        next_label += 1
    return labels == best_label if best_size else np.zeros_like(mask)


def classify_picture(image):
    """uint8 [H,W,3] -> dict(background, color, shape, fill_ratio, top_share, corner_fill, background_rgb,
    color_rgb); color, color_rgb and shape are None when no shape is found."""
    pixels = np.asarray(image, dtype=np.float64)  # [H,W,3]
    background_rgb = border_color(pixels)  # [3]
    result = dict(background=nearest_color(background_rgb), color=None, shape=None, fill_ratio=0.0,
                  background_rgb=background_rgb, color_rgb=None)
    far = np.linalg.norm(pixels - background_rgb[None, None, :], axis=2) > SHAPE_THRESHOLD  # [H,W]
    candidate = largest_component(far)  # [H,W]
    if candidate.sum() < 4:
        return result
    ys, xs = np.nonzero(candidate)
    center_y, center_x = int(round(ys.mean())), int(round(xs.mean()))
    window = np.zeros_like(candidate)
    window[max(0, center_y - 2):center_y + 3, max(0, center_x - 2):center_x + 3] = True
    centre_pixels = pixels[window & candidate]  # [K,3]
    if len(centre_pixels) == 0:
        centre_pixels = pixels[candidate]
    centre_rgb = np.median(centre_pixels, axis=0)  # [3]
    result["color"], result["color_rgb"] = nearest_color(centre_rgb), centre_rgb
    direction = centre_rgb - background_rgb  # [3]
    along = (pixels - background_rgb[None, None, :]) @ direction / max(direction @ direction, 1e-9)  # [H,W]
    outline = largest_component(along > 0.5)  # [H,W]
    area = int(outline.sum())
    if area < 4:
        outline, area = candidate, int(candidate.sum())
    ys, xs = np.nonzero(outline)
    box = outline[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)  # [h,w]
    height, width = box.shape
    result["fill_ratio"] = float(area / (height * width))
    # top share: the middle row of an odd-height box counts half to each half
    row_weights = np.clip((height / 2 - np.arange(height)), 0.0, 1.0)  # [h]: 1 above the middle, 0 below
    top_share = float((box.sum(axis=1) * row_weights).sum() / area)
    corner_h, corner_w = max(1, int(round(height / 4))), max(1, int(round(width / 4)))
    corners = [box[:corner_h, :corner_w], box[:corner_h, -corner_w:], box[-corner_h:, :corner_w],
               box[-corner_h:, -corner_w:]]
    corner_fill = float(np.mean([corner.mean() for corner in corners]))
    result["top_share"], result["corner_fill"] = top_share, corner_fill
    if top_share < TRIANGLE_MAX_TOP_SHARE:
        result["shape"] = "triangle"
    elif corner_fill > SQUARE_MIN_CORNER_FILL:
        result["shape"] = "square"
    else:
        result["shape"] = "circle"
    return result


def border_color(pixels):
    """float [H,W,3] -> [3]: the median colour of the 2-pixel border ring."""
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])  # [R,3]
    return np.median(ring, axis=0)


def shape_mask(image):
    """uint8 [H,W,3] -> bool [H,W]: the largest group of pixels far (> 60) from the border colour."""
    pixels = np.asarray(image, dtype=np.float64)  # [H,W,3]
    background_rgb = border_color(pixels)  # [3]
    return largest_component(np.linalg.norm(pixels - background_rgb[None, None, :], axis=2) > SHAPE_THRESHOLD)


def color_error(found, spec):
    """found: classify_picture's answer. -> RGB distance of the picture's background (border median)
    and shape centre (5x5 median) from the named colours of the spec, added: 0 for a picture drawn
    exactly in the prompt's colours. A missing shape counts as the largest distance, 255 * sqrt(3)."""
    background = np.linalg.norm(found["background_rgb"] - np.array(COLORS[spec["background"]]))
    if found["color_rgb"] is None:
        return float(background + 255 * np.sqrt(3))
    return float(background + np.linalg.norm(found["color_rgb"] - np.array(COLORS[spec["color"]])))


def iou(mask_a, mask_b):
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = np.logical_or(mask_a, mask_b).sum()
    return float(np.logical_and(mask_a, mask_b).sum() / union) if union else 0.0


def score(pictures, specs):
    """Fraction of pictures whose background, centre colour (both together) and shape match the specs,
    the shape mistakes counted by kind ("circle->square": asked for a circle, read a square) and the mean
    colour_error (RGB distance from the named colours, background + shape centre)."""
    colors_right, shapes_right, shape_mistakes, color_errors = 0, 0, {}, []
    for picture, spec in zip(pictures, specs):
        found = classify_picture(picture)
        color_errors.append(color_error(found, spec))
        colors_right += found["background"] == spec["background"] and found["color"] == spec["color"]
        shapes_right += found["shape"] == spec["shape"]
        if found["shape"] != spec["shape"]:
            mistake = f"{spec['shape']}->{found['shape']}"
            shape_mistakes[mistake] = shape_mistakes.get(mistake, 0) + 1
    return dict(color_accuracy=colors_right / len(specs), shape_accuracy=shapes_right / len(specs),
                shape_mistakes=dict(sorted(shape_mistakes.items())), color_error=float(np.mean(color_errors)))
