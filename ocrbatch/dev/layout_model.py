"""Random-weight PP-DocLayout models for tests (``ocrbatch dev make-layout-model``).

The real PP-DocLayoutV2/V3 weights cannot be downloaded where this project
is tested, so tests run the ``pp-doclayout`` detector on a model of the
real architecture (``PPDocLayoutV2ForObjectDetection`` /
``PPDocLayoutV3ForObjectDetection``: HGNetV2 backbone, hybrid encoder,
RT-DETR decoder, reading-order head) with tiny dimensions and random
weights. Its boxes are noise, but every stage of detection, filtering,
ordering and cropping runs for real. The folder holds ``config.json``,
``model.safetensors`` and the ``preprocessor_config.json`` the detector
reads (800 x 800 input, pixel values in [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..layout.detect import PP_DOCLAYOUT_LABELS, PP_DOCLAYOUT_V2_THRESHOLDS

VERSIONS = ("v2", "v3")

# Reading-order class of each detection label (index-aligned with
# PP_DOCLAYOUT_LABELS), as PP-DocLayoutV2's reading-order head groups them.
_READING_ORDER_CLASSES = [4, 2, 14, 1, 5, 7, 8, 6, 11, 11, 9, 13, 10, 10, 1, 2, 3, 0, 2, 2, 12, 1, 2, 15, 6]
_CHANNELS = 32
WEIGHT_JITTER = 0.2


def _backbone(version: str) -> dict:
    # V3 also takes the first stage's features, for its mask head.
    stages = [0, 1, 2, 3] if version == "v3" else [1, 2, 3]
    return {
        "model_type": "hgnet_v2", "arch": "L", "return_idx": stages, "freeze_stem_only": True,
        "freeze_at": 0, "freeze_norm": True, "lr_mult_list": [0, 0.05, 0.05, 0.05, 0.05],
        "out_features": [f"stage{i + 1}" for i in stages],
        "stem_channels": [3, 16, 16], "hidden_sizes": [_CHANNELS] * 4,
        "stage_in_channels": [16, _CHANNELS, _CHANNELS, _CHANNELS],
        "stage_mid_channels": [16] * 4, "stage_out_channels": [_CHANNELS] * 4,
        "stage_num_blocks": [1, 1, 1, 1], "stage_numb_of_layers": [2, 2, 2, 2],
        "stage_downsample": [False, True, True, True], "stage_light_block": [False, False, True, True],
        "stage_kernel_size": [3, 3, 5, 5],
    }


def _common(version: str) -> dict:
    return dict(
        backbone_config=_backbone(version),
        encoder_hidden_dim=_CHANNELS, encoder_in_channels=[_CHANNELS] * 3, encoder_layers=1,
        encoder_ffn_dim=32, encoder_attention_heads=2,
        d_model=_CHANNELS, num_queries=40, decoder_in_channels=[_CHANNELS] * 3, decoder_ffn_dim=32,
        decoder_layers=2, decoder_attention_heads=2, decoder_n_points=2, num_denoising=0,
        id2label=dict(enumerate(PP_DOCLAYOUT_LABELS)),
        label2id={label: i for i, label in enumerate(PP_DOCLAYOUT_LABELS)},
    )


def make_layout_model(directory: str | Path, seed: int = 0, version: str = "v2") -> Path:
    """Write a tiny random PP-DocLayoutV2 (or V3) model folder and return its path.

    ``AutoModelForObjectDetection.from_pretrained`` loads it, and so does
    :func:`ocrbatch.layout.detect.load_layout` with ``name="pp-doclayout"``. The
    same ``seed`` and ``version`` give identical weights.
    """
    import torch
    from transformers import (
        PPDocLayoutV2Config,
        PPDocLayoutV2ForObjectDetection,
        PPDocLayoutV3Config,
        PPDocLayoutV3ForObjectDetection,
    )

    if version not in VERSIONS:
        raise ValueError(f"unknown PP-DocLayout version {version!r}; choose one of {', '.join(VERSIONS)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if version == "v2":
        config = PPDocLayoutV2Config(
            **_common(version),
            # The model's forward feeds only boxes that clear these to its
            # reading-order head: the official per-label detection thresholds.
            class_thresholds=[PP_DOCLAYOUT_V2_THRESHOLDS.get(label, 0.5) for label in PP_DOCLAYOUT_LABELS],
            class_order=_READING_ORDER_CLASSES,
            reading_order_config=dict(
                hidden_size=32, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                coordinate_size=6, shape_size=4, global_pointer_head_size=16,
                max_2d_position_embeddings=1024,
            ),
        )
        model_class = PPDocLayoutV2ForObjectDetection
    else:
        config = PPDocLayoutV3Config(
            **_common(version), mask_feature_channels=[16, 16], x4_feat_dim=_CHANNELS, num_prototypes=8,
            global_pointer_head_size=16,
        )
        model_class = PPDocLayoutV3ForObjectDetection
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        # With the initialisation alone every query picks the same invalid
        # anchor (boxes pinned to a page corner); jittered weights spread the
        # boxes over the page and let some of them clear the thresholds.
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn_like(param) * WEIGHT_JITTER)
    model.save_pretrained(out)
    preprocessor = {
        "image_processor_type": f"PPDocLayout{version.upper()}ImageProcessor",
        "size": {"height": 800, "width": 800}, "do_resize": True, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out
