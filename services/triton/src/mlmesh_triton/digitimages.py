"""Digit images for the ``digitclip`` encoder: decoding, captions, the split.

One module serves three places, so they cannot drift apart: the Triton model
(the build copies this file beside its ``model.py``; it imports nothing from
``mlmesh_triton`` and needs only numpy and Pillow there), the build that
trains the encoder, and callers and tests that need images it understands.

What an image must look like: a PNG or JPEG of a single digit drawn LIGHT on a
DARK background (ink bright, paper black, as in scikit-learn's digits, whose
value 16 is ink), roughly centred and filling a roughly square frame. It is
shrunk to 8x8 by area averaging, so a small or off-centre digit, or dark ink on
white paper, looks like nothing the encoder was trained on (invert it first).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SIDE = 8  # scikit-learn's digits are 8x8
INK_MAX = 16.0  # ... with values 0 (background) to 16 (ink)
MAX_IMAGE_BYTES = 1024 * 1024
MAX_IMAGE_SIDE = 4096
FORMATS = ("PNG", "JPEG")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words and numerals both, so a query phrased either way finds the digit.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a scanned handwritten number {word}",
    "an image of the number {digit}",
)
CAPTIONS: dict[int, tuple[str, ...]] = {
    digit: tuple(t.format(word=word, digit=digit) for t in CAPTION_TEMPLATES)
    for digit, word in enumerate(DIGIT_WORDS)
}

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 13


# What Pillow raises on malformed files, besides its own named errors.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


class ImageRejected(ValueError):
    """The bytes are not an image the encoder takes; the message says why."""


def captions_of(digit: int) -> list[str]:
    """The captions the encoder was trained to sit near for ``digit``."""
    return list(CAPTIONS[digit])


def pixels_of(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> float32 [8, 8] on scikit-learn's 0..16 ink scale.

    Refuses, with ImageRejected, anything over MAX_IMAGE_BYTES, any other
    format, a header claiming more than MAX_IMAGE_SIDE pixels a side (checked
    before decoding: a small file can claim a huge canvas) and undecodable
    bytes. Colour is converted to grayscale; the image is shrunk to 8x8 by
    area averaging (a non-square one is squashed).
    """
    if not isinstance(data, bytes):
        raise ImageRejected(f"expected image file bytes, got {type(data).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} allowed")
    try:
        # Lazy: reads the header (and PNG chunks before the pixels) only.
        # Pillow itself refuses (or warns about) canvases far beyond ours.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected("not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"image is absurdly large: {error}") from None
    except _DECODE_ERRORS as error:  # e.g. a text chunk that inflates too far
        raise ImageRejected(f"cannot read the image header: {error}") from None
    width, height = image.size
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise ImageRejected(
            f"image is {width}x{height} pixels; at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} allowed"
        )
    try:
        gray = image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    except _DECODE_ERRORS as error:  # truncated or corrupt data
        raise ImageRejected(f"cannot decode the {image.format} image: {error}") from None
    return np.asarray(gray, dtype=np.float32) * (INK_MAX / 255.0)


def png_of(pixels: np.ndarray, scale: int = 4) -> bytes:
    """A grayscale PNG of an 8x8 digit on the 0..16 scale, each pixel a
    ``scale`` x ``scale`` block; pixels_of() maps it back to within 16/510."""
    values = np.asarray(pixels, dtype=np.float64).reshape(SIDE, SIDE)
    if scale < 1:
        raise ValueError(f"scale must be at least 1, not {scale}")
    gray = np.rint(np.clip(values, 0.0, INK_MAX) * (255.0 / INK_MAX)).astype(np.uint8)
    big = np.kron(gray, np.ones((scale, scale), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(big).save(out, format="PNG")  # uint8 2-D: mode "L"
    return out.getvalue()


def held_out_split() -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) into scikit-learn's load_digits(): a fixed,
    seeded, stratified 20% held out from training, for honest evaluation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(
        np.arange(len(target)),
        test_size=HELD_OUT_FRACTION,
        random_state=SPLIT_SEED,
        stratify=target,
    )
    return np.sort(train), np.sort(test)


def tower_input(pixels: np.ndarray) -> np.ndarray:
    """[n, 8, 8] on the 0..16 scale -> float32 [n, 64] in 0..1: what the image
    tower reads, in training and in serving alike."""
    return np.asarray(pixels, dtype=np.float32).reshape(len(pixels), SIDE * SIDE) / INK_MAX


@dataclass(frozen=True)
class ImageTower:
    """The image encoder: [n, 8, 8] (0..16) -> L2-normalized float32 [n, 384].

    A two-layer perceptron, 64 -> hidden (ReLU) -> 384, which the build
    trains; numpy only, so Triton's model needs no torch for it.
    """

    w1: np.ndarray  # [64, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden, 384]
    b2: np.ndarray  # [384]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        hidden = np.maximum(tower_input(pixels) @ self.w1 + self.b1, 0.0)
        out = hidden @ self.w2 + self.b2
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        np.savez(path, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    @classmethod
    def load(cls, path: str | Path) -> ImageTower:
        with np.load(path) as saved:
            return cls(saved["w1"], saved["b1"], saved["w2"], saved["b2"])
