"""Turn SAM3_WEIGHTS_PATH into a model on a device: a hub repo, a local directory, a Meta `.pt`, or `demo`."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Sam3Config, Sam3Model, Sam3Processor

from sam3_runner.demo import build_demo_model
from sam3_runner.meta_checkpoint import UnknownKeyError, convert_state_dict, image_model_state_dict

log = logging.getLogger(__name__)

DEMO = "demo"
DEFAULT_HUB_REPO = "facebook/sam3"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HOW_TO_GET_WEIGHTS = (
    "Set SAM3_WEIGHTS_PATH to one of: a Hugging Face repo id (default facebook/sam3; it is gated, so request access "
    "on its model page and set HF_TOKEN), a local directory in transformers format (config.json, model.safetensors, "
    "processor and tokenizer files, e.g. from `hf download facebook/sam3 --local-dir DIR`), Meta's sam3.pt, "
    "or `demo` for tiny random weights that exercise the API but segment nothing meaningful."
)


class WeightsError(RuntimeError):
    """Weights could not be found or read; the message says how to get them."""


@dataclass
class LoadedModel:
    model: Sam3Model
    processor: Sam3Processor
    device: torch.device
    dtype: torch.dtype
    source: str
    kind: str  # "hub", "directory", "meta_checkpoint", "demo"
    random_weights: bool
    load_seconds: float

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def info(self) -> dict:
        return {
            "model_name": "SAM 3 (random demo weights)" if self.random_weights else "SAM 3",
            "model_version": "sam3-demo-tiny" if self.random_weights else "sam3",
            "parameters": self.parameters,
            "weights_size_gb": round(self.weights_bytes / 1e9, 4),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights_source": self.source,
            "weights_kind": self.kind,
            "random_weights": self.random_weights,
            "load_seconds": round(self.load_seconds, 2),
        }


def resolve_device(requested: str) -> torch.device:
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError("SAM3_DEVICE asks for CUDA but no CUDA device is visible; use SAM3_DEVICE=cpu or auto")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise WeightsError(f"SAM3_DEVICE must be auto, cuda, cuda:N or cpu, not {requested!r}")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if requested not in names:
        raise WeightsError(f"SAM3_DTYPE must be auto, bf16, fp16 or fp32, not {requested!r}")
    return names[requested]


def load_model(weights: str, device: str = "auto", dtype: str = "auto", hf_token: str | None = None) -> LoadedModel:
    """Load SAM 3 for inference. Never falls back to `demo`: a bad path is an error that says what to do."""
    started = time.perf_counter()
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    weights = (weights or "").strip()
    if check_weights_reference(weights) == DEMO:
        model, processor = build_demo_model()
        kind, source = "demo", "demo (tiny random weights, built in memory)"
        log.warning(
            "!!! SAM3_WEIGHTS_PATH=demo: RANDOM WEIGHTS. Masks are meaningless; use real weights in production."
        )
    else:
        kind, model, processor = _load_weights(weights, hf_token)
        source = weights
    model = model.to(device=target_device, dtype=target_dtype).eval()
    model.requires_grad_(False)
    loaded = LoadedModel(
        model, processor, target_device, target_dtype, source, kind, kind == "demo", time.perf_counter() - started
    )
    log.info(
        "SAM 3 loaded from %s (%s) on %s as %s: %s parameters in %.1f s",
        source,
        kind,
        target_device,
        target_dtype,
        f"{loaded.parameters:,}",
        loaded.load_seconds,
    )
    return loaded


def check_weights_reference(weights: str) -> str:
    """The kind of weights `weights` names ("demo", "directory", "meta_checkpoint", "hub"), without loading them.

    Cheap enough to run before a background load, so a path that cannot work fails the start at once.
    """
    weights = (weights or "").strip()
    if not weights:
        raise WeightsError("SAM3_WEIGHTS_PATH is empty. " + HOW_TO_GET_WEIGHTS)
    if weights == DEMO:
        return "demo"
    path = Path(weights).expanduser()
    if path.is_dir():
        return "directory"
    if path.is_file():
        return "meta_checkpoint"
    looks_like_path = weights.startswith(("/", ".", "~")) or weights.endswith((".pt", ".pth")) or path.exists()
    if looks_like_path or not _HUB_ID.match(weights):
        raise WeightsError(f"SAM3_WEIGHTS_PATH={weights!r} does not exist. " + HOW_TO_GET_WEIGHTS)
    return "hub"


def _load_weights(weights: str, hf_token: str | None) -> tuple[str, Sam3Model, Sam3Processor]:
    kind = check_weights_reference(weights)
    if kind == "directory":
        return kind, *_from_pretrained(str(Path(weights).expanduser()), None, f"the directory {weights}")
    if kind == "meta_checkpoint":
        return kind, *_from_meta_checkpoint(Path(weights).expanduser(), hf_token)
    return kind, *_from_pretrained(weights, hf_token, f"the Hugging Face repo {weights}")


def _from_pretrained(location: str, hf_token: str | None, what: str) -> tuple[Sam3Model, Sam3Processor]:
    try:
        model = Sam3Model.from_pretrained(location, token=hf_token)
        processor = Sam3Processor.from_pretrained(location, token=hf_token)
    except Exception as exc:  # the hub and file readers raise many types; all mean "no usable weights here"
        raise WeightsError(f"could not load SAM 3 from {what}: {_first_line(exc)}. " + HOW_TO_GET_WEIGHTS) from None
    return model, processor


def _from_meta_checkpoint(path: Path, hf_token: str | None) -> tuple[Sam3Model, Sam3Processor]:
    """A `sam3.pt`: config and processor come from the same directory when it has them, else from the hub repo."""
    config_source = str(path.parent) if (path.parent / "config.json").is_file() else DEFAULT_HUB_REPO
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = convert_state_dict(image_model_state_dict(checkpoint))
    except UnknownKeyError as exc:
        raise WeightsError(
            f"the checkpoint {path} holds the key {exc.key!r}, which is not SAM 3's. A file in SAM3_WEIGHTS_PATH "
            "must be Meta's original SAM 3 checkpoint (sam3.pt: the image model under `detector.`, the tracker "
            "under `tracker.`); for weights in transformers format give their directory."
        ) from None
    except Exception as exc:  # unpickling and format errors come in many types
        raise WeightsError(
            f"could not read the Meta checkpoint {path}: {_first_line(exc)}. " + HOW_TO_GET_WEIGHTS
        ) from None
    try:
        config = Sam3Config.from_pretrained(config_source, token=hf_token)
        processor = Sam3Processor.from_pretrained(config_source, token=hf_token)
    except Exception as exc:  # see _from_pretrained
        raise WeightsError(
            f"{path} holds weights only; its config and tokenizer come from {config_source}, which failed: "
            f"{_first_line(exc)}. Put config.json and the processor files beside the checkpoint, or set HF_TOKEN."
        ) from None
    model = Sam3Model(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"the Meta checkpoint {path} does not fit the SAM 3 config: {_first_line(exc)}") from None
    if missing or unexpected:
        raise WeightsError(
            f"the Meta checkpoint {path} does not fit the SAM 3 architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model, processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
