"""digitclip: the build's held-out retrieval, the image decoding the Triton
model shares with callers, and the model's batching with Triton stubbed."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from mlmesh_triton import digitimages
from mlmesh_triton.build import build_digitclip, caption_embeddings, digits_training_data
from mlmesh_triton.digitimages import (
    ImageRejected,
    ImageTower,
    captions_of,
    held_out_split,
    pixels_of,
    png_of,
)
from PIL import Image, PngImagePlugin

# png_of quantizes 0..16 to 0..255: at most half a grey level off.
ROUND_TRIP = 16 / 510 + 1e-6


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_digitclip(tmp_path_factory.mktemp("digitclip"))


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_training_data()
    _, test = held_out_split()
    return x[test].reshape(-1, 8, 8), y[test]


def tower_of(artifact: Path) -> ImageTower:
    return ImageTower.load(artifact / "payload" / "weights.npz")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height pixels,
    followed by the data of a 1x1 image: a decompression bomb's shape."""
    small = png_of(np.zeros((8, 8)), scale=1)
    body = b"IHDR" + struct.pack(">II", width, height) + small[24:29]
    return (
        small[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + small[33:]
    )


def test_held_out_retrieval_is_recorded_and_good(artifact):
    build = json.loads((artifact / "mlmesh-build.json").read_text())
    figures = build["held_out"]
    assert build["held_out_images"] == 360 and build["train_images"] == 1437
    # 0.981, 1.0 and 0.9925 when written; the bars leave room for other CPUs.
    assert figures["image_to_text_recall_at_1"] >= 0.95
    assert figures["text_to_image_recall_at_1"] >= 0.95
    assert figures["text_to_image_precision_at_10"] >= 0.95
    config = (artifact / "config.pbtxt").read_text()
    assert 'name: "image" data_type: TYPE_STRING dims: [ 1 ]' in config
    assert "max_batch_size: 64" in config and "dynamic_batching" in config


def test_images_as_files_find_their_captions(artifact, held_out):
    """The serving path end to end, less Triton: PNG bytes -> decode -> tower."""
    pixels, digits = held_out
    images = tower_of(artifact).embed(np.stack([pixels_of(png_of(p)) for p in pixels]))
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    captions, caption_digits = caption_embeddings()
    nearest = caption_digits[(images @ captions.T).argmax(axis=1)]
    assert np.mean(nearest == digits) >= 0.95


def test_split_is_fixed_stratified_and_disjoint():
    train, test = held_out_split()
    _, y = digits_training_data()
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(y)
    assert len(test) == 360
    assert np.all(np.abs(np.bincount(y[test]) - np.bincount(y) * 0.2) <= 1)
    np.testing.assert_array_equal(held_out_split()[1], test)


def test_captions_say_the_digit_in_words_and_numerals():
    assert "a handwritten seven" in captions_of(7)
    assert "the digit 7" in captions_of(7)
    assert digitimages.DIGIT_WORDS[0] == "zero"
    assert all(len(captions_of(d)) == len(digitimages.CAPTION_TEMPLATES) for d in range(10))


@pytest.mark.parametrize("scale", [1, 4, 7])
def test_png_of_round_trips_through_the_preprocessing(held_out, scale):
    for pixels in held_out[0][:50]:
        data = png_of(pixels, scale)
        assert Image.open(io.BytesIO(data)).size == (8 * scale, 8 * scale)
        np.testing.assert_allclose(pixels_of(data), pixels, atol=ROUND_TRIP)


def test_jpeg_and_colour_are_taken(held_out):
    pixels = held_out[0][0]
    out = io.BytesIO()
    Image.open(io.BytesIO(png_of(pixels, 8))).convert("RGB").save(out, format="JPEG", quality=95)
    np.testing.assert_allclose(pixels_of(out.getvalue()), pixels, atol=0.25)


def png_with_text_bomb() -> bytes:
    """A small PNG with a compressed text chunk that inflates past Pillow's
    limit, which Pillow reads while opening, before any pixel."""
    small = png_of(np.eye(8) * 16)
    body = b"zTXt" + b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), 9)
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return small[:33] + chunk + small[33:]


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, format="GIF")
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image at all", "not a PNG or JPEG"),
        (gif(), "not a PNG or JPEG"),
        ("a str, not bytes", "expected image file bytes"),
        (png_of(np.eye(8) * 16)[:-30], "cannot decode"),
        (b"\x89PNG\r\n\x1a\n" + bytes(digitimages.MAX_IMAGE_BYTES), "at most 1048576"),
        (png_claiming(4097, 8), "4097x8 pixels; at most 4096x4096"),
        # 25 Mpixel from a few dozen bytes: refused from the header, before decoding
        (png_claiming(5000, 5000), "5000x5000 pixels"),
        # past Pillow's own limits (a warning at 89 Mpixel, an error at twice that)
        (png_claiming(20_000, 5_000), "absurdly large|20000x5000 pixels"),
        (png_with_text_bomb(), "cannot read the image header"),
        (png_claiming(100_000, 100_000), "absurdly large"),
    ],
    ids=[
        "text",
        "gif",
        "str",
        "truncated",
        "too-many-bytes",
        "too-wide",
        "bomb-25M",
        "bomb-100M",
        "bomb-10G",
        "text-bomb",
    ],
)
def test_bad_inputs_are_refused(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        pixels_of(data)


def test_an_oversized_but_valid_image_is_refused():
    out = io.BytesIO()
    Image.new("L", (4100, 10)).save(out, format="PNG")
    with pytest.raises(ImageRejected, match="4100x10 pixels"):
        pixels_of(out.getvalue())


# The Triton model, loaded with the python backend's utilities stubbed.


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _TritonError(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


class _Response:
    def __init__(self, output_tensors=(), error=None) -> None:  # type: ignore[no-untyped-def]
        self.output_tensors, self.error = list(output_tensors), error


@pytest.fixture
def triton_model(artifact, monkeypatch):
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Tensor = _Tensor  # type: ignore[attr-defined]
    stub.TritonError = _TritonError  # type: ignore[attr-defined]
    stub.InferenceResponse = _Response  # type: ignore[attr-defined]
    stub.get_input_tensor_by_name = lambda request, name: request[name]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the template prepends its folder
    payload = artifact / "payload"
    spec = importlib.util.spec_from_file_location("digitclip_model", payload / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(artifact), "model_version": "payload"})
    yield model
    sys.modules.pop("digitimages", None)  # the payload's copy, imported by the template


def request(*images: bytes) -> dict[str, _Tensor]:
    return {"image": _Tensor("image", np.array([[i] for i in images], dtype=object))}


def test_a_bad_image_fails_its_own_request_only(triton_model, artifact, held_out):
    pixels, _ = held_out
    good = [png_of(p) for p in pixels[:3]]
    responses = triton_model.execute(
        [request(good[0], good[1]), request(b"GIF89a nonsense"), request(good[2])]
    )
    assert len(responses) == 3
    first, bad, last = responses
    assert bad.error.code == _TritonError.INVALID_ARG
    assert "not a PNG or JPEG" in str(bad.error) and not bad.output_tensors
    assert first.error is None and last.error is None
    expected = tower_of(artifact).embed(np.stack([pixels_of(g) for g in good]))
    (a,), (b,) = first.output_tensors, last.output_tensors
    assert a.name == b.name == "embedding"
    assert a.array.shape == (2, 384) and a.array.dtype == np.float32
    np.testing.assert_allclose(np.concatenate([a.array, b.array]), expected, atol=1e-6)
    # a batch of bad requests alone is answered too
    (only,) = triton_model.execute([request(png_claiming(5000, 5000))])
    assert "5000x5000" in str(only.error)
