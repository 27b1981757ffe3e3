"""Decoding: every mode to RGB, EXIF orientation applied, bad bytes refused with a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import encode, random_image
from PIL import Image, ImageOps

from sam3_runner import ImageDecodeError, ImageTooLarge, Job, Prompt, decode_image, header_size


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, "JPEG", exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_exif_rotated_jpeg_is_decoded_in_display_orientation(orientation, rng):
    decoded = decode_image(exif_jpeg(random_image(rng, 40, 80), orientation))
    assert (decoded.width, decoded.height) == (40, 80)


def test_exif_orientation_6_rotates_clockwise():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    decoded = decode_image(exif_jpeg(pixels, 6))
    assert decoded.pixels[:10].mean() > 200 and decoded.pixels[-10:].mean() < 50  # left became top


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_gives_pillows_exif_transpose_pixels(orientation, fmt, rng):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(random_image(rng, 12, 20), fmt, exif=exif.tobytes())
    by_pillow = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data).pixels), by_pillow)


def test_an_xmp_orientation_is_applied_like_pillow_applies_it(rng):
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = encode(random_image(rng, 12, 20), "JPEG", xmp=xmp)
    by_pillow = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert by_pillow.shape == (20, 12, 3)
    assert np.array_equal(np.asarray(decode_image(data).pixels), by_pillow)


def test_masks_of_an_exif_rotated_jpeg_are_in_display_orientation(engine, rng):
    decoded = decode_image(exif_jpeg(random_image(rng, 30, 70), 8))
    result = engine.run([Job(decoded.pixels, [Prompt("cat", score_threshold=0.0)])])[0][0]
    assert result.image_size == (30, 70)
    assert result.union_mask.shape == (70, 30)
    assert all(instance.rle["size"] == [70, 30] for instance in result.instances)


def _saved(image: Image.Image, fmt: str = "PNG", **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **args)
    return buffer.getvalue()


def test_grey_and_16_bit_images_keep_their_brightness():
    assert decode_image(_saved(Image.new("L", (8, 8), 100))).pixels.mean() == pytest.approx(100, abs=1)
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert decode_image(_saved(sixteen)).pixels.mean() == pytest.approx(40000 >> 8, abs=1)


def test_transparency_is_flattened_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert tuple(decode_image(_saved(rgba)).pixels[0, 0]) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 255))
    assert tuple(decode_image(_saved(la)).pixels[0, 0]) == (0, 0, 0)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(decode_image(_saved(palette, transparency=0)).pixels[0, 0]) == (0, 255, 0)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    red, green, blue = decode_image(_saved(cmyk, "JPEG")).pixels[4, 4]
    assert red > 200 and green < 60 and blue < 60


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = decode_image(data).pixels[0, 0]
    assert red > 200 and blue < 60


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xd8\xff\xe0\x00\x10JFIF"],
    ids=["empty", "text", "truncated-png-header", "truncated-jpeg-header"],
)
def test_non_images_are_refused(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_truncated_image_body_is_refused(rng):
    data = encode(random_image(rng, 64, 64), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_pixel_cap_refuses_before_decoding():
    huge_header = _saved(Image.new("L", (5000, 5000)))
    with pytest.raises(ImageTooLarge, match="25000000 pixels"):
        decode_image(huge_header, max_pixels=1_000_000)


def test_header_size_reads_the_stored_size_without_decoding(rng):
    assert header_size(_saved(Image.new("L", (5000, 4000)))[:200]) == (5000, 4000)  # the header alone suffices
    assert header_size(exif_jpeg(random_image(rng, 40, 80), 6)) == (80, 40)  # as stored: same pixel count
    assert header_size(b"") is None and header_size(b"not an image") is None


# --- plain JPEGs go to torchvision's decoder: on the CPU by default, on the GPU with SAM3_JPEG_DECODE=device -----


def _smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("pixels", "options"),
    [
        (_smooth(37, 61), {"subsampling": 0}),
        (_smooth(37, 61), {"subsampling": 1}),
        (_smooth(37, 61), {"subsampling": 2}),
        (_smooth(37, 61), {"progressive": True}),
        (_smooth(37, 61)[..., 0], {}),  # grey
    ],
    ids=["4:4:4", "4:2:2", "4:2:0", "progressive", "grey"],
)
def test_plain_jpeg_decoded_on_the_cpu_has_pillows_exact_pixels(pixels, options):
    data = encode(pixels, "JPEG", quality=90, **options)
    decoded = decode_image(data)
    assert isinstance(decoded.pixels, torch.Tensor) and tuple(decoded.pixels.shape) == (37, 61, 3)
    by_pillow = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded.pixels.numpy(), by_pillow)


@pytest.mark.parametrize("offset", [0, 500, 1000, 1500])
def test_a_jpeg_corrupted_inside_decodes_as_pillow_decodes_it_or_fails_as_pillow_fails(offset):
    """Complete (ends with EOI) but damaged: torchvision must never return pixels Pillow would not."""
    data = bytearray(encode(_smooth(120, 160), "JPEG", quality=90))
    start = len(data) // 3 + offset
    data[start : start + 40] = np.random.default_rng(offset).integers(0, 256, 40, dtype=np.uint8).tobytes()
    try:
        by_pillow = np.array(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
    except OSError:
        with pytest.raises(ImageDecodeError):
            decode_image(bytes(data))
    else:
        assert np.array_equal(np.asarray(decode_image(bytes(data)).pixels), by_pillow)


def test_grey_jpeg_on_the_device_becomes_rgb():
    pixels = decode_image(_saved(Image.new("L", (8, 8), 100), "JPEG"), device="cpu").pixels
    assert isinstance(pixels, torch.Tensor) and tuple(pixels.shape) == (8, 8, 3)
    assert pixels.float().mean() == pytest.approx(100, abs=2)


def test_jpegs_the_device_path_must_not_take_go_through_pillow():
    """EXIF rotation, CMYK and truncation keep Pillow's exact behaviour with device decoding on."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255
    rotated = decode_image(exif_jpeg(pixels, 6), device="cpu")
    assert (rotated.width, rotated.height) == (20, 40) and rotated.pixels[:10].mean() > 200
    cmyk = _saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    red, green, blue = decode_image(cmyk, device="cpu").pixels[4, 4]
    assert red > 200 and green < 60 and blue < 60
    with pytest.raises(ImageDecodeError):
        decode_image(encode(_smooth(48, 64), "JPEG")[:-400], device="cpu")
    assert isinstance(decode_image(encode(_smooth(8, 8)), device="cpu").pixels, np.ndarray)  # PNG


@pytest.mark.parametrize(
    "options",
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "progressive": True}, {"quality": 40}, "grey"],
)
def test_pillow_alone_gives_the_pixels_the_device_decoder_gives(options):
    """device=None (the gateway, drawing overlays) decodes with Pillow: the pixels the model service's decoder
    gave the model, so an overlay lines up with the mask to the pixel."""
    image = Image.fromarray(_smooth(48, 64))
    data = _saved(image.convert("L"), "JPEG") if options == "grey" else _saved(image, "JPEG", **options)
    by_pillow = decode_image(data, device=None).pixels
    assert isinstance(by_pillow, np.ndarray)
    assert np.array_equal(by_pillow, decode_image(data, device="cpu").pixels.numpy())


def test_device_decoded_images_segment_like_host_arrays(engine):
    on_device = decode_image(encode(_smooth(48, 64), "JPEG"), device="cpu").pixels
    from_tensor = engine.run([Job(on_device, [Prompt("cat", score_threshold=0.0)])])[0][0]
    from_array = engine.run([Job(on_device.numpy(), [Prompt("cat", score_threshold=0.0)])])[0][0]
    assert [(i.score, i.rle) for i in from_tensor.instances] == [(i.score, i.rle) for i in from_array.instances]
