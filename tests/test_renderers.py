"""renderers/: what an app draws from the instances' masks (polygons, instance map, cut-out, preview), from the COCO
RLEs the model service sends."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from runner_asserts import mask_iou

from renderers import Drawable, render
from renderers.cutout import cutout_png
from renderers.instance_map import InstanceMap
from renderers.instances import decode
from renderers.overlay import Overlay
from renderers.polygons import polygons

HEIGHT, WIDTH = 120, 160


def rle_of(mask: np.ndarray) -> dict:
    """What the model service sends: pycocotools' compressed RLE with a str `counts`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def drawn(mask: np.ndarray) -> np.ndarray:
    """A mask as uint8 to draw on with OpenCV."""
    return mask.astype(np.uint8)


def canvas() -> np.ndarray:
    return np.zeros((HEIGHT, WIDTH), dtype=np.uint8)


def ellipse(center, axes, angle) -> np.ndarray:
    image = canvas()
    cv2.ellipse(image, center, axes, angle, 0, 360, 1, -1)
    return image.astype(bool)


def rasterised(parts: list[dict], shape=(HEIGHT, WIDTH)) -> np.ndarray:
    """The polygons back to pixels as the contract says: each part's exterior and holes filled together, even-odd,
    edges included (cv2.fillPoly)."""
    image = np.zeros(shape, dtype=np.uint8)
    for part in parts:
        rings = [np.array(part["exterior"], dtype=np.int32)] + [np.array(h, dtype=np.int32) for h in part["holes"]]
        cv2.fillPoly(image, rings, 1)
    return image.astype(bool)


def ring() -> np.ndarray:
    mask = ellipse((80, 60), (50, 40), 0)
    return mask & ~ellipse((80, 60), (25, 18), 0)


def ring_with_an_island() -> np.ndarray:
    return ring() | ellipse((80, 60), (8, 6), 0)


def several_parts() -> np.ndarray:
    mask = ellipse((30, 30), (20, 12), 30) | ellipse((110, 80), (30, 20), 120) | ellipse((130, 20), (10, 10), 0)
    mask[100, 10] = True  # a single pixel
    return mask


def one_pixel_wide_parts() -> np.ndarray:
    """A blob with 1-pixel-wide parts: a horizontal, a vertical and a diagonal line, and a lone pixel."""
    image = drawn(ellipse((90, 60), (40, 30), 20))
    image[5, 10:150] = 1
    image[20:110, 5] = 1
    cv2.line(image, (20, 110), (150, 30), 1, 1)
    image[115, 155] = 1
    return image.astype(bool)


def touching_the_border() -> np.ndarray:
    mask = ellipse((0, 0), (60, 50), 0) | ellipse((WIDTH - 1, HEIGHT - 1), (50, 40), 0)
    mask[:, WIDTH - 3 :] = True
    mask[HEIGHT - 1, :] = True
    return mask


def many_small_holes() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[10:110, 10:150] = True
    for row in range(20, 100, 12):
        for column in range(20, 140, 12):
            mask[row : row + 3, column : column + 3] = False
    return mask


def blobs() -> np.ndarray:
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    return np.sin(columns / 9) * np.cos(rows / 11) > 0.3


def whole_image() -> np.ndarray:
    return np.ones((HEIGHT, WIDTH), dtype=bool)


def one_pixel_curve() -> np.ndarray:
    image = canvas()
    cv2.circle(image, (80, 60), 40, 1, 1)
    return image.astype(bool)


SHAPES = [
    ring,
    ring_with_an_island,
    several_parts,
    one_pixel_wide_parts,
    touching_the_border,
    many_small_holes,
    blobs,
    whole_image,
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_polygons_rasterised_back_cover_the_mask_at_the_default_tolerance(shape):
    mask = shape()
    parts = polygons(decode(rle_of(mask)))
    assert mask_iou(rasterised(parts), mask) >= 0.95


@pytest.mark.parametrize("shape", [*SHAPES, one_pixel_curve], ids=lambda shape: shape.__name__)
def test_polygons_at_tolerance_0_give_the_mask_back_exactly(shape):
    mask = shape()
    assert np.array_equal(rasterised(polygons(decode(rle_of(mask)), tolerance=0)), mask)


def test_polygons_have_the_documented_shape_in_image_pixels():
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[40:60, 100:130] = True
    mask[48:52, 110:120] = False
    (part,) = polygons(decode(rle_of(mask)))
    assert set(part) == {"exterior", "holes"}
    assert sorted(map(tuple, part["exterior"])) == [(100, 40), (100, 59), (129, 40), (129, 59)]
    ((hole),) = part["holes"]
    assert all(type(value) is int for point in part["exterior"] + hole for value in point)
    xs, ys = zip(*hole, strict=True)
    assert (min(xs), max(xs), min(ys), max(ys)) == (109, 120, 47, 52)  # the part's pixels around the hole


def test_separate_parts_are_separate_polygons_and_lone_pixels_are_kept():
    parts = polygons(decode(rle_of(several_parts())))
    assert len(parts) == 4 and all(part["holes"] == [] for part in parts)
    assert [[10, 100]] in [part["exterior"] for part in parts]


def test_an_island_in_a_hole_is_a_part_of_its_own():
    parts = polygons(decode(rle_of(ring_with_an_island())))
    assert sorted(len(part["holes"]) for part in parts) == [0, 1]


def test_decode_gives_the_mask_inside_its_bounding_box():
    mask = ellipse((120, 90), (20, 10), 45)
    decoded = decode(rle_of(mask))
    rows, columns = np.nonzero(mask)
    assert (decoded.x, decoded.y) == (columns.min(), rows.min())
    assert decoded.pixels.shape == (rows.max() - rows.min() + 1, columns.max() - columns.min() + 1)
    assert np.array_equal(decoded.pixels, mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1])


def square(x, y, size) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y : y + size, x : x + size] = True
    return mask


def map_of(masks: list[np.ndarray], scores: list[float]) -> np.ndarray:
    instance_map = InstanceMap(HEIGHT, WIDTH, len(masks))
    for number, (mask, score) in enumerate(zip(masks, scores, strict=True), start=1):
        instance_map.add(number, score, decode(rle_of(mask)))
    return np.array(Image.open(io.BytesIO(instance_map.png())))


@pytest.mark.parametrize("scores", [[0.9, 0.6], [0.6, 0.9]])
def test_the_instance_map_numbers_instances_from_1_and_overlaps_go_to_the_higher_score(scores):
    first, second = square(10, 10, 40), square(30, 30, 40)
    values = map_of([first, second], scores)
    assert values.shape == (HEIGHT, WIDTH) and values.dtype == np.uint8
    winner = 1 if scores[0] > scores[1] else 2
    assert np.all(values[first & second] == winner)
    assert np.all(values[first & ~second] == 1) and np.all(values[second & ~first] == 2)
    assert np.all(values[~(first | second)] == 0)


def test_on_equal_scores_an_overlap_goes_to_the_first_instance():
    first, second = square(10, 10, 40), square(30, 30, 40)
    assert np.all(map_of([first, second], [0.7, 0.7])[first & second] == 1)


def grid_of_squares(count: int, height: int, width: int) -> list[np.ndarray]:
    per_row = width // 5
    masks = []
    for index in range(count):
        mask = np.zeros((height, width), dtype=bool)
        row, column = divmod(index, per_row)
        mask[row * 5 : row * 5 + 4, column * 5 : column * 5 + 4] = True
        masks.append(mask)
    return masks


def instances_of(masks: list[np.ndarray], scores=None, label="cat") -> list[Drawable]:
    scores = scores or [0.9 - index * 1e-4 for index in range(len(masks))]
    boxes = []
    for mask in masks:
        rows, columns = np.nonzero(mask)
        boxes.append([float(columns.min()), float(rows.min()), float(columns.max() + 1), float(rows.max() + 1)])
    return [
        Drawable(rle=rle_of(mask), score=score, box=box, label=label)
        for mask, score, box in zip(masks, scores, boxes, strict=True)
    ]


@pytest.mark.parametrize(("count", "mode", "dtype"), [(255, "L", np.uint8), (300, "I;16", np.uint16)])
def test_the_instance_map_is_8_bit_up_to_255_instances_and_16_bit_beyond(count, mode, dtype):
    masks = grid_of_squares(count, 100, 400)
    rendered = render(instances_of(masks), (400, 100), frozenset({"instance_map"}), 1.0)
    image = Image.open(io.BytesIO(rendered.files["instance_map"]))
    values = np.array(image)
    assert image.mode == mode and values.dtype == dtype and values.shape == (100, 400)
    for number, mask in enumerate(masks, start=1):
        assert np.all(values[mask] == number)
    assert set(np.unique(values)) == set(range(count + 1))


def smooth_photo() -> np.ndarray:
    """Channels that differ (a swap of red and blue shows) and change slowly (JPEG keeps them)."""
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    return np.stack([columns * 255 // WIDTH, rows * 255 // HEIGHT, np.full_like(rows, 60)], axis=-1).astype(np.uint8)


def test_with_no_instance_the_map_is_all_background_and_the_files_keep_their_documented_sizes():
    pixels = smooth_photo()
    wanted = frozenset({"polygons", "instance_map", "cutout", "overlay"})
    rendered = render([], (WIDTH, HEIGHT), wanted, 1.0, pixels=pixels, union=np.zeros((HEIGHT, WIDTH), dtype=bool))
    assert rendered.polygons == []
    values = np.array(Image.open(io.BytesIO(rendered.files["instance_map"])))
    assert values.shape == (HEIGHT, WIDTH) and not values.any()
    cutout = Image.open(io.BytesIO(rendered.files["cutout"]))
    assert cutout.mode == "RGBA" and cutout.size == (1, 1) and cutout.getpixel((0, 0))[3] == 0
    overlay = Image.open(io.BytesIO(rendered.files["overlay"]))
    assert overlay.format == "JPEG" and overlay.size == (WIDTH, HEIGHT)
    assert np.abs(np.asarray(overlay, dtype=int) - pixels).max() < 12  # the image alone, in its colours


def test_the_cutout_is_the_unions_bounding_box_with_the_union_as_alpha():
    pixels = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    union = ring() | square(140, 100, 10)
    rgba = np.array(Image.open(io.BytesIO(cutout_png(pixels, union))))
    rows, columns = np.nonzero(union)
    box = np.s_[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    assert rgba.shape == (*union[box].shape, 4)
    assert np.array_equal(rgba[..., 3], union[box] * 255)
    assert np.array_equal(rgba[..., :3][union[box]], pixels[box][union[box]])
    assert not rgba[..., :3][~union[box]].any()  # the background is gone, not hidden


@pytest.mark.parametrize(
    ("size", "preview"),
    [((1920, 1080), (1024, 576)), ((1080, 1920), (576, 1024)), ((640, 480), (640, 480)), ((3000, 7), (1024, 2))],
)
def test_the_overlay_is_a_jpeg_at_most_1024_pixels_on_its_long_side(size, preview):
    width, height = size
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    overlay = Overlay(pixels)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : height // 2 + 1, width // 4 : width // 2 + 1] = True
    overlay.add(decode(rle_of(mask)), [width / 4, height / 4, width / 2, height / 2], "cat 0.93")
    image = Image.open(io.BytesIO(overlay.jpeg()))
    assert image.format == "JPEG" and image.size == preview
    image.load()


def test_the_overlay_tints_each_instance_and_leaves_the_rest_of_the_image_alone():
    pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    first, second = square(20, 40, 40), square(100, 40, 40)
    rendered = render(instances_of([first, second]), (WIDTH, HEIGHT), frozenset({"overlay"}), 1.0, pixels=pixels)
    overlay = np.asarray(Image.open(io.BytesIO(rendered.files["overlay"])), dtype=int)
    inside = [overlay[30:50, 30:50].mean(axis=(0, 1)), overlay[70:80, 110:130].mean(axis=(0, 1))]
    assert all(np.abs(colour - 128).max() > 20 for colour in inside)
    assert np.abs(inside[0] - inside[1]).max() > 20  # a colour of its own per instance
    assert np.abs(overlay[100:, :] - 128).max() < 10  # far from every mask, box and caption


def test_an_empty_visual_candidate_is_not_drawn_and_the_others_keep_their_colours():
    """A visual candidate may have no pixel above mask_threshold (area 0, box [0, 0, 0, 0]): every output is still
    drawn (this was a 500 internal_error: OpenCV resized a 0 x 0 mask), and the overlay draws the other candidates
    exactly as if the empty one sat in its place."""
    pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    first, second, empty = square(20, 40, 40), square(100, 40, 40), np.zeros((HEIGHT, WIDTH), dtype=bool)
    wanted = frozenset({"polygons", "instance_map", "cutout", "overlay"})
    union = first | second
    first_drawn, second_drawn = instances_of([first, second])
    with_empty = [
        first_drawn,
        Drawable(rle=rle_of(empty), score=0.8, box=[0.0, 0.0, 0.0, 0.0], label="object"),
        second_drawn,
    ]
    rendered = render(with_empty, (WIDTH, HEIGHT), wanted, 1.0, pixels=pixels, union=union)
    assert rendered.polygons[1] == []
    instance_map = np.asarray(Image.open(io.BytesIO(rendered.files["instance_map"])))
    assert set(np.unique(instance_map)) == {0, 1, 3}
    overlay = np.asarray(Image.open(io.BytesIO(rendered.files["overlay"])), dtype=int)
    assert overlay.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(overlay[100:, :] - 128).max() < 10  # nothing drawn for the empty one (its box is at 0, 0)

    placeholder = instances_of([first, square(0, 0, 1), second])  # a third colour in the second slot
    expected = render(placeholder, (WIDTH, HEIGHT), frozenset({"overlay"}), 1.0, pixels=pixels).files["overlay"]
    expected = np.asarray(Image.open(io.BytesIO(expected)), dtype=int)
    assert np.abs(overlay[70:80, 110:130] - expected[70:80, 110:130]).max() < 10  # the second square's colour


def test_render_draws_only_what_is_asked():
    masks = [ring(), several_parts()]
    rendered = render(instances_of(masks), (WIDTH, HEIGHT), frozenset({"rle", "polygons"}), 1.0)
    assert rendered.files == {} and len(rendered.polygons) == 2
    rendered = render(instances_of(masks), (WIDTH, HEIGHT), frozenset({"instance_map"}), 1.0)
    assert rendered.polygons is None and set(rendered.files) == {"instance_map"}
