"""What a video job's MP4 preview costs the gateway's CPU per frame (renderers/video_overlay.py): decoding each
object's RLE, drawing it as the image overlay does, and libx264's encoding (its own threads included: process CPU
time), without decoding the clip (the gateway's decoder) or the R2 upload.

    python bench/video_overlay.py [--frames 60] [--objects 5] [--repeats 3]

Frames: a smooth random scene (blurred noise, as a camera gives) panning by a few pixels per frame, with `objects`
ellipses (1-20 % of the frame each) moving over it, as COCO RLE as the model service sends them. Writes
bench/results/<date>-<machine>-video-overlay.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from renderers.instances import decode  # noqa: E402
from renderers.overlay import Overlay  # noqa: E402
from renderers.video_overlay import ENCODER, ENCODER_OPTIONS, render_video_overlay  # noqa: E402

SIZES = [(640, 360), (1920, 1080)]
FPS = 30.0
DISTINCT = 20  # frames generated before timing and played in a loop (forward then back, so the motion is smooth)


def clip(width: int, height: int, objects: int) -> list[tuple[np.ndarray, list[dict]]]:
    rng = np.random.default_rng(0)
    scene = cv2.GaussianBlur(rng.integers(0, 256, (height + 64, width + 64, 3), dtype=np.uint8), (0, 0), 6)
    shapes = [
        (
            (int(rng.integers(width // 5, 4 * width // 5)), int(rng.integers(height // 5, 4 * height // 5))),
            (int(rng.integers(width // 30, width // 5)), int(rng.integers(height // 20, height // 4))),
            float(rng.integers(0, 180)),
        )
        for _ in range(objects)
    ]
    frames = []
    for k in range(DISTINCT):
        pixels = np.ascontiguousarray(scene[k * 2 : k * 2 + height, k * 3 : k * 3 + width])
        drawn = []
        for object_id, (center, axes, angle) in enumerate(shapes):
            mask = np.zeros((height, width), dtype=np.uint8)
            cv2.ellipse(mask, (center[0] + k * width // 200, center[1]), axes, angle + k, 0, 360, 1, -1)
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            drawn.append({"object_id": object_id, "label": "dog", "box": [x, y, x + w, y + h], "rle": rle})
        frames.append((pixels, drawn))
    return frames


def played(frames: list, count: int):
    loop = frames + frames[-2:0:-1]
    for index in range(count):
        yield loop[index % len(loop)]


def draw_only(frames) -> None:
    for pixels, objects in frames:
        overlay = Overlay(pixels)
        for drawn in objects:
            overlay.add(
                decode(drawn["rle"]), drawn["box"], f"#{drawn['object_id']} {drawn['label']}", drawn["object_id"]
            )
        overlay.draw()


def cpu_and_wall(run, repeats: int) -> tuple[float, float]:
    """The least process CPU and wall seconds of `repeats` runs: other processes on the cores only ever add."""
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return min(cpu), min(wall)


def measure(width: int, height: int, objects: int, count: int, repeats: int, out_dir: Path) -> dict:
    frames = clip(width, height, objects)
    path = out_dir / f"{width}x{height}.mp4"
    render_video_overlay(played(frames, 5), FPS, path)  # first use: supervision, fonts, x264
    draw_cpu, _ = cpu_and_wall(lambda: draw_only(played(frames, count)), repeats)
    total_cpu, total_wall = cpu_and_wall(lambda: render_video_overlay(played(frames, count), FPS, path), repeats)
    info = render_video_overlay(played(frames, count), FPS, path)
    return {
        "frame": f"{width}x{height}",
        "preview": f"{info.width}x{info.height}",
        "cpu_ms_per_frame": round(total_cpu / count * 1000, 1),
        "draw_cpu_ms_per_frame": round(draw_cpu / count * 1000, 1),
        "encode_cpu_ms_per_frame": round((total_cpu - draw_cpu) / count * 1000, 1),
        "wall_ms_per_frame": round(total_wall / count * 1000, 1),
        "kbit_per_s": round(path.stat().st_size * 8 / 1000 / (count / FPS)),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# The MP4 preview's CPU per frame ({report['machine']}, {report['objects']} objects, "
        f"{report['frames']} frames at {FPS:g} fps, {report['encoder']} {report['encoder_options']})",
        "",
        f"Load average while measuring: {report['load_average_1min']} (other processes share the cores).",
        "",
        f"Process CPU ms per frame (libx264's threads included), the least of {report['repeats']} runs; draw = "
        "decoding the RLEs and drawing as the image overlay does; encode = the rest (colour conversion, libx264, MP4).",
        "",
        "| frame | preview | CPU ms/frame | draw | encode | wall ms/frame | kbit/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["sizes"]:
        lines.append(
            f"| {row['frame']} | {row['preview']} | {row['cpu_ms_per_frame']} | {row['draw_cpu_ms_per_frame']} | "
            f"{row['encode_cpu_ms_per_frame']} | {row['wall_ms_per_frame']} | {row['kbit_per_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    with tempfile.TemporaryDirectory() as out_dir:
        sizes = [
            measure(width, height, args.objects, args.frames, args.repeats, Path(out_dir)) for width, height in SIZES
        ]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "objects": args.objects,
        "frames": args.frames,
        "repeats": args.repeats,
        "encoder": ENCODER,
        "encoder_options": ENCODER_OPTIONS,
        "pyav": av.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes on the machine inflate CPU ms too
        "sizes": sizes,
    }
    table = markdown(report)
    print(table)
    save(report, args.out, machine, "video-overlay", markdown=table)


if __name__ == "__main__":
    main()
