"""Damaged EXIF never fails a photo Pillow can decode, nor any request batched with it.

A seeded corpus mutates a valid EXIF block (IFD0 with a sub-IFD, a GPS IFD and a thumbnail IFD) the ways broken
cameras, editors and fuzzers do: wrong types, wrong counts, offsets past the end, IFD loops, truncated IFDs, huge
entry counts, odd orientation values, damaged headers and stray bytes; in JPEG APP1, PNG eXIf and WebP EXIF.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import struct

import httpx
import numpy as np
import pytest
from PIL import Image
from stack import STACK_API_KEY, new_task_row, task_row

from backend.protocol import make_item
from sam3_runner import ImageDecodeError, ImageTooLarge, Prompt, decode_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns on damaged EXIF

WIDTH, HEIGHT = 48, 32
ORIENTATION = 0x0112
IFD0, EXIF_IFD, GPS_IFD, IFD1 = range(4)


def _pixels() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)


def with_exif(exif: bytes, fmt: str = "JPEG") -> bytes:
    """A 48x32 image carrying `exif` (the TIFF block, without the "Exif\\0\\0" prefix) as written by Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(_pixels()).save(buffer, format=fmt, exif=b"Exif\x00\x00" + exif)
    return buffer.getvalue()


def tiff_block(
    order: str, ifds: list[list[tuple[int, int, int, bytes | int]]], next_ifd: dict[int, int]
) -> tuple[bytes, dict]:
    """A TIFF block (EXIF's layout): header, then each IFD followed by its out-of-line values.

    An entry is (tag, type, count, value): packed bytes, or an IFD index for a pointer (resolved to its offset).
    Returns the bytes and where each field lies: entry starts, IFD entry-count fields, pointer fields.
    """
    sizes = [
        2 + 12 * len(entries) + 4 + sum(len(v) for *_, v in entries if isinstance(v, bytes) and len(v) > 4)
        for entries in ifds
    ]
    starts = [8 + sum(sizes[:index]) for index in range(len(ifds))]
    block = bytearray(b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    fields = {"entries": [], "counts": [], "pointers": []}
    for index, entries in enumerate(ifds):
        fields["counts"].append(len(block))
        block += struct.pack(order + "H", len(entries))
        data_at = starts[index] + 2 + 12 * len(entries) + 4
        data = bytearray()
        for tag, kind, count, value in entries:
            fields["entries"].append(len(block))
            block += struct.pack(order + "HHI", tag, kind, count)
            if isinstance(value, int):
                fields["pointers"].append(len(block))
                block += struct.pack(order + "I", starts[value])
            elif len(value) > 4:
                block += struct.pack(order + "I", data_at + len(data))
                data += value
            else:
                block += value.ljust(4, b"\x00")
        fields["pointers"].append(len(block))
        block += struct.pack(order + "I", starts[next_ifd[index]] if index in next_ifd else 0)
        block += data
    return bytes(block), fields


def valid_exif(order: str = "<") -> tuple[bytes, dict]:
    def pack(fmt: str, *values: int) -> bytes:
        return struct.pack(order + fmt, *values)

    ifds = [
        [
            (0x010F, 2, 8, b"SAM3Cam\x00"),
            (ORIENTATION, 3, 1, pack("H", 6)),
            (0x011A, 5, 1, pack("II", 72, 1)),
            (0x011B, 5, 1, pack("II", 72, 1)),
            (0x0128, 3, 1, pack("H", 2)),
            (0x0132, 2, 20, b"2024:01:02 03:04:05\x00"),
            (0x8769, 4, 1, EXIF_IFD),
            (0x8825, 4, 1, GPS_IFD),
        ],
        [(0x829A, 5, 1, pack("II", 1, 100)), (0x8827, 3, 1, pack("H", 100)), (0x9286, 7, 10, b"ASCII\x00\x00\x00hi")],
        [(0x0001, 2, 2, b"N\x00"), (0x0002, 5, 3, pack("6I", 37, 1, 46, 1, 0, 1))],
        [(0x0103, 3, 1, pack("H", 6))],
    ]
    return tiff_block(order, ifds, {IFD0: IFD1})


def _put(block: bytearray, at: int, fmt: str, value: int, order: str) -> None:
    if at + struct.calcsize(fmt) <= len(block):
        block[at : at + struct.calcsize(fmt)] = struct.pack(order + fmt, value)


def _mutate(kind: str, block: bytearray, fields: dict, order: str, rng: random.Random) -> bytearray:
    entry = rng.choice(fields["entries"])
    if kind == "type":
        _put(block, entry + 2, "H", rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 16, 255, 0xFFFF]), order)
    elif kind == "count":
        counts = [0, 2, 3, 7, 255, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2**32)]
        _put(block, entry + 4, "I", rng.choice(counts), order)
    elif kind == "offset":
        offsets = [len(block) + 1, len(block) + 1000, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF, 3, rng.randrange(2**32)]
        _put(block, entry + 8, "I", rng.choice(offsets), order)
    elif kind == "loop":  # a next-IFD or sub-IFD pointer sent back to an IFD already read
        _put(block, rng.choice(fields["pointers"]), "I", rng.choice([8, *fields["counts"]]), order)
    elif kind == "truncated":
        del block[rng.randrange(len(block)) :]
    elif kind == "entries":
        counts = [0, 1, 9, 20, 0xFFFF, rng.randrange(2**16)]
        _put(block, rng.choice(fields["counts"]), "H", rng.choice(counts), order)
    elif kind == "orientation":  # (type, count, the 4 value bytes): odd values, types and counts
        short, long_ = (lambda v: struct.pack(order + "H", v) + b"\x00\x00"), (lambda v: struct.pack(order + "I", v))
        kind_, count, value = rng.choice(
            [
                (3, 1, short(0)),
                (3, 1, short(9)),
                (3, 1, short(0xFFFF)),
                (3, 2, short(6)),
                (3, 0, short(6)),
                (3, 0xFFFFFFFF, short(6)),
                (2, 2, b"6\x00\x00\x00"),
                (1, 1, b"\x06\x00\x00\x00"),
                (7, 1, b"\x06\x00\x00\x00"),
                (4, 1, long_(6)),
                (8, 1, short(0xFFFF)),
                (9, 1, long_(6)),
                (5, 1, long_(0xFFFFFFFF)),
                (0, 1, short(6)),
            ]
        )
        at = fields["entries"][1]
        block[at + 2 : at + 12] = struct.pack(order + "HI", kind_, count) + value
    elif kind == "header":
        at, value = rng.choice(
            [
                (0, b"MM" if order == "<" else b"II"),
                (2, b"\x00\x00"),
                (4, b"\xff\xff\xff\xff"),
                (4, b"\x00\x00\x00\x00"),
                (4, struct.pack(order + "I", len(block))),
            ]
        )
        block[at : at + len(value)] = value
    elif kind == "bytes":
        for _ in range(rng.randrange(1, 9)):
            block[rng.randrange(len(block))] = rng.randrange(256)
    return block


KINDS = ("type", "count", "offset", "loop", "truncated", "entries", "orientation", "header", "bytes", "mixed")


def _corpus(variants_per_kind: int = 30, seed: int = 20261212) -> dict[str, bytes]:
    """name -> image bytes; most in JPEG, every fifth in PNG (eXIf chunk) or WebP (EXIF chunk)."""
    rng = random.Random(seed)
    corpus = {"issue-12": ISSUE_PHOTO}
    for kind in KINDS:
        for number in range(variants_per_kind):
            order = "<" if number % 2 == 0 else ">"
            exif, fields = valid_exif(order)
            block = bytearray(exif)
            steps = [rng.choice(KINDS[:-1]) for _ in range(rng.randrange(2, 5))] if kind == "mixed" else [kind]
            for step in steps:
                block = _mutate(step, block, fields, order, rng)
            fmt = {4: "PNG", 9: "WEBP"}.get(number % 10, "JPEG")
            corpus[f"{kind}-{number}-{fmt.lower()}"] = with_exif(bytes(block), fmt)
    return corpus


def issue_exif() -> bytes:
    """Issue 12's photo's EXIF: Orientation 6 and an XResolution (normally RATIONAL) stored as ASCII "ab\\0"."""
    return tiff_block("<", [[(ORIENTATION, 3, 1, struct.pack("<H", 6)), (0x011A, 2, 3, b"ab\x00")]], {})[0]


ISSUE_PHOTO = with_exif(issue_exif())
CORPUS = _corpus()


def _pillow_loads(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # whatever Pillow raises, it could not decode the bytes
        return False
    return True


def test_the_issue_photo_is_decoded_in_display_orientation():
    """Pillow's exif_transpose raises TypeError rewriting this EXIF; the orientation itself reads fine: 6."""
    decoded = decode_image(ISSUE_PHOTO)
    assert (decoded.width, decoded.height) == (HEIGHT, WIDTH)  # rotated as a viewer shows it
    stored = Image.open(io.BytesIO(ISSUE_PHOTO)).convert("RGB")
    assert np.array_equal(np.asarray(decoded.pixels), np.array(stored.transpose(Image.Transpose.ROTATE_270)))


def test_an_unreadable_orientation_leaves_the_pixels_as_stored_and_says_so(caplog):
    exif, _ = valid_exif()
    damaged = b"XX" + exif[2:]  # no byte order mark: Pillow's EXIF reader raises SyntaxError, "not a TIFF file"
    data = with_exif(damaged, "PNG")
    with caplog.at_level(logging.WARNING, logger="sam3_runner.images"):
        decoded = decode_image(data)
    assert np.array_equal(np.asarray(decoded.pixels), _pixels())
    assert "orientation could not be read" in caplog.text
    assert "XX" not in caplog.text and "SAM3Cam" not in caplog.text  # no bytes of the file in the log


def test_no_damaged_exif_fails_a_photo_pillow_can_decode():
    """decode_image raises only its two errors, and only for bytes Pillow itself cannot decode."""
    assert len(CORPUS) > 300
    for kind in KINDS:
        assert {name.rsplit("-", 1)[1] for name in CORPUS if name.startswith(f"{kind}-")} == {"jpeg", "png", "webp"}
    escaped, refused = {}, []
    for name, data in CORPUS.items():
        try:
            decoded = decode_image(data)
        except (ImageDecodeError, ImageTooLarge):
            refused.append(name)
            continue
        except Exception as exc:  # what this test looks for: anything else escaping the decoder
            escaped[name] = f"{type(exc).__name__}: {exc}"
            continue
        assert {decoded.width, decoded.height} == {WIDTH, HEIGHT}, name
    assert not escaped
    assert [name for name in refused if _pillow_loads(CORPUS[name])] == []


GOOD = [
    make_item(with_exif(valid_exif()[0]), [Prompt("cat", score_threshold=0.0)], 10**8),
    make_item(with_exif(b"", "PNG"), [Prompt("cat", score_threshold=0.0)], 10**8),
]


def test_a_damaged_exif_never_fails_the_other_items_of_its_batch(segmenter):
    sample = ["issue-12", *list(CORPUS)[1::12]]
    for name in sample:
        batch = [make_item(CORPUS[name], [Prompt("cat", score_threshold=0.0)], 10**8)] + [GOOD[i % 2] for i in range(7)]
        outcomes = segmenter.segment(batch)
        assert all(outcome["ok"] for outcome in outcomes[1:]), name
        assert outcomes[0]["ok"] or outcomes[0]["error"]["code"] == "invalid_image", name
        if outcomes[0]["ok"]:
            assert sorted(outcomes[0]["results"][0]["image_size"]) == [HEIGHT, WIDTH]


@pytest.mark.stack
def test_the_issue_photo_served_with_good_requests_answers_200_and_so_do_they(stack_server, r2, supabase, bucket):
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="exif/issue-12.jpg", Body=ISSUE_PHOTO, ContentType="image/jpeg")
    rows = [new_task_row(supabase) for _ in range(6)]
    keys = ["images/in.jpg"] * 5 + ["exif/issue-12.jpg"]  # sent last: it waits in a batch with good ones

    async def send_together():
        async with httpx.AsyncClient(timeout=60, headers={"X-API-Key": STACK_API_KEY}) as client:
            calls = [
                client.post(
                    f"{stack_server.url}/api/v1/predict",
                    json={"image_url": key, "text_prompt": f"thing {i}", "user_id": user_id, "task_id": task_id},
                )
                for i, (key, (task_id, user_id)) in enumerate(zip(keys, rows, strict=True))
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(send_together())
    assert [response.status_code for response in responses] == [200] * 6, [r.text for r in responses]
    assert responses[-1].json()["image"] == {"width": HEIGHT, "height": WIDTH}  # orientation 6 applied
    assert [task_row(supabase, task_id)["status"] for task_id, _ in rows] == ["completed"] * 6
