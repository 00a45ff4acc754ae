"""Read a generated picture back: background colour, shape colour and shape kind, by simple rules.

No learned model judges the shipped model: the rules below are a few lines a reader can check.
  1. background = the named colour nearest to the median of the 2-pixel border ring;
  2. shape pixels = pixels farther than 60 (RGB distance) from that median; keep the largest
     4-connected group of them;
  3. shape colour = the named colour nearest to the median of the group's pixels in a 5x5 window at
     its centroid (the centre region of the shape);
  4. shape kind from the fill ratio = group area / bounding-box area: a square fills ~1.0, a circle
     ~pi/4 = 0.785, an upright triangle ~0.5; split at 0.89 and 0.64.
"""

from collections import deque

import numpy as np

from shapes_data import COLORS

COLOR_NAMES = list(COLORS)
COLOR_TABLE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float64)  # [8,3]
SHAPE_THRESHOLD = 60.0
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.64


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
    """uint8 [H,W,3] -> dict(background, color, shape, fill_ratio); color/shape None if no shape found."""
    pixels = np.asarray(image, dtype=np.float64)  # [H,W,3]
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])  # [R,3]
    background_rgb = np.median(ring, axis=0)  # [3]
    result = dict(background=nearest_color(background_rgb), color=None, shape=None, fill_ratio=0.0)
    far = np.linalg.norm(pixels - background_rgb[None, None, :], axis=2) > SHAPE_THRESHOLD  # [H,W]
    shape_mask = largest_component(far)  # [H,W]
    area = int(shape_mask.sum())
    if area < 9:
        return result
    ys, xs = np.nonzero(shape_mask)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill_ratio = area / box_area
    center_y, center_x = int(round(ys.mean())), int(round(xs.mean()))
    window = np.zeros_like(shape_mask)
    window[max(0, center_y - 2):center_y + 3, max(0, center_x - 2):center_x + 3] = True
    centre_pixels = pixels[window & shape_mask]  # [K,3]
    if len(centre_pixels) == 0:
        centre_pixels = pixels[shape_mask]
    result["color"] = nearest_color(np.median(centre_pixels, axis=0))
    result["fill_ratio"] = float(fill_ratio)
    if fill_ratio >= SQUARE_MIN_FILL:
        result["shape"] = "square"
    elif fill_ratio >= CIRCLE_MIN_FILL:
        result["shape"] = "circle"
    else:
        result["shape"] = "triangle"
    return result


def score(pictures, specs):
    """Fraction of pictures whose background, centre colour (both together) and shape match the specs."""
    colors_right, shapes_right = 0, 0
    for picture, spec in zip(pictures, specs):
        found = classify_picture(picture)
        colors_right += found["background"] == spec["background"] and found["color"] == spec["color"]
        shapes_right += found["shape"] == spec["shape"]
    return dict(color_accuracy=colors_right / len(specs), shape_accuracy=shapes_right / len(specs))
