"""Meta's original `sam3.pt` -> transformers `Sam3Model` (the detector) or `Sam3VideoModel` (detector + tracker).

A `sam3.pt` holds 1465 tensors (as Meta's `sam3` 0.1.4 package builds the model it loads strictly): 1156 under
`detector.` (Meta's image model, its SAM 2 neck included) and 309 under `tracker.` (the interactive tracker: prompt
encoder, mask decoder, memory attention and memory encoder; it has no ViT of its own and reads the detector's trunk
through the SAM 2 neck). `Sam3VideoModel` holds the same modules under
transformers names: `detector_model.*` (a `Sam3Model`), `tracker_neck.*` (the SAM 2 neck) and `tracker_model.*`
(a `Sam3TrackerVideoModel` without a vision encoder).

Each Meta key gets a plan: the transformers key(s) it feeds and how its tensor changes on the way (fused q/k/v split
in three, the ViT CLS position dropped, the CLIP text projection transposed, the prompt encoder's four point embeddings
stacked into one table, its random-Fourier position matrix copied to the two places transformers keeps it). Plans work
on shapes as well as tensors, so the whole table is testable without real weights. The names follow transformers'
own converters (`models/sam3/convert_sam3_to_hf.py`, `models/sam3_video/convert_sam3_video_to_hf.py`).

Meta keys with no counterpart (dropped; see `no_counterpart`):
- `backbone.vision_backbone.trunk.blocks.*.attn.freqs_cis` (32): the ViT's precomputed rope tables; transformers
  recomputes them from the config.
- `geometry_encoder.points_{direct,pool,pos_enc}_project.*` (6): the detector's point-prompt projections; transformers'
  `Sam3Model` takes no point prompts (points go to the tracker).
- for the image model only, `backbone.vision_backbone.sam2_convs.*` (22): the tracker's neck (`tracker_neck.*` in
  `Sam3VideoModel`).
Every `tracker.*` key has a counterpart in `Sam3VideoModel`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DETECTOR_PREFIX = "detector."
TRACKER_PREFIX = "tracker."  # the interactive tracker (`Sam3VideoModel.tracker_model`): never part of the image model

# The SAM 2 neck the tracker reads the trunk through: 22 keys `sam2_convs.{0..3}.*`, laid out like `convs`
# (Meta's video builder loads them into the detector). `Sam3VideoModel` holds it as `tracker_neck.*`.
SAM2_NECK = re.compile(
    r"^backbone\.vision_backbone\.sam2_convs\.\d+\.(dconv_2x2(_[01])?|conv_1x1|conv_3x3)\.(weight|bias)$"
)

# Meta detector keys (without `detector.`) that no transformers model holds, and why.
_NO_COUNTERPART = (
    (
        re.compile(r"^backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis$"),
        "the ViT's precomputed rope table: transformers recomputes it",
    ),
    (
        re.compile(r"^geometry_encoder\.points_(direct|pool|pos_enc)_project\.(weight|bias)$"),
        "a point-prompt projection of the detector: transformers' Sam3Model takes no point prompts",
    ),
)
# ... and the image model (`Sam3Model`) has no tracker neck either.
NO_COUNTERPART = tuple(pattern for pattern, _reason in _NO_COUNTERPART) + (SAM2_NECK,)

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

# The SAM 2 neck (`detector.backbone.vision_backbone.sam2_convs.*`) -> `tracker_neck.*`: laid out like the detector's.
_TRACKER_NECK_RENAMES: tuple[tuple[str, str], ...] = (
    (r"backbone\.vision_backbone\.sam2_convs\.(\d+)\.dconv_2x2(_0)?\.(.+)", r"fpn_layers.\1.scale_layers.0.\3"),
    (r"backbone\.vision_backbone\.sam2_convs\.(\d+)\.dconv_2x2_1\.(.+)", r"fpn_layers.\1.scale_layers.2.\2"),
    (r"backbone\.vision_backbone\.sam2_convs\.(\d+)\.conv_1x1\.(.+)", r"fpn_layers.\1.proj1.\2"),
    (r"backbone\.vision_backbone\.sam2_convs\.(\d+)\.conv_3x3\.(.+)", r"fpn_layers.\1.proj2.\2"),
)

_PROMPT = r"sam_prompt_encoder\."
_MASK = r"sam_mask_decoder\."
# The mask decoder's three-layer MLPs: Meta's `layers.{0,1,2}` are transformers' `proj_in`, `layers.0`, `proj_out`.
_HEAD = r"(iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+)"
_TWO_WAY = r"transformer\.(layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)|final_attn_token_to_image)"
_MEMORY = r"transformer\.encoder\."
_DOWNSAMPLER = r"maskmem_backbone\.mask_downsampler\.encoder\."

# Meta's tracker (without `tracker.`) -> `Sam3VideoModel.tracker_model` (without `tracker_model.`), as in
# `_RENAMES`; besides, `a | b` means the one tensor feeds both keys (transformers keeps the prompt encoder's
# Fourier matrix twice) and `name[\1]` that the tensor is row \1 of `name` (the point embeddings are one table).
_TRACKER_RENAMES: tuple[tuple[str, str], ...] = (
    # Prompt encoder
    (
        _PROMPT + r"pe_layer\.positional_encoding_gaussian_matrix",
        r"prompt_encoder.shared_embedding.positional_embedding | shared_image_embedding.positional_embedding",
    ),
    (_PROMPT + r"point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.weight[\1]"),
    (_PROMPT + r"(no_mask_embed|not_a_point_embed)\.weight", r"prompt_encoder.\1.weight"),
    (_PROMPT + r"mask_downscaling\.0\.(.+)", r"prompt_encoder.mask_embed.conv1.\1"),
    (_PROMPT + r"mask_downscaling\.1\.(.+)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (_PROMPT + r"mask_downscaling\.3\.(.+)", r"prompt_encoder.mask_embed.conv2.\1"),
    (_PROMPT + r"mask_downscaling\.4\.(.+)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (_PROMPT + r"mask_downscaling\.6\.(.+)", r"prompt_encoder.mask_embed.conv3.\1"),
    # Mask decoder (conv_s0 / conv_s1 project the neck's 4x and 2x levels for its upscaling path)
    (_MASK + r"(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    (_MASK + r"(conv_s[01])\.(.+)", r"mask_decoder.\1.\2"),
    (_MASK + r"output_upscaling\.0\.(.+)", r"mask_decoder.upscale_conv1.\1"),
    (_MASK + r"output_upscaling\.1\.(.+)", r"mask_decoder.upscale_layer_norm.\1"),
    (_MASK + r"output_upscaling\.3\.(.+)", r"mask_decoder.upscale_conv2.\1"),
    (_MASK + _HEAD + r"\.layers\.0\.(.+)", r"mask_decoder.\1.proj_in.\2"),
    (_MASK + _HEAD + r"\.layers\.1\.(.+)", r"mask_decoder.\1.layers.0.\2"),
    (_MASK + _HEAD + r"\.layers\.2\.(.+)", r"mask_decoder.\1.proj_out.\2"),
    (_MASK + _TWO_WAY + r"\.([qkv])_proj\.(.+)", r"mask_decoder.transformer.\1.\2_proj.\3"),
    (_MASK + _TWO_WAY + r"\.out_proj\.(.+)", r"mask_decoder.transformer.\1.o_proj.\2"),
    (_MASK + r"transformer\.layers\.(\d+)\.mlp\.lin1\.(.+)", r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2"),
    (_MASK + r"transformer\.layers\.(\d+)\.mlp\.lin2\.(.+)", r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2"),
    (_MASK + r"transformer\.layers\.(\d+)\.norm([1-4])\.(.+)", r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (_MASK + r"transformer\.norm_final_attn\.(.+)", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    # Memory attention (Meta's `transformer.encoder`)
    (
        _MEMORY + r"layers\.(\d+)\.(self_attn|cross_attn_image)\.([qkv])_proj\.(.+)",
        r"memory_attention.layers.\1.\2.\3_proj.\4",
    ),
    (
        _MEMORY + r"layers\.(\d+)\.(self_attn|cross_attn_image)\.out_proj\.(.+)",
        r"memory_attention.layers.\1.\2.o_proj.\3",
    ),
    (_MEMORY + r"layers\.(\d+)\.linear([12])\.(.+)", r"memory_attention.layers.\1.linear\2.\3"),
    (_MEMORY + r"layers\.(\d+)\.norm([123])\.(.+)", r"memory_attention.layers.\1.layer_norm\2.\3"),
    (_MEMORY + r"norm\.(.+)", r"memory_attention.layer_norm.\1"),
    # Memory encoder (Meta's `maskmem_backbone`): the mask downsampler's Sequential is (conv, norm, GELU) x 4 + conv
    (_DOWNSAMPLER + r"12\.(.+)", r"memory_encoder.mask_downsampler.final_conv.\1"),
    (_DOWNSAMPLER + r"(0|3|6|9)\.(.+)", r"memory_encoder.mask_downsampler.layers.<div3:\1>.conv.\2"),
    (_DOWNSAMPLER + r"(1|4|7|10)\.(.+)", r"memory_encoder.mask_downsampler.layers.<div3:\1>.layer_norm.\2"),
    (
        r"maskmem_backbone\.fuser\.layers\.(\d+)\.dwconv\.(.+)",
        r"memory_encoder.memory_fuser.layers.\1.depthwise_conv.\2",
    ),
    (
        r"maskmem_backbone\.fuser\.layers\.(\d+)\.pwconv([12])\.(.+)",
        r"memory_encoder.memory_fuser.layers.\1.pointwise_conv\2.\3",
    ),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.norm\.(.+)", r"memory_encoder.memory_fuser.layers.\1.layer_norm.\2"),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.gamma", r"memory_encoder.memory_fuser.layers.\1.scale"),
    (r"maskmem_backbone\.pix_feat_proj\.(.+)", r"memory_encoder.feature_projection.\1"),
    (r"maskmem_backbone\.out_proj\.(.+)", r"memory_encoder.projection.\1"),
    # Memory and object-pointer embeddings
    (r"no_mem_embed", r"no_memory_embedding"),
    (r"no_mem_pos_enc", r"no_memory_positional_encoding"),
    (r"maskmem_tpos_enc", r"memory_temporal_positional_encoding"),
    (r"no_obj_ptr", r"no_object_pointer"),
    (r"no_obj_embed_spatial", r"occlusion_spatial_embedding_parameter"),
    (r"mask_downsample\.(weight|bias)", r"mask_downsample.\1"),
    (r"obj_ptr_proj\.layers\.0\.(.+)", r"object_pointer_proj.proj_in.\1"),
    (r"obj_ptr_proj\.layers\.1\.(.+)", r"object_pointer_proj.layers.0.\1"),
    (r"obj_ptr_proj\.layers\.2\.(.+)", r"object_pointer_proj.proj_out.\1"),
    (r"obj_ptr_tpos_proj\.(.+)", r"temporal_positional_encoding_projection_layer.\1"),
)
_TRACKER_NECK_COMPILED = tuple((re.compile(f"^{p}$"), r) for p, r in _TRACKER_NECK_RENAMES)
_TRACKER_COMPILED = tuple((re.compile(f"^{p}$"), r) for p, r in _TRACKER_RENAMES)

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
    """Where one Meta tensor goes: `targets[i]` receives chunk i (three chunks for fused q/k/v).

    transform: "copy"; "split_qkv" (chunks along dim 0); "drop_cls_position" (dim 1 loses its first entry);
    "transpose"; "duplicate" (every target gets the whole tensor); "row" (the tensor is row `row` of the one
    target: a target's rows are stacked along dim 0 in `row` order).
    """

    targets: tuple[str, ...]
    transform: str
    row: int = 0


def _expand(replacement: str) -> str:
    replacement = re.sub(r"<decoder:(\w+)>", lambda m: _DECODER_ATTENTION_NAMES[m.group(1)], replacement)
    replacement = re.sub(r"<\+1:(\d+)>", lambda m: str(int(m.group(1)) + 1), replacement)
    replacement = re.sub(r"<div3:(\d+)>", lambda m: str(int(m.group(1)) // 3), replacement)
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


def no_counterpart(meta_key: str) -> str | None:
    """Why a full `sam3.pt` key (with its `detector.` / `tracker.` prefix) has no `Sam3VideoModel` counterpart,
    or None when it has one (or is unknown)."""
    detector_key = meta_key.removeprefix(DETECTOR_PREFIX)
    if detector_key == meta_key:
        return None
    return next((reason for pattern, reason in _NO_COUNTERPART if pattern.match(detector_key)), None)


def _renamed(table: tuple[tuple[re.Pattern[str], str], ...], key: str, prefix: str) -> KeyPlan | None:
    for pattern, replacement in table:
        if pattern.match(key):
            target = _expand(pattern.sub(replacement, key))
            row = re.fullmatch(r"(.+)\[(\d+)\]", target)
            if row:
                return KeyPlan((prefix + row.group(1),), "row", int(row.group(2)))
            targets = tuple(prefix + name for name in target.split(" | "))
            return KeyPlan(targets, "duplicate" if len(targets) > 1 else "copy")
    return None


def plan_video_key(meta_key: str) -> KeyPlan | None:
    """The plan for one key of a full `sam3.pt` (with its `detector.` / `tracker.` prefix) into `Sam3VideoModel`,
    or None when it has no counterpart (`no_counterpart` says why).

    Raises UnknownKeyError (naming the key as given) for a key no rule knows.
    """
    if no_counterpart(meta_key):
        return None
    if meta_key.startswith(TRACKER_PREFIX):
        plan = _renamed(_TRACKER_COMPILED, meta_key.removeprefix(TRACKER_PREFIX), "tracker_model.")
    elif meta_key.startswith(DETECTOR_PREFIX):
        detector_key = meta_key.removeprefix(DETECTOR_PREFIX)
        plan = _renamed(_TRACKER_NECK_COMPILED, detector_key, "tracker_neck.")
        if plan is None:
            try:
                image_plan = plan_key(detector_key)  # not the SAM 2 neck here, so never None
            except UnknownKeyError:
                raise UnknownKeyError(meta_key) from None
            plan = KeyPlan(tuple("detector_model." + t for t in image_plan.targets), image_plan.transform)
    else:
        plan = None
    if plan is None:
        raise UnknownKeyError(meta_key)
    return plan


def convert_shape(plan: KeyPlan, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes the plan produces from a Meta tensor of `shape` (for "row": this tensor's rows only)."""
    if plan.transform == "split_qkv":
        return [(shape[0] // 3, *shape[1:])] * 3
    if plan.transform == "drop_cls_position":
        return [(shape[0], shape[1] - 1, *shape[2:])]
    if plan.transform == "transpose":
        return [tuple(reversed(shape))]
    return [tuple(shape)] * len(plan.targets)


def convert_tensor(plan: KeyPlan, tensor: torch.Tensor) -> list[torch.Tensor]:
    if plan.transform == "split_qkv":
        return list(tensor.chunk(3, dim=0))
    if plan.transform == "drop_cls_position":
        return [tensor[:, 1:]]
    if plan.transform == "transpose":
        return [tensor.t().contiguous()]
    if plan.transform == "duplicate":
        return [tensor] + [tensor.clone() for _ in plan.targets[1:]]
    return [tensor]


def _tensors(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError("the checkpoint holds no state dict (expected a mapping, possibly under 'model')")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def holds_tracker(checkpoint: Mapping[str, object]) -> bool:
    """Whether a `sam3.pt` payload holds the tracker (`tracker.*` keys, possibly under 'model'), as Meta's full
    sam3.pt does. Raises ValueError when the payload holds no state dict."""
    return any(key.startswith(TRACKER_PREFIX) for key in _tensors(checkpoint))


def image_model_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The detector's tensors from a `sam3.pt` payload, `detector.` stripped; tracker keys are left out.

    A payload without `detector.` keys is taken as a bare image-model state dict. Raises UnknownKeyError for
    any other key (named as in the file), ValueError when the payload holds no state dict.
    """
    tensors = _tensors(checkpoint)
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


def video_model_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A full `sam3.pt` payload (`detector.*` and `tracker.*`, possibly under 'model') -> the state dict of
    transformers' `Sam3VideoModel`: `detector_model.*`, `tracker_neck.*` and `tracker_model.*`, in transformers'
    layouts (see `KeyPlan`); keys with no counterpart (`no_counterpart`) are dropped. Dtypes are kept.

    For the released checkpoint the result loads with `strict=True` into `Sam3VideoModel(Sam3VideoConfig())`.
    Raises UnknownKeyError for a key no rule knows (named as in the file), ValueError when the payload holds no
    state dict, lacks the detector or the tracker, or misses one of the rows of a stacked table.
    """
    tensors = _tensors(checkpoint)
    for prefix, part in ((DETECTOR_PREFIX, "image model"), (TRACKER_PREFIX, "tracker")):
        if not any(key.startswith(prefix) for key in tensors):
            raise ValueError(f"the checkpoint holds no {part} (no `{prefix}*` keys); Meta's sam3.pt has both")
    converted: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        plan = plan_video_key(key)
        if plan is None:
            continue
        if plan.transform == "row":
            rows.setdefault(plan.targets[0], {})[plan.row] = tensor
            continue
        for target, part in zip(plan.targets, convert_tensor(plan, tensor), strict=True):
            converted[target] = part
    for target, pieces in rows.items():
        if sorted(pieces) != list(range(len(pieces))):
            raise ValueError(f"the checkpoint has rows {sorted(pieces)} of {target}, not 0..{len(pieces) - 1}")
        converted[target] = torch.cat([pieces[row] for row in range(len(pieces))])
    return converted
