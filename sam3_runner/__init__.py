"""SAM 3 inference core: weight loading, batched concept and visual-prompt segmentation, post-processing.

Knows nothing about HTTP, object storage or task rows.

Importing the package is light: the prompt and result types and the image decoder load no torch. The model's
parts (Sam3Engine, load_model, LoadedModel, WeightsError, VisualPromptsUnavailable) import torch and transformers
(~700 MB of memory, ~3 s) when first used (PEP 562), so the gateway's workers, which only build prompts and read
results, never load them.
"""

from importlib import import_module

from sam3_runner.images import (
    DecodedImage,
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    decode_threads,
    header_size,
)
from sam3_runner.types import (
    BOX_ONLY_TEXT,
    Abandoned,
    BoxPrompt,
    Instance,
    Job,
    PointPrompt,
    Prompt,
    PromptResult,
    VisualPrompt,
)

_MODEL_PARTS = {
    "Sam3Engine": "sam3_runner.engine",
    "LoadedModel": "sam3_runner.loading",
    "WeightsError": "sam3_runner.loading",
    "load_model": "sam3_runner.loading",
    "VisualPromptsUnavailable": "sam3_runner.visual",
}


def __getattr__(name: str):
    if name in _MODEL_PARTS:
        return getattr(import_module(_MODEL_PARTS[name]), name)
    raise AttributeError(f"module 'sam3_runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODEL_PARTS))


__all__ = [
    "BOX_ONLY_TEXT",
    "Abandoned",
    "BoxPrompt",
    "DecodedImage",
    "ImageDecodeError",
    "ImageTooLarge",
    "Instance",
    "Job",
    "LoadedModel",
    "PointPrompt",
    "Prompt",
    "PromptResult",
    "Sam3Engine",
    "VisualPrompt",
    "VisualPromptsUnavailable",
    "WeightsError",
    "decode_image",
    "decode_threads",
    "header_size",
    "load_model",
]
