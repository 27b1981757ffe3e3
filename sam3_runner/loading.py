"""Turn SAM3_WEIGHTS_PATH into a model on a device: a hub repo, a local directory, a Meta `.pt`, or `demo`.

Weights whose config is `sam3_video` (the hub's facebook/sam3, `demo`, Meta's full sam3.pt) load as transformers'
`Sam3VideoModel`: the concept detector (`Sam3Model`) plus the tracker's neck, prompt encoder and mask decoder, which
answer visual prompts (points, a box, a previous mask) from the detector's ViT trunk; the trunk is held once. A `sam3`
(detector-only) directory loads the detector alone: concept prompts only.

A Meta `.pt` never needs the hub: its architecture comes from SAM3_CONFIG, else a config.json beside it, else
transformers' default `Sam3VideoConfig()` (full-size SAM 3 with its tracker, the architecture of Meta's released
sam3.pt); its processor from processor files in SAM3_CONFIG's directory, else beside it, else built in
(`Sam3ImageProcessor()` defaults and CLIP's BPE tokenizer from open_clip_torch's vocabulary file,
sam3_runner.clip_tokenizer). A `.pt` holding the tracker (`tracker.*`, as the released sam3.pt does) under a
`sam3_video` architecture loads as `Sam3VideoModel` (sam3_runner.meta_checkpoint.video_model_state_dict); a `.pt`
holding the detector alone (`detector.*`), or any `.pt` under a `sam3` architecture, loads the detector alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Sam3Config,
    Sam3ImageProcessor,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerVideoModel,
    Sam3VideoConfig,
    Sam3VideoModel,
)
from transformers.models.sam3.modeling_sam3 import Sam3VisionNeck

from sam3_runner.clip_tokenizer import VOCABULARY_SIZE, clip_tokenizer
from sam3_runner.demo import build_demo_video_model
from sam3_runner.meta_checkpoint import (
    UnknownKeyError,
    convert_state_dict,
    holds_tracker,
    image_model_state_dict,
    video_model_state_dict,
)

log = logging.getLogger(__name__)

DEMO = "demo"
CONFIG_FILE = "config.json"
VIDEO_MODEL_TYPE = "sam3_video"  # the config of a detector + tracker checkpoint (the hub's facebook/sam3)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HOW_TO_GET_WEIGHTS = (
    "Set SAM3_WEIGHTS_PATH to one of: a Hugging Face repo id (default facebook/sam3; it is gated, so request access "
    "on its model page and set HF_TOKEN), a local directory in transformers format (config.json, model.safetensors, "
    "processor and tokenizer files, e.g. from `hf download facebook/sam3 --local-dir DIR`), Meta's sam3.pt "
    "(loads offline; SAM3_CONFIG names its config.json if it is not full-size SAM 3), or `demo` for tiny random "
    "weights that exercise the API but segment nothing meaningful."
)


class WeightsError(RuntimeError):
    """Weights could not be found or read; the message says how to get them."""


@dataclass
class LoadedModel:
    """The model on its device. `model` is the concept detector; `tracker` and `tracker_neck` (None for detector-only
    weights) answer visual prompts from the detector's ViT trunk output (sam3_runner/visual.py): the tracker's memory
    modules (video only) are loaded with it but never run."""

    model: Sam3Model
    processor: Sam3Processor
    device: torch.device
    dtype: torch.dtype
    source: str
    kind: str  # "hub", "directory", "meta_checkpoint", "demo"
    random_weights: bool
    load_seconds: float
    tracker: Sam3TrackerVideoModel | None = None
    tracker_neck: Sam3VisionNeck | None = None
    # The container of detector + tracker + tracker neck (the same modules as above, not copies), for video
    # tracking (sam3_runner/video.py); None for detector-only weights.
    video: Sam3VideoModel | None = None

    @property
    def visual_prompts(self) -> bool:
        return self.tracker is not None

    def _modules(self) -> list[torch.nn.Module]:
        return [module for module in (self.model, self.tracker, self.tracker_neck) if module is not None]

    @property
    def parameters(self) -> int:
        """Every parameter held (detector, tracker and its neck), each once."""
        return sum(p.numel() for module in self._modules() for p in module.parameters())

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for module in self._modules() for p in module.parameters())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: the ViT trunk (shared by both tasks), the detector's heads (its FPN neck, geometry
        encoder, DETR encoder/decoder, mask head, scoring), the text encoder (CLIP and its projection), the tracker
        (its neck, prompt encoder, mask decoder, and the memory modules it holds for video)."""
        trunk = _count(self.model.vision_encoder.backbone)
        text = _count(self.model.text_encoder) + _count(self.model.text_projection)
        tracker = sum(_count(module) for module in (self.tracker, self.tracker_neck) if module is not None)
        return {
            "trunk": trunk,
            "detector_heads": _count(self.model) - trunk - text,
            "text": text,
            "tracker": tracker,
        }

    def info(self) -> dict:
        info = {
            "model_name": "SAM 3 (random demo weights)" if self.random_weights else "SAM 3",
            "model_version": "sam3-demo-tiny" if self.random_weights else "sam3",
            "parameters": self.parameters,
            "parameter_counts": self.parameter_counts(),
            "weights_size_gb": round(self.weights_bytes / 1e9, 4),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights_source": self.source,
            "weights_kind": self.kind,
            "random_weights": self.random_weights,
            "load_seconds": round(self.load_seconds, 2),
            "visual_prompts": self.visual_prompts,
            # Video tracking runs the same detector, tracker and trunk (Sam3VideoModel holds these modules, not
            # copies): the weights counted above are all the GPU holds, plus each running clip's tracker state.
            "video": self.video is not None,
        }
        if self.device.type == "cuda":
            info["gpu_memory_gb"] = {
                "allocated": round(torch.cuda.memory_allocated(self.device) / 1e9, 3),
                "reserved": round(torch.cuda.memory_reserved(self.device) / 1e9, 3),
            }
        return info


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def load_model(
    weights: str, device: str = "auto", dtype: str = "auto", hf_token: str | None = None, config: str | None = None
) -> LoadedModel:
    """Load SAM 3 for inference. Never falls back to `demo`: a bad path is an error that says what to do.

    `config` (SAM3_CONFIG) applies to a Meta `.pt` only: a config.json, or a directory holding one (and optionally
    the processor files), that overrides the files beside the checkpoint and the built-in full-size defaults.
    Raises WeightsError.
    """
    started = time.perf_counter()
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    weights = (weights or "").strip()
    config = (config or "").strip() or None
    if check_weights_reference(weights, config) == DEMO:
        model, processor = build_demo_video_model()
        kind, source = "demo", "demo (tiny random weights, built in memory)"
        log.warning(
            "!!! SAM3_WEIGHTS_PATH=demo: RANDOM WEIGHTS. Masks are meaningless; use real weights in production."
        )
    else:
        kind, model, processor = _load_weights(weights, hf_token, config)
        source = weights
    model = model.to(device=target_device, dtype=target_dtype).eval()
    model.requires_grad_(False)
    parts = (
        (model.detector_model, model.tracker_model, model.tracker_neck)
        if isinstance(model, Sam3VideoModel)
        else (model, None, None)
    )
    detector, tracker, tracker_neck = parts
    loaded = LoadedModel(
        detector,
        processor,
        target_device,
        target_dtype,
        source,
        kind,
        kind == "demo",
        time.perf_counter() - started,
        tracker,
        tracker_neck,
        model if isinstance(model, Sam3VideoModel) else None,
    )
    log.info(
        "SAM 3 loaded from %s (%s) on %s as %s: %s parameters in %.1f s; visual prompts %s",
        source,
        kind,
        target_device,
        target_dtype,
        f"{loaded.parameters:,}",
        loaded.load_seconds,
        "on" if loaded.visual_prompts else "off (the weights hold no tracker)",
    )
    return loaded


def check_weights_reference(weights: str, config: str | None = None) -> str:
    """The kind of weights `weights` names ("demo", "directory", "meta_checkpoint", "hub"), without loading them.

    Cheap enough to run before a background load, so a path that cannot work fails the start at once: that includes
    a `config` (SAM3_CONFIG) that names no config.json, or is given for weights that carry their own config.
    """
    kind = _weights_kind(weights)
    config = (config or "").strip()
    if config and kind != "meta_checkpoint":
        raise WeightsError(
            f"SAM3_CONFIG is set but SAM3_WEIGHTS_PATH is not a Meta .pt: {kind} weights bring their own config. "
            "Unset SAM3_CONFIG."
        )
    if config:
        _config_file(config)
    return kind


def _weights_kind(weights: str) -> str:
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


def _load_weights(
    weights: str, hf_token: str | None, config: str | None
) -> tuple[str, Sam3Model | Sam3VideoModel, Sam3Processor]:
    kind = check_weights_reference(weights, config)
    if kind == "directory":
        return kind, *_from_pretrained(str(Path(weights).expanduser()), None, f"the directory {weights}")
    if kind == "meta_checkpoint":
        return kind, *_from_meta_checkpoint(Path(weights).expanduser(), config)
    return kind, *_from_pretrained(weights, hf_token, f"the Hugging Face repo {weights}")


def _from_pretrained(
    location: str, hf_token: str | None, what: str
) -> tuple[Sam3Model | Sam3VideoModel, Sam3Processor]:
    """A `sam3_video` config loads detector + tracker (Sam3VideoModel), any other the detector (Sam3Model).

    Sam3VideoModel reads the tracker's keys as the hub holds them (`tracker_model.*`) and as transformers 5.17's
    save_pretrained writes them (`tracker_model.tracker_model.*`: its sam3_tracker key renaming applied in reverse
    within the tracker).
    """
    try:
        architecture = AutoConfig.from_pretrained(location, token=hf_token)
        model_class = Sam3VideoModel if architecture.model_type == VIDEO_MODEL_TYPE else Sam3Model
        model = model_class.from_pretrained(location, config=architecture, token=hf_token)
        processor = Sam3Processor.from_pretrained(location, token=hf_token)
    except Exception as exc:  # the hub and file readers raise many types; all mean "no usable weights here"
        raise WeightsError(f"could not load SAM 3 from {what}: {_first_line(exc)}. " + HOW_TO_GET_WEIGHTS) from None
    return model, processor


def _from_meta_checkpoint(path: Path, config: str | None) -> tuple[Sam3Model | Sam3VideoModel, Sam3Processor]:
    """A `sam3.pt`, loaded without the hub (see the module docstring for where config, processor and the choice
    between detector + tracker and detector alone come from)."""
    architecture, architecture_source = meta_checkpoint_config(path, config)
    video_config = isinstance(architecture, Sam3VideoConfig)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        video = video_config and holds_tracker(checkpoint)
        state = video_model_state_dict(checkpoint) if video else convert_state_dict(image_model_state_dict(checkpoint))
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
    detector_config = architecture.detector_config if video_config else architecture
    model_class, model_config = (Sam3VideoModel, architecture) if video else (Sam3Model, detector_config)
    _check_fits(state, model_class, model_config, f"the Meta checkpoint {path}", architecture_source)
    processor, processor_source = meta_checkpoint_processor(path, config, detector_config)
    model = model_class(model_config)
    model.load_state_dict(state)
    log.info(
        "Meta checkpoint %s (%s): architecture from %s, processor from %s",
        path,
        "detector + tracker" if video else f"detector alone: {_why_detector_only(video_config)}",
        architecture_source,
        processor_source,
    )
    return model, processor


def _why_detector_only(video_config: bool) -> str:
    if video_config:
        return "the file holds no tracker (`tracker.*`)"
    return "its config is `sam3`, the detector's (a `sam3_video` config loads the tracker too)"


def meta_checkpoint_config(checkpoint: Path, config: str | None = None) -> tuple[Sam3Config | Sam3VideoConfig, str]:
    """The architecture a Meta checkpoint loads into, and where it came from.

    SAM3_CONFIG (`config`: a config.json or a directory holding one) wins, then a config.json beside the checkpoint,
    then transformers' default `Sam3VideoConfig()`: full-size SAM 3 with its tracker (859,921,848 parameters, the
    detector's `Sam3Config()` 840,376,374 of them), the released sam3.pt's. A `sam3_video` config.json (the hub's)
    gives a Sam3VideoConfig, any other a Sam3Config.
    Raises WeightsError when the chosen file cannot be read.
    """
    if config:
        file, source = _config_file(config), f"SAM3_CONFIG ({config})"
    elif (checkpoint.parent / CONFIG_FILE).is_file():
        file = checkpoint.parent / CONFIG_FILE
        source = str(file)
    else:
        return Sam3VideoConfig(), "the built-in full-size SAM 3 config (transformers' Sam3VideoConfig())"
    try:
        video = json.loads(file.read_text()).get("model_type") == VIDEO_MODEL_TYPE
        return (Sam3VideoConfig if video else Sam3Config).from_json_file(file), source
    except Exception as exc:  # JSON and config validation raise many types
        raise WeightsError(f"could not read the SAM 3 config {file}: {_first_line(exc)}") from None


def meta_checkpoint_processor(
    checkpoint: Path, config: str | None, architecture: Sam3Config
) -> tuple[Sam3Processor, str]:
    """The processor (image preprocessing + tokenizer) for a Meta checkpoint, and where it came from.

    Processor files (processor_config.json, tokenizer files) in SAM3_CONFIG's directory win, then those beside the
    checkpoint, then the built-in full-size processor: `Sam3ImageProcessor()` (1008x1008 bilinear, rescale 1/255,
    mean = std = 0.5) with CLIP's tokenizer (sam3_runner.clip_tokenizer). Raises WeightsError when the files cannot
    be read, or when the built-in processor does not fit `architecture` (another image size or vocabulary).
    """
    directories = ([_config_file(config).parent] if config else []) + [checkpoint.parent]
    for directory in directories:
        if any((directory / name).is_file() for name in PROCESSOR_FILES):
            try:
                return Sam3Processor.from_pretrained(str(directory), local_files_only=True), str(directory)
            except Exception as exc:  # see _from_pretrained
                raise WeightsError(f"could not read the processor files in {directory}: {_first_line(exc)}") from None
    image_processor = Sam3ImageProcessor()
    built_in = (image_processor.size["height"], image_processor.size["width"], VOCABULARY_SIZE)
    wanted = (
        architecture.vision_config.backbone_config.image_size,
        architecture.vision_config.backbone_config.image_size,
        architecture.text_config.vocab_size,
    )
    if built_in != wanted:
        raise WeightsError(
            f"{checkpoint}'s config wants {wanted[0]} px images and a {wanted[2]}-token vocabulary; the built-in "
            f"processor is full-size SAM 3's ({built_in[0]} px, {built_in[2]} tokens). Put the processor files "
            "(processor_config.json, tokenizer files) beside the checkpoint or in SAM3_CONFIG's directory."
        )
    processor = Sam3Processor(image_processor=image_processor, tokenizer=clip_tokenizer())
    return processor, "the built-in full-size SAM 3 processor (open_clip_torch's CLIP vocabulary)"


def _config_file(config: str) -> Path:
    path = Path(config).expanduser()
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise WeightsError(f"SAM3_CONFIG={config!r} is not a config.json or a directory holding one")
    return file


def _check_fits(
    state: dict[str, torch.Tensor],
    model_class: type[Sam3Model] | type[Sam3VideoModel],
    config: Sam3Config | Sam3VideoConfig,
    what: str,
    config_source: str,
) -> None:
    """Compare names and shapes with the architecture built on the meta device (no memory, ~0.1 s at full size)."""
    with torch.device("meta"):
        expected = {key: tuple(tensor.shape) for key, tensor in model_class(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key}: {tuple(state[key].shape)} in the file, {expected[key]} in the config"
        for key in sorted(set(state) & set(expected))
        if tuple(state[key].shape) != expected[key]
    ]
    if missing or unexpected or reshaped:
        raise WeightsError(
            f"{what} does not fit the SAM 3 architecture of {config_source}: {len(reshaped)} tensors of another "
            f"shape (e.g. {reshaped[:2]}), {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:2]}). Set SAM3_CONFIG to the config.json the checkpoint was made with."
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
