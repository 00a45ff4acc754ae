"""npdiff.preprocess against OpenCV (opencv-python-headless, the reference) on pictures drawn here."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from npdiff.errors import NpdiffError
from npdiff.preprocess import canny, canny_array, canny_ref, line_threshold, resize_for_model

import cv2  # in the test extra: opencv-python-headless


def random_colour(rng):
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def drawn_picture(rng, width=96, height=80, noise=20):
    """Shapes, lines and text on a plain background, plus uniform noise of +-noise levels. -> uint8 [H,W,3]."""
    image = Image.new("RGB", (width, height), random_colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        box = (x0, y0, x0 + int(rng.integers(5, 40)), y0 + int(rng.integers(5, 40)))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=random_colour(rng))
        else:
            draw.rectangle(box, fill=random_colour(rng))
        ends = [int(v) for v in rng.integers(0, min(width, height), 4)]
        draw.line(ends, fill=random_colour(rng), width=int(rng.integers(1, 4)))
    draw.text((int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))), "npdiff 23",
              fill=random_colour(rng))
    pixels = np.asarray(image).astype(np.int64)
    pixels = pixels + rng.integers(-noise, noise + 1, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("thresholds", [(100, 200), (50, 120), (20.7, 60.2), (200, 100)])
def test_canny_equals_opencv(rng, thresholds):
    """Colour pictures (as diffusers' examples feed cv2.Canny), their gray versions, several thresholds."""
    low, high = thresholds
    for _ in range(4):
        picture = drawn_picture(rng)
        for pixels in (picture, cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY)):
            expected = cv2.Canny(pixels, low, high)  # [H,W] uint8 0/255
            ours = canny_array(pixels, low, high)
            assert expected.mean() > 5, "the drawn picture has too few edges to compare"
            agreement = (ours == expected).mean()
            assert agreement >= 0.99, f"{agreement:.4f} of pixels agree with cv2.Canny"


def test_canny_reference_equals_opencv(rng):
    """The per-pixel reference (small pictures: it is slow) against OpenCV and the fast version."""
    picture = drawn_picture(rng, width=40, height=32, noise=30)
    expected = cv2.Canny(picture, 100, 200)
    reference = canny_ref(picture, 100, 200)
    assert (reference == expected).mean() >= 0.99
    assert np.array_equal(reference, canny_array(picture, 100, 200))


def test_canny_picture_is_three_channel_and_accepts_pil(rng):
    picture = drawn_picture(rng)
    edges = canny(Image.fromarray(picture))
    assert edges.mode == "RGB" and edges.size == (96, 80)
    channels = np.asarray(edges)  # [H,W,3]
    assert np.array_equal(channels[:, :, 0], cv2.Canny(picture, 100, 200))
    assert np.array_equal(channels[:, :, 0], channels[:, :, 2])


def test_line_threshold_against_opencv_gray(rng):
    """Dark lines on white -> white lines on black; gray as cv2.cvtColor within one level."""
    picture = drawn_picture(rng, noise=0)
    gray_cv = cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY).astype(np.int64)
    lines = np.asarray(line_threshold(picture, threshold=128))[:, :, 0]
    far_from_threshold = np.abs(gray_cv - 128) > 1
    expected = np.where(gray_cv < 128, 255, 0)
    assert np.array_equal(lines[far_from_threshold], expected[far_from_threshold])


def test_resize_for_model():
    picture = np.zeros((50, 70, 3), np.uint8)
    resized = resize_for_model(picture, 64, 32)
    assert resized.size == (64, 32) and resized.mode == "RGB"


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((0, 8), np.uint8)])
def test_bad_pictures(bad):
    with pytest.raises(NpdiffError):
        canny(bad)


def test_bad_thresholds():
    with pytest.raises(NpdiffError, match="low_threshold"):
        canny(np.zeros((8, 8), np.uint8), low_threshold=-1)
    with pytest.raises(NpdiffError, match="width"):
        resize_for_model(np.zeros((8, 8), np.uint8), 30, 32)


@pytest.mark.parametrize("sigma", [0.8, 1.5, 3.0])
def test_gaussian_blur_equals_opencv(rng, sigma):
    """float32 within 1e-5 of cv2.GaussianBlur; uint8 within 2 levels and mostly equal (OpenCV's 8-bit path
    rounds the kernel and the row sums in fixed point: ~88% of pixels equal, the rest 1-2 off)."""
    from npdiff.preprocess import gaussian_blur
    picture = drawn_picture(rng, noise=40)
    smooth = rng.random((40, 56)).astype(np.float32)
    expected = cv2.GaussianBlur(smooth, (0, 0), sigma)
    ours = gaussian_blur(smooth, sigma)
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) <= 1e-5
    expected_u8 = cv2.GaussianBlur(picture, (0, 0), sigma).astype(np.int64)
    difference = np.abs(gaussian_blur(picture, sigma).astype(np.int64) - expected_u8)
    assert difference.max() <= 2 and (difference == 0).mean() >= 0.8, (difference.max(), (difference == 0).mean())
    expected_5 = cv2.GaussianBlur(smooth, (5, 5), sigma)
    assert np.linalg.norm(gaussian_blur(smooth, sigma, kernel_size=5) - expected_5) / np.linalg.norm(expected_5) <= 1e-5
