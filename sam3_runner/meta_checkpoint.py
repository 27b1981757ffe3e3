"""Meta's original `sam3.pt` -> transformers `Sam3Model` state dict.

Each Meta key gets a plan: the transformers key(s) it feeds and how its tensor changes on the way
(fused q/k/v split in three, the ViT CLS position dropped, the CLIP text projection transposed).
Plans work on shapes as well as tensors, so the whole table is testable without real weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DETECTOR_PREFIX = "detector."
TRACKER_PREFIX = "tracker."  # the interactive (video) tracker's own modules: never part of the image model

# The SAM 2 neck the tracker reads the trunk through: 22 keys `sam2_convs.{0..3}.*`, laid out like `convs`
# (Meta's video builder loads them into the detector). The image model has no counterpart; the tracker's neck
# (transformers `tracker_neck.*`) will take them with the visual-prompts work.
SAM2_NECK = re.compile(
    r"^backbone\.vision_backbone\.sam2_convs\.\d+\.(dconv_2x2(_[01])?|conv_1x1|conv_3x3)\.(weight|bias)$"
)

# Meta keys that have no counterpart in the transformers image model: the ViT's precomputed rope tables
# (transformers recomputes them), the point-prompt projections (points belong to the tracker) and the SAM 2 neck.
NO_COUNTERPART = (
    re.compile(r"^backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis$"),
    re.compile(r"^geometry_encoder\.points_(direct|pool|pos_enc)_project\.(weight|bias)$"),
    SAM2_NECK,
)

_VIT = r"backbone\.vision_backbone\.trunk\."
_TEXT = r"backbone\.language_backbone\.encoder\."
_ATTN = r"(self_attn|cross_attn_image|cross_attn|ca_text|cross_attend_prompt)"

# (Meta pattern, transformers replacement): the first match wins; patterns are anchored at both ends.
_RENAMES: tuple[tuple[str, str], ...] = (
    # Vision: ViT trunk
    (_VIT + r"pos_embed", r"vision_encoder.backbone.embeddings.position_embeddings"),
    (_VIT + r"patch_embed\.proj\.(.+)", r"vision_encoder.backbone.embeddings.patch_embeddings.projection.\1"),
    (_VIT + r"ln_pre\.(.+)", r"vision_encoder.backbone.layer_norm.\1"),
    (_VIT + r"blocks\.(\d+)\.norm([12])\.(.+)", r"vision_encoder.backbone.layers.\1.layer_norm\2.\3"),
    (_VIT + r"blocks\.(\d+)\.attn\.qkv\.(.+)", r"vision_encoder.backbone.layers.\1.attention.{qkv}_proj.\2"),
    (_VIT + r"blocks\.(\d+)\.attn\.proj\.(.+)", r"vision_encoder.backbone.layers.\1.attention.o_proj.\2"),
    (_VIT + r"blocks\.(\d+)\.mlp\.(fc[12])\.(.+)", r"vision_encoder.backbone.layers.\1.mlp.\2.\3"),
    # Vision: FPN neck (the 4x level has two transposed convs around a GELU, at indices 0 and 2)
    (
        r"backbone\.vision_backbone\.convs\.(\d+)\.dconv_2x2(_0)?\.(.+)",
        r"vision_encoder.neck.fpn_layers.\1.scale_layers.0.\3",
    ),
    (
        r"backbone\.vision_backbone\.convs\.(\d+)\.dconv_2x2_1\.(.+)",
        r"vision_encoder.neck.fpn_layers.\1.scale_layers.2.\2",
    ),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_1x1\.(.+)", r"vision_encoder.neck.fpn_layers.\1.proj1.\2"),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_3x3\.(.+)", r"vision_encoder.neck.fpn_layers.\1.proj2.\2"),
    # Text: CLIP
    (_TEXT + r"token_embedding\.(.+)", r"text_encoder.text_model.embeddings.token_embedding.\1"),
    (_TEXT + r"positional_embedding", r"text_encoder.text_model.embeddings.position_embedding.weight"),
    (_TEXT + r"ln_final\.(.+)", r"text_encoder.text_model.final_layer_norm.\1"),
    (_TEXT + r"text_projection", r"text_encoder.text_projection.weight"),
    (
        _TEXT + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
        r"text_encoder.text_model.encoder.layers.\1.self_attn.{qkv}_proj.\2",
    ),
    (
        _TEXT + r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(.+)",
        r"text_encoder.text_model.encoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        _TEXT + r"transformer\.resblocks\.(\d+)\.ln_([12])\.(.+)",
        r"text_encoder.text_model.encoder.layers.\1.layer_norm\2.\3",
    ),
    (
        _TEXT + r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(.+)",
        r"text_encoder.text_model.encoder.layers.\1.mlp.fc1.\2",
    ),
    (
        _TEXT + r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(.+)",
        r"text_encoder.text_model.encoder.layers.\1.mlp.fc2.\2",
    ),
    (r"backbone\.language_backbone\.resizer\.(.+)", r"text_projection.\1"),
    # Geometry (exemplar box) encoder
    (
        r"geometry_encoder\.encode\.(\d+)\." + _ATTN + r"\.in_proj_(weight|bias)",
        r"geometry_encoder.layers.\1.<\2>.{qkv}_proj.\3",
    ),
    (r"geometry_encoder\.encode\.(\d+)\." + _ATTN + r"\.out_proj\.(.+)", r"geometry_encoder.layers.\1.<\2>.o_proj.\3"),
    (r"geometry_encoder\.encode\.(\d+)\.linear([12])\.(.+)", r"geometry_encoder.layers.\1.mlp.fc\2.\3"),
    (r"geometry_encoder\.encode\.(\d+)\.norm([123])\.(.+)", r"geometry_encoder.layers.\1.layer_norm\2.\3"),
    (r"geometry_encoder\.img_pre_norm\.(.+)", r"geometry_encoder.vision_layer_norm.\1"),
    (r"geometry_encoder\.norm\.(.+)", r"geometry_encoder.prompt_layer_norm.\1"),
    (r"geometry_encoder\.encode_norm\.(.+)", r"geometry_encoder.output_layer_norm.\1"),
    (r"geometry_encoder\.(label_embed|cls_embed|boxes_\w+_project|final_proj)\.(.+)", r"geometry_encoder.\1.\2"),
    # DETR encoder
    (
        r"transformer\.encoder\.layers\.(\d+)\." + _ATTN + r"\.in_proj_(weight|bias)",
        r"detr_encoder.layers.\1.<\2>.{qkv}_proj.\3",
    ),
    (r"transformer\.encoder\.layers\.(\d+)\." + _ATTN + r"\.out_proj\.(.+)", r"detr_encoder.layers.\1.<\2>.o_proj.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.(.+)", r"detr_encoder.layers.\1.mlp.fc\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm([123])\.(.+)", r"detr_encoder.layers.\1.layer_norm\2.\3"),
    # DETR decoder
    (
        r"transformer\.decoder\.layers\.(\d+)\." + _ATTN + r"\.in_proj_(weight|bias)",
        r"detr_decoder.layers.\1.<decoder:\2>.{qkv}_proj.\3",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\." + _ATTN + r"\.out_proj\.(.+)",
        r"detr_decoder.layers.\1.<decoder:\2>.o_proj.\3",
    ),
    (r"transformer\.decoder\.layers\.(\d+)\.linear([12])\.(.+)", r"detr_decoder.layers.\1.mlp.fc\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(.+)", r"detr_decoder.layers.\1.vision_cross_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)", r"detr_decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)", r"detr_decoder.layers.\1.mlp_layer_norm.\2"),
    (
        r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.(.+)",
        r"detr_decoder.layers.\1.text_cross_attn_layer_norm.\2",
    ),
    (r"transformer\.decoder\.(query_embed|reference_points|presence_token)\.(.+)", r"detr_decoder.\1.\2"),
    (r"transformer\.decoder\.norm\.(.+)", r"detr_decoder.output_layer_norm.\1"),
    (r"transformer\.decoder\.presence_token_out_norm\.(.+)", r"detr_decoder.presence_layer_norm.\1"),
    (r"transformer\.decoder\.presence_token_head\.layers\.(\d+)\.(.+)", r"detr_decoder.presence_head.layer<+1:\1>.\2"),
    (r"transformer\.decoder\.bbox_embed\.layers\.(\d+)\.(.+)", r"detr_decoder.box_head.layer<+1:\1>.\2"),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(.+)", r"detr_decoder.ref_point_head.layer<+1:\1>.\2"),
    (
        r"transformer\.decoder\.boxRPB_embed_([xy])\.layers\.(\d+)\.(.+)",
        r"detr_decoder.box_rpb_embed_\1.layer<+1:\2>.\3",
    ),
    # Scoring
    (r"dot_prod_scoring\.prompt_mlp\.layers\.(\d+)\.(.+)", r"dot_product_scoring.text_mlp.layer<+1:\1>.\2"),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.(.+)", r"dot_product_scoring.text_mlp_out_norm.\1"),
    (r"dot_prod_scoring\.prompt_proj\.(.+)", r"dot_product_scoring.text_proj.\1"),
    (r"dot_prod_scoring\.hs_proj\.(.+)", r"dot_product_scoring.query_proj.\1"),
    # Mask decoder
    (r"segmentation_head\.pixel_decoder\.(conv_layers|norms)\.(\d+)\.(.+)", r"mask_decoder.pixel_decoder.\1.\2.\3"),
    (r"segmentation_head\.mask_predictor\.mask_embed\.layers\.(\d+)\.(.+)", r"mask_decoder.mask_embedder.layers.\1.\2"),
    (r"segmentation_head\.instance_seg_head\.(.+)", r"mask_decoder.instance_projection.\1"),
    (r"segmentation_head\.semantic_seg_head\.(.+)", r"mask_decoder.semantic_projection.\1"),
    (r"segmentation_head\.cross_attend_prompt\.in_proj_(weight|bias)", r"mask_decoder.prompt_cross_attn.{qkv}_proj.\1"),
    (r"segmentation_head\.cross_attend_prompt\.out_proj\.(.+)", r"mask_decoder.prompt_cross_attn.o_proj.\1"),
    (r"segmentation_head\.cross_attn_norm\.(.+)", r"mask_decoder.prompt_cross_attn_norm.\1"),
)
_COMPILED = tuple((re.compile(f"^{pattern}$"), replacement) for pattern, replacement in _RENAMES)

# Meta attention module names -> transformers ones (the decoder calls its image cross-attention differently).
_ATTENTION_NAMES = {"self_attn": "self_attn", "cross_attn_image": "cross_attn", "cross_attn": "cross_attn"}
_DECODER_ATTENTION_NAMES = {"self_attn": "self_attn", "cross_attn": "vision_cross_attn", "ca_text": "text_cross_attn"}


class UnknownKeyError(ValueError):
    """A checkpoint key that no conversion rule and no no-counterpart rule knows; `key` is as written in the file."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no conversion rule for the key {key!r}")
        self.key = key


@dataclass(frozen=True)
class KeyPlan:
    """Where one Meta tensor goes: `targets[i]` receives chunk i (three chunks for fused q/k/v)."""

    targets: tuple[str, ...]
    transform: str  # "copy", "split_qkv", "drop_cls_position", "transpose"


def _expand(replacement: str) -> str:
    replacement = re.sub(r"<decoder:(\w+)>", lambda m: _DECODER_ATTENTION_NAMES[m.group(1)], replacement)
    replacement = re.sub(r"<\+1:(\d+)>", lambda m: str(int(m.group(1)) + 1), replacement)
    return re.sub(r"<(\w+)>", lambda m: _ATTENTION_NAMES[m.group(1)], replacement)


def plan_key(meta_key: str) -> KeyPlan | None:
    """The plan for one Meta image-model key (without `detector.`), or None when it has no counterpart.

    Raises UnknownKeyError for a key no rule knows.
    """
    if any(pattern.match(meta_key) for pattern in NO_COUNTERPART):
        return None
    for pattern, replacement in _COMPILED:
        if pattern.match(meta_key):
            target = _expand(pattern.sub(replacement, meta_key))
            if "{qkv}" in target:
                return KeyPlan(tuple(target.replace("{qkv}", part) for part in "qkv"), "split_qkv")
            if target.endswith("embeddings.position_embeddings"):
                return KeyPlan((target,), "drop_cls_position")
            if target == "text_encoder.text_projection.weight":
                return KeyPlan((target,), "transpose")
            return KeyPlan((target,), "copy")
    raise UnknownKeyError(meta_key)


def convert_shape(plan: KeyPlan, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes the plan produces from a Meta tensor of `shape`."""
    if plan.transform == "split_qkv":
        return [(shape[0] // 3, *shape[1:])] * 3
    if plan.transform == "drop_cls_position":
        return [(shape[0], shape[1] - 1, *shape[2:])]
    if plan.transform == "transpose":
        return [tuple(reversed(shape))]
    return [tuple(shape)]


def convert_tensor(plan: KeyPlan, tensor: torch.Tensor) -> list[torch.Tensor]:
    if plan.transform == "split_qkv":
        return list(tensor.chunk(3, dim=0))
    if plan.transform == "drop_cls_position":
        return [tensor[:, 1:]]
    if plan.transform == "transpose":
        return [tensor.t().contiguous()]
    return [tensor]


def image_model_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The detector's tensors from a `sam3.pt` payload, `detector.` stripped; tracker keys are left out.

    A payload without `detector.` keys is taken as a bare image-model state dict. Raises UnknownKeyError for
    any other key (named as in the file), ValueError when the payload holds no state dict.
    """
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError("the checkpoint holds no state dict (expected a mapping, possibly under 'model')")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    prefix = DETECTOR_PREFIX if any(key.startswith(DETECTOR_PREFIX) for key in tensors) else ""
    detector = {}
    for key, value in tensors.items():
        if key.startswith(TRACKER_PREFIX):
            continue
        if not key.startswith(prefix):
            raise UnknownKeyError(key)
        try:
            plan_key(key.removeprefix(prefix))
        except UnknownKeyError:
            raise UnknownKeyError(key) from None
        detector[key.removeprefix(prefix)] = value
    return detector


def convert_state_dict(meta_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta image-model tensors -> transformers names and layouts; keys with no counterpart are dropped."""
    converted: dict[str, torch.Tensor] = {}
    for meta_key, tensor in meta_state.items():
        plan = plan_key(meta_key)
        if plan is None:
            continue
        for target, part in zip(plan.targets, convert_tensor(plan, tensor), strict=True):
            converted[target] = part
    return converted
