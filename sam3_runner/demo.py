"""A tiny random-weight SAM 3 for trying the API with no weights, and for tests.

The architecture is the real one, shrunk: `Sam3Model` (the concept detector, about 256K parameters) inside
`Sam3VideoModel` (the same detector plus the tracker's neck, prompt encoder and mask decoder for visual prompts, about
540K parameters in all); its outputs are meaningless. Constraints (see the shrinking notes): pixel size equals the
ViT image size, FPN sizes follow the patch grid, every head's hidden size (the tracker's too) equals the FPN width,
and the text model holds at least 32 positions.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    Sam3Config,
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3ImageProcessor,
    Sam3MaskDecoderConfig,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerVideoConfig,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VisionConfig,
    Sam3ViTConfig,
)
from transformers.models.sam3_tracker_video.configuration_sam3_tracker_video import (
    Sam3TrackerVideoMaskDecoderConfig,
    Sam3TrackerVideoPromptEncoderConfig,
)

DEMO_IMAGE_SIZE = 56
DEMO_SEED = 0
DEMO_PRESENCE_LOGIT = 6.0
# Trained weights hold a non-zero no-memory embedding (Meta adds it to the image embedding of every visual prompt);
# transformers initialises it to zeros, which would hide where it is added.
DEMO_NO_MEMORY_EMBEDDING_STD = 0.5
# Random weights predict an IoU of ~0.5 for every candidate, so their order would hang on float noise; these output
# biases (single-mask token, then the 3 candidates) rank the candidates clearly, and not in their token order.
DEMO_IOU_LOGITS = (0.5, 1.5, -0.5, 1.0)
# Drawn at transformers' default std (0.02), the tiny tracker's mask logits are ~1e-5: every mask is noise around the
# cut, and a mask prompt or the no-memory embedding moves nothing visible. At 0.15 (hidden size 128) they are ~1, as
# trained SAM's are.
DEMO_TRACKER_INIT_STD = 0.15
# The tracker's video memory needs a hidden size above its 64 memory channels (transformers splits each object
# pointer into hidden/64 memory tokens, and its memory cross-attention reads 64 channels).
_HIDDEN = 128


def demo_config() -> Sam3Config:
    grid = DEMO_IMAGE_SIZE // 14
    vit = Sam3ViTConfig(
        hidden_size=_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=DEMO_IMAGE_SIZE,
        patch_size=14,
        window_size=2,
        global_attn_indexes=[1],
        pretrain_image_size=DEMO_IMAGE_SIZE,
    )
    vision = Sam3VisionConfig(
        backbone_config=vit,
        fpn_hidden_size=_HIDDEN,
        backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
    )
    text = CLIPTextConfig(
        vocab_size=514,
        hidden_size=_HIDDEN,
        intermediate_size=64,
        projection_dim=_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    heads = {"hidden_size": _HIDDEN, "num_attention_heads": 2, "intermediate_size": 64}
    return Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, **heads),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **heads),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=1, num_queries=8, **heads),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=_HIDDEN, num_attention_heads=2),
    )


def demo_video_config() -> Sam3VideoConfig:
    """The detector of demo_config() with a tracker of the same width (its memory parts, unused on images, minimal)."""
    detector = demo_config()
    grid = DEMO_IMAGE_SIZE // 14
    tracker = Sam3TrackerVideoConfig(
        vision_config=detector.vision_config,
        prompt_encoder_config=Sam3TrackerVideoPromptEncoderConfig(
            hidden_size=_HIDDEN, image_size=DEMO_IMAGE_SIZE, patch_size=14, mask_input_channels=8
        ),
        mask_decoder_config=Sam3TrackerVideoMaskDecoderConfig(
            hidden_size=_HIDDEN, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=_HIDDEN
        ),
        image_size=DEMO_IMAGE_SIZE,
        initializer_range=DEMO_TRACKER_INIT_STD,
        memory_attention_hidden_size=_HIDDEN,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=_HIDDEN,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=_HIDDEN,
        memory_fuser_embed_dim=_HIDDEN,
        memory_fuser_intermediate_dim=64,
        memory_fuser_num_layers=1,
    )
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=grid * 4)


def demo_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory: 256 byte symbols, their end-of-word forms, BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_demo_model() -> tuple[Sam3Model, Sam3Processor]:
    """Random weights drawn from a fixed seed, so every start of the demo gives the same answers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = Sam3Model(demo_config()).eval()
        # Random weights give presence ~0.5 and so scores ~0.25: nothing would pass the default threshold.
        # A confident presence head makes about half the queries "detections", so the demo returns masks.
        with torch.no_grad():
            model.detr_decoder.presence_head.layer3.bias.fill_(DEMO_PRESENCE_LOGIT)
    image_processor = Sam3ImageProcessor(
        size={"height": DEMO_IMAGE_SIZE, "width": DEMO_IMAGE_SIZE},
        mask_size={"height": DEMO_IMAGE_SIZE // 14 * 4, "width": DEMO_IMAGE_SIZE // 14 * 4},
    )
    processor = Sam3Processor(image_processor=image_processor, tokenizer=demo_tokenizer())
    return model, processor


def build_demo_video_model() -> tuple[Sam3VideoModel, Sam3Processor]:
    """build_demo_model()'s detector (the same weights, so concept answers do not change) with a random tracker
    drawn from the next fixed seed: concept and visual prompts, the same answers at every start."""
    detector, processor = build_demo_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED + 1)
        model = Sam3VideoModel(demo_video_config()).eval()
        with torch.no_grad():
            model.tracker_model.no_memory_embedding.normal_(std=DEMO_NO_MEMORY_EMBEDDING_STD)
            model.tracker_model.mask_decoder.iou_prediction_head.proj_out.bias.copy_(torch.tensor(DEMO_IOU_LOGITS))
            # Meta's tracker has one random-Fourier matrix for points and for the image; transformers keeps two
            # copies (the hub's hold the same values), drawn apart at random initialisation.
            fourier = model.tracker_model.prompt_encoder.shared_embedding.positional_embedding
            model.tracker_model.shared_image_embedding.positional_embedding.copy_(fourier)
    model.detector_model = detector
    return model, processor
