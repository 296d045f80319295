"""Image decoding for mining: one function that turns a file into an RGB array or says why it cannot.

Orientation follows the file's EXIF tag (as a viewer shows the photo); grayscale, palette, CMYK and
16-bit images are converted to 8-bit RGB; an image with transparency (RGBA, LA, a palette with a transparent
index) is composited over black, so transparent pixels are black whatever colour the file stores under them.
Decoding is bounded by ``max_pixels``: a larger image is refused, not decoded.
"""

from __future__ import annotations

import os

import numpy as np

#: Default decoding bound: 64 megapixels (a 12000x9000 photo is 108 MP and is refused).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(Exception):
    """The file cannot be used as an image; ``str(error)`` is the reason recorded in the run's rejects."""


def load_rgb(path: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to RGB.

    Args:
        path: an image file (a local path, or a URI read through :mod:`ovseg_mine.storage`), or the encoded image
            itself as bytes (JPEG, PNG, ... anything Pillow reads).
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).

    Returns:
        uint8 ``[H, W, 3]`` array, values in [0, 255], EXIF orientation applied.

    Raises:
        ImageDecodeError: missing, empty, unreadable, truncated or too large; the message is the reason.
    """
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(path, (bytes, bytearray, memoryview)):
        size = len(path)
        path = io.BytesIO(path)
    elif "://" in os.fspath(path):
        from ovseg_mine.storage import StorageError, resolve

        try:
            location = resolve(os.fspath(path))
            if not location.is_file():
                raise ImageDecodeError("file not found")
            path = io.BytesIO(location.read_bytes())
        except StorageError as exc:
            raise ImageDecodeError(f"cannot read file: {exc}") from exc
        size = len(path.getvalue())
    else:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError as exc:
            raise ImageDecodeError("file not found") from exc
        except OSError as exc:
            raise ImageDecodeError(f"cannot stat file: {exc.strerror}") from exc
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image too large: {width}x{height} exceeds {max_pixels} pixels")
            if width < 2 or height < 2:
                raise ImageDecodeError(f"image too small: {width}x{height}")
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float64)
                peak = array.max() if array.size else 0
                scaled = (array / (65535.0 if peak > 255 else 255.0) * 255.0).round().clip(0, 255)
                return np.repeat(scaled.astype(np.uint8)[:, :, None], 3, axis=2)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a readable image (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt image: {exc}") from exc
