"""Bytes -> RGB pixels in display orientation, refusing what cannot or should not be decoded."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
_WHITE = (255, 255, 255)
_JPEG_END = b"\xff\xd9"
# EXIF orientation -> the transpose that shows the image upright: Pillow's own table (ImageOps.exif_transpose)
_TO_DISPLAY = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read (empty, truncated, not an image format)."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed: refused before its pixels are decoded."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray | torch.Tensor  # HxWx3 uint8, RGB, display orientation; a tensor from torchvision's decoder

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_threads() -> int:
    """Threads for decoding a batch's images: one per core this process may use, 2 to 8. JPEG decoding scales with
    the cores and not beyond them (bench/decode.py, `*-decode-threads.json`: on 2 cores 12.3 ms per image on one
    thread, 6.1-6.3 on 2, 4 or 8)."""
    return max(2, min(8, len(os.sched_getaffinity(0))))


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, device: str | torch.device | None = "cpu"
) -> DecodedImage:
    """Decode the first frame, apply EXIF orientation and convert any mode to RGB.

    The pixel cap is checked on the header, before decoding, so a decompression bomb costs nothing. Plain JPEGs are
    decoded by torchvision on `device` (see _decode_jpeg_on); the rest go through Pillow on the host. With
    `device=None` Pillow decodes everything (the same pixels on the CPU, ~30 % slower per JPEG) and torch is never
    imported: the gateway decodes so for the images it draws on, and its processes stay free of torch. Damaged
    metadata never refuses an image Pillow can decode (see exif_orientation). Raises ImageTooLarge, or
    ImageDecodeError for bytes Pillow cannot decode, whatever Pillow raised for them; nothing else.
    """
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            if device is not None and (decoded := _decode_jpeg_on(device, image, data)) is not None:
                return decoded
            image.seek(0)
            image.load()
            if (orientation := exif_orientation(image)) in _TO_DISPLAY:
                image = image.transpose(_TO_DISPLAY[orientation])
            rgb = to_rgb(image)
    except (ImageTooLarge, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("the bytes are not a supported image format (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"the image could not be decoded: {exc}") from None
    except Exception as exc:  # Pillow's format plugins raise many kinds (struct.error, zlib.error, KeyError...)
        raise ImageDecodeError(f"the image could not be decoded ({type(exc).__name__})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageDecodeError("the image has no pixels")
    return DecodedImage(pixels=np.array(rgb, dtype=np.uint8))


def exif_orientation(image: Image.Image) -> int:
    """The image's orientation, 1-8 as in EXIF (1: stored upright), read the way Pillow reads it (EXIF, else XMP).

    Unlike ImageOps.exif_transpose, which also rewrites the metadata and so fails on any EXIF entry it cannot
    re-encode (issue 12: an ASCII XResolution raised TypeError), this only reads the one tag. Orientation that
    cannot be read (damaged EXIF, a value outside 1-8) is 1, the pixels as stored, with a warning naming only
    the kind of damage.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # EXIF parsing raises what its damage leads to: struct.error, SyntaxError, ...
        damage = type(exc).__name__
    else:
        if type(orientation) is int and 1 <= orientation <= 8:
            return orientation
        damage = f"{orientation} is not 1-8" if type(orientation) is int else f"a {type(orientation).__name__}"
    log.warning("the image's EXIF orientation could not be read (%s); using the pixels as stored", damage)
    return 1


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as stored, read from the image header alone (Pillow's open decodes no pixels: microseconds);
    None when the header cannot be read (decode_image then says why). EXIF rotation is not applied: it swaps the
    two, the pixel count stays."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # any malformed header: decode_image is where it gets its explanation
        return None


def _decode_jpeg_on(device: str | torch.device, image: Image.Image, data: bytes) -> DecodedImage | None:
    """A complete RGB or grey JPEG that needs no EXIF rotation, decoded by torchvision on `device`.

    On a GPU (nvJPEG) ~20 ms of CPU per full-HD photo leave the request's path and the pixels are already where
    the model is. On the CPU it is the same libjpeg-turbo as Pillow, with the same pixels, but decoded straight into
    the tensor (no image copy, no bytes round trip): per full-HD photo 12.9 ms instead of 17.1 on one thread, 6.3
    instead of 9.2 in a 4-thread pool (bench/decode.py, 2-core x86_64).
    None for anything else, and for any JPEG the device decoder refuses: Pillow then decodes it or explains why not.
    (torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they work in 0.26-0.29, the versions
    this project runs.)
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.endswith(_JPEG_END):
        return None
    if exif_orientation(image) != 1:
        return None
    import torch  # here: a caller decoding with Pillow alone (device None, the gateway) never loads torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        encoded = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None
    if tuple(pixels.shape[1:]) != (image.height, image.width):
        return None
    return DecodedImage(pixels=pixels.permute(1, 2, 0))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every PIL mode: transparency is flattened on white, 16/32-bit greys are scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        grey = ((values - low) * scale).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
