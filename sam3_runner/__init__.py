"""SAM 3 inference core: weight loading, batched concept and visual-prompt segmentation, post-processing.

Knows nothing about HTTP, object storage or task rows.
"""

from sam3_runner.engine import Sam3Engine
from sam3_runner.images import (
    DecodedImage,
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    decode_threads,
    header_size,
)
from sam3_runner.loading import LoadedModel, WeightsError, load_model
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
from sam3_runner.visual import VisualPromptsUnavailable

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
