"""Fetch the wheels the lent GPU machine lacks (its Python 3.12 has torch, transformers, numpy, pillow, ...).

    python3 scripts/device-wheels.py      # -> .whl/ (pycocotools) and .whl-serve/ (the serving stack)

Both folders are ignored by git (.git/info/exclude) and carried by the device tool (bench/NOTES.md). What the
machine already has is read from the device tool's notes, so only missing packages travel.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_NOTES = Path("/work/.library/device/KINDS.md")
ON_DEVICE_ALREADY = {"torch", "torchvision", "transformers", "huggingface-hub", "safetensors", "numpy", "pillow"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 26, 24, 17, 12, 5)] + ["manylinux2014_x86_64", "linux_x86_64"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    line = next(line for line in DEVICE_NOTES.read_text().splitlines() if "Packages: " in line)
    return {normalise(name) for name in line.split("Packages: ", 1)[1].rstrip(".").split(", ")}


def resolve(requirements: list[str]) -> list[dict]:
    """pip's own resolution for Python 3.12 on x86_64, without installing anything."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
            + ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", *platforms]
            + ["--target", str(Path(scratch) / "target"), "--report", str(report), *requirements],
            check=True,
        )
        return json.loads(report.read_text())["install"]


def fetch(packages: list[dict], folder: Path) -> None:
    """Exactly these wheels in `folder`: two versions of one package would stop the install on the device."""
    folder.mkdir(exist_ok=True)
    urls = {url.rsplit("/", 1)[-1]: url for url in (p["download_info"]["url"].split("#")[0] for p in packages)}
    for stale in folder.glob("*.whl"):
        if stale.name not in urls:
            stale.unlink()
    for name, url in urls.items():
        if not (folder / name).exists():
            urllib.request.urlretrieve(url, folder / name)
    print(f"{folder.name}: {len(packages)} wheels, {sum(p.stat().st_size for p in folder.glob('*.whl')) >> 20} MiB")


def main() -> None:
    present = device_packages() | ON_DEVICE_ALREADY
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    serving = [r for r in requirements if normalise(re.split(r"[<>=!~ ]", r)[0]) not in present | {"pycocotools"}]
    fetch([p for p in resolve(serving) if normalise(p["metadata"]["name"]) not in present], ROOT / ".whl-serve")
    coco = [r for r in requirements if r.startswith("pycocotools")]
    fetch([p for p in resolve(coco) if normalise(p["metadata"]["name"]) not in present], ROOT / ".whl")


if __name__ == "__main__":
    main()
