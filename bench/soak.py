"""A bounded soak: 32 concurrent clients on loopback against a served Bento (demo model, local storage), with wrk.

    python bench/soak.py [--seconds 300] [--connections 32]      (needs wrk: apt-get install wrk)

Reports errors, p50/p99 latency and the servers' resident memory after warm-up vs at the end.
Writes bench/results/<date>-soak-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from served import ServedBento  # noqa: E402

from bench.output import DEFAULT_OUT, save  # noqa: E402

API_KEY = "soak-key-0123456789"
WRK_SCRIPT = """
math.randomseed(os.time())
local function hex(n) local s = "" for _ = 1, n do s = s .. string.format("%x", math.random(0, 15)) end return s end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "API_KEY_VALUE"
request = function()
  local id = hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-8" .. hex(3) .. "-" .. hex(12)
  return wrk.format(nil, "/api/v1/predict", nil,
    '{"image_url": "images/soak.jpg", "text_prompt": "car", "user_id": "soak", "include_rle": false, "task_id": "'
    .. id .. '"}')
end
"""


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (the gateway and the model service)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        total += int(match.group(1)) if match else 0
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=60, help="seconds before the memory baseline")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sam3-soak-"))
    (workdir / "storage" / "images").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(workdir / "storage" / "images" / "soak.jpg", quality=90)
    (workdir / "soak.lua").write_text(WRK_SCRIPT.replace("API_KEY_VALUE", API_KEY))
    bento = ServedBento(
        {"API_SECRET_KEY": API_KEY, "LOCAL_STORAGE_DIR": str(workdir / "storage")}, workdir / "serve.log"
    ).start()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample_memory() -> None:
        started = time.monotonic()
        while not done.wait(5):
            samples.append((time.monotonic() - started, tree_rss_mb(bento._process.pid)))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    try:
        wrk = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "--timeout",
                "60s",
                "--latency",
                "-s",
                str(workdir / "soak.lua"),
                bento.url,
            ],
            capture_output=True,
            text=True,
            timeout=args.seconds + 120,
        )
    finally:
        done.set()
        sampler.join()
        bento.stop()
    output = wrk.stdout
    print(output)
    baseline = next((rss for t, rss in samples if t >= args.warmup), samples[0][1])
    final = samples[-1][1]
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", output)) else 0
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (dev/CI box)",
        "model": "demo (tiny, CPU)",
        "seconds": args.seconds,
        "connections": args.connections,
        "requests": requests,
        "requests_per_s": round(requests / args.seconds, 1),
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "latency": {p: re.search(rf"\s{p}%\s+([\d.]+\w+)", output).group(1) for p in ("50", "90", "99")},
        "rss_mb_after_warmup": round(baseline, 1),
        "rss_mb_at_end": round(final, 1),
        "rss_growth_pct": round(100 * (final - baseline) / baseline, 2),
        "rss_samples_mb": [round(rss, 1) for _, rss in samples],
    }
    summary = (
        f"Soak, {report['machine']}, {report['model']}: {args.connections} clients for {args.seconds} s, loopback.\n\n"
        "| requests | req/s | errors (non-2xx + socket) | p50 | p90 | p99 | RSS after warm-up | RSS at end | growth |\n"
        f"| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {requests} | {report['requests_per_s']} | {non_2xx + socket_errors} | {report['latency']['50']} | "
        f"{report['latency']['90']} | {report['latency']['99']} | {report['rss_mb_after_warmup']} MB | "
        f"{report['rss_mb_at_end']} MB | {report['rss_growth_pct']}% |\n"
    )
    save(report, DEFAULT_OUT, f"soak-{platform.machine()}-{os.cpu_count()}cores", markdown=summary.rstrip("\n"))
    print(summary)


if __name__ == "__main__":
    main()
