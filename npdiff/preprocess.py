"""Control pictures for ControlNet, made in NumPy: Canny edges, a line threshold, a Gaussian blur, resizing.

A ControlNet follows a map of the picture (edges, lines, depth, pose). The maps that need no neural
network are made here; a depth or pose map is made elsewhere and passed as a picture.

Versions, each beside a plain reference that loops over pixels as the algorithm is written:
  canny_ref   per-pixel Python loops: Sobel, non-maximum suppression, hysteresis by a stack
  canny       the same steps vectorised in NumPy, hysteresis in Numba (a stack over 8-neighbours)
Both follow OpenCV's cv2.Canny(image, low, high) (aperture 3, L1 gradient) step by step:
  1. Sobel 3x3 derivatives dx, dy with the border replicated (OpenCV's BORDER_REPLICATE).
  2. magnitude |dx| + |dy|; on a colour picture each pixel keeps the channel of largest magnitude
     (its dx and dy too; the first channel on a tie), as cv2.Canny does on an RGB array, which is what
     diffusers' ControlNet examples feed it (np.array(pil_image) straight into cv2.Canny).
  3. non-maximum suppression in OpenCV's sectors: with tan(22.5 deg) in 15-bit fixed point (13573),
     |dy| < 0.4142 |dx| compares with the left/right neighbours (> left, >= right), |dy| > 2.4142 |dx|
     with up/down (> up, >= down), otherwise with the diagonal the gradient points along (> both);
     a pixel stays a candidate if its magnitude is > low.
  4. hysteresis: candidates 8-connected to a candidate with magnitude > high are edges (255), the rest 0.
Thresholds are floored to integers (OpenCV: cvFloor) and swapped if low > high.
"""

import numpy as np
from PIL import Image

from .errors import NpdiffError

TAN_22_5_FIXED = 13573  # round(tan(22.5 deg) * 2**15), OpenCV's TG22
FIXED_SHIFT = 15


# ---------------------------------------------------------------------------------------------- inputs

def as_uint8_array(image, name="image"):
    """PIL picture or uint8 array [H,W] / [H,W,C] -> uint8 array [H,W,C] (C = 1 or 3)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if image.mode in ("L", "1", "I", "F") else "RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise NpdiffError(f"{name}: expected a uint8 array or a PIL picture, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]  # [H,W] -> [H,W,1]
    if array.ndim != 3 or array.shape[2] not in (1, 3) or array.shape[0] < 1 or array.shape[1] < 1:
        raise NpdiffError(f"{name}: expected a picture of shape [H,W], [H,W,1] or [H,W,3], got {array.shape}")
    return array


def check_thresholds(low_threshold, high_threshold):
    """-> (low, high) as OpenCV uses them: floored to integers, swapped if low > high."""
    for label, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if not np.isfinite(value) or value < 0:
            raise NpdiffError(f"canny: {label} must be a finite number >= 0, got {value!r}")
    low, high = int(np.floor(low_threshold)), int(np.floor(high_threshold))
    return (high, low) if low > high else (low, high)


def to_control_picture(edges):
    """uint8 [H,W] -> 3-channel PIL picture (control pipelines want RGB)."""
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))  # [H,W] -> [H,W,3]


# ------------------------------------------------------------------------------------------- canny_ref

def canny_ref(image, low_threshold=100, high_threshold=200):
    """Plain per-pixel Canny (slow: for tests on small pictures). -> uint8 [H,W] of 0/255."""
    pixels = as_uint8_array(image).astype(np.int64)  # [H,W,C]
    low, high = check_thresholds(low_threshold, high_threshold)
    height, width, channels = pixels.shape

    def at(y, x, c):  # BORDER_REPLICATE
        return pixels[min(max(y, 0), height - 1), min(max(x, 0), width - 1), c]

    # 1-2. Sobel derivatives and the L1 magnitude of the strongest channel
    dx = np.zeros((height, width), np.int64)
    dy = np.zeros((height, width), np.int64)
    magnitude = np.zeros((height + 2, width + 2), np.int64)  # a ring of zeros around the picture
    for y in range(height):
        for x in range(width):
            best = -1
            for c in range(channels):
                gx = (at(y - 1, x + 1, c) + 2 * at(y, x + 1, c) + at(y + 1, x + 1, c)
                      - at(y - 1, x - 1, c) - 2 * at(y, x - 1, c) - at(y + 1, x - 1, c))
                gy = (at(y + 1, x - 1, c) + 2 * at(y + 1, x, c) + at(y + 1, x + 1, c)
                      - at(y - 1, x - 1, c) - 2 * at(y - 1, x, c) - at(y - 1, x + 1, c))
                if abs(gx) + abs(gy) > best:
                    best, dx[y, x], dy[y, x] = abs(gx) + abs(gy), gx, gy
            magnitude[y + 1, x + 1] = best

    # 3. non-maximum suppression: candidates (1) and strong candidates (2)
    state = np.zeros((height, width), np.int8)
    for y in range(height):
        for x in range(width):
            m = magnitude[y + 1, x + 1]
            if m <= low:
                continue
            ax, ay = abs(dx[y, x]), abs(dy[y, x]) << FIXED_SHIFT
            tan22 = ax * TAN_22_5_FIXED
            tan67 = tan22 + (ax << (FIXED_SHIFT + 1))
            mag = lambda oy, ox: magnitude[y + 1 + oy, x + 1 + ox]  # noqa: E731
            if ay < tan22:
                keep = m > mag(0, -1) and m >= mag(0, 1)
            elif ay > tan67:
                keep = m > mag(-1, 0) and m >= mag(1, 0)
            else:
                s = -1 if (dx[y, x] < 0) != (dy[y, x] < 0) else 1
                keep = m > mag(-1, -s) and m > mag(1, s)
            if keep:
                state[y, x] = 2 if m > high else 1

    # 4. hysteresis: grow edges from the strong candidates over 8-connected candidates
    edges = np.zeros((height, width), np.uint8)
    stack = [(y, x) for y in range(height) for x in range(width) if state[y, x] == 2]
    for y, x in stack:
        edges[y, x] = 255
    while stack:
        y, x = stack.pop()
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                ny, nx = y + oy, x + ox
                if 0 <= ny < height and 0 <= nx < width and state[ny, nx] == 1 and edges[ny, nx] == 0:
                    edges[ny, nx] = 255
                    stack.append((ny, nx))
    return edges


# ----------------------------------------------------------------------------------------------- canny

def sobel_3x3(pixels):
    """uint8 [H,W,C] -> dx, dy int32 [H,W,C]: OpenCV's Sobel (aperture 3), border replicated."""
    padded = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")  # [H+2,W+2,C]
    smooth_rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]  # [H,W+2,C]: [1,2,1] down the columns
    dx = smooth_rows[:, 2:] - smooth_rows[:, :-2]  # [H,W,C]
    smooth_cols = padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]  # [H+2,W,C]: [1,2,1] along rows
    dy = smooth_cols[2:] - smooth_cols[:-2]  # [H,W,C]
    return dx, dy


def strongest_channel(dx, dy):
    """dx, dy [H,W,C] -> dx, dy, magnitude [H,W] of the channel with the largest |dx|+|dy| (first on ties)."""
    magnitude = np.abs(dx) + np.abs(dy)  # [H,W,C]
    best = np.argmax(magnitude, axis=2)[:, :, None]  # [H,W,1]: argmax returns the first maximum
    pick = lambda a: np.take_along_axis(a, best, axis=2)[:, :, 0]  # noqa: E731  [H,W,C] -> [H,W]
    return pick(dx), pick(dy), pick(magnitude)


def non_maximum_candidates(dx, dy, magnitude, low, high):
    """-> int8 [H,W]: 0 not an edge, 1 a candidate (> low, a local maximum), 2 a strong one (> high)."""
    height, width = magnitude.shape
    ring = np.pad(magnitude, 1)  # [H+2,W+2]: zeros around, as OpenCV's magnitude buffer

    def neighbour(oy, ox):  # [H,W]: magnitude at (y+oy, x+ox)
        return ring[1 + oy:1 + oy + height, 1 + ox:1 + ox + width]

    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << FIXED_SHIFT
    tan22 = ax * TAN_22_5_FIXED
    tan67 = tan22 + (ax << (FIXED_SHIFT + 1))
    horizontal = ay < tan22
    vertical = ~horizontal & (ay > tan67)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx < 0) == (dy < 0)  # gradient along the main diagonal (down-right in picture rows)

    keep_horizontal = (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1))
    keep_vertical = (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0))
    keep_main = (magnitude > neighbour(-1, -1)) & (magnitude > neighbour(1, 1))
    keep_anti = (magnitude > neighbour(-1, 1)) & (magnitude > neighbour(1, -1))
    keep = (horizontal & keep_horizontal) | (vertical & keep_vertical)
    keep |= diagonal & np.where(same_sign, keep_main, keep_anti)
    keep &= magnitude > low

    state = keep.astype(np.int8)  # [H,W]
    state[keep & (magnitude > high)] = 2
    return state


_hysteresis_compiled = None


def hysteresis(state):
    """int8 [H,W] of 0/1/2 -> uint8 [H,W]: 255 where 8-connected to a 2 through 1s and 2s."""
    global _hysteresis_compiled
    if _hysteresis_compiled is None:
        import numba  # compiled on first use: importing npdiff.preprocess stays NumPy-only

        @numba.njit(cache=False)
        def grow(state, edges, stack):
            height, width = state.shape
            top = 0
            for y in range(height):  # rows are contiguous: the scan runs along them
                for x in range(width):
                    if state[y, x] == 2:
                        edges[y, x] = 255
                        stack[top, 0] = y
                        stack[top, 1] = x
                        top += 1
            while top > 0:  # each pixel is pushed at most once: the stack holds H*W entries at most
                top -= 1
                y = stack[top, 0]
                x = stack[top, 1]
                for ny in range(max(y - 1, 0), min(y + 2, height)):
                    for nx in range(max(x - 1, 0), min(x + 2, width)):
                        if state[ny, nx] == 1 and edges[ny, nx] == 0:
                            edges[ny, nx] = 255
                            stack[top, 0] = ny
                            stack[top, 1] = nx
                            top += 1

        _hysteresis_compiled = grow
    edges = np.zeros(state.shape, np.uint8)  # [H,W]
    stack = np.empty((state.size, 2), np.int64)  # [H*W,2]
    _hysteresis_compiled(np.ascontiguousarray(state), edges, stack)
    return edges


def canny_array(image, low_threshold=100, high_threshold=200):
    """Canny edges as cv2.Canny(image, low, high) computes them. -> uint8 [H,W] of 0/255."""
    pixels = as_uint8_array(image)  # [H,W,C]
    low, high = check_thresholds(low_threshold, high_threshold)
    # 1. Sobel derivatives per channel
    dx, dy = sobel_3x3(pixels)  # [H,W,C] each
    # 2. the channel with the largest L1 magnitude
    dx, dy, magnitude = strongest_channel(dx, dy)  # [H,W] each
    # 3. non-maximum suppression and the two thresholds
    state = non_maximum_candidates(dx, dy, magnitude, low, high)  # [H,W]
    # 4. hysteresis
    return hysteresis(state)


def canny(image, low_threshold=100, high_threshold=200):
    """Canny edge map of a picture (PIL or uint8 array), as a 3-channel PIL picture: white edges on black."""
    return to_control_picture(canny_array(image, low_threshold, high_threshold))


# ------------------------------------------------------------------------------------ other cheap maps

def line_threshold(image, threshold=128, invert=True):
    """Scribble/lineart-style map: gray pixels darker than `threshold` (dark lines on white paper) become
    white lines on black (invert=True, what scribble ControlNets expect). -> 3-channel PIL picture.

    Gray as PIL's convert("L"), 0.299 R + 0.587 G + 0.114 B: the weights of OpenCV's cvtColor RGB2GRAY
    (each rounds in its own fixed point: within one level)."""
    pixels = as_uint8_array(image)  # [H,W,C]
    if not 0 <= threshold <= 255:
        raise NpdiffError(f"line_threshold: threshold must be within 0..255, got {threshold!r}")
    gray = np.asarray(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).convert("L"))  # [H,W]
    lines = gray < threshold if invert else gray >= threshold  # [H,W] bool
    return to_control_picture(np.where(lines, 255, 0).astype(np.uint8))


def resize_for_model(image, width, height):
    """Resize a control picture to the model's size (width x height pixels) as diffusers' image processor
    does for a control image: PIL's Lanczos on RGB. -> 3-channel PIL picture."""
    for label, value in (("width", width), ("height", height)):
        if int(value) != value or value < 8 or value % 8:
            raise NpdiffError(f"resize_for_model: {label} must be a multiple of 8 pixels, got {value!r}")
    if not isinstance(image, Image.Image):
        pixels = as_uint8_array(image)  # [H,W,C]
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return image.convert("RGB").resize((int(width), int(height)), Image.Resampling.LANCZOS)


def gaussian_kernel(sigma, kernel_size):
    """float64 [K]: OpenCV's getGaussianKernel(K, sigma) for sigma > 0: exp(-x^2 / (2 sigma^2)), summing to 1."""
    offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2  # [K]
    weights = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    return weights / weights.sum()


def gaussian_blur(image, sigma, kernel_size=None):
    """cv2.GaussianBlur(image, (K, K), sigma) for sigma > 0: separable, border reflected without repeating
    the edge pixel (OpenCV's BORDER_REFLECT_101). K defaults to OpenCV's choice, round(6 sigma + 1) made odd
    for uint8 pictures (round(8 sigma + 1) for float). uint8 in -> uint8 out rounded (OpenCV's 8-bit path rounds
    in fixed point: within 2 levels, ~88% equal); float32 in -> float32 out. -> array [H,W] or [H,W,C] as given."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype not in (np.uint8, np.float32) or pixels.ndim not in (2, 3):
        raise NpdiffError(f"gaussian_blur: expected a uint8 or float32 picture [H,W] or [H,W,C], got "
                          f"{pixels.dtype} {pixels.shape}")
    if not np.isfinite(sigma) or sigma <= 0:
        raise NpdiffError(f"gaussian_blur: sigma must be > 0, got {sigma!r}")
    if kernel_size is None:
        kernel_size = int(np.floor(sigma * (3 if pixels.dtype == np.uint8 else 4) * 2 + 1 + 0.5)) | 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise NpdiffError(f"gaussian_blur: kernel_size must be odd and >= 1, got {kernel_size!r}")
    weights = gaussian_kernel(sigma, kernel_size)  # [K]
    radius = kernel_size // 2
    planes = pixels.astype(np.float64)
    planes = planes[:, :, None] if planes.ndim == 2 else planes  # [H,W,C]
    if radius >= min(planes.shape[:2]):
        raise NpdiffError(f"gaussian_blur: kernel_size {kernel_size} is too large for a "
                          f"{planes.shape[1]}x{planes.shape[0]} picture")
    # 1. along rows (x), then 2. along columns (y), each over the reflected border
    padded = np.pad(planes, ((0, 0), (radius, radius), (0, 0)), mode="reflect")  # [H,W+2r,C]
    across = sum(weights[k] * padded[:, k:k + planes.shape[1]] for k in range(kernel_size))  # [H,W,C]
    padded = np.pad(across, ((radius, radius), (0, 0), (0, 0)), mode="reflect")  # [H+2r,W,C]
    blurred = sum(weights[k] * padded[k:k + planes.shape[0]] for k in range(kernel_size))  # [H,W,C]
    blurred = blurred.reshape(pixels.shape)
    if pixels.dtype == np.uint8:
        return np.clip(np.floor(blurred + 0.5), 0, 255).astype(np.uint8)
    return blurred.astype(np.float32)
