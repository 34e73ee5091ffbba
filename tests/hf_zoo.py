"""Third-party BatchNorm models: Hugging Face ``transformers`` vision, segmentation, depth, detection
backbone and time-series models, built from small configs with random weights (no download).

``HF_MODELS``: name -> :class:`HFModel` (``build()`` the ``transformers`` model, ``example(n)`` an
input of ``n`` samples, ``kind`` what it is). :class:`Head` wraps a model so that it returns one
tensor (``logits``, ``predicted_depth``, the last feature map, ...) and turns dropout and drop-path
off (the parity tests compare single training steps). The configs are tiny: a forward pass of any
model here takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import transformers as T
from torch import Tensor, nn

__all__ = ["HF_MODELS", "HFModel", "Head", "build_head", "output_tensor"]


def output_tensor(out: Any) -> Tensor:
    """The tensor a test compares from a ``transformers`` output."""
    if isinstance(out, Tensor):
        return out
    for key in (
        "logits",
        "predicted_depth",
        "feature_maps",
        "prediction_outputs",
        "last_hidden_state",
    ):
        value = getattr(out, key, None)
        if value is not None:
            return value[-1] if isinstance(value, (tuple, list)) else value
    return out[0]


class Head(nn.Module):
    """``model(x)`` as one tensor; dropout and stochastic depth off."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return output_tensor(self.model(x))


@dataclasses.dataclass(frozen=True)
class HFModel:
    build: Callable[[], nn.Module]
    example: Callable[[int], Tensor]
    kind: str


def _image(size: int = 32) -> Callable[[int], Tensor]:
    def make(n: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g)

    return make


def _series(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, 3, generator=g)


def _resnet_config(**kw: Any) -> Any:
    return T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **kw)


def _mobilenet_v2_config() -> Any:
    return T.MobileNetV2Config(depth_multiplier=0.25, num_labels=3, image_size=32)


def _mobilevit_config(**kw: Any) -> Any:
    return T.MobileViTConfig(
        image_size=32,
        hidden_sizes=[16, 16, 16],
        neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
        num_attention_heads=2,
        num_labels=3,
        **kw,
    )


def _glpn_like(**kw: Any) -> dict[str, Any]:
    return dict(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        **kw,
    )


HF_MODELS: dict[str, HFModel] = {
    "resnet": HFModel(
        lambda: T.ResNetForImageClassification(_resnet_config(num_labels=3)),
        _image(),
        "classification",
    ),
    "mobilenet_v1": HFModel(
        lambda: T.MobileNetV1ForImageClassification(
            T.MobileNetV1Config(depth_multiplier=0.25, num_labels=3, image_size=32)
        ),
        _image(),
        "classification",
    ),
    "mobilenet_v2": HFModel(
        lambda: T.MobileNetV2ForImageClassification(_mobilenet_v2_config()),
        _image(),
        "classification",
    ),
    "efficientnet": HFModel(
        lambda: T.EfficientNetForImageClassification(
            T.EfficientNetConfig(
                width_coefficient=0.1,
                depth_coefficient=0.1,
                image_size=32,
                num_labels=3,
                hidden_dim=128,
            )
        ),
        _image(),
        "classification",
    ),
    "regnet": HFModel(
        lambda: T.RegNetForImageClassification(
            T.RegNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=3
            )
        ),
        _image(),
        "classification",
    ),
    "mobilevit": HFModel(
        lambda: T.MobileViTForImageClassification(_mobilevit_config()),
        _image(),
        "hybrid transformer",
    ),
    "mobilevitv2": HFModel(
        lambda: T.MobileViTV2ForImageClassification(
            T.MobileViTV2Config(image_size=64, width_multiplier=0.25, num_labels=3)
        ),
        _image(64),
        "hybrid transformer",
    ),
    "levit": HFModel(
        lambda: T.LevitForImageClassification(
            T.LevitConfig(
                image_size=32,
                hidden_sizes=[16, 24, 32],
                num_attention_heads=[1, 2, 2],
                depths=[1, 1, 1],
                key_dim=[8, 8, 8],
                num_labels=3,
            )
        ),
        _image(),
        "hybrid transformer (BatchNorm1d over merged tokens)",
    ),
    "cvt": HFModel(
        lambda: T.CvtForImageClassification(
            T.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=3)
        ),
        _image(),
        "hybrid transformer",
    ),
    "swiftformer": HFModel(
        lambda: T.SwiftFormerForImageClassification(
            T.SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_labels=3)
        ),
        _image(),
        "hybrid transformer",
    ),
    "mobilenet_v2_deeplab": HFModel(
        lambda: T.MobileNetV2ForSemanticSegmentation(_mobilenet_v2_config()),
        _image(),
        "segmentation",
    ),
    "mobilevit_deeplab": HFModel(
        lambda: T.MobileViTForSemanticSegmentation(_mobilevit_config(aspp_out_channels=16)),
        _image(),
        "segmentation",
    ),
    "segformer": HFModel(
        lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(**_glpn_like(num_labels=3))),
        _image(),
        "segmentation",
    ),
    "upernet_resnet": HFModel(
        lambda: T.UperNetForSemanticSegmentation(
            T.UperNetConfig(
                backbone_config=T.ResNetConfig(
                    embedding_size=8,
                    hidden_sizes=[8, 16, 16, 16],
                    depths=[1, 1, 1, 1],
                    out_features=["stage1", "stage2", "stage3", "stage4"],
                ),
                hidden_size=16,
                auxiliary_in_channels=16,
                num_labels=3,
            )
        ),
        _image(),
        "segmentation",
    ),
    "glpn": HFModel(
        lambda: T.GLPNForDepthEstimation(T.GLPNConfig(**_glpn_like())), _image(), "depth"
    ),
    "dpt": HFModel(
        lambda: T.DPTForDepthEstimation(
            T.DPTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=32,
                backbone_out_indices=[0, 1, 2, 3],
                neck_hidden_sizes=[8, 8, 16, 16],
                fusion_hidden_size=16,
                head_in_index=-1,
                use_batch_norm_in_fusion_residual=True,
                reassemble_factors=[4, 2, 1, 0.5],
            )
        ),
        _image(),
        "depth",
    ),
    "resnet_backbone": HFModel(
        lambda: T.ResNetBackbone(_resnet_config(out_features=["stage1", "stage2"])),
        _image(),
        "detection backbone",
    ),
    "rt_detr_resnet_backbone": HFModel(
        lambda: T.RTDetrResNetBackbone(
            T.RTDetrResNetConfig(
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                out_features=["stage1", "stage2"],
            )
        ),
        _image(),
        "detection backbone",
    ),
    "hgnet_v2_backbone": HFModel(
        lambda: T.HGNetV2Backbone(
            T.HGNetV2Config(
                stem_channels=[3, 8, 8],
                stage_in_channels=[8, 16],
                stage_mid_channels=[8, 8],
                stage_out_channels=[16, 16],
                stage_num_blocks=[1, 1],
                stage_numb_of_layers=[2, 2],
                stage_downsample=[False, True],
                stage_light_block=[False, False],
                stage_kernel_size=[3, 3],
                hidden_sizes=[16, 16],
                depths=[1, 1],
                out_features=["stage1", "stage2"],
            )
        ),
        _image(),
        "detection backbone",
    ),
    "textnet_backbone": HFModel(
        lambda: T.TextNetBackbone(
            T.TextNetConfig(
                stem_num_channels=3,
                stem_out_channels=8,
                conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
                conv_layer_stride=[[1], [2], [2], [2]],
                hidden_sizes=[8, 8, 16, 16, 16],
                out_features=["stage1", "stage2"],
            )
        ),
        _image(),
        "detection backbone",
    ),
    "patchtst": HFModel(
        lambda: T.PatchTSTForPrediction(
            T.PatchTSTConfig(
                num_input_channels=3,
                context_length=32,
                patch_length=8,
                patch_stride=8,
                prediction_length=4,
                d_model=16,
                num_attention_heads=2,
                num_hidden_layers=1,
                ffn_dim=16,
                norm_type="batchnorm",
            )
        ),
        _series,
        "time series (BatchNorm over batch x channels)",
    ),
}


def build_head(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The model ``name`` wrapped in :class:`Head`, seeded, in ``dtype``, in training mode."""
    torch.manual_seed(0)
    return Head(HF_MODELS[name].build()).to(dtype).train()
