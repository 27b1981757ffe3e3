"""What the gateway should send the model service: encoded image bytes or decoded pixels? (CPU, no model)

BentoML pickles items between the two services. This times pickling + unpickling each form and the decode it
implies, for a 1920x1080 JPEG.   python bench/transport.py
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import synthetic_jpeg  # noqa: E402
from sam3_runner import decode_image  # noqa: E402


def per_call_ms(fn, repeat: int = 20) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) * 1000 / repeat


def main() -> None:
    jpeg = synthetic_jpeg(1920, 1080, 1)
    pixels = np.asarray(decode_image(jpeg).pixels)
    rows = {
        "encoded bytes": (len(pickle.dumps(jpeg)), per_call_ms(lambda: pickle.loads(pickle.dumps(jpeg)))),
        "decoded uint8 array": (len(pickle.dumps(pixels)), per_call_ms(lambda: pickle.loads(pickle.dumps(pixels)))),
    }
    decode_ms = per_call_ms(lambda: decode_image(jpeg))
    print("| form | pickled size | pickle + unpickle |")
    print("| --- | --- | --- |")
    for name, (size, ms) in rows.items():
        print(f"| {name} | {size / 1e6:.2f} MB | {ms:.2f} ms |")
    print(f"\nDecoding the JPEG (needed on one side or the other): {decode_ms:.1f} ms. Copy of the array over a local")
    print(f"socket moves {rows['decoded uint8 array'][0] / len(jpeg):.0f}x more bytes than the JPEG.")
    assert np.array_equal(pickle.loads(pickle.dumps(pixels)), pixels)


if __name__ == "__main__":
    main()
